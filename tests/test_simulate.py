"""`fedpt simulate` end to end: real aggregator and node processes on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def simulate(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "fedpt", "simulate", "--out", str(tmp_path / "run"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)


@pytest.mark.slow
@pytest.mark.parametrize("ranks", ["1", "2"], ids=["1-rank-nodes", "2-rank-nodes"])
def test_simulation_runs_and_the_global_validation_loss_falls(tmp_path: Path, ranks: str) -> None:
    proc = simulate(tmp_path, "--nodes", "2", "--rounds", "2", "--inner-steps", "5",
                    "--nproc-per-node", ranks, "--micro-batch-size", "4", "--seq-len", "64")  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = tmp_path / "run"
    # The inner-loop flags reach every node (through the federation's spec) and the alone runs.
    for org in ("web", "systems"):
        records = [json.loads(line) for line in (run / "nodes" / org / "rounds.jsonl").open()]
        assert [r["tokens"] for r in records] == [5 * 4 * 64 * int(ranks)] * 2, records
    alone = (run / "alone" / "train.toml").read_text()
    assert "micro_batch_size = 4" in alone and "seq_len = 64" in alone
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_val_loss"] < summary["initial_val_loss"]
    assert [r["state"] for r in summary["rounds"]] == ["COMMITTED", "COMMITTED"]
    assert all(r["nodes"] == 2 for r in summary["rounds"])
    table = proc.stdout
    assert "round" in table and "val loss" in table and "web" in table and "systems" in table
    for path in ("aggregator/fedpt.db", "aggregator.toml", "logs/aggregator.log", "logs/node-web.log",
                 "nodes/web/rounds.jsonl", "rounds.csv", "nodes/web/final/personalised.safetensors",
                 "alone/web/model.safetensors"):  # fmt: skip
        assert (run / path).exists(), path
    # The closing comparison: per organisation, at equal tokens (2 rounds x 5 + 5 personalised)
    orgs = summary["organisations"]
    assert summary["alone_steps"] == 15 and summary["union_global_val_loss"] > 0
    for org in ("web", "systems"):
        o = orgs[org]
        assert sorted(int(v) for v in o["reported"]) == [0, 1]  # its node's score of v0 and v1
        assert o["final_version"] == 2 and o["final_global"] < o["reported"]["0"]
        assert o["personalised"] is not None and {int(s) for s in o["alone_curve"]} == {5, 10, 15}
        assert o["alone_union"] > 0
    assert "personalised better" in table and "on the union of every organisation's" in table


def test_bad_simulation_arguments_are_one_line(tmp_path: Path) -> None:
    proc = simulate(tmp_path, "--nodes", "3", "--data", "builtin:web,builtin:apps")
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("fedpt: error:") and proc.stderr.count("\n") == 1
    assert "2 sources for 3 nodes" in proc.stderr


@pytest.mark.parametrize(
    "args,words",
    [(("--ray-address", "auto"), "--ray-address is for --engine flower"),
     (("--engine", "spark"), "invalid choice: 'spark'")],
)  # fmt: skip
def test_bad_engine_settings_are_one_line(tmp_path: Path, args: tuple, words: str) -> None:
    proc = simulate(tmp_path, *args)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("fedpt: error:") and proc.stderr.count("\n") == 1
    assert words in proc.stderr
