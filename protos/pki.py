"""The federation's public-key infrastructure: its own CA, per-organisation startup kits, and
the mTLS credentials and caller identity the gRPC server and client build from them.

Operator:  init_ca(Path("ca"))  once; then  issue_kit(Path("ca"), "acme", Path("kits/acme"))
           per organisation, one kit for the aggregator with server_hosts=("agg.example.org",),
           and for people who watch the federation (`fedpt status --aggregator`) an operator kit:
           issue_kit(Path("ca"), "ops", Path("kits/ops"), operator=True).
Node:      kit = load_kit(Path("kits/acme")); grpc.secure_channel(addr, channel_credentials(kit))
Server:    server.add_secure_port(addr, server_credentials(kit)); in a servicer method
           caller_organisation(context, kit.ca_pem).organisation  is who is calling.

A startup kit is a folder: ca.crt (the federation CA), node.crt + node.key (ECDSA P-256 TLS
certificate and key), identity.key (the organisation's long-term Ed25519 key, which later signs
per-round secure-aggregation keys) and identity.pub. The certificate binds both names a peer
may rely on: the URI SAN  urn:fedpt:org:ORG  and  urn:fedpt:identity:ed25519:HEX  (the identity
public key), so anyone holding ca.crt can check that an Ed25519 key belongs to organisation X.
An operator's certificate also carries  urn:fedpt:role:operator : it may read the federation's
status and nothing else (the aggregator refuses it as a node, and refuses node certificates the
operators' calls). A caller's organisation and role come only from its verified certificate,
never from a request field.

TLS versions: gRPC Python cannot set a minimum TLS version on a server (grpc/grpc#37305; the
server-side option is pending in grpc/grpc#43080). gRPC core's default range is TLS 1.2-1.3,
so TLS 1.0/1.1 are refused and peers that support it negotiate TLS 1.3 (tests/test_pki.py
checks that). No private key ever leaves its kit; key files are written with mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, SignatureAlgorithmOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

CA_CERT, CA_KEY = "ca.crt", "ca.key"
NODE_CERT, NODE_KEY = "node.crt", "node.key"
IDENTITY_KEY, IDENTITY_PUB = "identity.key", "identity.pub"
KIT_FILES = (CA_CERT, NODE_CERT, NODE_KEY, IDENTITY_KEY, IDENTITY_PUB)
REQUIRED_KIT_FILES = (CA_CERT, NODE_CERT, NODE_KEY, IDENTITY_KEY)  # identity.pub is a copy

IDENTITY_URI_PREFIX = "urn:fedpt:identity:ed25519:"
ORG_URI_PREFIX = "urn:fedpt:org:"
OPERATOR_ROLE_URI = "urn:fedpt:role:operator"

# The gRPC auth-context property holding the peer's verified leaf certificate (PEM).
PEER_CERT_PROPERTY = "x509_pem_cert"

_ORG_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_DNS_LABEL_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_IDENTITY_HEX_RE = re.compile(r"[0-9a-f]{64}")
_CLOCK_SKEW = dt.timedelta(minutes=5)  # backdate notBefore so slightly slow peer clocks accept
_PRIVATE, _PUBLIC = 0o600, 0o644


class PKIError(ValueError):
    """A CA, kit or certificate that is missing or fails validation; the message is one line
    naming the file (or certificate) and what is wrong."""


@dataclass(frozen=True)
class StartupKit:
    directory: Path
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes
    identity_key: Ed25519PrivateKey
    organisation: str
    operator: bool = False


@dataclass(frozen=True)
class PeerIdentity:
    organisation: str
    identity_public: Ed25519PublicKey
    operator: bool = False  # an operator's credential: status only, never a node

    @property
    def identity_hex(self) -> str:
        return self.identity_public.public_bytes_raw().hex()


def organisation_from(name: str, fallback: str = "node") -> str:
    """A valid organisation name made of `name` (a folder or data source's name): characters
    outside the rule become '-', at most 64 kept; `fallback` when nothing is left."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "-", name)[:64]
    return cleaned if cleaned.strip(".") else fallback


def check_organisation(organisation: str) -> str:
    """The name itself, or PKIError: 1-64 characters of [A-Za-z0-9._-], not '.' or '..'."""
    # '.'/'..' would be harmless in a certificate but are path traps for a default kits/ORG.
    if not _ORG_RE.fullmatch(organisation) or organisation in (".", ".."):
        raise PKIError(
            f"organisation {organisation!r} is not valid: use 1-64 characters of A-Z a-z 0-9 . _ -"
        )
    return organisation


# ---- the CA -----------------------------------------------------------------------------------
def init_ca(out_dir: Path, name: str = "fedpt federation CA", days: int = 3650) -> Path:
    """Create the federation CA in `out_dir` (ca.key 0600, ca.crt); returns `out_dir`."""
    out_dir = Path(out_dir)
    _check_days(days)
    _refuse_existing(out_dir, (CA_CERT, CA_KEY), "a CA")
    key = ec.generate_private_key(ec.SECP256R1())
    try:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    except ValueError as e:
        raise PKIError(f"CA name {name!r} is not valid: {e}") from e
    now = _utcnow()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        # pathlen=0: the CA signs organisation certificates only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    _write_new_files(
        out_dir,
        {CA_KEY: (_private_pem(key), _PRIVATE), CA_CERT: (_cert_pem(cert), _PUBLIC)},
    )
    return out_dir


def issue_kit(
    ca_dir: Path,
    organisation: str,
    out_dir: Path,
    *,
    server_hosts: Sequence[str] = (),
    days: int = 825,
    operator: bool = False,
) -> Path:
    """Write a startup kit for `organisation` into `out_dir`, signed by the CA in `ca_dir`; with
    `server_hosts` (DNS names or IP addresses) the certificate can also serve TLS; with
    `operator` it is an operator's credential (status only). Returns `out_dir`."""
    ca_dir, out_dir = Path(ca_dir), Path(out_dir)
    check_organisation(organisation)
    _check_days(days)
    if isinstance(server_hosts, str):  # a lone "host" would be split into characters
        server_hosts = (server_hosts,)
    host_names = [_host_name(h) for h in dict.fromkeys(server_hosts)]
    if operator and host_names:
        raise PKIError("an operator kit is a client credential: it cannot also serve TLS")
    _refuse_existing(out_dir, KIT_FILES, "a startup kit")
    ca_cert, ca_key = _load_ca(ca_dir)

    tls_key = ec.generate_private_key(ec.SECP256R1())
    identity_key = Ed25519PrivateKey.generate()
    identity_hex = identity_key.public_key().public_bytes_raw().hex()
    names: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(ORG_URI_PREFIX + organisation),
        x509.UniformResourceIdentifier(IDENTITY_URI_PREFIX + identity_hex),
        *([x509.UniformResourceIdentifier(OPERATOR_ROLE_URI)] if operator else []),
        *host_names,
    ]
    # One role per kit: a node's certificate authenticates clients only, the aggregator's
    # servers only, so the aggregator's kit cannot join the federation as a node.
    usages = [ExtendedKeyUsageOID.SERVER_AUTH if host_names else ExtendedKeyUsageOID.CLIENT_AUTH]
    now = _utcnow()
    # A certificate must not outlive the CA that vouches for it.
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation),
                    x509.NameAttribute(NameOID.COMMON_NAME, organisation),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(tls_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(tls_key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    identity_pub = identity_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_new_files(
        out_dir,
        {
            CA_CERT: (_cert_pem(ca_cert), _PUBLIC),
            NODE_CERT: (_cert_pem(cert), _PUBLIC),
            NODE_KEY: (_private_pem(tls_key), _PRIVATE),
            IDENTITY_KEY: (_private_pem(identity_key), _PRIVATE),
            IDENTITY_PUB: (identity_pub, _PUBLIC),
        },
    )
    return out_dir


# ---- kits and certificates --------------------------------------------------------------------
def load_kit(directory: Path) -> StartupKit:
    """Read and check a startup kit: every file parses, node.crt chains to the kit's ca.crt and
    is valid now, node.key and identity.key match the certificate."""
    directory = Path(directory)
    if not directory.is_dir():
        raise PKIError(f"{directory}: no such startup kit folder")
    ca_pem, cert_pem, key_pem, identity_pem = (
        _read(directory / name, "startup kit") for name in REQUIRED_KIT_FILES
    )
    _parse_ca(ca_pem, directory / CA_CERT)
    role = "server" if is_server_certificate(cert_pem) else "client"
    try:
        peer = verify_certificate(cert_pem, ca_pem, role=role)
    except PKIError as e:
        raise PKIError(f"{directory / NODE_CERT}: {e}") from None
    cert = x509.load_pem_x509_certificate(cert_pem)  # parses: verify_certificate checked it
    tls_key = _load_private_key(key_pem, directory / NODE_KEY)
    # cryptography's public keys compare by value.
    if (
        not isinstance(tls_key, ec.EllipticCurvePrivateKey)
        or tls_key.public_key() != cert.public_key()
    ):
        raise PKIError(f"{directory / NODE_KEY}: does not match the key in {NODE_CERT}")
    identity_key = _load_private_key(identity_pem, directory / IDENTITY_KEY)
    if not isinstance(identity_key, Ed25519PrivateKey):
        raise PKIError(f"{directory / IDENTITY_KEY}: not an Ed25519 private key")
    if identity_key.public_key() != peer.identity_public:
        raise PKIError(
            f"{directory / IDENTITY_KEY}: does not match the identity key bound in {NODE_CERT}"
        )
    pub_path = directory / IDENTITY_PUB
    if pub_path.exists():  # optional, but a stale copy would mislead whoever reads it
        try:
            pub = serialization.load_pem_public_key(_read(pub_path, "startup kit"))
        except ValueError as e:
            raise PKIError(f"{pub_path}: not a PEM public key ({e})") from None
        if pub != peer.identity_public:
            raise PKIError(f"{pub_path}: does not match {IDENTITY_KEY}")
    return StartupKit(directory, ca_pem, cert_pem, key_pem, identity_key, peer.organisation,
                      peer.operator)  # fmt: skip


def verify_certificate(
    cert_pem: bytes, ca_pem: bytes, *, now: dt.datetime | None = None, role: str = "client"
) -> PeerIdentity:
    """The organisation and identity key a certificate vouches for, after checking that the CA
    signed it (ECDSA-SHA256), that it is valid at `now` (default: the current time), that it is
    not itself a CA, that it is certified for `role` ("client": a node, the default; "server":
    the aggregator, for its first host name), and that it names exactly one organisation and
    one identity key."""
    if now is None:
        now = _utcnow()
    elif now.tzinfo is None:
        raise ValueError("now must be a timezone-aware datetime")
    ca = _parse_ca(ca_pem, "CA certificate")
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as e:
        raise PKIError(f"certificate is not a PEM X.509 certificate ({e})") from None
    label = f"certificate {_subject(cert)!r}"
    if cert.signature_algorithm_oid != SignatureAlgorithmOID.ECDSA_WITH_SHA256:
        raise PKIError(f"{label} is not signed with ECDSA-SHA256")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise PKIError(f"{label} is not signed by the federation CA {_subject(ca)!r}") from None
    if now < cert.not_valid_before_utc:
        raise PKIError(f"{label} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M}Z")
    if now > cert.not_valid_after_utc:
        raise PKIError(f"{label} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M}Z")
    if _basic_constraints(cert).ca:
        raise PKIError(f"{label} is a CA certificate, not an organisation's")
    # The full RFC 5280 path check (key usages, critical extensions, CA validity) on top of the
    # checks above, which exist to give a precise message for the common failures.
    try:
        policy = PolicyBuilder().store(Store([ca])).time(now).max_chain_depth(0)
        if role == "server":
            policy.build_server_verifier(_first_host(cert, label)).verify(cert, [])
        else:
            policy.build_client_verifier().verify(cert, [])
    except VerificationError as e:
        raise PKIError(f"{label} fails path validation: {e}") from None
    san = _subject_alt_names(cert, label)
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    orgs = [u.removeprefix(ORG_URI_PREFIX) for u in uris if u.startswith(ORG_URI_PREFIX)]
    keys = [u.removeprefix(IDENTITY_URI_PREFIX) for u in uris if u.startswith(IDENTITY_URI_PREFIX)]
    if len(orgs) != 1 or len(keys) != 1:
        raise PKIError(
            f"{label} must name exactly one organisation and one identity key "
            f"(found {len(orgs)} {ORG_URI_PREFIX}* and {len(keys)} {IDENTITY_URI_PREFIX}* URIs)"
        )
    try:
        organisation = check_organisation(orgs[0])
    except PKIError as e:
        raise PKIError(f"{label}: {e}") from None
    if not _IDENTITY_HEX_RE.fullmatch(keys[0]):
        raise PKIError(f"{label}: identity key is not 64 lowercase hex digits")
    public = Ed25519PublicKey.from_public_bytes(bytes.fromhex(keys[0]))
    return PeerIdentity(organisation, public, OPERATOR_ROLE_URI in uris)


# ---- gRPC -------------------------------------------------------------------------------------
def server_credentials(kit: StartupKit) -> grpc.ServerCredentials:
    """TLS server credentials that require a client certificate signed by the kit's CA."""
    return grpc.ssl_server_credentials(
        [(kit.key_pem, kit.cert_pem)], root_certificates=kit.ca_pem, require_client_auth=True
    )


def channel_credentials(kit: StartupKit) -> grpc.ChannelCredentials:
    """TLS channel credentials: trust only the federation CA, present the kit's certificate."""
    return grpc.ssl_channel_credentials(
        root_certificates=kit.ca_pem, private_key=kit.key_pem, certificate_chain=kit.cert_pem
    )


def caller_certificate(context: grpc.ServicerContext) -> bytes | None:
    """The caller's certificate (PEM) as verified by the TLS handshake; None on a plain-text
    channel. Keyed on the certificate property, not transport_security_type, which grpc/grpc#43080
    changes from "ssl" to "tls"."""
    values = context.auth_context().get(PEER_CERT_PROPERTY) or []
    return bytes(values[0]) if values else None


def caller_organisation(context: grpc.ServicerContext, ca_pem: bytes) -> PeerIdentity:
    """Who is calling, from their verified certificate alone; PKIError when there is none or it
    does not verify against `ca_pem` (checked again here so a server wired with the wrong roots
    cannot let in another federation's nodes)."""
    cert_pem = caller_certificate(context)
    if cert_pem is None:
        raise PKIError("the caller presented no client certificate (plain-text channel?)")
    return verify_certificate(cert_pem, ca_pem)


# ---- helpers ----------------------------------------------------------------------------------
def is_server_certificate(cert_pem: bytes) -> bool:
    """Whether the certificate is certified for TLS servers (an aggregator's kit)."""
    try:
        eku = x509.load_pem_x509_certificate(cert_pem).extensions.get_extension_for_class(
            x509.ExtendedKeyUsage
        )
    except (ValueError, x509.ExtensionNotFound):
        return False
    return ExtendedKeyUsageOID.SERVER_AUTH in eku.value


def _subject_alt_names(cert: x509.Certificate, label: str) -> x509.SubjectAlternativeName:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise PKIError(f"{label} has no subjectAltName (not issued by fedpt?)") from None


def _first_host(cert: x509.Certificate, label: str) -> x509.GeneralName:
    san = _subject_alt_names(cert, label)
    hosts = [*san.get_values_for_type(x509.IPAddress), *san.get_values_for_type(x509.DNSName)]
    if not hosts:
        raise PKIError(f"{label} names no host name: it is no server certificate")
    host = hosts[0]
    return x509.DNSName(host) if isinstance(host, str) else x509.IPAddress(host)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _check_days(days: int) -> None:
    if not isinstance(days, int) or days < 1:
        raise PKIError(f"validity must be a positive number of days, not {days!r}")


def _key_usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=key_cert_sign,
        crl_sign=crl_sign, encipher_only=False, decipher_only=False,
    )  # fmt: skip


def _host_name(host: str) -> x509.GeneralName:
    """An IP address SAN for an address, a DNS SAN for a host name; PKIError otherwise."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    if len(host) > 253 or not all(_DNS_LABEL_RE.fullmatch(label) for label in labels):
        raise PKIError(f"server host {host!r} is neither an IP address nor a DNS name")
    return x509.DNSName(host.rstrip(".").lower())


def _basic_constraints(cert: x509.Certificate) -> x509.BasicConstraints:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return x509.BasicConstraints(ca=False, path_length=None)


def _subject(cert: x509.Certificate) -> str:
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(cn[0].value) if cn else cert.subject.rfc4514_string()


def _parse_ca(ca_pem: bytes, where: object) -> x509.Certificate:
    try:
        ca = x509.load_pem_x509_certificate(ca_pem)
    except ValueError as e:
        raise PKIError(f"{where}: not a PEM X.509 certificate ({e})") from None
    if not _basic_constraints(ca).ca:
        raise PKIError(f"{where}: not a CA certificate")
    return ca


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    if not ca_dir.is_dir():
        raise PKIError(f"{ca_dir}: no such CA folder (create one with `fedpt ca init`)")
    cert_path, key_path = ca_dir / CA_CERT, ca_dir / CA_KEY
    cert = _parse_ca(_read(cert_path, "CA"), cert_path)
    key = _load_private_key(_read(key_path, "CA"), key_path)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise PKIError(f"{key_path}: does not match the key in {cert_path}")
    if _utcnow() > cert.not_valid_after_utc:
        raise PKIError(f"{cert_path}: the CA expired on {cert.not_valid_after_utc:%Y-%m-%d}")
    return cert, key


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise PKIError(f"{path}: missing (not a complete {what} folder?)") from None
    except OSError as e:
        raise PKIError(f"{path}: cannot read ({e.strerror})") from None


def _load_private_key(pem: bytes, path: Path) -> object:
    try:
        return serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as e:  # TypeError: an encrypted key
        raise PKIError(f"{path}: not an unencrypted PEM private key ({e})") from None


def _private_pem(key: ec.EllipticCurvePrivateKey | Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _refuse_existing(out_dir: Path, names: Sequence[str], what: str) -> None:
    clashes = [name for name in names if (out_dir / name).exists()]
    if clashes:
        raise PKIError(
            f"{out_dir}: already holds {what} ({', '.join(clashes)}); refusing to overwrite it"
        )


def _write_new_files(out_dir: Path, files: dict[str, tuple[bytes, int]]) -> None:
    """Create each file exclusively (never replacing one) with its mode; on failure remove the
    ones written so a half-made CA or kit is not left behind."""
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    written: list[Path] = []
    try:
        for name, (data, mode) in files.items():
            path = out_dir / name
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            except FileExistsError:
                raise PKIError(f"{path}: already exists; refusing to overwrite it") from None
            written.append(path)
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), mode)  # exact mode, whatever the umask
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
