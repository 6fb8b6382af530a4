"""A federation run under a scheduler (Flower's ServerApp): the data plane admits only the nodes
its messages asked in, with one-time tokens (aggregator/admissions.py), and a node started for a
round is held to the round, model version and sha256 the message announced
(node/round_order.py). Real gRPC on 127.0.0.1; real `fedpt node join --once` processes."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from aggregator.config import AggregatorConfig, RoundConfig
from aggregator.server import RunningAggregator, start_aggregator
from node.client import AggregatorClient, _announced
from node.round_order import ADMISSION_TOKEN_ENV, ModelMismatch
from protos import federation_pb2 as pb
from tests.test_aggregator import make_config, state_fingerprint


@pytest.fixture
def scheduled(tmp_path: Path) -> Iterator:
    """Start aggregators that require admission tokens from their first call on."""
    servers: list[RunningAggregator] = []

    def start(config: AggregatorConfig) -> RunningAggregator:
        running = start_aggregator(config, log=lambda _m: None, admission_required=True)
        servers.append(running)
        return running

    yield start
    for running in servers:
        running.stop(grace=0)


def join_as(agg: RunningAggregator, organisation: str, token: str) -> AggregatorClient:
    client = AggregatorClient(agg.address, organisation, rpc_timeout=10, admission_token=token)
    client.join()
    return client


def refused(agg: RunningAggregator, organisation: str, token: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        join_as(agg, organisation, token)
    return raised.value


def test_a_scheduled_aggregator_admits_only_nodes_its_messages_asked_in(
    tmp_path: Path, scheduled
) -> None:
    agg = scheduled(make_config(tmp_path))
    state_dir = tmp_path / "state"
    before = state_fingerprint(agg, state_dir)
    error = refused(agg, "acme", "")
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "admission token" in error.details()
    assert refused(agg, "acme", "made-up").code() == grpc.StatusCode.UNAUTHENTICATED
    assert state_fingerprint(agg, state_dir) == before  # refusals store nothing

    admissions = agg.coordinator.require_admission()
    tokens = admissions.issue(["1", "2"], "round 0")
    join_as(agg, "acme", tokens["1"])
    join_as(agg, "acme", tokens["1"])  # a Join retried after its reply was lost
    spent = refused(agg, "globex", tokens["1"])
    assert spent.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "already used by organisation 'acme'" in spent.details()
    twice = refused(agg, "acme", tokens["2"])  # one organisation, two SuperNodes
    assert twice.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "already joined round 0 through SuperNode 1" in twice.details()
    join_as(agg, "globex", tokens["2"])
    assert sorted(n.organisation for n in agg.store.nodes(agg.coordinator.federation_id)) == [
        "acme", "globex"
    ]  # fmt: skip

    later = admissions.issue(["1", "2"], "round 1")
    assert refused(agg, "acme", tokens["1"]).code() == grpc.StatusCode.UNAUTHENTICATED  # expired
    switched = refused(agg, "globex", later["1"])  # SuperNode 1 spoke for acme before
    assert switched.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "SuperNode 1 joined as organisation 'acme' before" in switched.details()
    join_as(agg, "acme", later["1"])
    assert admissions.organisation_of("1") == "acme"


def test_a_plain_aggregator_needs_no_admission_token(tmp_path: Path) -> None:
    agg = start_aggregator(make_config(tmp_path), log=lambda _m: None)
    try:
        assert join_as(agg, "acme", "").node_id
    finally:
        agg.stop(grace=0)


def test_a_pull_refuses_a_model_other_than_the_one_announced(tmp_path: Path, scheduled) -> None:
    agg = scheduled(make_config(tmp_path))
    tokens = agg.coordinator.require_admission().issue(["1"], "round 0")
    client = join_as(agg, "acme", tokens["1"])
    served = agg.coordinator.payload.manifest.sha256
    with pytest.raises(ModelMismatch, match="announced"):
        client.pull_model(0, announced_sha256=bytes(32))
    pulled = client.pull_model(0, announced_sha256=served)
    assert pulled.keys() == agg.coordinator.params.keys()


def test_an_outer_update_is_held_to_the_model_it_leads_to() -> None:
    update = pb.ModelStreamMessage(
        manifest=pb.TensorManifest(sha256=b"u" * 32, model_sha256=b"m" * 32)
    )
    assert list(_announced(iter([update]), 3, b"m" * 32)) == [update]
    with pytest.raises(ModelMismatch):
        list(_announced(iter([update]), 3, b"u" * 32))  # the update's own hash is not the model's


def node_once(
    agg: RunningAggregator, work_dir: Path, token: str, *expect: str
) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", ADMISSION_TOKEN_ENV: token}
    return subprocess.run(
        [sys.executable, "-m", "fedpt", "node", "join", "--insecure", "--aggregator", agg.address,
         "--data", "builtin:web", "--organisation", "acme", "--work-dir", str(work_dir),
         "--poll-seconds", "1", "--once", *expect],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip


@pytest.mark.slow
def test_a_node_started_for_a_round_is_held_to_the_message_that_started_it(
    tmp_path: Path, scheduled
) -> None:
    config = make_config(tmp_path)
    config = dataclasses.replace(
        config, train={"micro_batch_size": 2, "seq_len": 32},
        round=RoundConfig(min_nodes=1, timeout_seconds=120.0, start_grace_seconds=0.1),
    )  # fmt: skip
    agg = scheduled(config)
    admissions = agg.coordinator.require_admission()
    served = agg.coordinator.payload.manifest.sha256.hex()

    # Announced another model: refused before training, with one line.
    wrong = node_once(agg, tmp_path / "n1", admissions.issue(["1"], "round 0")["1"],
                      "--expect-round", "0", "--expect-model", f"0:{'00' * 32}")  # fmt: skip
    assert wrong.returncode == 2, wrong.stdout[-2000:] + wrong.stderr[-2000:]
    lines = wrong.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedpt: error: the data plane serves model "
                                                   "version 0 as sha256 "), wrong.stderr  # fmt: skip

    # Started for a later round: the data plane's round 0 is left alone, nothing is pushed.
    later = node_once(agg, tmp_path / "n2", admissions.issue(["1"], "round 5")["1"],
                      "--expect-round", "5", "--expect-model", f"0:{served}")  # fmt: skip
    assert later.returncode == 0, later.stdout[-2000:] + later.stderr[-2000:]
    assert "started for round 5, but the aggregator asks for round 0" in later.stdout
    assert not agg.coordinator.intake.completed

    # No token from this run: refused at Join, with one line.
    stranger = node_once(agg, tmp_path / "n3", "", "--expect-model", f"0:{served}")
    assert stranger.returncode == 2
    assert stranger.stderr.strip().splitlines()[-1].startswith(
        "fedpt: error: the aggregator at 127.0.0.1:"
    ) and "UNAUTHENTICATED" in stranger.stderr  # fmt: skip

    # As announced: it trains round 0 and its update arrives.
    right = node_once(agg, tmp_path / "n4", admissions.issue(["1"], "round 0")["1"],
                      "--expect-round", "0", "--expect-model", f"0:{served}")  # fmt: skip
    assert right.returncode == 0, right.stdout[-2000:] + right.stderr[-2000:]
    assert agg.coordinator.version == 1  # `--once` returns once its round has closed
