"""`fedpt status --state-dir`: what a running federation is doing, read from its aggregator's
records without touching them (fedpt/status.py). Real aggregator and clients on 127.0.0.1."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import torch

from aggregator.server import start_aggregator
from fedpt.status import read_status
from tests.test_aggregator import join, local_params, make_config, train_tasks, wait_for_version
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
    assert (status.name, status.status, status.round_number) == ("test", "running", 0)
    assert status.round_state in ("TRAINING", "COLLECTING")
    doing = {n.organisation: n for n in status.nodes}
    assert doing["acme"].doing == "uploaded round 0"
    assert doing["acme"].last_loss == 2.5 and doing["acme"].uploaded_bytes > 0
    assert doing["globex"].doing == "uploading round 0 (4.9 KiB so far)"
    assert status.uploads_in_flight == {b.node_id: 5000}
    (spool / f"{b.node_id}.0badc0de.part").unlink()

    delta = {k: global0[k] - v for k, v in local_params(global0, 2).items()}
    assert b.push_update(0, 0, delta, num_tokens=1000, train_loss=3.0).complete
    wait_for_version(agg, 1)
    [status] = read_status(state_dir)
    assert (status.version, status.committed, status.round_number) == (1, 1, 1)
    assert status.last_outcome == "committed" or status.last_outcome.startswith("committed")
    # round 1 opens, and starts at once if both nodes polled lately: either way, not round 0
    next_round = {"waiting for the next round", "training round 1"}
    assert {n.doing for n in status.nodes} <= next_round
    assert torch.is_tensor(global0["tok_embeddings.weight"])  # the model was really pulled

    proc = fedpt("status", "--state-dir", state_dir)
    lines = proc.stdout.splitlines()  # not a terminal: plain lines, tab-separated node rows
    assert lines[0].startswith("federation test (running): model version 1, 1 committed, 0 failed")
    assert lines[1].startswith("round 1: ")  # open, or started: both nodes polled lately
    rows = [line.split("\t") for line in lines[3:]]
    assert [r[0] for r in rows] == ["acme", "globex"] and {r[3] for r in rows} <= next_round
    assert rows[0][5] == "2.5000" and rows[1][5] == "3.0000"


def test_status_without_records_is_one_line(tmp_path: Path) -> None:
    for args, message in (
        (["--state-dir", tmp_path / "nowhere"], "is not a folder"),
        (["--state-dir", tmp_path], "no aggregator records"),
        (["--state-dir", tmp_path, "--watch", "0"], "--watch must be a positive"),
    ):
        proc = fedpt("status", *args, check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
