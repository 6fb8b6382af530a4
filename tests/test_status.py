"""`fedpt status`: what a running federation is doing, read from its aggregator's records
without touching them (--state-dir), or asked of the running aggregator with an operator kit
(--aggregator; GetFederationStatus). Real aggregator, clients and mutual TLS on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import hashlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from aggregator.server import start_aggregator
from aggregator.status_records import size
from fedpt.status import read_status
from node.client import AggregatorClient
from protos import federation_pb2 as pb
from protos import federation_pb2_grpc as pb_grpc
from protos import pki
from protos.codec import encode
from tests.conftest import issue_kits
from tests.test_aggregator import (
    CHUNK,
    join,
    local_params,
    make_config,
    raw_push,
    train_tasks,
    wait_for_version,
)
from tests.test_cli import fedpt


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_status_shows_who_uploaded_who_trains_and_changes_nothing(tmp_path: Path) -> None:
    agg = start_aggregator(make_config(tmp_path), log=lambda _m: None)
    try:
        watch_a_round(agg, tmp_path / "state")
    finally:
        agg.stop(grace=0)


def watch_a_round(agg, state_dir: Path) -> None:
    a, b = join(agg, "acme", "globex")
    train_tasks([a, b])
    global0 = a.pull_model(0)
    delta = {k: global0[k] - v for k, v in local_params(global0, 1).items()}
    assert a.push_update(0, 0, delta, num_tokens=3000, train_loss=2.5).complete
    # b's upload is on its way: a partial spool as the aggregator names them (aggregator/uploads.py)
    spool = state_dir / "uploads" / "round_00000000"
    (spool / f"{b.node_id}.0badc0de.part").write_bytes(b"\0" * 5000)

    db = state_dir / "fedpt.db"
    before = digest(db)
    writer = sqlite3.connect(db, timeout=1)
    writer.execute("BEGIN IMMEDIATE")  # another process holds the write lock meanwhile
    try:
        [status] = read_status(state_dir)
    finally:
        writer.rollback()
        writer.close()
    assert digest(db) == before  # nothing written, nothing migrated
    assert (status.name, status.status, status.round) == ("test", "running", 0)
    assert not status.live
    assert status.round_state in ("TRAINING", "COLLECTING")
    doing = {n.organisation: n for n in status.nodes}
    assert doing["acme"].doing == "uploaded round 0"
    assert doing["acme"].last_loss == 2.5 and doing["acme"].uploaded_bytes > 0
    assert doing["globex"].doing == "uploading round 0 (4.9 KiB so far)"
    assert {n.node_id: n.upload_in_flight_bytes for n in status.nodes} == {
        a.node_id: 0,
        b.node_id: 5000,
    }
    (spool / f"{b.node_id}.0badc0de.part").unlink()

    delta = {k: global0[k] - v for k, v in local_params(global0, 2).items()}
    assert b.push_update(0, 0, delta, num_tokens=1000, train_loss=3.0).complete
    wait_for_version(agg, 1)
    [status] = read_status(state_dir)
    assert (status.model_version, status.committed, status.round) == (1, 1, 1)
    # the model each pulled is counted: one whole payload each (acme pulled it above)
    assert doing_of(status)["acme"].downloaded_bytes >= agg.coordinator.payload.manifest.total_bytes
    assert all(not n.HasField("energy_joules") for n in status.nodes)  # nothing measured
    assert status.last_outcome == "committed" or status.last_outcome.startswith("committed")
    # round 1 opens, and starts at once if both nodes polled lately: either way, not round 0
    next_round = {"waiting for the next round", "training round 1"}
    assert {n.doing for n in status.nodes} <= next_round
    assert torch.is_tensor(global0["tok_embeddings.weight"])  # the model was really pulled

    proc = fedpt("status", "--state-dir", state_dir)
    lines = proc.stdout.splitlines()  # not a terminal: plain lines, tab-separated node rows
    assert lines[0].startswith("federation test (running, from its records): model version 1, "
                               "1 committed, 0 failed")  # fmt: skip
    assert lines[1].startswith("round 1: ")  # open, or started: both nodes polled lately
    assert lines[2].startswith("energy: not measured (no node could measure it")
    assert lines[3].split("\t")[2] == "last record"
    rows = [line.split("\t") for line in lines[4:]]
    assert [r[0] for r in rows] == ["acme", "globex"] and {r[3] for r in rows} <= next_round
    assert rows[0][6] == "2.5000" and rows[1][6] == "3.0000"
    assert rows[0][7] == rows[1][7] == "not measured"


def doing_of(status) -> dict:
    return {n.organisation: n for n in status.nodes}


def test_status_without_records_is_one_line(tmp_path: Path) -> None:
    for args, message in (
        (["--state-dir", tmp_path / "nowhere"], "is not a folder"),
        (["--state-dir", tmp_path], "no aggregator records"),
        (["--state-dir", tmp_path, "--watch", "0"], "--watch must be a positive"),
    ):
        proc = fedpt("status", *args, check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr


# ---- live: GetFederationStatus with an operator kit --------------------------------------------
@pytest.fixture
def mtls_federation(tmp_path: Path) -> Iterator[tuple]:
    """(aggregator, kits, acme, globex): an mTLS aggregator with two joined nodes, and an
    operator kit "ops" beside the nodes' kits."""
    kits = issue_kits(tmp_path / "pki", ["acme", "globex"])
    kits["ops"] = pki.load_kit(pki.issue_kit(tmp_path / "pki" / "ca", "ops", tmp_path / "pki" / "ops",
                                             operator=True))  # fmt: skip
    config = make_config(tmp_path)
    config = dataclasses.replace(config, server=dataclasses.replace(
        config.server, insecure=False, kit=str(kits["aggregator"].directory)))  # fmt: skip
    agg = start_aggregator(config, log=lambda _m: None)
    clients = [AggregatorClient(agg.address, org, kit=kits[org], rpc_timeout=10)
               for org in ("acme", "globex")]  # fmt: skip
    try:
        for client in clients:
            client.join()
        yield agg, kits, *clients
    finally:
        for client in clients:
            client.close()
        agg.stop(grace=0)


def ask(agg, kit: pki.StartupKit) -> pb.FederationStatus:
    with grpc.secure_channel(agg.address, pki.channel_credentials(kit)) as channel:
        return pb_grpc.FederationStub(channel).GetFederationStatus(pb.FederationStatusRequest(),
                                                                   timeout=10)  # fmt: skip


def test_live_status_shows_last_calls_and_an_upload_cut_mid_stream(mtls_federation) -> None:
    agg, kits, a, b = mtls_federation
    train_tasks([a, b])
    global0 = a.pull_model(0)
    delta = {k: global0[k] - v for k, v in local_params(global0, 1).items()}
    assert a.push_update(0, 0, delta, num_tokens=3000, train_loss=2.5).complete
    payload = encode({k: torch.full_like(v, 0.5) for k, v in global0.items()}, CHUNK)
    header = pb.UpdateHeader(round=0, base_version=0, num_tokens=10, train_loss=1.0)
    assert not raw_push(b, header, payload, stop=2).complete  # globex's stream ends after 2 chunks

    status = ask(agg, kits["ops"])
    assert status.live and (status.round, status.model_version) == (0, 0)
    nodes = doing_of(status)
    assert nodes["acme"].doing == "uploaded round 0" and nodes["acme"].last_loss == 2.5
    model_bytes = agg.coordinator.payload.manifest.total_bytes  # on the wire: + manifest, framing
    assert model_bytes < nodes["acme"].downloaded_bytes < model_bytes * 1.05
    assert nodes["globex"].downloaded_bytes == 0  # it never pulled
    # only the aggregator's memory knows: each node's last GetTask, the cut upload's bytes
    assert all(0 < status.as_of - n.last_call < 30 for n in status.nodes)
    assert nodes["globex"].upload_in_flight_bytes == 2 * CHUNK
    assert nodes["globex"].doing == (f"uploading round 0 ({size(2 * CHUNK)} of "
                                     f"{size(payload.manifest.total_bytes)}), stream cut: waiting "
                                     "for it to resume")  # fmt: skip

    proc = fedpt("status", "--aggregator", agg.address, "--kit", kits["ops"].directory,
                 "--price-per-kwh", "0.3")  # fmt: skip
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(
        "federation test (running, live from the aggregator): model version 0"
    )
    assert f"uploads in flight: {size(2 * CHUNK)} from 1 node(s)" in lines[1]
    assert lines[2].startswith("energy: not measured")
    assert lines[3].split("\t")[2] == "last call"
    rows = {line.split("\t")[0]: line.split("\t") for line in lines[4:]}
    assert rows["acme"][2].endswith("s ago") and rows["globex"][3].startswith("uploading round 0")


def test_live_status_is_refused_to_node_credentials_and_operators_cannot_act_as_nodes(
    mtls_federation, tmp_path: Path
) -> None:
    agg, kits, _a, _b = mtls_federation
    before = agg.store.snapshot()
    with pytest.raises(grpc.RpcError) as refused:
        ask(agg, kits["acme"])
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "needs an operator kit" in refused.value.details()
    # the operator's kit cannot join, poll or upload as a node, not even as an organisation's name
    operator = AggregatorClient(agg.address, "ops", kit=kits["ops"], rpc_timeout=10, attempts=1)
    try:
        with pytest.raises(grpc.RpcError) as joined:
            operator.join()
        assert joined.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as polled:
            operator.stub.GetTask(pb.TaskRequest(wait_seconds=0), timeout=10)
        assert polled.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "cannot act as a node" in polled.value.details()
    finally:
        operator.close()
    assert agg.store.snapshot() == before
    # the command says so in one line before asking, and relays the server's refusal otherwise
    proc = fedpt(
        "status", "--aggregator", agg.address, "--kit", kits["acme"].directory, check=False
    )
    assert proc.returncode == 2 and "needs an operator kit" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_live_status_needs_mutual_tls(tmp_path: Path) -> None:
    agg = start_aggregator(make_config(tmp_path), log=lambda _m: None)  # --insecure
    try:
        with grpc.insecure_channel(agg.address) as channel, pytest.raises(grpc.RpcError) as refused:
            pb_grpc.FederationStub(channel).GetFederationStatus(pb.FederationStatusRequest(),
                                                                timeout=10)  # fmt: skip
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "fedpt status --state-dir" in refused.value.details()
    finally:
        agg.stop(grace=0)


def test_status_flags_that_do_not_go_together_are_one_line(tmp_path: Path) -> None:
    for args, message in (
        (["--aggregator", "127.0.0.1:1"], "--aggregator needs --kit"),
        (["--aggregator", "127.0.0.1:1", "--state-dir", tmp_path], "not allowed with"),
        (["--state-dir", tmp_path, "--kit", tmp_path], "--kit goes with --aggregator"),
        (["--state-dir", tmp_path, "--price-per-kwh", "-1"], "--price-per-kwh must be"),
        (["--state-dir", tmp_path, "--grid-gco2-per-kwh", "nan"], "--grid-gco2-per-kwh must be"),
    ):
        proc = fedpt("status", *args, check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
