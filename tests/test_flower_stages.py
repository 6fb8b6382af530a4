"""Secure aggregation's stages as scheduler messages (Flower's; no Flower needed here): the node
answers each stage in a process of its own (node/flower_stages.py), keeping the round's secrets
in its work dir, and the ServerApp's side (aggregator/flower_stages.py) accepts an answer only
with a certificate from the federation's CA, from the organisation that SuperNode joined the
data plane as, signed by that organisation's identity key for this federation, round and
stage. Real aggregator with mutual TLS on 127.0.0.1; real kits."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from aggregator.config import (
    AggregatorConfig,
    FederationConfig,
    RoundConfig,
    SecAggConfig,
    ServerConfig,
    StoreConfig,
)
from aggregator.errors import InvalidArgument, PermissionDenied, Unauthenticated
from aggregator.flower_stages import StageReplies
from aggregator.outer import OuterConfig
from aggregator.server import RunningAggregator, start_aggregator
from model.config import ModelConfig
from node.client import AggregatorClient
from node.flower_stages import StageError, answer_stage
from node.secure_aggregation import NodeSecAgg
from protos import federation_pb2 as pb
from protos import pki, secagg
from protos.codec import SpooledPayload
from protos.delta_encoding import encode_update_in_place
from tests.conftest import issue_kits
from tests.test_aggregator import state_fingerprint

MODEL = ModelConfig(dim=16, n_layers=1, n_heads=2, ffn_dim=32, max_seq_len=16)
ORGS = ["acme", "globex", "initech"]
SUPERNODES = {"acme": 11, "globex": 22, "initech": 33}  # Flower node ids


@pytest.fixture(scope="module")
def kits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pki.StartupKit]:
    return issue_kits(tmp_path_factory.mktemp("pki"), ORGS, foreign="acme")


@pytest.fixture
def aggregator(tmp_path: Path, kits: dict) -> Iterator[RunningAggregator]:
    """A secure aggregator whose rounds a scheduler starts, as the ServerApp runs it."""
    config = AggregatorConfig(
        server=ServerConfig(port=0, long_poll_seconds=0.5, kit=str(kits["aggregator"].directory)),
        federation=FederationConfig(name="staged", rounds=1, inner_steps=1,
                                    delta_encoding="masked-int32", download_encoding="fp32"),
        model=MODEL,
        train={"micro_batch_size": 2, "seq_len": 16},
        round=RoundConfig(min_nodes=2, timeout_seconds=30.0),
        outer=OuterConfig(name="fedavg"),
        store=StoreConfig(state_dir=str(tmp_path / "state")),
        secagg=SecAggConfig(clip=1.0, threshold=2, stage_timeout_seconds=30.0),
    )  # fmt: skip
    running = start_aggregator(config, log=lambda _m: None, admission_required=True)
    running.coordinator.schedule_rounds()
    yield running
    running.stop(grace=0)


def settings(tmp_path: Path, kit: pki.StartupKit) -> dict:
    """A SuperNode's node_config (only what the stage messages read)."""
    return {"kit": str(kit.directory), "work-dir": str(tmp_path / "nodes" / kit.organisation)}


def answer(stage: str, tmp_path: Path, kit: pki.StartupKit, agg: RunningAggregator, number: int,
           token: str = "", node_id: str = "") -> dict:  # fmt: skip
    state = b""
    if stage != "keys":
        state = agg.coordinator.secagg_state(node_id, number).SerializeToString()
    return answer_stage(stage, settings(tmp_path, kit), agg.address, number, token, state)


def wait_for_stage(agg: RunningAggregator, number: int, stage: str) -> None:
    give_up = time.monotonic() + 20
    while agg.coordinator.secagg_stage(number) != stage:
        assert time.monotonic() < give_up, agg.coordinator.secagg_stage(number)
        time.sleep(0.05)


def keys_of(agg: RunningAggregator, tmp_path: Path, kits: dict, orgs: list[str]) -> dict:
    """Every org's keys answer to round 0's message, with the tokens its SuperNode got."""
    admissions = agg.coordinator.membership.admissions
    tokens = admissions.issue([str(SUPERNODES[o]) for o in orgs], "round 0 (keys)")
    return {o: answer("keys", tmp_path, kits[o], agg, 0, tokens[str(SUPERNODES[o])]) for o in orgs}


def test_stage_answers_in_separate_processes_make_a_secure_round_with_the_exact_mean(
    tmp_path: Path, kits: dict, aggregator: RunningAggregator
) -> None:
    """Keys, shares and unmask answered by stage messages, each with fresh objects reading the
    secrets the last one kept in the work dir, and the masked push by yet another (the TRAIN
    message's process): the round commits the tokens-weighted mean of the deltas."""
    agg, coordinator = aggregator, aggregator.coordinator
    replies = StageReplies(
        coordinator, coordinator.membership.admissions, kits["aggregator"].ca_pem
    )
    orgs = ORGS[:2]
    members = {}
    for org, keys_answer in keys_of(agg, tmp_path, kits, orgs).items():
        member, request = replies.keys(SUPERNODES[org], 0, keys_answer)
        assert member.organisation == org
        members[org] = (member, request)
    assert coordinator.start_round(sorted(m.node_id for m, _ in members.values())) == 0
    for member, request in members.values():
        coordinator.advertise_keys(member.node_id, request, member.certificate_pem, member.identity)
    wait_for_stage(agg, 0, "SHARE")
    for org, (member, _) in members.items():
        shares = answer("shares", tmp_path, kits[org], agg, 0, node_id=member.node_id)
        request = replies.request(member, 0, "shares", shares, pb.ShareKeysRequest)
        coordinator.share_keys(member.node_id, request)
    wait_for_stage(agg, 0, "MASKED_INPUT")

    base = {k: v.clone() for k, v in coordinator.params.items()}
    deltas = {}
    for i, org in enumerate(orgs):  # the TRAIN message's process: the data plane, kept secrets
        client = AggregatorClient(agg.address, org, kit=kits[org], rpc_timeout=10)
        tokens = coordinator.membership.admissions.issue([str(SUPERNODES[org])], "round 0 (train)")
        client.admission_token = tokens[str(SUPERNODES[org])]
        client.join()
        sec = NodeSecAgg(client, kits[org], client.spec.federation_id, client.spec.name,
                         keep_dir=Path(settings(tmp_path, kits[org])["work-dir"]) / "secagg")  # fmt: skip
        g = torch.Generator().manual_seed(7 + i)
        delta = {k: 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        deltas[org] = {k: v.clone() for k, v in delta.items()}
        secure = sec.secure_params(0, 32, len(delta))
        path = tmp_path / f"{org}.bin"
        manifest = encode_update_in_place(delta, "masked-int32", path, client.spec.chunk_bytes,
                                          rounding_key=sec.rounding_key(0), secure=secure)  # fmt: skip
        reply = client.push_payload(0, 0, SpooledPayload(manifest, path), 32, 1.0)
        assert reply.complete
        client.close()
    wait_for_stage(agg, 0, "UNMASK")
    for org, (member, _) in members.items():
        unmask = answer("unmask", tmp_path, kits[org], agg, 0, node_id=member.node_id)
        coordinator.unmask(
            member.node_id, replies.request(member, 0, "unmask", unmask, pb.UnmaskRequest)
        )
        kept = Path(settings(tmp_path, kits[org])["work-dir"]) / "secagg"
        assert not list(kept.glob("round-*.json"))  # the round's secrets are gone once unmasked
    give_up = time.monotonic() + 30
    while coordinator.version < 1:
        assert time.monotonic() < give_up, coordinator.round
        time.sleep(0.05)
    for name, before in base.items():
        mean = (deltas["acme"][name] + deltas["globex"][name]) / 2
        # fedavg with lr 1: the new model is the old one minus the mean pseudo-gradient
        torch.testing.assert_close(coordinator.params[name], before - mean, atol=1e-6, rtol=0)


def test_keys_answers_prove_their_organisation_or_change_nothing(
    tmp_path: Path, kits: dict, aggregator: RunningAggregator
) -> None:
    agg, coordinator = aggregator, aggregator.coordinator
    replies = StageReplies(
        coordinator, coordinator.membership.admissions, kits["aggregator"].ca_pem
    )
    answers = keys_of(agg, tmp_path, kits, ["acme", "globex"])
    before = state_fingerprint(agg, tmp_path / "state")

    foreign = {**answers["acme"], "certificate": kits["foreign"].cert_pem}
    with pytest.raises(Unauthenticated, match="certificate is refused"):
        replies.keys(SUPERNODES["acme"], 0, foreign)
    with pytest.raises(PermissionDenied, match="joined as 'globex' but answers with 'acme'"):
        replies.keys(SUPERNODES["globex"], 0, answers["acme"])
    with pytest.raises(Unauthenticated, match="has not joined the data plane"):
        replies.keys(SUPERNODES["initech"], 0, answers["acme"])
    tampered = bytearray(answers["acme"]["request"])
    tampered[-1] ^= 1
    with pytest.raises(PermissionDenied, match="not signed by its identity key"):
        replies.keys(SUPERNODES["acme"], 0, {**answers["acme"], "request": bytes(tampered)})
    with pytest.raises(PermissionDenied, match="not signed"):  # a replay into another round
        replies.keys(SUPERNODES["acme"], 1, answers["acme"])
    with pytest.raises(PermissionDenied, match="answers for node"):
        replies.keys(SUPERNODES["acme"], 0, {**answers["acme"], "node-id": "node-else"})
    with pytest.raises(InvalidArgument, match="no signature"):
        replies.keys(SUPERNODES["acme"], 0, {**answers["acme"], "signature": "text"})
    assert state_fingerprint(agg, tmp_path / "state") == before
    assert coordinator.secagg_stage(0) is None  # no round started

    member, _ = replies.keys(SUPERNODES["acme"], 0, answers["acme"])  # the honest answer passes
    assert member.node_id == coordinator.node_of_organisation("acme").id


def test_a_later_stage_answer_signed_by_another_organisation_is_refused(
    tmp_path: Path, kits: dict, aggregator: RunningAggregator
) -> None:
    agg, coordinator = aggregator, aggregator.coordinator
    replies = StageReplies(
        coordinator, coordinator.membership.admissions, kits["aggregator"].ca_pem
    )
    verified = {o: replies.keys(SUPERNODES[o], 0, a)
                for o, a in keys_of(agg, tmp_path, kits, ["acme", "globex"]).items()}  # fmt: skip
    coordinator.start_round(sorted(m.node_id for m, _ in verified.values()))
    for member, request in verified.values():
        coordinator.advertise_keys(member.node_id, request, member.certificate_pem, member.identity)
    wait_for_stage(agg, 0, "SHARE")
    acme, globex = verified["acme"][0], verified["globex"][0]
    shares = answer("shares", tmp_path, kits["acme"], agg, 0, node_id=acme.node_id)
    stored = state_fingerprint(agg, tmp_path / "state")
    with pytest.raises(PermissionDenied, match="answers for node"):  # via globex's SuperNode
        replies.request(globex, 0, "shares", shares, pb.ShareKeysRequest)
    with pytest.raises(PermissionDenied, match="not signed"):  # ... claiming to be globex
        replies.request(globex, 0, "shares", {**shares, "node-id": globex.node_id},
                        pb.ShareKeysRequest)  # fmt: skip
    with pytest.raises(PermissionDenied, match="not signed"):  # right node, wrong stage
        replies.request(acme, 0, "unmask", shares, pb.UnmaskRequest)
    # globex re-signs acme's shares as its own: its signature holds, the shares' sender does not
    forged = secagg.sign(kits["globex"].identity_key, secagg.stage_reply_message(
        coordinator.federation_id, 0, "shares", globex.node_id, shares["request"]))  # fmt: skip
    relayed = {**shares, "node-id": globex.node_id, "signature": forged}
    request = replies.request(globex, 0, "shares", relayed, pb.ShareKeysRequest)
    with pytest.raises(InvalidArgument, match="as yourself"):
        coordinator.share_keys(globex.node_id, request)
    assert state_fingerprint(agg, tmp_path / "state") == stored
    assert coordinator.secagg_stage(0) == "SHARE"


def test_a_stage_message_without_its_keys_message_is_refused_with_the_reason(
    tmp_path: Path, kits: dict
) -> None:
    with pytest.raises(StageError, match="no keys message was answered"):
        answer_stage("shares", settings(tmp_path, kits["acme"]), "127.0.0.1:1", 0, "", b"")
    with pytest.raises(StageError, match="needs the SuperNode's node-config kit"):
        answer_stage("keys", {"work-dir": str(tmp_path)}, "127.0.0.1:1", 0, "", b"")
