"""The aggregator over a real gRPC server on 127.0.0.1: round lifecycle, outer step, refusals
that change nothing, stragglers, quorum failure, restart-resume, resumable transfers, health."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aggregator.config import (
    AggregatorConfig,
    FederationConfig,
    RoundConfig,
    ServerConfig,
    StoreConfig,
)
from aggregator.outer import OuterConfig
from aggregator.rounds import RecoveryError
from aggregator.server import RunningAggregator, start_aggregator
from model.config import ModelConfig
from node.client import SESSION_METADATA, AggregatorClient
from protos import federation_pb2 as pb
from protos.codec import encode, update_messages

MODEL = ModelConfig(dim=32, n_layers=1, n_heads=2, ffn_dim=64, max_seq_len=32)
CHUNK = 16 << 10  # small chunks: the test model spans many of them


def make_config(tmp_path: Path, database_url: str | None = None, **sections) -> AggregatorConfig:
    base = AggregatorConfig(
        server=ServerConfig(port=0, chunk_bytes=CHUNK, long_poll_seconds=2.0, insecure=True),
        # fp32 both ways: these tests recompute the committed model exactly.
        federation=FederationConfig(
            name="test", rounds=0, inner_steps=1, delta_encoding="fp32", download_encoding="fp32"
        ),
        model=MODEL,
        round=RoundConfig(min_nodes=2, timeout_seconds=30.0, start_grace_seconds=0.2),
        outer=OuterConfig(name="fedavg"),
        store=StoreConfig(state_dir=str(tmp_path / "state"), database_url=database_url or ""),
    )
    return dataclasses.replace(base, **sections)


def join(agg: RunningAggregator, *orgs: str) -> list[AggregatorClient]:
    clients = []
    for org in orgs:
        client = AggregatorClient(agg.address, org, rpc_timeout=10)
        client.join()
        clients.append(client)
    return clients


def train_tasks(clients: list[AggregatorClient]) -> list[pb.Task]:
    """Every client long-polls at once, as real nodes do, until each has a TRAIN task."""
    tasks: list[pb.Task | None] = [None] * len(clients)

    def poll(i: int) -> None:
        for _ in range(20):
            task = clients[i].get_task(wait_seconds=1.0)
            if task.kind == pb.Task.TRAIN:
                tasks[i] = task
                return

    threads = [threading.Thread(target=poll, args=(i,)) for i in range(len(clients))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(t is not None for t in tasks), "not every node got a TRAIN task"
    return tasks


def local_params(global_params: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in global_params.items()}


def wait_for_version(agg: RunningAggregator, version: int, timeout: float = 15.0) -> None:
    give_up = time.monotonic() + timeout
    while agg.coordinator.version < version:
        assert time.monotonic() < give_up, f"version {version} not committed in {timeout}s"
        time.sleep(0.05)


def state_fingerprint(agg: RunningAggregator, state_dir: Path) -> tuple:
    files = sorted((str(p.relative_to(state_dir)), p.stat().st_size) for p in state_dir.rglob("*") if p.is_file()
                   and not p.name.startswith("fedpt.db"))  # fmt: skip
    return agg.store.snapshot(), files


def test_round_lifecycle_commits_the_weighted_mean(
    tmp_path: Path, serve, database_url: str
) -> None:
    agg = serve(make_config(tmp_path, database_url))
    a, b = join(agg, "acme", "globex")
    assert a.spec.outer_optimizer == "fedavg" and a.spec.chunk_bytes == CHUNK
    task_a, task_b = train_tasks([a, b])
    assert task_a.round == task_b.round == 0 and task_a.model_version == 0
    global0 = a.pull_model(0)
    torch.testing.assert_close(global0, agg.coordinator.params, atol=0, rtol=0)
    local_a, local_b = local_params(global0, 1), local_params(global0, 2)
    for client, local, tokens, score in ((a, local_a, 3000, 5.25), (b, local_b, 1000, None)):
        delta = {k: global0[k] - local[k] for k in global0}
        reply = client.push_update(0, 0, delta, num_tokens=tokens, train_loss=2.0,
                                   base_val_loss=score)  # fmt: skip
        assert reply.complete
    wait_for_version(agg, 1)
    # FedAvg with lr 1: the token-weighted mean of the local models.
    for name in global0:
        expected = (3000 * local_a[name] + 1000 * local_b[name]) / 4000
        torch.testing.assert_close(agg.coordinator.params[name], expected, atol=1e-6, rtol=1e-5)
    rounds = agg.store.rounds(agg.coordinator.federation_id)
    assert [(r.number, r.state) for r in rounds] == [(0, "COMMITTED"), (1, "OPEN")]
    ck = agg.store.latest_checkpoint(agg.coordinator.federation_id)
    from aggregator.checkpoints import sha256_file

    assert ck.version == 1 and sha256_file(Path(ck.path)) == ck.sha256
    assert a.pull_model(1).keys() == global0.keys()
    metrics = {
        (m.node_id, m.name): m.value for m in agg.store.metrics(agg.coordinator.federation_id)
    }
    assert metrics[(None, "nodes")] == 2.0
    # Each node's score of the round's base model on its own validation split, if it sent one.
    assert metrics[(a.node_id, "base_val_loss")] == 5.25
    assert (b.node_id, "base_val_loss") not in metrics


def test_nesterov_outer_step_is_predicted_exactly(tmp_path: Path, serve) -> None:
    agg = serve(make_config(tmp_path, outer=OuterConfig(name="nesterov")))
    a, b = join(agg, "acme", "globex")
    train_tasks([a, b])
    global0 = a.pull_model(0)
    delta = {k: torch.full_like(v, 0.5) for k, v in global0.items()}
    for client in (a, b):
        client.push_update(0, 0, delta, num_tokens=100, train_loss=1.0)
    wait_for_version(agg, 1)
    # First Nesterov step: b = Δ̄; θ ← θ − lr·(Δ̄ + μ·b) = θ − 0.7·1.9·0.5
    for name in global0:
        torch.testing.assert_close(agg.coordinator.params[name], global0[name] - 0.7 * 1.9 * 0.5)


def raw_push(client: AggregatorClient, header: pb.UpdateHeader, payload, first: int = 0, stop: int | None = None,
             mutate=None) -> pb.PushReply:  # fmt: skip
    messages = list(update_messages(header, payload, first))
    if stop is not None:
        messages = messages[: 1 + stop - first]
    if mutate is not None:
        messages = mutate(messages)
    return client.stub.PushUpdate(iter(messages), metadata=client._metadata, timeout=10)


def zero_delta(global_params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.zeros_like(v) for k, v in global_params.items()}


def flip_byte(messages: list) -> list:
    data = bytearray(messages[2].chunk.data)
    data[0] ^= 0xFF
    messages[2].chunk.data = bytes(data)
    return messages


def nan_payload(global_params):
    bad = zero_delta(global_params)
    next(iter(bad.values())).view(-1)[3] = float("nan")
    return encode(bad, CHUNK)


REFUSALS = {
    # name: (header overrides, payload factory, message mutation, expected code, expected words)
    "wrong round": ({"round": 5}, None, None, grpc.StatusCode.FAILED_PRECONDITION, "has not started"),
    "wrong base version": ({"base_version": 3}, None, None, grpc.StatusCode.INVALID_ARGUMENT, "trains from version 0"),
    "zero tokens": ({"num_tokens": 0}, None, None, grpc.StatusCode.INVALID_ARGUMENT, "num_tokens"),
    "nan loss": ({"train_loss": float("nan")}, None, None, grpc.StatusCode.INVALID_ARGUMENT, "train_loss"),
    "inf validation loss": ({"base_val_loss": float("inf")}, None, None, grpc.StatusCode.INVALID_ARGUMENT,
                            "base_val_loss"),
    "negative validation loss": ({"base_val_loss": -0.5}, None, None, grpc.StatusCode.INVALID_ARGUMENT,
                                 "base_val_loss"),
    "wrong shapes": ({}, lambda g: encode({k: torch.zeros(3) for k in g}, CHUNK), None,
                     grpc.StatusCode.INVALID_ARGUMENT, "shape"),
    "wrong dtype": ({}, lambda g: encode({k: v.half() for k, v in g.items()}, CHUNK), None,
                    grpc.StatusCode.INVALID_ARGUMENT, "dtype"),
    "missing tensor": ({}, lambda g: encode(dict(list(g.items())[1:]), CHUNK), None,
                       grpc.StatusCode.INVALID_ARGUMENT, "manifest"),
    "nan values": ({}, nan_payload, None, grpc.StatusCode.INVALID_ARGUMENT, "NaN"),
    "corrupt chunk": ({}, None, flip_byte, grpc.StatusCode.INVALID_ARGUMENT, "sha256"),
    "chunk out of order": ({}, None, lambda m: [m[0], m[2], m[1], *m[3:]], grpc.StatusCode.INVALID_ARGUMENT,
                           "chunk"),
    "wrong resume offset": ({"first_chunk": 2}, None, None, grpc.StatusCode.FAILED_PRECONDITION,
                            "resume this upload from chunk 0"),
    "header missing": ({}, None, lambda m: m[1:], grpc.StatusCode.INVALID_ARGUMENT, "header"),
}  # fmt: skip


@pytest.mark.parametrize("case", REFUSALS.keys())
def test_every_refusal_is_clear_and_changes_nothing(tmp_path: Path, serve, case: str) -> None:
    overrides, make_payload, mutate, code, words = REFUSALS[case]
    agg = serve(make_config(tmp_path))
    a, b = join(agg, "acme", "globex")
    train_tasks([a, b])
    global0 = a.pull_model(0)
    payload = make_payload(global0) if make_payload else encode(zero_delta(global0), CHUNK)
    header = pb.UpdateHeader(
        **{"round": 0, "base_version": 0, "num_tokens": 10, "train_loss": 1.0, **overrides}
    )
    before = state_fingerprint(agg, tmp_path / "state")
    accumulated = agg.coordinator.accumulator._sum.copy()
    with pytest.raises(grpc.RpcError) as info:
        raw_push(a, header, payload, first=overrides.get("first_chunk", 0), mutate=mutate)
    assert info.value.code() == code, info.value.details()
    assert words in info.value.details()
    assert state_fingerprint(agg, tmp_path / "state") == before
    assert (agg.coordinator.accumulator._sum == accumulated).all()
    # The node can still send a good update afterwards.
    assert a.push_update(0, 0, zero_delta(global0), num_tokens=10, train_loss=1.0).complete


def test_duplicate_late_and_foreign_uploads_are_refused(tmp_path: Path, serve) -> None:
    config = make_config(tmp_path, round=RoundConfig(min_nodes=2, max_nodes=2, timeout_seconds=30.0,
                                                     start_grace_seconds=0.2))  # fmt: skip
    agg = serve(config)
    a, b, c = join(agg, "acme", "globex", "initech")
    tasks = train_tasks([a, b])
    assert all(t.round == 0 for t in tasks)
    global0 = a.pull_model(0)
    payload = encode(zero_delta(global0), CHUNK)
    header = pb.UpdateHeader(round=0, base_version=0, num_tokens=10, train_loss=1.0)
    # c was ready too late to be picked (max_nodes 2): not a participant.
    with pytest.raises(grpc.RpcError) as info:
        raw_push(c, header, payload)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert raw_push(a, header, payload).complete
    before = state_fingerprint(agg, tmp_path / "state")
    with pytest.raises(grpc.RpcError) as info:
        raw_push(a, header, payload)
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert state_fingerprint(agg, tmp_path / "state") == before
    assert raw_push(b, header, payload).complete
    wait_for_version(agg, 1)
    with pytest.raises(grpc.RpcError) as info:  # round 0 is over
        raw_push(b, header, payload)
    assert (
        info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        and "closed" in info.value.details()
    )


def test_unknown_session_and_oversized_message_are_refused(tmp_path: Path, serve) -> None:
    agg = serve(make_config(tmp_path))
    (a,) = join(agg, "acme")
    with pytest.raises(grpc.RpcError) as info:
        a.stub.GetTask(
            pb.TaskRequest(wait_seconds=0), metadata=((SESSION_METADATA, "forged"),), timeout=5
        )
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as info:
        a.stub.GetTask(pb.TaskRequest(wait_seconds=0), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    big = pb.JoinRequest(organisation="x" * (17 << 20))
    with pytest.raises(grpc.RpcError) as info:
        a.stub.Join(big, timeout=10)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.RpcError) as info:
        a.stub.Join(pb.JoinRequest(organisation="bad\nname"), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_straggler_is_excluded_at_the_deadline(tmp_path: Path, serve) -> None:
    config = make_config(
        tmp_path, round=RoundConfig(min_nodes=2, timeout_seconds=2.0, start_grace_seconds=0.5)
    )
    agg = serve(config)
    a, b, c = join(agg, "acme", "globex", "initech")
    train_tasks([a, b, c])
    global0 = a.pull_model(0)
    header = pb.UpdateHeader(round=0, base_version=0, num_tokens=10, train_loss=1.0)
    payload = encode(zero_delta(global0), CHUNK)
    assert a.push_update(0, 0, zero_delta(global0), 10, 1.0).complete
    assert b.push_update(0, 0, zero_delta(global0), 10, 1.0).complete
    raw_push(c, header, payload, stop=2)  # c starts but does not finish in time
    wait_for_version(agg, 1, timeout=10)
    with pytest.raises(grpc.RpcError) as info:
        raw_push(c, header, payload, first=2)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    metrics = {
        (m.round_number, m.name): m.value for m in agg.store.metrics(agg.coordinator.federation_id)
    }
    assert metrics[(0, "nodes")] == 2.0
    assert not list((tmp_path / "state" / "uploads").rglob("*.part")), (
        "straggler's spool left behind"
    )


def test_round_without_quorum_fails_and_the_next_starts_from_the_same_model(
    tmp_path: Path, serve
) -> None:
    config = make_config(
        tmp_path, round=RoundConfig(min_nodes=2, timeout_seconds=1.0, start_grace_seconds=0.1)
    )
    agg = serve(config)
    a, b = join(agg, "acme", "globex")
    train_tasks([a, b])
    global0 = a.pull_model(0)
    assert a.push_update(0, 0, zero_delta(global0), 10, 1.0).complete
    give_up = time.monotonic() + 10
    while agg.coordinator.round.number < 1:
        assert time.monotonic() < give_up
        time.sleep(0.05)
    rounds = agg.store.rounds(agg.coordinator.federation_id)
    assert (rounds[0].state, rounds[1].state) == ("FAILED", "OPEN")
    assert "quorum not reached" in rounds[0].outcome
    assert agg.coordinator.version == 0 and rounds[1].base_version == 0


def test_restart_resumes_from_the_database_and_checkpoints(
    tmp_path: Path, serve, database_url: str
) -> None:
    config = make_config(tmp_path, database_url)
    agg = serve(config)
    a, b = join(agg, "acme", "globex")
    train_tasks([a, b])
    global0 = a.pull_model(0)
    delta_a, delta_b = ({k: torch.full_like(v, x) for k, v in global0.items()} for x in (0.25, 0.5))
    a.push_update(0, 0, delta_a, 100, 1.0)
    b.push_update(0, 0, delta_b, 100, 1.0)
    wait_for_version(agg, 1)
    global1 = {k: v.clone() for k, v in agg.coordinator.params.items()}
    train_tasks([a, b])
    a.push_update(1, 1, delta_a, 100, 1.0)  # round 1 has one upload when the aggregator stops
    agg.stop(grace=0)

    again = serve(config)
    assert again.coordinator.version == 1
    torch.testing.assert_close(again.coordinator.params, global1, atol=0, rtol=0)
    assert again.coordinator.round.number == 1
    assert set(again.coordinator.intake.completed) == {a.node_id}
    a2, b2 = (AggregatorClient(again.address, org, rpc_timeout=10) for org in ("acme", "globex"))
    a2.join(), b2.join()  # re-join: same node ids, new session tokens
    assert (a2.node_id, b2.node_id) == (a.node_id, b.node_id)
    assert b2.get_task(wait_seconds=2).kind == pb.Task.TRAIN
    b2.push_update(1, 1, delta_b, 100, 1.0)
    wait_for_version(again, 2)
    for name in global1:  # FedAvg lr 1 of the kept upload and the new one
        torch.testing.assert_close(again.coordinator.params[name], global1[name] - 0.375)


def test_push_and_pull_resume_from_an_offset(tmp_path: Path, serve) -> None:
    agg = serve(make_config(tmp_path))
    a, b = join(agg, "acme", "globex")
    train_tasks([a, b])
    global0 = a.pull_model(0)
    payload = encode({k: torch.full_like(v, 0.5) for k, v in global0.items()}, CHUNK)
    assert payload.manifest.num_chunks > 4
    header = pb.UpdateHeader(round=0, base_version=0, num_tokens=10, train_loss=1.0)
    partial = raw_push(a, header, payload, stop=3)  # the stream ends after 3 chunks
    assert (partial.chunks_received, partial.complete) == (3, False)
    assert a.upload_status(0).chunks_received == 3
    done = raw_push(a, header, payload, first=3)
    assert done.complete and a.upload_status(0).complete
    # Pull from chunk 2 on: the manifest, then only chunks 2.. arrive.
    stream = a.stub.PullModel(
        pb.PullRequest(model_version=0, first_chunk=2), metadata=a._metadata, timeout=10
    )
    messages = list(stream)
    assert messages[0].WhichOneof("payload") == "manifest"
    assert [m.chunk.index for m in messages[1:]] == list(
        range(2, agg.coordinator.payload.manifest.num_chunks)
    )
    with pytest.raises(grpc.RpcError) as info:
        list(a.stub.PullModel(pb.PullRequest(model_version=7), metadata=a._metadata, timeout=5))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_service_reports_serving(tmp_path: Path, serve) -> None:
    agg = serve(make_config(tmp_path))
    with grpc.insecure_channel(agg.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "fedpt.v1.Federation"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def finished_one_round_federation(tmp_path: Path, serve) -> tuple:
    """(aggregator, config, acme, globex): a 1-round federation both nodes took part in, now
    finished, lingering up to 60 s for its nodes."""
    config = make_config(tmp_path)
    config = dataclasses.replace(
        config,
        federation=dataclasses.replace(config.federation, rounds=1),
        server=dataclasses.replace(config.server, stop_linger_seconds=60.0),
    )
    agg = serve(config)
    a, b = join(agg, "acme", "globex")
    train_tasks([a, b])
    global0 = a.pull_model(0)
    for seed, client in enumerate((a, b)):
        delta = {k: global0[k] - v for k, v in local_params(global0, seed).items()}
        assert client.push_update(0, 0, delta, num_tokens=100, train_loss=2.0).complete
    wait_for_version(agg, 1)
    return agg, config, a, b


def test_finished_aggregator_lingers_until_every_node_has_seen_stop(tmp_path: Path, serve) -> None:
    from aggregator.server import _linger

    agg, config, a, b = finished_one_round_federation(tmp_path, serve)
    assert agg.coordinator.finished
    lingering = threading.Thread(target=_linger, args=(agg.coordinator, threading.Event()))
    lingering.start()
    # A node away for longer than a long poll (in reconnect back-off) must still hear STOP.
    lingering.join(timeout=config.server.long_poll_seconds + 2.5)
    assert lingering.is_alive(), "the aggregator stopped before every node had seen STOP"
    assert a.get_task(wait_seconds=0).kind == pb.Task.STOP
    lingering.join(timeout=1.5)
    assert lingering.is_alive(), "one node has not seen STOP yet"
    assert b.get_task(wait_seconds=0).kind == pb.Task.STOP
    lingering.join(timeout=5)
    assert not lingering.is_alive(), "every node saw STOP, yet the aggregator lingers"


def test_a_node_that_asks_for_the_final_model_is_served_it_before_the_aggregator_stops(
    tmp_path: Path, serve
) -> None:
    from aggregator.server import _linger

    agg, _, a, b = finished_one_round_federation(tmp_path, serve)
    lingering = threading.Thread(target=_linger, args=(agg.coordinator, threading.Event()))
    lingering.start()
    assert b.get_task(wait_seconds=0).kind == pb.Task.STOP
    stop = a.get_task(wait_seconds=0, final_model=True)
    assert stop.kind == pb.Task.STOP and stop.model_version == 1
    # Every node has heard STOP, but acme is still pulling the final model: stay up for it.
    lingering.join(timeout=1.5)
    assert lingering.is_alive(), "the aggregator stopped while a node pulled the final model"
    torch.testing.assert_close(a.pull_model(1), agg.coordinator.params, atol=0, rtol=0)
    assert a.get_task(wait_seconds=0).kind == pb.Task.STOP  # "I have it"
    lingering.join(timeout=5)
    assert not lingering.is_alive(), "every node has what it needs, yet the aggregator lingers"


@pytest.mark.parametrize(
    "change,field",
    [
        ({"federation": {"inner_steps": 7}}, "inner_steps"),
        ({"train": {"lr": 1e-4}}, "train_config_json"),
    ],
)
def test_a_restart_may_not_change_what_nodes_read_at_join(
    tmp_path: Path, change: dict, field: str
) -> None:
    """Certified nodes never join again after a restart: H and the inner settings they train
    with are frozen with the federation, like the model."""
    config = make_config(tmp_path)
    start_aggregator(config, log=lambda _m: None).stop(grace=0)
    changed = dataclasses.replace(
        config,
        federation=dataclasses.replace(config.federation, **change.get("federation", {})),
        train={**config.train, **change.get("train", {})},
    )
    with pytest.raises(RecoveryError, match=f"created with another {field}"):
        start_aggregator(changed, log=lambda _m: None)
    start_aggregator(config, log=lambda _m: None).stop(grace=0)  # unchanged: it resumes
