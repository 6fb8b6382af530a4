"""The aggregator under concurrency, over a real gRPC server on 127.0.0.1: a slow commit does
not stall the control plane, and uploads summed in parallel (with one refused half-way, its
bytes rebuilt out while the others keep adding) give exactly the sum recomputed here."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aggregator import accumulator
from aggregator.checkpoints import CheckpointStore
from aggregator.config import RoundConfig
from aggregator.errors import ResourceExhausted, RoundClosed
from aggregator.handlers import SERVICE_NAME
from aggregator.limits import NodeCallLimits
from aggregator.round_sum import RoundSum
from aggregator.uploads import UploadSession
from model.writeback import SequentialFile
from node.client import AggregatorClient
from protos import federation_pb2 as pb
from protos.codec import encode, specs_of
from tests.test_aggregator import (
    CHUNK,
    flip_byte,
    join,
    make_config,
    raw_push,
    train_tasks,
    wait_for_version,
)

SLOW_WRITE_SECONDS = 3.0
PROMPT_SECONDS = 0.5  # far below the slow write: an answer that waited for it would take ~3 s


def test_a_slow_commit_does_not_delay_get_task_join_or_health(
    tmp_path: Path,
    serve,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    writing, written = threading.Event(), threading.Event()
    original_write = CheckpointStore.write

    def slow_write(self, version, *args, **kwargs):  # the disk of a 1B-parameter checkpoint
        if version >= 1:
            writing.set()
            time.sleep(SLOW_WRITE_SECONDS)
        record = original_write(self, version, *args, **kwargs)
        if version >= 1:
            written.set()
        return record

    monkeypatch.setattr(CheckpointStore, "write", slow_write)
    agg = serve(make_config(tmp_path))
    a, b = join(agg, "acme", "globex")
    train_tasks([a, b])
    global0 = a.pull_model(0)
    deltas = [{k: torch.full_like(v, x) for k, v in global0.items()} for x in (0.25, 0.75)]
    for client, delta in zip((a, b), deltas, strict=True):
        assert client.push_update(0, 0, delta, num_tokens=100, train_loss=1.0).complete
    assert writing.wait(timeout=10), "the commit did not start"
    health = health_pb2_grpc.HealthStub(a.channel)

    latencies: dict[str, list[float]] = {"GetTask": [], "Join": [], "status": [], "health": []}
    waits: list[pb.Task] = []
    probe = 0
    while not written.is_set():
        start = time.perf_counter()
        waits.append(a.get_task(wait_seconds=0))
        latencies["GetTask"].append(time.perf_counter() - start)
        start = time.perf_counter()
        a.stub.Join(pb.JoinRequest(organisation=f"probe-{probe}"), timeout=10)
        latencies["Join"].append(time.perf_counter() - start)
        probe += 1
        start = time.perf_counter()
        a.upload_status(0)
        latencies["status"].append(time.perf_counter() - start)
        start = time.perf_counter()
        health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10)
        latencies["health"].append(time.perf_counter() - start)
        time.sleep(0.02)
    for name, values in latencies.items():
        p99 = float(np.percentile(values, 99))
        assert max(values) < PROMPT_SECONDS, (
            f"{name} waited for the commit: max {max(values):.3f} s, p99 {p99:.3f} s over "
            f"{len(values)} calls"
        )
    assert len(latencies["GetTask"]) >= 10, "too few calls landed during the commit"
    # During the commit a node is told to wait, and why.
    assert all(t.kind == pb.Task.WAIT for t in waits)
    assert any("being aggregated" in t.message for t in waits), [t.message for t in waits]

    wait_for_version(agg, 1)  # the commit still lands, with the right model
    for name, value in global0.items():
        torch.testing.assert_close(agg.coordinator.params[name], value - 0.5, atol=0, rtol=0)
    rounds = agg.store.rounds(agg.coordinator.federation_id)
    assert (rounds[0].state, rounds[0].result_version, rounds[-1].number) == ("COMMITTED", 1, 1)
    assert a.pull_model(1).keys() == global0.keys()


def dyadic_delta(global_params: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Multiples of 1/8 in [-8, 8]: weighted sums of a few of them are exact in fp32 whatever
    the order they are added in, so the server's parallel sum can be checked bit for bit."""
    g = torch.Generator().manual_seed(seed)
    return {
        k: torch.randint(-64, 65, v.shape, generator=g).float() / 8
        for k, v in global_params.items()
    }


def test_parallel_uploads_sum_exactly_while_a_refused_one_is_rebuilt_out(
    tmp_path: Path,
    serve,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Small stripes: each 16 KiB chunk spans several, so uploads share and interleave them.
    monkeypatch.setattr(accumulator, "STRIPE_ELEMENTS", 1000)
    inside, most_inside, count_lock = 0, 0, threading.Lock()
    original_add_stripe = accumulator.StreamingAccumulator._add_stripe

    def counted_add_stripe(self, *args):  # how many threads add at once (a slow add widens it)
        nonlocal inside, most_inside
        with count_lock:
            inside += 1
            most_inside = max(most_inside, inside)
        try:
            time.sleep(0.002)
            return original_add_stripe(self, *args)
        finally:
            with count_lock:
                inside -= 1

    monkeypatch.setattr(accumulator.StreamingAccumulator, "_add_stripe", counted_add_stripe)
    orgs = ("acme", "globex", "initech", "umbrella", "hooli")
    config = make_config(tmp_path, round=RoundConfig(min_nodes=5, max_nodes=5,
                                                     timeout_seconds=60.0, start_grace_seconds=0.2))  # fmt: skip
    agg = serve(config)
    clients = join(agg, *orgs)
    train_tasks(clients)
    global0 = clients[0].pull_model(0)
    deltas = [dyadic_delta(global0, seed) for seed in range(len(orgs))]
    tokens = [1000 * (i + 1) for i in range(len(orgs))]
    payloads = [encode(d, CHUNK) for d in deltas]
    assert payloads[0].manifest.num_chunks >= 4

    def header(i: int) -> pb.UpdateHeader:
        return pb.UpdateHeader(round=0, base_version=0, num_tokens=tokens[i], train_loss=1.0)

    def corrupt_late_chunk(messages: list) -> list:  # a bad chunk after some good ones
        return messages[:2] + flip_byte(messages[2:])

    # Nodes 0-2 upload in full, node 3 is refused half-way (its chunks leave the sum by a
    # rebuild while the others stream), node 4 holds back so that the round stays open.
    outcomes: dict[int, object] = {}

    def push(i: int) -> None:
        try:
            mutate = corrupt_late_chunk if i == 3 else None
            outcomes[i] = raw_push(clients[i], header(i), payloads[i], mutate=mutate)
        except grpc.RpcError as e:
            outcomes[i] = e.code()

    threads = [threading.Thread(target=push, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert all(outcomes[i].complete for i in range(3)), outcomes
    assert outcomes[3] == grpc.StatusCode.INVALID_ARGUMENT
    assert most_inside > 1, "chunks of different uploads were never added at the same time"

    def exact_sum(nodes: range | list[int]) -> np.ndarray:
        flat = [torch.cat([deltas[i][k].reshape(-1) for k in global0]).double() for i in nodes]
        return sum(tokens[i] * f for i, f in zip(nodes, flat, strict=True)).float().numpy()

    acc = agg.coordinator.accumulator
    with acc.exclusive():
        np.testing.assert_array_equal(acc._sum, exact_sum(range(3)))
        assert acc.total_weight == sum(tokens[:3])

    # The refused node sends its update again, the last one joins in: the round commits
    # FedAvg (lr 1) of the five, from the same exact sum.
    assert raw_push(clients[3], header(3), payloads[3]).complete
    assert raw_push(clients[4], header(4), payloads[4]).complete
    wait_for_version(agg, 1)
    mean = torch.from_numpy(exact_sum(range(5)) / np.float32(sum(tokens)))
    start = 0
    for name, value in global0.items():
        n = value.numel()
        expected = value - mean[start : start + n].view(value.shape)
        torch.testing.assert_close(agg.coordinator.params[name], expected, atol=0, rtol=0)
        start += n
    assert not list((tmp_path / "state" / "uploads").rglob("*.part"))


def test_each_round_sums_into_a_fresh_accumulator(tmp_path: Path, serve) -> None:
    """Ending a round never waits for the last round's sum: the next starts from zeros."""
    agg = serve(make_config(tmp_path))
    a, b = join(agg, "acme", "globex")
    train_tasks([a, b])
    global0 = a.pull_model(0)
    first = agg.coordinator.accumulator
    for client in (a, b):
        delta = {k: torch.full_like(v, 0.5) for k, v in global0.items()}
        assert client.push_update(0, 0, delta, num_tokens=10, train_loss=1.0).complete
    wait_for_version(agg, 1)
    fresh = agg.coordinator.accumulator
    assert fresh is not first and fresh.total_weight == 0 and not np.any(fresh._sum)


def test_node_call_limits_count_exactly() -> None:
    limits = NodeCallLimits(max_calls=3, max_long_polls=1)
    with contextlib.ExitStack() as held:
        for _ in range(3):
            held.enter_context(limits.call("a"))
        with pytest.raises(ResourceExhausted, match="already has 3 calls"):
            held.enter_context(limits.call("a"))
        held.enter_context(limits.call("b"))  # another node's slots are its own
        first = held.enter_context(limits.long_poll("a"))
        second = held.enter_context(limits.long_poll("a"))
        assert (first, second) == (True, False) and limits.in_flight("a") == (3, 1)
    assert limits.in_flight("a") == (0, 0) and limits.in_flight("b") == (0, 0)
    with limits.long_poll("a", wanted=False) as may_wait:  # wait 0: takes no slot
        assert not may_wait and limits.in_flight("a") == (0, 0)
    with NodeCallLimits(0, 0).long_poll("a") as may_wait:  # 0: no limit
        assert may_wait


FLOOD = 30  # one node's simultaneous long polls: far more than the server's threads
FLOOD_WAIT = 6.0


@pytest.mark.parametrize("limited", [True, False], ids=["limits", "no-limits"])
def test_one_nodes_long_poll_flood_does_not_starve_join_or_health(
    tmp_path: Path,
    serve,
    limited: bool,
) -> None:
    """8 server threads, one node holds 30 GetTask(wait 6 s). With the per-node limit only 2 of
    them wait, so another node's Join and a health check are answered while they do. Without
    it (the control run) every thread is held and Join waits for a poll to end."""
    server = dataclasses.replace(
        make_config(tmp_path).server, max_workers=8, long_poll_seconds=FLOOD_WAIT,
        max_long_polls_per_node=2 if limited else 0,
    )  # fmt: skip
    agg = serve(make_config(tmp_path, server=server, round=RoundConfig(min_nodes=100)))
    (flooder,) = join(agg, "flooder")
    ends: list[tuple[float, float]] = []  # (seconds the poll took, when it ended)
    started = threading.Barrier(FLOOD + 1)

    def poll() -> None:
        started.wait()
        t0 = time.monotonic()
        # Without the limit, polls queued behind the held ones can run out of deadline.
        with contextlib.suppress(grpc.RpcError):
            flooder.get_task(wait_seconds=FLOOD_WAIT)
        ends.append((time.monotonic() - t0, time.monotonic()))

    threads = [threading.Thread(target=poll) for _ in range(FLOOD)]
    for t in threads:
        t.start()
    started.wait()
    time.sleep(0.5)  # the polls reach the server and take its threads
    other = AggregatorClient(agg.address, "newcomer", rpc_timeout=30)
    health = health_pb2_grpc.HealthStub(other.channel)
    status = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=30)
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    other.join()
    answered = time.monotonic()
    for t in threads:
        t.join(timeout=60)
    held = [took for took, _ in ends if took >= FLOOD_WAIT - 1]
    first_held_end = min(end for took, end in ends if took >= FLOOD_WAIT - 1)
    if limited:
        assert len(held) == 2, sorted(took for took, _ in ends)
        assert answered < first_held_end  # Join and health did not wait for a thread
    else:
        assert len(held) >= 8  # every thread held: the starvation the limit prevents
        assert answered >= first_held_end


def test_a_straggler_discarded_while_its_chunk_is_written_ends_as_round_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The round closes (intake.discard, then settle's delete_files in another thread) while the
    straggler's upload thread is inside its spool write: the discard waits for the write, and
    the upload ends with RoundClosed, not a write to a closed file (INTERNAL)."""
    payload = encode({"w": torch.ones(4096)}, 4096)
    round_sum = RoundSum(0, specs_of({"w": torch.ones(4096)}), "fp32")
    session = UploadSession("straggler", 0, payload.manifest, 1.0, 1.0, tmp_path, round_sum)
    write = SequentialFile.write
    discarding: list[threading.Thread] = []

    def write_while_discarded(spool: SequentialFile, data: bytes) -> None:
        if not discarding:  # the round closes now, from another thread

            def discard() -> None:
                session.cancelled = True
                session.delete_files()

            discarding.append(threading.Thread(target=discard))
            discarding[0].start()
            discarding[0].join(0.5)  # unprotected, the file would be closed by now
        write(spool, data)

    monkeypatch.setattr(SequentialFile, "write", write_while_discarded)
    with pytest.raises(RoundClosed):
        session.add_chunk(0, payload.chunk(0))
    discarding[0].join(10)
    assert not discarding[0].is_alive()
    with pytest.raises(RoundClosed):
        session.add_chunk(1, payload.chunk(1))
    assert session.added_bytes == 0 and round_sum.accumulator.total_weight == 0
    assert not session.part_path.exists() and not session.delta_path.exists()
