"""Secure aggregation's key, share and unmask stages as Flower messages: the ServerApp's side.

Flower's TLS authenticates the SuperLink, not the SuperNodes, so a stage's answer proves its
organisation in-band (node/flower_stages.py signs it): the keys answer carries the node's fedpt
certificate, checked here against the federation's CA, and must come from the organisation
that SuperNode joined the data plane as (with mutual TLS and the message's admission token);
every answer carries the organisation's Ed25519 signature over the serialized request, bound to
the federation, round, stage and node. Only then does the request reach the coordinator, which
checks it as it checks the same request on the data plane (aggregator/secure_aggregation.py).
A refused answer is logged and counts as no answer: the stage's deadline decides the round.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from google.protobuf.message import DecodeError

from aggregator.admissions import Admissions
from aggregator.errors import InvalidArgument, PermissionDenied, Unauthenticated
from protos import federation_pb2 as pb
from protos import pki, secagg


@dataclass(frozen=True)
class StageMember:
    """A SuperNode whose keys answer verified: the fedpt node it speaks for this round."""

    supernode: int
    node_id: str
    organisation: str
    identity: Ed25519PublicKey
    certificate_pem: bytes


class StageReplies:
    """Checks stage answers for one federation."""

    def __init__(self, coordinator, admissions: Admissions, ca_pem: bytes) -> None:
        self.coordinator, self.admissions, self.ca_pem = coordinator, admissions, ca_pem

    def keys(self, supernode: int, number: int,
             answer: Mapping[str, object]) -> tuple[StageMember, pb.AdvertiseKeysRequest]:  # fmt: skip
        """The member and its keys, from a keys answer; Refused if any check fails."""
        certificate = _field(answer, "certificate", bytes)
        try:
            identity = pki.verify_certificate(certificate, self.ca_pem)
        except pki.PKIError as e:
            raise Unauthenticated(f"SuperNode {supernode}'s certificate is refused: {e}") from e
        joined_as = self.admissions.organisation_of(str(supernode))
        if joined_as is None:
            raise Unauthenticated(f"SuperNode {supernode} has not joined the data plane")
        if joined_as != identity.organisation:
            raise PermissionDenied(
                f"SuperNode {supernode} joined as {joined_as!r} but answers with "
                f"{identity.organisation!r}'s certificate"
            )
        node_id = self.coordinator.node_of_organisation(joined_as).id
        member = StageMember(supernode, node_id, joined_as, identity.identity_public, certificate)
        request = self.request(member, number, "keys", answer, pb.AdvertiseKeysRequest)
        return member, request

    def request(self, member: StageMember, number: int, stage: str, answer: Mapping[str, object],
                kind: type):  # fmt: skip
        """The stage's request (of protobuf type `kind`) once its signature verifies."""
        if _field(answer, "node-id", str) != member.node_id:
            raise PermissionDenied(
                f"SuperNode {member.supernode} answers for node {answer['node-id']!r}, not "
                f"{member.node_id!r}"
            )
        raw = _field(answer, "request", bytes)
        signed = secagg.stage_reply_message(self.coordinator.federation_id, number, stage,
                                            member.node_id, raw)  # fmt: skip
        try:
            secagg.verify(member.identity, signed, _field(answer, "signature", bytes))
        except secagg.SecAggError as e:
            raise PermissionDenied(
                f"{member.organisation}'s {stage} answer for round {number} is not signed by its "
                f"identity key: {e}"
            ) from e
        try:
            request = kind.FromString(raw)
        except DecodeError as e:
            raise InvalidArgument(
                f"{member.organisation}'s {stage} answer does not parse: {e}"
            ) from e
        if request.round != number:
            raise InvalidArgument(
                f"{member.organisation}'s {stage} answer is for round {request.round}, not {number}"
            )
        return request


def _field(answer: Mapping[str, object], key: str, kind: type):
    value = answer.get(key)
    if not isinstance(value, kind):
        raise InvalidArgument(f"the stage answer has no {key} ({kind.__name__})")
    return value
