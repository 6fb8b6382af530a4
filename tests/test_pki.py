"""The federation CA and startup kits: files and modes, certificate checks, and mTLS on a real
gRPC server on 127.0.0.1 (a generic handler, no protos) that names its caller."""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl
from collections.abc import Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from protos import pki
from protos.pki import PKIError

SERVICE, METHOD = "fedpt.test.Echo", "WhoAmI"
RPC_TIMEOUT = 5.0


@dataclass
class Federation:
    root: Path
    ca_dir: Path
    acme: pki.StartupKit
    server: pki.StartupKit
    other_acme: pki.StartupKit  # the same organisation name, from another federation's CA


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    root = tmp_path_factory.mktemp("pki")
    pki.init_ca(root / "ca")
    pki.init_ca(root / "other-ca", name="someone else's CA")
    pki.issue_kit(root / "ca", "acme", root / "kits" / "acme")
    pki.issue_kit(root / "ca", "aggregator", root / "kits" / "agg", server_hosts=["127.0.0.1"])
    pki.issue_kit(root / "other-ca", "acme", root / "kits" / "other-acme")
    return Federation(
        root,
        root / "ca",
        pki.load_kit(root / "kits" / "acme"),
        pki.load_kit(root / "kits" / "agg"),
        pki.load_kit(root / "kits" / "other-acme"),
    )


# ---- files ------------------------------------------------------------------------------------
def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_init_ca_writes_a_signing_only_ca(fed: Federation) -> None:
    assert mode(fed.ca_dir / pki.CA_KEY) == 0o600
    cert = x509.load_pem_x509_certificate((fed.ca_dir / pki.CA_CERT).read_bytes())
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    cert.verify_directly_issued_by(cert)  # self-signed
    key = serialization.load_pem_private_key((fed.ca_dir / pki.CA_KEY).read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"


def test_init_ca_refuses_to_overwrite(fed: Federation) -> None:
    before = (fed.ca_dir / pki.CA_KEY).read_bytes()
    with pytest.raises(PKIError, match="already holds a CA"):
        pki.init_ca(fed.ca_dir)
    assert (fed.ca_dir / pki.CA_KEY).read_bytes() == before


def test_issue_and_load_kit_round_trip(fed: Federation) -> None:
    kit_dir = fed.root / "kits" / "acme"
    assert sorted(p.name for p in kit_dir.iterdir()) == sorted(pki.KIT_FILES)
    assert mode(kit_dir / pki.NODE_KEY) == mode(kit_dir / pki.IDENTITY_KEY) == 0o600
    assert mode(kit_dir) == 0o700
    assert (kit_dir / pki.CA_CERT).read_bytes() == (fed.ca_dir / pki.CA_CERT).read_bytes()

    kit = fed.acme
    assert kit.organisation == "acme" and kit.directory == kit_dir
    assert kit.ca_pem == (fed.ca_dir / pki.CA_CERT).read_bytes()
    cert = x509.load_pem_x509_certificate(kit.cert_pem)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "acme"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "acme"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]  # a node's kit cannot serve TLS
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    identity_hex = kit.identity_key.public_key().public_bytes_raw().hex()
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        pki.ORG_URI_PREFIX + "acme",
        pki.IDENTITY_URI_PREFIX + identity_hex,
    ]
    assert san.get_values_for_type(x509.DNSName) == []
    pub = serialization.load_pem_public_key((kit_dir / pki.IDENTITY_PUB).read_bytes())
    assert pub == kit.identity_key.public_key()
    peer = pki.verify_certificate(kit.cert_pem, kit.ca_pem)
    assert peer.organisation == "acme" and peer.identity_hex == identity_hex


def test_server_kit_names_its_hosts(fed: Federation) -> None:
    pki.issue_kit(fed.ca_dir, "agg2", fed.root / "agg2",
                  server_hosts=["127.0.0.1", "agg.example.org", "::1", "127.0.0.1"])  # fmt: skip
    cert = x509.load_pem_x509_certificate(pki.load_kit(fed.root / "agg2").cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["agg.example.org"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]  # a server only: it cannot join


def test_issue_kit_refuses_to_overwrite(fed: Federation) -> None:
    kit_dir = fed.root / "kits" / "acme"
    before = (kit_dir / pki.IDENTITY_KEY).read_bytes()
    with pytest.raises(PKIError, match="already holds a startup kit"):
        pki.issue_kit(fed.ca_dir, "acme", kit_dir)
    assert (kit_dir / pki.IDENTITY_KEY).read_bytes() == before


@pytest.mark.parametrize("name", ["", "a b", "x" * 65, "../evil", "a/b", "ünï", ".", "..", "a\n"])
def test_bad_organisation_names_are_refused(fed: Federation, name: str) -> None:
    with pytest.raises(PKIError, match="is not valid"):
        pki.issue_kit(fed.ca_dir, name, fed.root / "bad-name")
    assert not (fed.root / "bad-name").exists()


@pytest.mark.parametrize("host", ["", "under_score.org", "-lead.org", "a..b", "h" * 64])
def test_bad_server_hosts_are_refused(fed: Federation, host: str) -> None:
    with pytest.raises(PKIError, match="neither an IP address nor a DNS name"):
        pki.issue_kit(fed.ca_dir, "h", fed.root / "bad-host", server_hosts=[host])


def test_issue_kit_needs_a_ca(tmp_path: Path) -> None:
    with pytest.raises(PKIError, match="no such CA folder"):
        pki.issue_kit(tmp_path / "nope", "acme", tmp_path / "kit")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / pki.CA_CERT).write_bytes(b"")
    with pytest.raises(PKIError, match=r"ca\.crt: not a PEM"):
        pki.issue_kit(tmp_path / "half", "acme", tmp_path / "kit")


def copy_kit(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in pki.KIT_FILES:
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        ("missing node.key", r"node\.key: missing"),
        ("foreign identity.key", r"identity\.key: does not match the identity key bound"),
        ("foreign node.key", r"node\.key: does not match"),
        ("foreign ca.crt", r"node\.crt: .* is not signed by the federation CA"),
        ("stale identity.pub", r"identity\.pub: does not match"),
        ("garbage node.crt", r"node\.crt: certificate is not a PEM"),
    ],
)
def test_load_kit_names_the_broken_file(
    fed: Federation, tmp_path: Path, broken: str, message: str
) -> None:
    kit = copy_kit(fed.root / "kits" / "acme", tmp_path / "kit")
    other = fed.root / "kits" / "agg"  # same CA, different keys
    what, name = broken.split()
    if what == "missing":
        (kit / name).unlink()
    elif what == "garbage":
        (kit / name).write_bytes(b"-----BEGIN CERTIFICATE-----\nnope\n")
    elif name == pki.CA_CERT:
        (kit / name).write_bytes((fed.root / "other-ca" / pki.CA_CERT).read_bytes())
    else:
        (kit / name).write_bytes((other / name).read_bytes())
    with pytest.raises(PKIError, match=message):
        pki.load_kit(kit)


# ---- verify_certificate -----------------------------------------------------------------------
def forge(
    ca_dir: Path,
    *,
    uris: Sequence[str] = (),
    hosts: Sequence[x509.GeneralName] = (),
    eku: Sequence[x509.ObjectIdentifier] = (ExtendedKeyUsageOID.CLIENT_AUTH,),
    authority_key_id: bool = True,
) -> tuple[bytes, bytes]:
    """A certificate (PEM) and key signed by the CA in `ca_dir` but not made by issue_kit."""
    ca_cert = x509.load_pem_x509_certificate((ca_dir / pki.CA_CERT).read_bytes())
    ca_key = serialization.load_pem_private_key((ca_dir / pki.CA_KEY).read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "forged")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [*(x509.UniformResourceIdentifier(u) for u in uris), *hosts]
            ),
            critical=False,
        )
    )
    if authority_key_id:  # RFC 5280 requires it; path validation refuses a leaf without one
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
        builder = builder.add_extension(aki, critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def test_verify_certificate_accepts_a_good_one(fed: Federation) -> None:
    peer = pki.verify_certificate(fed.acme.cert_pem, fed.acme.ca_pem)
    assert peer.organisation == "acme"
    assert peer.identity_public == fed.acme.identity_key.public_key()
    server = pki.verify_certificate(fed.server.cert_pem, fed.acme.ca_pem, role="server")
    assert server.organisation == "aggregator"
    assert server.identity_public == fed.server.identity_key.public_key()


def test_each_kit_is_certified_for_its_own_role_only(fed: Federation) -> None:
    with pytest.raises(PKIError, match="required EKU not found"):
        pki.verify_certificate(fed.server.cert_pem, fed.acme.ca_pem)  # as a node
    with pytest.raises(PKIError, match="names no host name: it is no server certificate"):
        pki.verify_certificate(fed.acme.cert_pem, fed.acme.ca_pem, role="server")


def test_verify_certificate_rejects_another_cas_certificate(fed: Federation) -> None:
    with pytest.raises(PKIError, match="not signed by the federation CA"):
        pki.verify_certificate(fed.other_acme.cert_pem, fed.acme.ca_pem)


def test_verify_certificate_rejects_outside_its_validity(fed: Federation) -> None:
    pki.issue_kit(fed.ca_dir, "brief", fed.root / "brief", days=1)
    cert_pem = pki.load_kit(fed.root / "brief").cert_pem
    now = dt.datetime.now(dt.UTC)
    pki.verify_certificate(cert_pem, fed.acme.ca_pem, now=now + dt.timedelta(hours=23))
    with pytest.raises(PKIError, match="expired on"):
        pki.verify_certificate(cert_pem, fed.acme.ca_pem, now=now + dt.timedelta(days=2))
    with pytest.raises(PKIError, match="not valid before"):
        pki.verify_certificate(cert_pem, fed.acme.ca_pem, now=now - dt.timedelta(days=1))


def test_verify_certificate_rejects_a_tampered_certificate(fed: Federation) -> None:
    """Swap the bound identity key for another one: the DER still parses, the signature fails."""
    der = x509.load_pem_x509_certificate(fed.acme.cert_pem).public_bytes(serialization.Encoding.DER)
    mine = fed.acme.identity_key.public_key().public_bytes_raw().hex().encode()
    theirs = fed.server.identity_key.public_key().public_bytes_raw().hex().encode()
    assert der.count(mine) == 1
    tampered = x509.load_der_x509_certificate(der.replace(mine, theirs))
    with pytest.raises(PKIError, match="not signed by the federation CA"):
        pki.verify_certificate(tampered.public_bytes(serialization.Encoding.PEM), fed.acme.ca_pem)


def test_verify_certificate_rejects_ambiguous_or_odd_certificates(fed: Federation) -> None:
    key_uri = pki.IDENTITY_URI_PREFIX + "ab" * 32
    two_orgs, _ = forge(
        fed.ca_dir, uris=[pki.ORG_URI_PREFIX + "a", pki.ORG_URI_PREFIX + "b", key_uri]
    )
    with pytest.raises(PKIError, match="exactly one organisation and one identity key"):
        pki.verify_certificate(two_orgs, fed.acme.ca_pem)
    no_key, _ = forge(fed.ca_dir, uris=[pki.ORG_URI_PREFIX + "a"])
    with pytest.raises(PKIError, match="exactly one organisation and one identity key"):
        pki.verify_certificate(no_key, fed.acme.ca_pem)
    bad_key, _ = forge(fed.ca_dir, uris=[pki.ORG_URI_PREFIX + "a", key_uri[:-2]])
    with pytest.raises(PKIError, match="64 lowercase hex digits"):
        pki.verify_certificate(bad_key, fed.acme.ca_pem)
    with pytest.raises(PKIError, match="is a CA certificate"):
        pki.verify_certificate(fed.acme.ca_pem, fed.acme.ca_pem)
    with pytest.raises(PKIError, match=r"not a PEM X\.509 certificate"):
        pki.verify_certificate(b"hello", fed.acme.ca_pem)
    with pytest.raises(PKIError, match="not a CA certificate"):
        pki.verify_certificate(fed.acme.cert_pem, fed.acme.cert_pem)
    no_aki, _ = forge(fed.ca_dir, uris=[pki.ORG_URI_PREFIX + "a", key_uri], authority_key_id=False)
    with pytest.raises(PKIError, match="fails path validation"):
        pki.verify_certificate(no_aki, fed.acme.ca_pem)
    good, _ = forge(fed.ca_dir, uris=[pki.ORG_URI_PREFIX + "a", key_uri])
    assert pki.verify_certificate(good, fed.acme.ca_pem).identity_hex == "ab" * 32


# ---- gRPC over mTLS ---------------------------------------------------------------------------
@dataclass
class EchoServer:
    server: grpc.Server
    port: int
    calls: list[pki.PeerIdentity] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


def start_echo(ca_pem: bytes, credentials: grpc.ServerCredentials | None) -> EchoServer:
    """A server whose one method answers 'ORG IDENTITY_HEX' for a verified caller and
    UNAUTHENTICATED otherwise; `credentials` None serves plain text."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    echo = EchoServer(server, 0)

    def who_am_i(request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            peer = pki.caller_organisation(context, ca_pem)
        except PKIError as e:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))
        echo.calls.append(peer)
        return f"{peer.organisation} {peer.identity_hex}".encode()

    handler = grpc.unary_unary_rpc_method_handler(who_am_i)  # no (de)serializers: raw bytes
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {METHOD: handler}),)
    )
    address = "127.0.0.1:0"
    if credentials is None:
        echo.port = server.add_insecure_port(address)
    else:
        echo.port = server.add_secure_port(address, credentials)
    server.start()
    return echo


@pytest.fixture(scope="module")
def tls_server(fed: Federation) -> Iterator[EchoServer]:
    echo = start_echo(fed.server.ca_pem, pki.server_credentials(fed.server))
    yield echo
    echo.server.stop(None)


def call(target: str, credentials: grpc.ChannelCredentials | None) -> bytes:
    channel = (
        grpc.insecure_channel(target)
        if credentials is None
        else grpc.secure_channel(target, credentials)
    )
    with channel:
        method = channel.unary_unary(f"/{SERVICE}/{METHOD}")
        return method(b"", timeout=RPC_TIMEOUT)


def test_server_sees_the_callers_organisation(fed: Federation, tls_server: EchoServer) -> None:
    before = len(tls_server.calls)
    reply = call(tls_server.target, pki.channel_credentials(fed.acme))
    identity_hex = fed.acme.identity_key.public_key().public_bytes_raw().hex()
    assert reply.decode() == f"acme {identity_hex}"
    assert len(tls_server.calls) == before + 1
    assert tls_server.calls[-1].identity_public == fed.acme.identity_key.public_key()


def refused(target: str, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call(target, credentials)
    return info.value.code()  # type: ignore[attr-defined]


def test_client_from_another_ca_fails_the_handshake(
    fed: Federation, tls_server: EchoServer
) -> None:
    """Same organisation name, trusts our CA, but its certificate comes from another CA."""
    before = len(tls_server.calls)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=fed.acme.ca_pem,
        private_key=fed.other_acme.key_pem,
        certificate_chain=fed.other_acme.cert_pem,
    )
    assert refused(tls_server.target, credentials) == grpc.StatusCode.UNAVAILABLE
    assert len(tls_server.calls) == before


def test_client_without_a_certificate_fails(fed: Federation, tls_server: EchoServer) -> None:
    before = len(tls_server.calls)
    credentials = grpc.ssl_channel_credentials(root_certificates=fed.acme.ca_pem)
    assert refused(tls_server.target, credentials) == grpc.StatusCode.UNAVAILABLE
    assert len(tls_server.calls) == before


def test_plain_text_client_fails(tls_server: EchoServer) -> None:
    before = len(tls_server.calls)
    assert refused(tls_server.target, None) == grpc.StatusCode.UNAVAILABLE
    assert len(tls_server.calls) == before


def test_plain_text_server_has_no_caller_organisation(fed: Federation) -> None:
    echo = start_echo(fed.acme.ca_pem, None)
    try:
        with pytest.raises(grpc.RpcError) as info:
            call(echo.target, None)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
        assert "no client certificate" in info.value.details()  # type: ignore[attr-defined]
    finally:
        echo.server.stop(None)


def test_python_ssl_client_negotiates_tls13(fed: Federation, tls_server: EchoServer) -> None:
    kit_dir = fed.root / "kits" / "acme"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the server and its name
    context.load_verify_locations(cadata=fed.acme.ca_pem.decode())
    context.load_cert_chain(kit_dir / pki.NODE_CERT, kit_dir / pki.NODE_KEY)
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", tls_server.port), timeout=RPC_TIMEOUT) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as sock,
    ):
        assert sock.version() == "TLSv1.3"
        assert sock.selected_alpn_protocol() == "h2"


@pytest.mark.parametrize("server_auth", [False, True])
def test_only_server_auth_certificates_can_serve(fed: Federation, server_auth: bool) -> None:
    """A certificate with the right IP SAN but EKU clientAuth only (like a node's kit) is refused
    by clients; the same with serverAuth is accepted (the control)."""
    eku = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if server_auth:
        eku.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    cert_pem, key_pem = forge(
        fed.ca_dir,
        uris=[pki.ORG_URI_PREFIX + "x", pki.IDENTITY_URI_PREFIX + "00" * 32],
        hosts=[x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
        eku=eku,
    )
    credentials = grpc.ssl_server_credentials(
        [(key_pem, cert_pem)], root_certificates=fed.acme.ca_pem, require_client_auth=True
    )
    echo = start_echo(fed.acme.ca_pem, credentials)
    try:
        if server_auth:
            assert call(echo.target, pki.channel_credentials(fed.acme)).startswith(b"acme ")
        else:
            assert refused(echo.target, pki.channel_credentials(fed.acme)) == (
                grpc.StatusCode.UNAVAILABLE
            )
            assert echo.calls == []
    finally:
        echo.server.stop(None)
