"""`fedpt report`: charts and a self-contained report.html, from a real `fedpt train` run and
from a federation's records (a real aggregator store, opened read-only)."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import re
import sqlite3
import sys
import time
from pathlib import Path

import pytest

from aggregator.store import (
    DOWNLOAD_BYTES,
    GPU_ENERGY,
    CheckpointRow,
    MetricRow,
    Store,
    SubmissionRow,
)
from fedpt import report
from node.participant import RoundRecord
from tests.test_cli import SMALL_RUN, fedpt

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DATA_URI = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
ORGS = ("web", "apps")
ROUNDS = 3


def assert_valid_png(data: bytes) -> None:
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 5000  # axes, lines and labels: not an empty canvas
    image = pytest.importorskip("matplotlib.image").imread(io.BytesIO(data))
    assert image.shape[0] > 100 and image.shape[1] > 100


def assert_self_contained(html_path: Path, pngs: list[str]) -> list[bytes]:
    """Every chart embedded as a data URI, nothing fetched from anywhere."""
    text = html_path.read_text()
    assert not re.search(r"https?://", text)
    assert "<script" not in text and "<link" not in text
    embedded = [base64.b64decode(m) for m in DATA_URI.findall(text)]
    assert len(embedded) == len(pngs)
    for name, data in zip(pngs, embedded, strict=True):
        assert data == (html_path.parent / name).read_bytes()
        assert_valid_png(data)
    return embedded


# ---- a `fedpt train` run ----------------------------------------------------------------------
@pytest.mark.slow
def test_a_training_run_writes_its_report_and_fedpt_report_rewrites_it(
    corpus_dir: Path, tmp_path: Path
) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "run"
    proc = fedpt("train", "--data", corpus_dir, "--out", out, "--steps", "6", "--eval-every",
                 "3", *SMALL_RUN)  # fmt: skip
    default = out / "report" / "report.html"
    assert f"report: {default}" in proc.stdout  # written at the end of the run
    assert_self_contained(default, ["loss.png", "lr.png"])
    assert "n_layers = 5" in default.read_text()  # the run's settings (run.json)

    elsewhere = tmp_path / "elsewhere" / "train.html"
    proc = fedpt("report", "--run", out, "--out", elsewhere)
    assert proc.stdout.strip() == str(elsewhere)
    assert_self_contained(elsewhere, ["loss.png", "lr.png"])
    assert "training run run" in elsewhere.read_text()


# ---- a federation's records -------------------------------------------------------------------
SPEC = {"name": "simulation", "inner_steps": 5, "total_rounds": ROUNDS, "outer_optimizer": "nesterov",
        "delta_encoding": "masked-int16", "download_encoding": "int8",
        "model_config_json": json.dumps({"d_model": 64, "n_layers": 2, "n_heads": 4}),
        "train_config_json": json.dumps({"lr": 0.003})}  # fmt: skip


def fake_simulation(run: Path, web_joules: float | None = None) -> Path:
    """A `fedpt simulate` run folder with a real aggregator store (made by Store, as the
    aggregator makes it), node round logs in RoundRecord's own format and a summary.json.
    Each node pulls 50 kB a round; with `web_joules`, "web" measured that much GPU energy in
    each round ("apps" never measures)."""
    (run / "aggregator").mkdir(parents=True)
    (run / "aggregator.toml").write_text(
        '[federation]\nname = "simulation"\nrounds = 3\ninner_steps = 5\n'
        '[model]\npreset = "tiny"\n[outer]\nname = "nesterov"\nlr = 0.7\nmomentum = 0.9\n'
    )
    db = run / "aggregator" / "fedpt.db"
    store = Store(f"sqlite:///{db}")
    fid = "fed-1"
    store.create_federation(fid, "simulation", json.dumps(SPEC), CheckpointRow(
        version=0, round_number=-1, path="/ck/v0", sha256="a" * 64, nbytes=10, created_at=1.0))  # fmt: skip
    for org in ORGS:
        store.upsert_node(fid, f"node-{org}", org, org[0] * 64, {})
    t = time.time() - 100  # commit_round stamps finished_at with the real clock
    summary_rounds = []
    for n in range(ROUNDS):
        store.start_round(fid, n, [f"node-{o}" for o in ORGS], started_at=t, deadline_at=t + 60)
        for i, org in enumerate(ORGS):
            loss = 3.0 - 0.3 * n - 0.1 * i
            store.add_submission(
                fid,
                n,
                SubmissionRow(
                    f"node-{org}",
                    1000,
                    loss,
                    40_000 + 1000 * i,
                    "b" * 64,
                    f"/up/{n}/{org}",
                    t + 5 + i,
                ),
                [MetricRow(n, f"node-{org}", "base_val_loss", loss + 0.2)]
                + ([MetricRow(n, "node-web", GPU_ENERGY, web_joules)]
                   if web_joules is not None and org == "web" else []),
            )  # fmt: skip
            (run / "nodes" / org).mkdir(parents=True, exist_ok=True)
            with open(run / "nodes" / org / "rounds.jsonl", "a") as f:
                record = RoundRecord(round=n, version=n, wait_seconds=0.5, pull_seconds=0.2 + i,
                                     train_seconds=3.0, push_seconds=0.3, train_loss=loss,
                                     tokens=1000, pushed=True, base_val_loss=loss + 0.2)  # fmt: skip
                f.write(json.dumps(dataclasses.asdict(record)) + "\n")
        metrics = [MetricRow(n, f"node-{o}", "train_loss", 3.0 - 0.3 * n) for o in ORGS]
        metrics += [MetricRow(n, f"node-{o}", DOWNLOAD_BYTES, 50_000.0) for o in ORGS]
        store.commit_round(fid, n, CheckpointRow(n + 1, n, f"/ck/v{n + 1}", "c" * 64, 10, t + 8),
                           metrics, open_next=n + 1 < ROUNDS)  # fmt: skip
        summary_rounds.append({"round": n, "state": "COMMITTED", "val_loss": 2.9 - 0.3 * n})
        t += 10
    store.close()
    (run / "summary.json").write_text(json.dumps(
        {"initial_val_loss": 3.2, "final_val_loss": 2.3, "rounds": summary_rounds}))  # fmt: skip
    return db


FEDERATION_PNGS = ["global_val_loss.png", "organisations.png", "round_time.png", "bytes.png"]


def test_a_federation_report_reads_the_store_without_changing_or_waiting_for_it(
    tmp_path: Path,
) -> None:
    pytest.importorskip("matplotlib")
    run = tmp_path / "sim"
    db = fake_simulation(run)
    # A running aggregator mid-commit: a write transaction open, with a row not yet committed.
    writer = sqlite3.connect(db, timeout=0, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("UPDATE federations SET name = 'renamed-mid-commit'")
    before = (db.read_bytes(), db.stat().st_mtime_ns)
    try:
        html_path = report.write_report(run)
    finally:
        after = (db.read_bytes(), db.stat().st_mtime_ns)
        writer.execute("ROLLBACK")
        writer.close()
    assert after == before
    assert html_path == run / "report" / "report.html"
    assert_self_contained(html_path, FEDERATION_PNGS)
    text = html_path.read_text()
    for setting in ("simulation", "nesterov", "lr = 0.7", "masked-int16", "int8", "n_layers = 2",
                    "3 round(s) committed"):  # fmt: skip
        assert setting in text, setting
    assert "renamed-mid-commit" not in text  # the uncommitted write is not seen


def test_the_store_is_opened_read_only(tmp_path: Path) -> None:
    db = fake_simulation(tmp_path / "sim")
    connection = report.open_read_only(db)
    try:
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            connection.execute("CREATE TABLE intruder (x INTEGER)")
    finally:
        connection.close()
    federation = report.read_federation(db)
    assert federation.name == "simulation"
    assert [r["state"] for r in federation.rounds] == ["COMMITTED"] * ROUNDS
    assert {federation.organisation_of[s["node_id"]] for s in federation.submissions} == set(ORGS)


def test_an_aggregator_state_dir_alone_is_reported_from_its_database(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    run = tmp_path / "sim"
    fake_simulation(run)
    state_dir = run / "aggregator"  # fedpt.db and nothing else: no node logs, no summary
    html_path = report.write_report(state_dir, tmp_path / "out" / "agg.html")
    assert_self_contained(html_path, FEDERATION_PNGS)
    assert "base_val_loss" in html_path.read_text()  # says where the global loss came from
    assert "wait, pull and push are not known" in html_path.read_text()


def test_bytes_are_not_invented_when_no_upload_was_recorded(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    store = Store(f"sqlite:///{state_dir / 'fedpt.db'}")
    store.create_federation(
        "f", "fresh", json.dumps(SPEC), CheckpointRow(0, -1, "/v0", "a" * 64, 1, 1.0)
    )
    store.close()
    html_path = report.write_report(state_dir)
    assert not (html_path.parent / "bytes.png").exists()
    text = html_path.read_text()
    assert "no upload has completed and no model was pulled yet" in text
    assert (
        "Energy per round: not measured" in text and not (html_path.parent / "energy.png").exists()
    )


def test_measured_energy_is_charted_priced_and_unmeasured_nodes_are_not_estimated(
    tmp_path: Path,
) -> None:
    pytest.importorskip("matplotlib")
    run = tmp_path / "sim"
    fake_simulation(run, web_joules=36_000.0)  # 10 Wh a round, 1000 tokens each
    out = tmp_path / "out" / "report.html"
    proc = fedpt("report", "--run", run, "--out", out, "--price-per-kwh", "0.3",
                 "--grid-gco2-per-kwh", "400")  # fmt: skip
    assert proc.stdout.strip() == str(out)
    assert_self_contained(out, [*FEDERATION_PNGS, "energy.png"])
    text = out.read_text()
    # 3 rounds x 10 Wh, web's 3000 tokens only: apps measured nothing and is not estimated
    assert (
        "0.03 kWh measured; 100,000 tokens/kWh; estimated cost 0.009 EUR; estimated 12 g CO2e"
        in text
    )
    assert "In all: web 0.03 kWh." in text and "apps" not in text.split("In all:")[1].split(".")[0]
    assert "the bytes the aggregator sent each organisation" in text

    fake_simulation(tmp_path / "quiet")  # nobody measured
    quiet = report.write_report(tmp_path / "quiet")
    assert "energy</th><td>not measured (no node could measure it" in quiet.read_text()


# ---- the command ------------------------------------------------------------------------------
@pytest.mark.parametrize("what", ["missing", "empty"])
def test_bad_input_is_one_line_and_exit_status_2(tmp_path: Path, what: str) -> None:
    folder = tmp_path / what
    if what == "empty":
        folder.mkdir()
    proc = fedpt("report", "--run", folder, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedpt: error:"), proc.stderr
    assert str(folder) in lines[0]
    assert not (folder / "report").exists()


def test_without_matplotlib_a_run_says_how_to_get_its_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"event": "train", "step": 1, "loss": 3.0,
                                                        "lr": 1e-3}) + "\n")  # fmt: skip
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    lines: list[str] = []
    assert report.report_at_end(tmp_path, lines.append) is None
    assert len(lines) == 1 and "fedpt[report]" in lines[0] and "fedpt report --run" in lines[0]
    assert not (tmp_path / "report").exists()
    with pytest.raises(report.ReportUnavailable, match="matplotlib"):
        report.write_report(tmp_path)


def test_a_report_that_fails_never_fails_the_run(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    lines: list[str] = []
    assert report.report_at_end(tmp_path / "nothing-here", lines.append) is None
    assert len(lines) == 1 and lines[0].startswith("no report")
