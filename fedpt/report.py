"""`fedpt report`: PNG charts and one self-contained report.html of a run.

It reads what a run left behind and writes nothing but its own report folder:

  a `fedpt simulate` run folder  aggregator.toml, aggregator/fedpt.db (the aggregator's store),
                                 summary.json, nodes/ORG/rounds.jsonl (each node's round log)
  an aggregator --state-dir      fedpt.db
  a `fedpt train` run folder     run.json, summary.json, metrics.jsonl

The aggregator's SQLite database is opened read-only (`mode=ro`), never through
aggregator.store.Store (which migrates on open): a report of a running federation neither
changes nor locks its database. The PNGs are embedded in report.html as data URIs: the file
needs no network and nothing beside it. matplotlib (the `report` extra) is imported only here,
lazily, with the Agg backend.
"""

from __future__ import annotations

import base64
import html
import json
import math
import sqlite3
import time
import tomllib
import urllib.parse
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from aggregator.store import CPU_ENERGY, DOWNLOAD_BYTES, GPU_ENERGY
from fedpt.energy_cost import (
    JOULES_PER_KWH,
    NOT_MEASURED,
    WHY_NOT_MEASURED,
    EnergyPrices,
    energy_summary,
    kwh_text,
)

INSTALL_HINT = "pip install 'fedpt[report]' (matplotlib)"
NO_PRICES = EnergyPrices()
PHASES = ("wait", "pull", "train", "push", "aggregate")


class ReportError(ValueError):
    """The folder holds nothing this command can report on; the message says why."""


class ReportUnavailable(RuntimeError):
    """matplotlib (the `report` extra) is not installed."""


@dataclass
class Chart:
    filename: str
    title: str
    caption: str


@dataclass
class Report:
    kind: str  # "federation" | "training"
    title: str
    settings: list[tuple[str, str]] = field(default_factory=list)
    charts: list[Chart] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ---- reading a federation ---------------------------------------------------------------------
@dataclass
class Federation:
    name: str
    spec: dict
    status: str
    organisation_of: dict[str, str]  # node id -> organisation
    rounds: list[dict]  # number, state, started_at, finished_at, result_version, ...
    submissions: list[dict]  # round, node_id, num_tokens, train_loss, nbytes, completed_at
    metrics: list[dict]  # round, node_id, name, value


def open_read_only(db: Path) -> sqlite3.Connection:
    """The SQLite file `db`, read-only: no migration, no write, no write lock."""
    uri = f"file:{urllib.parse.quote(str(db.resolve()))}?mode=ro"
    connection = sqlite3.connect(uri, uri=True, timeout=10)
    connection.row_factory = sqlite3.Row
    return connection


def read_federation(db: Path, name: str | None = None) -> Federation:
    try:
        connection = open_read_only(db)
    except sqlite3.Error as e:
        raise ReportError(f"cannot open {db} read-only: {e}") from e
    try:
        return _read_federation(connection, db, name)
    except sqlite3.Error as e:
        raise ReportError(f"cannot read {db}: {e}") from e
    finally:
        connection.close()


def _read_federation(c: sqlite3.Connection, db: Path, name: str | None) -> Federation:
    c.execute("BEGIN")  # one consistent snapshot of every table (a read transaction)
    federations = c.execute(
        "SELECT id, name, spec_json, status FROM federations ORDER BY created_at DESC"
    ).fetchall()
    chosen = [f for f in federations if f["name"] == name] or federations
    if not chosen:
        raise ReportError(f"{db} holds no federation yet: nothing to report")
    fed = chosen[0]
    fid = fed["id"]
    nodes = c.execute("SELECT id, organisation FROM nodes WHERE federation_id = ?", (fid,))
    organisation_of = {r["id"]: r["organisation"] for r in nodes}
    rounds = [dict(r) for r in c.execute(
        "SELECT id, number, state, base_version, started_at, finished_at, result_version, outcome "
        "FROM rounds WHERE federation_id = ? ORDER BY number", (fid,))]  # fmt: skip
    submissions = [dict(r) for r in c.execute(
        "SELECT r.number AS round, s.node_id, s.num_tokens, s.train_loss, s.nbytes, s.completed_at "
        "FROM submissions s JOIN rounds r ON s.round_id = r.id WHERE r.federation_id = ? "
        "ORDER BY r.number", (fid,))]  # fmt: skip
    metrics = [dict(r) for r in c.execute(
        "SELECT round_number AS round, node_id, name, value FROM metrics "
        "WHERE federation_id = ? ORDER BY round_number, id", (fid,))]  # fmt: skip
    c.rollback()
    return Federation(fed["name"], json.loads(fed["spec_json"] or "{}"), fed["status"],
                      organisation_of, rounds, submissions, metrics)  # fmt: skip


def read_jsonl(path: Path) -> list[dict]:
    """Every whole JSON line of `path` (a line being written, cut short, is left out)."""
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


# ---- what a run folder is ---------------------------------------------------------------------
def find_database(run: Path) -> Path | None:
    for db in (run / "aggregator" / "fedpt.db", run / "fedpt.db"):
        if db.is_file():
            return db
    return None


def build_report(run: Path, out_dir: Path, prices: EnergyPrices = NO_PRICES) -> Report:
    """Draw the run's charts into `out_dir` and say what the page shows."""
    if not run.is_dir():
        raise ReportError(f"--run {run}: no such folder")
    db = find_database(run)
    if db is not None:
        return _federation_report(run, db, out_dir, prices)
    if (run / "metrics.jsonl").is_file() or (run / "run.json").is_file():
        return _training_report(run, out_dir)
    raise ReportError(
        f"{run} holds nothing to report: expected a fedpt simulate run folder "
        "(aggregator/fedpt.db), an aggregator --state-dir (fedpt.db) or a fedpt train run "
        "folder (metrics.jsonl)"
    )


def _plt():
    """matplotlib's Figure, on the Agg backend (no display, no GUI toolkit)."""
    try:
        import matplotlib
    except ImportError as e:
        raise ReportUnavailable(f"reports need matplotlib: {INSTALL_HINT}") from e
    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    return Figure


def _save(fig, out_dir: Path, filename: str) -> None:
    from matplotlib.ticker import MaxNLocator

    for ax in fig.axes:  # rounds and steps are whole numbers
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(out_dir / filename, format="png", dpi=100)


def _mean(values: list[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


# ---- a federation -----------------------------------------------------------------------------
def _federation_report(run: Path, db: Path, out_dir: Path, prices: EnergyPrices) -> Report:
    toml = {}
    if (run / "aggregator.toml").is_file():
        try:
            toml = tomllib.loads((run / "aggregator.toml").read_text())
        except (OSError, tomllib.TOMLDecodeError):
            toml = {}
    fed = read_federation(db, (toml.get("federation") or {}).get("name"))
    Figure = _plt()
    out_dir.mkdir(parents=True, exist_ok=True)
    report = Report(
        "federation", f"federation {fed.name}", settings=_federation_settings(fed, toml)
    )
    committed = [r for r in fed.rounds if r["state"] == "COMMITTED"]
    failed = [r for r in fed.rounds if r["state"] == "FAILED"]
    report.settings.append(("status", f"{fed.status}; {len(committed)} round(s) committed, "
                                      f"{len(failed)} failed, database {db}"))  # fmt: skip
    org = fed.organisation_of
    node_logs = {p.parent.name: read_jsonl(p) for p in sorted(run.glob("nodes/*/rounds.jsonl"))}

    # Global validation loss per round.
    summary = read_json(run / "summary.json")
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    rows = [r for r in summary.get("rounds", []) if r.get("state") == "COMMITTED"]
    if rows:
        xs, ys = [r["round"] for r in rows], [r["val_loss"] for r in rows]
        ax.plot(xs, ys, marker="o", label="global model after the round")
        if summary.get("initial_val_loss") is not None:
            ax.plot([min(xs) - 1], [summary["initial_val_loss"]], "s", label="initial model")
        caption = ("The new global model's loss on the held-out validation splits of every "
                   "organisation's data after each committed round (summary.json).")  # fmt: skip
    else:
        base = defaultdict(list)
        for m in fed.metrics:
            if m["name"] == "base_val_loss":
                base[m["round"]].append(m["value"])
        xs = sorted(base)
        ax.plot(xs, [_mean(base[x]) for x in xs], marker="o", label="mean over organisations")
        caption = ("No summary.json with the global model's validation loss: the mean over "
                   "organisations of each node's loss, on its own validation split, of the "
                   "global model the round started from (the aggregator's base_val_loss "
                   "metrics).")  # fmt: skip
    ax.set(xlabel="round", ylabel="validation loss", title="global validation loss")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    _save(fig, out_dir, "global_val_loss.png")
    report.charts.append(Chart("global_val_loss.png", "Global validation loss", caption))

    # Each organisation's training loss and its validation loss of the global model.
    train, val = defaultdict(dict), defaultdict(dict)
    for m in fed.metrics:
        who = org.get(m["node_id"] or "", m["node_id"])
        if m["name"] == "train_loss":
            train[who][m["round"]] = m["value"]
        elif m["name"] == "base_val_loss":
            val[who][m["round"]] = m["value"]
    for name, records in node_logs.items():  # the nodes' own logs fill what the store lacks
        for r in records:
            if r.get("pushed", True) and r.get("train_loss") is not None:
                train[name].setdefault(r["round"], r["train_loss"])
            if r.get("base_val_loss") is not None:
                val[name].setdefault(r["round"], r["base_val_loss"])
    fig = Figure(figsize=(11, 4))
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for ax, data, title in ((ax1, train, "training loss (mean of the inner steps)"),
                            (ax2, val, "validation loss of the global model")):  # fmt: skip
        for name in sorted(data):
            xs = sorted(data[name])
            ax.plot(xs, [data[name][x] for x in xs], marker=".", label=name)
        ax.set(xlabel="round", ylabel="loss", title=title)
        ax.grid(alpha=0.3)
        if data:
            ax.legend(fontsize="small")
    _save(fig, out_dir, "organisations.png")
    report.charts.append(Chart("organisations.png", "Each organisation", (
        "Left: each organisation's mean training loss over its inner steps in the round. Right: "
        "its loss, on its own private validation split, of the global model the round started "
        "from.")))  # fmt: skip
    if not train and not val:
        report.notes.append("No per-organisation losses recorded yet.")

    # Round time split into wait / pull / train / push / aggregate.
    last_upload = defaultdict(float)
    for s in fed.submissions:
        last_upload[s["round"]] = max(last_upload[s["round"]], s["completed_at"] or 0.0)
    numbers = [r["number"] for r in fed.rounds if r["state"] in ("COMMITTED", "FAILED")]
    phases = {p: [] for p in PHASES}
    by_round = defaultdict(list)
    for records in node_logs.values():
        for r in records:
            by_round[r["round"]].append(r)
    rounds_by_number = {r["number"]: r for r in fed.rounds}
    for n in numbers:
        records = by_round.get(n, [])
        for p in ("wait", "pull", "train", "push"):
            phases[p].append(_mean([r.get(f"{p}_seconds") for r in records]) if records else 0.0)
        r = rounds_by_number[n]
        aggregate = 0.0
        if r["finished_at"] and last_upload.get(n):
            aggregate = max(0.0, r["finished_at"] - last_upload[n])
        phases["aggregate"].append(aggregate)
        if not records and r["finished_at"] and r["started_at"]:
            # No node logs (an aggregator state dir): the nodes' part is the start to the
            # last upload, shown as training.
            end = last_upload.get(n) or r["finished_at"]
            phases["train"][-1] = max(0.0, end - r["started_at"])
    fig = Figure(figsize=(9, 4))
    ax = fig.add_subplot()
    bottom = [0.0] * len(numbers)
    for p in PHASES:
        values = [0.0 if math.isnan(v) else v for v in phases[p]]
        ax.bar(numbers, values, bottom=bottom, label=p)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set(xlabel="round", ylabel="seconds", title="round time")
    ax.legend(fontsize="small")
    _save(fig, out_dir, "round_time.png")
    if node_logs:
        caption = ("Per round, the mean over nodes of the seconds each node spent waiting for "
                   "its task, pulling the global model, training and pushing its update "
                   "(nodes/ORG/rounds.jsonl), then the aggregator's seconds from the last upload "
                   "to the commit (aggregator database).")  # fmt: skip
    else:
        caption = ("No node round logs here (nodes/ORG/rounds.jsonl): 'train' is the round's "
                   "start to its last upload, 'aggregate' the last upload to the commit "
                   "(aggregator database); wait, pull and push are not known.")  # fmt: skip
    report.charts.append(Chart("round_time.png", "Round time", caption))

    _bytes_chart(fed, out_dir, report, Figure)
    _energy_chart(fed, out_dir, report, Figure, prices)
    if summary.get("initial_val_loss") is not None:
        report.settings.append(("validation loss", f"{_fmt(summary['initial_val_loss'])} -> "
                                f"{_fmt(summary.get('final_val_loss'))}"))  # fmt: skip
    return report


def _per_round(fed: Federation, name: str) -> dict[str, dict[int, float]]:
    """organisation -> round -> the sum of its metric `name` rows in that round."""
    out: dict[str, dict[int, float]] = defaultdict(lambda: defaultdict(float))
    for m in fed.metrics:
        if m["name"] == name:
            out[fed.organisation_of.get(m["node_id"] or "", m["node_id"])][m["round"]] += m["value"]
    return out


def _stacked(ax, data: dict[str, dict[int, float]], scale: float) -> None:
    """One bar per round, one segment per organisation."""
    xs = sorted({n for per in data.values() for n in per})
    bottom = [0.0] * len(xs)
    for name in sorted(data):
        values = [data[name].get(x, 0) / scale for x in xs]
        ax.bar(xs, values, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    if data:
        ax.legend(fontsize="small")


def _bytes_chart(fed: Federation, out_dir: Path, report: Report, Figure) -> None:
    """Bytes per round: the completed uploads and the model bytes each node pulled."""
    uploaded: dict[str, dict[int, float]] = defaultdict(lambda: defaultdict(float))
    for s in fed.submissions:
        uploaded[fed.organisation_of.get(s["node_id"], s["node_id"])][s["round"]] += (
            s["nbytes"] or 0
        )
    downloaded = _per_round(fed, DOWNLOAD_BYTES)
    if not uploaded and not downloaded:
        report.notes.append("Bytes per round: no upload has completed and no model was pulled "
                            "yet, so there is no bytes chart.")  # fmt: skip
        return
    fig = Figure(figsize=(11, 4))
    for i, (data, what) in enumerate(((uploaded, "uploaded"), (downloaded, "downloaded")), 1):
        ax = fig.add_subplot(1, 2, i)
        _stacked(ax, data, 2**20)
        ax.set(xlabel="round", ylabel=f"MiB {what}", title=f"bytes {what} per round")
    _save(fig, out_dir, "bytes.png")
    report.charts.append(Chart("bytes.png", "Bytes per round", (
        "Left: the bytes of every completed upload (an organisation's encoded update), from the "
        "aggregator's submissions table. Right: the bytes the aggregator sent each organisation "
        "(the global model, or the compressed outer update), by the round it was pulled in.")))  # fmt: skip


def _energy_chart(fed: Federation, out_dir: Path, report: Report, Figure,
                  prices: EnergyPrices) -> None:  # fmt: skip
    """kWh per round and organisation, as the nodes measured it (NVML, RAPL); said when not."""
    joules: dict[str, dict[int, float]] = defaultdict(lambda: defaultdict(float))
    for name in (GPU_ENERGY, CPU_ENERGY):
        for who, rounds in _per_round(fed, name).items():
            for number, value in rounds.items():
                joules[who][number] += value
    # tokens per kWh over the uploads that carried a measurement: like with like
    tokens = sum(s["num_tokens"] for s in fed.submissions
                 if s["round"] in joules.get(fed.organisation_of.get(s["node_id"], s["node_id"]), {}))  # fmt: skip
    total = sum(v for rounds in joules.values() for v in rounds.values()) if joules else None
    report.settings.append(("energy", energy_summary(total, tokens, prices)
                            .removeprefix("energy: ")))  # fmt: skip
    if not joules:
        report.notes.append(f"Energy per round: {NOT_MEASURED}; {WHY_NOT_MEASURED}.")
        return
    fig = Figure(figsize=(9, 4))
    ax = fig.add_subplot()
    _stacked(ax, joules, JOULES_PER_KWH / 1000)
    ax.set(xlabel="round", ylabel="Wh", title="energy per round (measured)")
    _save(fig, out_dir, "energy.png")
    per_org = "; ".join(
        f"{who} {kwh_text(sum(rounds.values()))}" for who, rounds in sorted(joules.items())
    )
    report.charts.append(Chart("energy.png", "Energy per round", (
        "The energy each organisation's hardware used for the round's local work (pull, train, "
        f"encode), as its node measured it: GPUs through NVML, CPU packages through RAPL. In all: "
        f"{per_org}. Organisations that could not measure are absent, not estimated.")))  # fmt: skip


def _federation_settings(fed: Federation, toml: dict) -> list[tuple[str, str]]:
    spec, f = fed.spec, toml.get("federation") or {}
    settings = [("federation", fed.name),
                ("rounds", str(f.get("rounds", spec.get("total_rounds", "?")))),
                ("inner steps (H)", str(f.get("inner_steps", spec.get("inner_steps", "?")))),
                ("delta encoding (uploads)", str(spec.get("delta_encoding", f.get("delta_encoding", "?")))),
                ("download encoding", str(spec.get("download_encoding", f.get("download_encoding", "?"))))]  # fmt: skip
    outer = dict(toml.get("outer") or {})
    outer.setdefault("name", spec.get("outer_optimizer", "?"))
    settings.append(("outer optimizer", _kv(outer)))
    try:
        model = json.loads(spec.get("model_config_json") or "{}")
    except json.JSONDecodeError:
        model = {}
    if model:
        settings.append(("model", _kv(model)))
    if "preset" in (toml.get("model") or {}):
        settings.append(("model preset", str(toml["model"]["preset"])))
    train = toml.get("train")
    if train is None:
        try:
            train = json.loads(spec.get("train_config_json") or "{}")
        except json.JSONDecodeError:
            train = {}
    if train:
        settings.append(("inner loop [train]", _kv(train)))
    if spec.get("round_policy"):
        settings.append(("round policy", _kv(spec["round_policy"])))
    return settings


# ---- a `fedpt train` run ----------------------------------------------------------------------
def _training_report(run: Path, out_dir: Path) -> Report:
    records = read_jsonl(run / "metrics.jsonl") if (run / "metrics.jsonl").is_file() else []
    steps = [r for r in records if r.get("event") == "train"]
    evals = [r for r in records if r.get("event") == "eval" and r.get("val_loss") is not None]
    if not steps and not evals:
        raise ReportError(
            f"{run} holds no logged training step yet (metrics.jsonl): nothing to report"
        )
    Figure = _plt()
    out_dir.mkdir(parents=True, exist_ok=True)
    info, summary = read_json(run / "run.json"), read_json(run / "summary.json")
    report = Report("training", f"training run {run.name}")
    for key in ("data", "world_size", "init_from"):
        if key in info:
            report.settings.append((key, str(info[key])))
    for key, title in (("model_config", "model"), ("train_config", "training")):
        if info.get(key):
            report.settings.append((title, _kv(info[key])))
    if summary:
        report.settings.append(("summary", _kv(summary)))

    fig = Figure(figsize=(8, 4))
    ax = fig.add_subplot()
    if steps:
        ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], label="training loss")
    if evals:
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], marker="o",
                label="validation loss")  # fmt: skip
    ax.set(xlabel="step", ylabel="loss", title="loss")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, out_dir, "loss.png")
    report.charts.append(Chart("loss.png", "Loss", (
        "Training loss of each logged step and validation loss at each evaluation "
        "(metrics.jsonl).")))  # fmt: skip
    if steps:
        fig = Figure(figsize=(8, 3))
        ax = fig.add_subplot()
        ax.plot([r["step"] for r in steps], [r["lr"] for r in steps])
        ax.set(xlabel="step", ylabel="learning rate", title="learning rate")
        ax.grid(alpha=0.3)
        _save(fig, out_dir, "lr.png")
        report.charts.append(Chart("lr.png", "Learning rate", "The schedule's learning rate "
                                   "at each logged step."))  # fmt: skip
    return report


# ---- the page ---------------------------------------------------------------------------------
def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _kv(d: dict) -> str:
    """Settings as written (6 significant digits: a learning rate of 1e-5 stays 1e-05)."""
    return ", ".join(
        f"{k} = {v:.6g}" if isinstance(v, float) else f"{k} = {v}" for k, v in sorted(d.items())
    )


STYLE = """body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;
vertical-align:top}img{max-width:100%}figure{margin:1.5em 0}figcaption{color:#555}"""


def render_html(report: Report, out_dir: Path) -> str:
    e = html.escape
    rows = "\n".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in report.settings)
    figures = []
    for chart in report.charts:
        data = base64.b64encode((out_dir / chart.filename).read_bytes()).decode("ascii")
        figures.append(f'<figure><h2>{e(chart.title)}</h2><img alt="{e(chart.title)}" '
                       f'src="data:image/png;base64,{data}"><figcaption>{e(chart.caption)}'
                       "</figcaption></figure>")  # fmt: skip
    notes = "".join(f"<p><em>{e(n)}</em></p>" for n in report.notes)
    made = time.strftime("%Y-%m-%d %H:%M:%S")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{e(report.title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>fedpt report: {e(report.title)}</h1>"
            f"<p>written {e(made)}</p><h2>Settings</h2><table>{rows}</table>{notes}"
            + "".join(figures) + "</body></html>\n")  # fmt: skip


def write_report(run: Path, out: Path | None = None, prices: EnergyPrices = NO_PRICES) -> Path:
    """Write the charts and report.html (default `run`/report/report.html; the PNGs go beside
    the HTML file); returns the HTML file's path. `prices` turn measured energy into an
    estimated cost and CO2e."""
    html_path = out or run / "report" / "report.html"
    report = build_report(run, html_path.parent, prices)
    tmp = html_path.with_name(html_path.name + ".tmp")
    tmp.write_text(render_html(report, html_path.parent), encoding="utf-8")
    tmp.replace(html_path)
    return html_path


def report_at_end(run: Path, log: Callable[[str], None] = print) -> Path | None:
    """The report a finished `fedpt simulate` or `fedpt train` leaves in its run folder; a
    report that cannot be written is one line in the log, never the run's failure."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log(f"no report: {INSTALL_HINT}, then fedpt report --run {run}")
        return None
    try:
        path = write_report(run)
    except Exception as e:
        log(f"no report ({type(e).__name__}: {e})")
        return None
    log(f"report: {path}")
    return path
