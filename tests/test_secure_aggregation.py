"""Secure aggregation and mutual TLS over a real aggregator on 127.0.0.1: each node is a real
gRPC client with its own startup kit, driven through the protocol stages by a thread. Dropouts
at every stage, aborts below the threshold, forged keys, replays, foreign certificates and
identity claims."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
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
from aggregator.outer import OuterConfig
from aggregator.server import RunningAggregator, start_aggregator
from model.config import ModelConfig
from node.client import AggregatorClient
from node.secure_aggregation import NodeSecAgg
from protos import federation_pb2 as pb
from protos import pki, secagg
from protos.codec import SpooledPayload
from protos.delta_encoding import encode_update_in_place
from tests.conftest import issue_kits

MODEL = ModelConfig(dim=16, n_layers=1, n_heads=2, ffn_dim=32, max_seq_len=16)
N, THRESHOLD = 5, 3
ORGS = [f"org{i}" for i in range(N)]
TRAIN = {"micro_batch_size": 2, "seq_len": 16}
INNER_STEPS = 1
UNIT = INNER_STEPS * 2 * 16  # weight_unit: tokens of one rank's round


@pytest.fixture(scope="module")
def kits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pki.StartupKit]:
    return issue_kits(tmp_path_factory.mktemp("pki"), [*ORGS, "intruder"], foreign="org0")


def start(
    tmp_path: Path, kits: dict, *, round_timeout: float = 5.0, rounds: int = 1,
    start_grace: float = 0.3,
) -> RunningAggregator:  # fmt: skip
    config = AggregatorConfig(
        server=ServerConfig(port=0, long_poll_seconds=0.5, kit=str(kits["aggregator"].directory)),
        federation=FederationConfig(
            name="secure",
            rounds=rounds,
            inner_steps=INNER_STEPS,
            delta_encoding="masked-int32",
            download_encoding="fp32",
        ),
        model=MODEL,
        train=TRAIN,
        round=RoundConfig(
            min_nodes=2, timeout_seconds=round_timeout, start_grace_seconds=start_grace
        ),
        outer=OuterConfig(name="fedavg"),
        store=StoreConfig(state_dir=str(tmp_path / "state")),
        secagg=SecAggConfig(clip=1.0, threshold=THRESHOLD, stage_timeout_seconds=1.5),
    )
    return start_aggregator(config, log=lambda _m: None)


def connect(agg: RunningAggregator, kit: pki.StartupKit) -> AggregatorClient:
    client = AggregatorClient(agg.address, kit.organisation, kit=kit, rpc_timeout=10)
    client.join()
    return client


def delta_for(i: int, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + i)
    return {k: 0.01 * torch.randn(v.shape, generator=g) for k, v in like.items()}


def masked_payload(
    sec: NodeSecAgg, round_number: int, version: int, delta: dict, num_tokens: int, path: Path,
    encoding: str = "masked-int32",
) -> SpooledPayload:  # fmt: skip
    """What a participant pushes under secure aggregation (node/participant.py `_encode`): the
    quantized, weighted, masked update spooled at `path`; `delta` then holds the residual."""
    secure = sec.secure_params(round_number, num_tokens, len(delta))
    manifest = encode_update_in_place(delta, encoding, path, sec.client.spec.chunk_bytes,
                                      rounding_key=sec.rounding_key(version), secure=secure)  # fmt: skip
    return SpooledPayload(manifest, path)


# Answers the unmasking stage in a node's place; True: the node stops there.
UnmaskHook = Callable[[AggregatorClient, NodeSecAgg, int], bool]


def run_node(
    client: AggregatorClient, kit: pki.StartupKit, index: int, drop_at: str | None, log: list,
    unmask: UnmaskHook | None = None,
) -> None:  # fmt: skip
    """Follow the tasks of one round; stop answering at `drop_at` (a stage name); `unmask`
    answers the unmasking stage instead of the honest node code."""
    sec = NodeSecAgg(client, kit, client.spec.federation_id)
    spool = Path(tempfile.mkdtemp(prefix="fedpt-secagg-test-"))  # the node's encoded uploads
    stages = {pb.Task.SECAGG_ADVERTISE_KEYS: "advertise", pb.Task.SECAGG_SHARE_KEYS: "share",
              pb.Task.TRAIN: "input", pb.Task.SECAGG_UNMASK: "unmask"}  # fmt: skip
    give_up = time.monotonic() + 60
    while time.monotonic() < give_up:
        task = client.get_task(wait_seconds=0.5)
        if task.kind == pb.Task.STOP:
            return
        stage = stages.get(task.kind)
        if stage is None:
            continue
        if stage == drop_at:
            log.append((index, "dropped", stage))
            return
        if stage == "advertise":
            sec.advertise(task.round)
        elif stage == "share":
            sec.share(task.round)
        elif stage == "input":
            global_params = client.pull_model(task.model_version)
            masked = masked_payload(
                sec,
                task.round,
                task.model_version,
                delta_for(index, global_params),
                num_tokens=UNIT * (index + 1),
                path=spool / f"{index}-{task.round}.payload",
            )
            client.push_payload(task.round, task.model_version, masked, UNIT * (index + 1), 1.0)
            log.append((index, "pushed", task.round))
        elif stage == "unmask":
            if unmask is None:
                sec.unmask(task.round)
            elif unmask(client, sec, task.round):
                return


def run_round(
    agg: RunningAggregator, kits: dict, drops: dict[int, str], unmask: UnmaskHook | None = None
) -> list:
    clients = [connect(agg, kits[org]) for org in ORGS]
    log: list = []
    threads = [threading.Thread(target=run_node,
                                args=(c, kits[ORGS[i]], i, drops.get(i), log, unmask))
               for i, c in enumerate(clients)]  # fmt: skip
    for t in threads:
        t.start()
    give_up = time.monotonic() + 60
    while (
        agg.coordinator.version < 1
        and agg.coordinator.round.number < 1
        and time.monotonic() < give_up
    ):
        time.sleep(0.05)
    for t in threads:
        t.join(timeout=30)
    for c in clients:
        c.close()
    return log


CASES = [(stage, k) for stage in ("advertise", "share", "input", "unmask") for k in (1, 2)]


@pytest.mark.parametrize("stage,dropouts", CASES, ids=[f"{s}-{k}" for s, k in CASES])
def test_dropouts_at_each_stage_are_recovered(
    tmp_path: Path, kits: dict, stage: str, dropouts: int
) -> None:
    agg = start(tmp_path, kits)
    try:
        theta0 = {k: v.clone() for k, v in agg.coordinator.params.items()}
        log = run_round(agg, kits, {i: stage for i in range(dropouts)})
        assert agg.coordinator.version == 1, (
            f"round did not commit: {agg.store.rounds(agg.coordinator.federation_id)}"
        )
        # The aggregate is over the nodes whose masked update was summed.
        contributed = sorted(i for i, what, _ in log if what == "pushed")
        if stage in ("advertise", "share", "input"):
            assert contributed == list(range(dropouts, N))
        else:  # dropping while unmasking: their update is in the sum, their shares are not needed
            assert contributed == list(range(N))
        weights = {i: float(i + 1) for i in contributed}
        total = sum(weights.values())
        for name, value in theta0.items():
            expected = (
                value - sum(weights[i] * delta_for(i, theta0)[name] for i in contributed) / total
            )
            torch.testing.assert_close(agg.coordinator.params[name], expected, atol=1e-6, rtol=0)
    finally:
        agg.stop(grace=0)


def test_fewer_than_threshold_survivors_aborts_without_committing(
    tmp_path: Path, kits: dict
) -> None:
    agg = start(tmp_path, kits)
    try:
        run_round(agg, kits, {0: "input", 1: "input", 2: "input"})  # 2 masked updates < t = 3
        rounds = agg.store.rounds(agg.coordinator.federation_id)
        assert rounds[0].state == "FAILED" and "secure aggregation" in rounds[0].outcome
        assert agg.coordinator.version == 0
        assert agg.store.latest_checkpoint(agg.coordinator.federation_id).version == 0
        assert len(rounds) >= 2 and all(
            r.base_version == 0 for r in rounds[1:]
        )  # next round, same model
    finally:
        agg.stop(grace=0)


def test_an_unmask_answer_without_every_share_is_refused_and_the_round_commits(
    tmp_path: Path, kits: dict
) -> None:
    """Empty, partial and malformed answers to the unmasking stage are refused and do not
    count as answered: the honest answer that follows still unmasks the round. (Counted, three
    empty answers would end the stage with nothing to rebuild the masks from: stuck for good.)"""
    refusals: list = []

    def empty_then_partial_then_honest(client, sec, round_number) -> bool:
        state = client.secagg_state(round_number)
        fake = secrets.randbelow(secagg.PRIME).to_bytes(secagg.SHARE_BYTES, "big")
        attempts = [
            pb.UnmaskRequest(round=round_number),  # no shares at all
            pb.UnmaskRequest(round=round_number, self_seed_shares=[  # one survivor missing
                pb.RevealedShare(about_node=n, share=fake) for n in state.survivors[1:]]),
            pb.UnmaskRequest(round=round_number, self_seed_shares=[  # one survivor twice
                pb.RevealedShare(about_node=n, share=fake)
                for n in [*state.survivors, state.survivors[0]]]),
            pb.UnmaskRequest(round=round_number, self_seed_shares=[  # not a field element
                pb.RevealedShare(about_node=n, share=b"\xff" * secagg.SHARE_BYTES)
                for n in state.survivors]),
        ]  # fmt: skip
        for request in attempts:
            with pytest.raises(grpc.RpcError) as info:
                client.unmask(request)
            refusals.append((info.value.code(), info.value.details()))
        sec.unmask(round_number)
        return False

    agg = start(tmp_path, kits)
    try:
        run_round(agg, kits, {}, unmask=empty_then_partial_then_honest)
        assert len(refusals) == 4 * N
        assert {code for code, _ in refusals} == {grpc.StatusCode.INVALID_ARGUMENT}, refusals
        assert any("exactly one seed share for every survivor" in d for _, d in refusals)
        assert any("field element" in d for _, d in refusals)
        assert agg.coordinator.version == 1, agg.store.rounds(agg.coordinator.federation_id)
    finally:
        agg.stop(grace=0)


def test_shares_that_rebuild_no_secret_fail_the_round_and_the_federation_goes_on(
    tmp_path: Path, kits: dict
) -> None:
    """Well-formed but forged shares (every node lies): the masks cannot be rebuilt, and never
    will be. The round fails with that reason in the database instead of retrying forever,
    the model stays at version 0, and the next round opens for the nodes."""
    logs: list[str] = []

    def forged(client, sec, round_number) -> bool:
        state = client.secagg_state(round_number)
        client.unmask(pb.UnmaskRequest(round=round_number, self_seed_shares=[
            pb.RevealedShare(about_node=n, share=secrets.randbelow(secagg.PRIME).to_bytes(
                secagg.SHARE_BYTES, "big")) for n in state.survivors]))  # fmt: skip
        return True  # the round fails: no next round for this node

    agg = start(tmp_path, kits)
    agg.coordinator.log = logs.append
    try:
        run_round(agg, kits, {}, unmask=forged)
        fed = agg.coordinator.federation_id
        give_up = time.monotonic() + 30
        while agg.store.rounds(fed)[0].state == "AGGREGATING" and time.monotonic() < give_up:
            time.sleep(0.05)
        rounds = agg.store.rounds(fed)
        assert rounds[0].state == "FAILED", rounds
        assert "cannot rebuild the self secret" in rounds[0].outcome, rounds[0].outcome
        assert len(rounds) == 2 and rounds[1].state != "FAILED" and rounds[1].base_version == 0
        assert agg.coordinator.version == 0
        assert agg.store.latest_checkpoint(fed).version == 0
        assert sum("aggregation failed" in line for line in logs) == 1, logs  # no retry loop
    finally:
        agg.stop(grace=0)


def test_masked_uploads_reveal_nothing_on_their_own(tmp_path: Path, kits: dict) -> None:
    """What the aggregator stores for one node looks uniformly random, not like a delta."""
    agg = start(tmp_path, kits, round_timeout=20)
    try:
        clients = [connect(agg, kits[org]) for org in ORGS]
        threads = [threading.Thread(target=run_node, args=(c, kits[ORGS[i]], i, "unmask", []))
                   for i, c in enumerate(clients)]  # fmt: skip
        for t in threads:
            t.start()
        give_up = time.monotonic() + 30
        spool = tmp_path / "state" / "uploads"
        while len(list(spool.rglob("*.delta"))) < N and time.monotonic() < give_up:
            time.sleep(0.05)
        upload = np.fromfile(next(spool.rglob("*.delta")), dtype="<u4")
        # A quantized delta of 0.01-scale values would sit near 0 or near 2^32 (two's complement).
        assert abs(upload.astype(np.float64).mean() / 2**31 - 1) < 0.05
        assert np.mean((upload > 2**30) & (upload < 3 * 2**30)) > 0.4
        for t in threads:
            t.join(timeout=30)
    finally:
        agg.stop(grace=0)


def test_forged_or_unsigned_keys_are_refused(tmp_path: Path, kits: dict) -> None:
    agg = start(tmp_path, kits, round_timeout=20)
    try:
        a, b = connect(agg, kits["org0"]), connect(agg, kits["org1"])
        for c in (a, b):
            threading.Thread(target=c.get_task, kwargs={"wait_seconds": 1}).start()
        give_up = time.monotonic() + 10
        while agg.coordinator.shared.secagg is None and time.monotonic() < give_up:
            time.sleep(0.05)
        fed = a.spec.federation_id
        _, cipher = secagg.generate_x25519()
        _, mask = secagg.generate_x25519()
        message = secagg.keys_message(fed, 0, a.node_id, cipher, mask)
        forged = secagg.sign(kits["intruder"].identity_key, message)  # signed by someone else
        for signature in (forged, b"", b"\x00" * 64):
            request = pb.AdvertiseKeysRequest(round=0, keys=pb.SignedKeys(
                node_id=a.node_id, cipher_public=cipher, mask_public=mask, signature=signature))  # fmt: skip
            with pytest.raises(grpc.RpcError) as info:
                a.advertise_keys(request)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert not agg.coordinator.shared.secagg.keys
        # Keys claiming to be another node's are refused too, even when properly signed.
        message = secagg.keys_message(fed, 0, b.node_id, cipher, mask)
        request = pb.AdvertiseKeysRequest(round=0, keys=pb.SignedKeys(
            node_id=b.node_id, cipher_public=cipher, mask_public=mask,
            signature=secagg.sign(kits["org0"].identity_key, message)))  # fmt: skip
        with pytest.raises(grpc.RpcError) as info:
            a.advertise_keys(request)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        agg.stop(grace=0)


def test_round_0s_keys_and_upload_replayed_in_round_1_are_refused(
    tmp_path: Path, kits: dict
) -> None:
    """A two-round federation: in round 1, a node replays the signed keys it advertised in
    round 0 and an upload addressed to round 0. The keys' signature binds them to round 0
    (PERMISSION_DENIED); the upload names a round that is closed (FAILED_PRECONDITION). Neither
    leaves a trace in round 1, which then completes with fresh keys."""
    old_keys: dict[str, pb.SignedKeys] = {}

    def unmask_and_stop(client, sec, round_number) -> bool:
        state = client.secagg_state(round_number)
        old_keys.update({p.keys.node_id: p.keys for p in state.peers})
        sec.unmask(round_number)
        return True  # round 0 only: round 1 is driven below

    agg = start(tmp_path, kits, rounds=2)
    try:
        run_round(agg, kits, {}, unmask=unmask_and_stop)
        assert agg.coordinator.version == 1
        clients = [connect(agg, kits[org]) for org in ORGS[:THRESHOLD]]
        a = clients[0]
        assert a.node_id in old_keys
        give_up = time.monotonic() + 30
        tasks: list = [None] * THRESHOLD
        while time.monotonic() < give_up and not all(
            t is not None and t.kind == pb.Task.SECAGG_ADVERTISE_KEYS for t in tasks
        ):
            tasks = [c.get_task(wait_seconds=0.2) for c in clients]
        assert tasks[0].round == 1, tasks
        with pytest.raises(grpc.RpcError) as info:
            a.advertise_keys(pb.AdvertiseKeysRequest(round=1, keys=old_keys[a.node_id]))
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "signature does not verify" in info.value.details()
        zeros = {
            s.name: torch.zeros(s.shape, dtype=torch.uint32) for s in agg.coordinator.upload_specs
        }
        with pytest.raises(grpc.RpcError) as info:
            a.push_update(0, 0, zeros, UNIT, 1.0)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "round 0" in info.value.details(), info.value.details()
        assert agg.coordinator.shared.secagg.keys == {}  # round 1 holds nothing of either
        # Round 1 still completes with the nodes' fresh keys.
        log: list = []
        threads = [threading.Thread(target=run_node, args=(c, kits[ORGS[i]], i, None, log))
                   for i, c in enumerate(clients)]  # fmt: skip
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert agg.coordinator.version == 2, agg.store.rounds(agg.coordinator.federation_id)
    finally:
        agg.stop(grace=0)


def test_a_certificate_from_another_ca_fails_the_handshake(tmp_path: Path, kits: dict) -> None:
    agg = start(tmp_path, kits)
    try:
        foreign = AggregatorClient(
            agg.address, "org0", kit=kits["foreign"], rpc_timeout=5, attempts=1
        )
        with pytest.raises(grpc.RpcError) as info:
            foreign.join()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert agg.store.nodes(agg.coordinator.federation_id) == []
        plain = AggregatorClient(agg.address, "org0", rpc_timeout=5)  # no certificate at all
        with pytest.raises(grpc.RpcError):
            plain.join()
    finally:
        agg.stop(grace=0)


def test_a_node_with_a_kit_from_another_ca_stops_at_once_with_one_line(
    tmp_path: Path, kits: dict, corpus_dir: Path
) -> None:
    """A refused handshake is not a network outage: no reconnect back-off (300 s by default),
    one `fedpt: error:` line naming the TLS handshake."""
    agg = start(tmp_path, kits)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "fedpt", "node", "join", "--kit", str(kits["foreign"].directory),
             "--aggregator", agg.address, "--data", str(corpus_dir),
             "--work-dir", str(tmp_path / "node")],
            capture_output=True, text=True, timeout=120,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        assert proc.returncode == 2, proc.stdout + proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("fedpt: error: join: the TLS handshake"), (
            proc.stderr
        )
        assert "retrying" not in proc.stdout, proc.stdout  # refused once, never retried
        assert agg.store.nodes(agg.coordinator.federation_id) == []
    finally:
        agg.stop(grace=0)


def test_a_node_cannot_claim_another_identity(tmp_path: Path, kits: dict) -> None:
    agg = start(tmp_path, kits)
    try:
        impostor = AggregatorClient(agg.address, "org1", kit=kits["org0"], rpc_timeout=5)
        # Asking to join as org1 with org0's certificate:
        with pytest.raises(grpc.RpcError) as info:
            impostor.stub.Join(pb.JoinRequest(organisation="org1"), timeout=5)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        reply = impostor.join()  # joining as itself works, and it is org0
        nodes = agg.store.nodes(agg.coordinator.federation_id)
        assert [(n.id, n.organisation) for n in nodes] == [(reply.node_id, "org0")]
        # The session token means nothing under mutual TLS: the certificate is the identity.
        org1 = connect(agg, kits["org1"])
        task = org1.stub.GetTask(
            pb.TaskRequest(wait_seconds=0), metadata=impostor._metadata, timeout=5
        )
        assert agg.coordinator.lifecycle.ready.get(org1.node_id) is not None and task is not None
        assert reply.node_id != org1.node_id
    finally:
        agg.stop(grace=0)


def test_after_a_restart_certified_nodes_still_get_the_start_grace(
    tmp_path: Path, kits: dict
) -> None:
    """Five organisations joined; the aggregator restarts. Certified nodes do not join again,
    so the first two back must not start a round on their own: the round waits the start
    grace for the others (it counted only this process's sessions, none, and started at once)."""
    first = start(tmp_path, kits)
    for org in ORGS:
        connect(first, kits[org]).close()
    first.stop(grace=0)
    agg = start(tmp_path, kits, start_grace=3.0)
    try:
        back = [AggregatorClient(agg.address, org, kit=kits[org], rpc_timeout=10)
                for org in ORGS[:2]]  # fmt: skip
        quorum_at = time.monotonic()
        while time.monotonic() < quorum_at + 1.0:  # well inside the 3 s grace
            for c in back:
                c.get_task(wait_seconds=0)
            assert agg.coordinator.round.state == "OPEN", agg.coordinator.round
            time.sleep(0.05)
        give_up = time.monotonic() + 15
        while agg.coordinator.round.state == "OPEN" and time.monotonic() < give_up:
            for c in back:
                c.get_task(wait_seconds=0.2)
        assert agg.coordinator.round.state != "OPEN"  # the grace ended: the two go ahead
        assert time.monotonic() - quorum_at >= 2.5
        assert len(agg.coordinator.round.participants) == 2
    finally:
        agg.stop(grace=0)


def test_the_aggregators_own_kit_cannot_join_as_a_node(tmp_path: Path, kits: dict) -> None:
    """Server kits certify serverAuth only: presented as a client certificate, the handshake
    (or, failing that, fedpt's own path validation) refuses it, and no node is registered."""
    agg = start(tmp_path, kits)
    try:
        server_kit = kits["aggregator"]
        with pytest.raises(pki.PKIError, match="path validation"):
            pki.verify_certificate(server_kit.cert_pem, server_kit.ca_pem)
        client = AggregatorClient(agg.address, "aggregator", kit=server_kit, rpc_timeout=5)
        with pytest.raises(grpc.RpcError) as info:
            client.join()
        assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED)
        assert agg.store.nodes(agg.coordinator.federation_id) == []
    finally:
        agg.stop(grace=0)
