"""Secure aggregation's key, share and unmask stages as Flower messages: the node's side.

The ServerApp (aggregator/flower_stages.py) sends each stage as a message of its own
(`query.secagg_keys`, `query.secagg_shares`, `query.secagg_unmask`) and the ClientApp answers
it here, in its own process, with fedpt's protocol (node/secure_aggregation.py) unchanged: the
stage's request, serialized, and the organisation's Ed25519 identity signature over it, bound
to the federation, round, stage and node (protos.secagg.stage_reply_message). The keys answer
also carries the node's certificate. Flower's TLS does not authenticate the node; this does:
the ServerApp checks the certificate against the federation's CA, and every signature against
the identity key that certificate names.

The keys message is the round's first word to the node: it joins the data plane with the
message's admission token (mutual TLS, as the kit's organisation) to learn its node id and the
federation, and keeps both, with the round's secrets, in `work-dir/secagg/` (owner-only) for
the messages that follow, including the TRAIN message's `node join --once --secagg-by-scheduler`,
which masks its update with them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.message import DecodeError

from node.secure_aggregation import NodeSecAgg, SecAggRefused
from protos import federation_pb2 as pb
from protos import pki, secagg

# Flower message types (`query.<action>`) -> the stage's name in signatures and logs.
STAGE_MESSAGES = {"query.secagg_keys": "keys", "query.secagg_shares": "shares",
                  "query.secagg_unmask": "unmask"}  # fmt: skip
KEEP_DIR = "secagg"  # in the node's work dir
MEMBER_FILE = "member.json"


class StageError(RuntimeError):
    """This node cannot answer the stage message; the message says why."""


@dataclass
class StageCarrier:
    """What NodeSecAgg calls its client: the state comes with the message, and the stage's
    request is kept to answer it with, instead of going over the data plane."""

    node_id: str
    state: pb.SecAggState | None = None
    request: bytes = b""

    def advertise_keys(self, request: pb.AdvertiseKeysRequest) -> None:
        self.request = request.SerializeToString()

    def share_keys(self, request: pb.ShareKeysRequest) -> None:
        self.request = request.SerializeToString()

    def unmask(self, request: pb.UnmaskRequest) -> None:
        self.request = request.SerializeToString()

    def secagg_state(self, round_number: int) -> pb.SecAggState:
        if self.state is None or self.state.round != round_number:
            got = "none" if self.state is None else f"round {self.state.round}'s"
            raise StageError(f"the message carries {got} secure-aggregation state, not round "
                             f"{round_number}'s")  # fmt: skip
        return self.state


def answer_stage(stage: str, settings: Mapping[str, object], aggregator: str, round_number: int,
                 token: str, state: bytes = b"") -> dict[str, str | bytes]:  # fmt: skip
    """Answer one stage message for the organisation whose SuperNode `settings` these are:
    the fields of the reply's ConfigRecord."""
    kit_dir, work_dir = str(settings.get("kit") or ""), str(settings.get("work-dir") or "")
    if not kit_dir or not work_dir:
        raise StageError(
            "secure aggregation needs the SuperNode's node-config kit=... and work-dir=..."
        )
    kit = pki.load_kit(Path(kit_dir))
    keep_dir = Path(work_dir) / KEEP_DIR
    member = _join(aggregator, kit, token, keep_dir) if stage == "keys" else _member(keep_dir)
    carrier = StageCarrier(member["node_id"])
    if state:
        try:
            carrier.state = pb.SecAggState.FromString(state)
        except DecodeError as e:
            raise StageError(f"the message's secure-aggregation state does not parse: {e}") from e
    sec = NodeSecAgg(carrier, kit, member["federation_id"], member["federation_name"],
                     keep_dir=keep_dir)  # fmt: skip
    try:
        {"keys": sec.advertise, "shares": sec.share, "unmask": sec.unmask}[stage](round_number)
    except SecAggRefused as e:
        raise StageError(f"round {round_number}, {stage}: {e}") from e
    signed = secagg.stage_reply_message(member["federation_id"], round_number, stage,
                                        member["node_id"], carrier.request)  # fmt: skip
    reply: dict[str, str | bytes] = {"node-id": member["node_id"], "request": carrier.request,
                                     "signature": secagg.sign(kit.identity_key, signed)}  # fmt: skip
    if stage == "keys":
        reply["certificate"] = kit.cert_pem
    return reply


def _join(aggregator: str, kit: pki.StartupKit, token: str, keep_dir: Path) -> dict[str, str]:
    """Join the data plane with the message's token; keep the node id and federation."""
    import grpc

    from node.client import AggregatorClient

    client = AggregatorClient(aggregator, kit.organisation, kit=kit, admission_token=token)
    try:
        reply = client.join()
    except grpc.RpcError as e:
        raise StageError(f"the data plane at {aggregator} refused the Join: "
                         f"{e.code().name}: {e.details()}") from e  # fmt: skip
    finally:
        client.close()
    member = {"node_id": reply.node_id, "federation_id": reply.spec.federation_id,
              "federation_name": reply.spec.name}  # fmt: skip
    keep_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    partial = keep_dir / (MEMBER_FILE + ".partial")
    partial.write_text(json.dumps(member))
    os.replace(partial, keep_dir / MEMBER_FILE)
    return member


def _member(keep_dir: Path) -> dict[str, str]:
    try:
        return json.loads((keep_dir / MEMBER_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError) as e:
        raise StageError(
            f"no keys message was answered from this work dir ({keep_dir}): {e}"
        ) from e
