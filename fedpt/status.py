"""`fedpt status --state-dir DIR`: a federation at a glance, read from its aggregator's records.

Read-only by construction: the SQLite file is opened with `mode=ro` (a PostgreSQL URL in a
read-only transaction), never through aggregator.store.Store, which migrates on open, so a
running aggregator is neither migrated nor locked; every query is one short read. What the
records hold: the rounds (state, participants, times, outcome), every node's uploads (tokens,
loss, bytes), the upload spools of the open round (what is arriving now). What they do not
hold, a node's last call, is the aggregator's memory only; a node's latest record stands in.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ACCEPTING = ("TRAINING", "COLLECTING")


class StatusError(ValueError):
    """No federation records where the user pointed; the message says what was found."""


@dataclass
class NodeStatus:
    organisation: str
    node_id: str
    joined_at: float
    last_seen: float  # the node's latest record: its join or its last upload
    doing: str
    uploaded_bytes: int = 0
    last_loss: float | None = None


@dataclass
class FederationStatus:
    name: str
    status: str  # running | finished
    version: int
    total_rounds: int  # 0: until stopped
    round_number: int
    round_state: str
    round_started: float | None
    round_deadline: float | None
    committed: int
    failed: int
    rounds_per_hour: float | None
    eta_seconds: float | None
    last_outcome: str
    nodes: list[NodeStatus] = field(default_factory=list)
    uploads_in_flight: dict[str, int] = field(default_factory=dict)  # node id -> bytes so far


def database_url(state_dir: Path, url: str | None) -> str:
    """The read-only URL of the state dir's SQLite file, or `url` (PostgreSQL)."""
    if url:
        return url
    path = state_dir / "fedpt.db"
    if not path.is_file():
        raise StatusError(f"no aggregator records in {state_dir} (no fedpt.db): pass the "
                          "aggregator's --state-dir, or --database-url for PostgreSQL")  # fmt: skip
    return f"sqlite:///file:{path.resolve()}?mode=ro&uri=true"


def read_status(state_dir: Path, url: str | None = None,
                now: Callable[[], float] = time.time) -> list[FederationStatus]:  # fmt: skip
    """Every federation the records hold, newest first."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import SQLAlchemyError

    engine = create_engine(database_url(state_dir, url))
    try:
        with engine.connect() as db:
            if not url or url.startswith("sqlite"):
                db.exec_driver_sql("PRAGMA query_only = ON")
            else:
                db.exec_driver_sql("SET TRANSACTION READ ONLY")
            federations = db.execute(text(
                "SELECT id, name, spec_json, status, created_at FROM federations "
                "ORDER BY created_at DESC")).all()  # fmt: skip
            return [_federation(db, row, state_dir, now()) for row in federations]
    except SQLAlchemyError as e:
        raise StatusError(f"cannot read the aggregator's records: {e.__class__.__name__}: "
                          f"{str(e).splitlines()[0]}") from e  # fmt: skip
    finally:
        engine.dispose()


def _federation(db, row, state_dir: Path, now: float) -> FederationStatus:
    from sqlalchemy import text

    federation_id, name, spec_json, status, _created = row
    spec = json.loads(spec_json)
    rounds = db.execute(text(
        "SELECT id, number, state, participants_json, started_at, deadline_at, finished_at, "
        "outcome FROM rounds WHERE federation_id = :f ORDER BY number"), {"f": federation_id}).all()  # fmt: skip
    version = db.execute(text("SELECT MAX(version) FROM checkpoints WHERE federation_id = :f"),
                         {"f": federation_id}).scalar() or 0  # fmt: skip
    current = rounds[-1]
    committed = [r for r in rounds if r.state == "COMMITTED"]
    failed = sum(r.state == "FAILED" for r in rounds)
    total = int(spec.get("totalRounds", spec.get("total_rounds", 0)))
    rate = eta = None
    if len(committed) >= 2 and committed[-1].finished_at and committed[0].started_at:
        hours = (committed[-1].finished_at - committed[0].started_at) / 3600
        rate = len(committed) / hours if hours > 0 else None
    if rate and total and status != "finished":
        eta = max(0, total - version) / rate * 3600
    finished = [r for r in rounds if r.finished_at]
    result = FederationStatus(
        name=name, status=status, version=version, total_rounds=total,
        round_number=current.number, round_state=current.state,
        round_started=current.started_at, round_deadline=current.deadline_at,
        committed=len(committed), failed=failed, rounds_per_hour=rate, eta_seconds=eta,
        last_outcome=finished[-1].outcome if finished else "",
    )  # fmt: skip
    participants = set(json.loads(current.participants_json or "[]"))
    uploads = db.execute(text(
        "SELECT s.node_id, s.nbytes, s.train_loss, s.completed_at, r.number FROM submissions s "
        "JOIN rounds r ON r.id = s.round_id WHERE r.federation_id = :f ORDER BY s.completed_at"),
        {"f": federation_id}).all()  # fmt: skip
    nodes = db.execute(text("SELECT id, organisation, joined_at FROM nodes "
                            "WHERE federation_id = :f ORDER BY organisation"),
                       {"f": federation_id}).all()  # fmt: skip
    in_flight = _spooling(state_dir, current.number) if current.state in ACCEPTING else {}
    for node_id, organisation, joined_at in nodes:
        mine = [u for u in uploads if u.node_id == node_id]
        node = NodeStatus(organisation, node_id, joined_at,
                          max([joined_at, *[u.completed_at for u in mine]]), "",
                          sum(u.nbytes for u in mine), mine[-1].train_loss if mine else None)  # fmt: skip
        node.doing = _doing(node_id, current, participants, mine, in_flight, status)
        result.nodes.append(node)
    result.uploads_in_flight = in_flight
    return result


def _doing(node_id: str, current, participants: set[str], mine: list, in_flight: dict[str, int],
           status: str) -> str:  # fmt: skip
    if status == "finished":
        return "finished"
    number = current.number
    if node_id not in participants or current.state not in (*ACCEPTING, "AGGREGATING"):
        return "waiting for the next round"
    if any(u.number == number for u in mine):
        return f"uploaded round {number}"
    if node_id in in_flight:
        return f"uploading round {number} ({_size(in_flight[node_id])} so far)"
    if current.state == "AGGREGATING":
        return f"left out of round {number}"
    return f"training round {number}"


def _spooling(state_dir: Path, number: int) -> dict[str, int]:
    """Uploads arriving now: the open round's partial spool files, by node id."""
    spool = state_dir / "uploads" / f"round_{number:08d}"
    found: dict[str, int] = {}
    for part in spool.glob("*.part") if spool.is_dir() else ():
        node_id = part.name.rsplit(".", 2)[0]
        try:
            found[node_id] = found.get(node_id, 0) + part.stat().st_size
        except FileNotFoundError:  # completed or dropped while we looked
            continue
    return found


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _ago(then: float | None, now: float) -> str:
    if then is None:
        return "-"
    seconds = max(0.0, now - then)
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def summary_lines(f: FederationStatus, now: float) -> list[str]:
    """The federation's and its round's state, one line each."""
    rounds = f"{f.version}/{f.total_rounds}" if f.total_rounds else f"{f.version}"
    pace = (f"{f.rounds_per_hour:.1f} rounds/h" if f.rounds_per_hour else "pace n/a (fewer "
            "than 2 committed rounds)")  # fmt: skip
    eta = f", ETA {f.eta_seconds / 60:.0f} min" if f.eta_seconds is not None else ""
    deadline = ""
    if f.round_deadline and f.round_state in ACCEPTING:
        deadline = f", deadline in {max(0.0, f.round_deadline - now):.0f} s"
    return [f"federation {f.name} ({f.status}): model version {rounds}, {f.committed} committed, "
            f"{f.failed} failed, {pace}{eta}",
            f"round {f.round_number}: {f.round_state}, started {_ago(f.round_started, now)}"
            f"{deadline}; last outcome: {f.last_outcome or '-'}"]  # fmt: skip


def node_row(n: NodeStatus, now: float) -> list[str]:
    loss = "-" if n.last_loss is None else f"{n.last_loss:.4f}"
    return [n.organisation, n.node_id, _ago(n.last_seen, now), n.doing,
            _size(n.uploaded_bytes), loss]  # fmt: skip


NODE_COLUMNS = ("organisation", "node", "last record", "doing", "uploaded", "last loss")


def render(federations: list[FederationStatus], now: float):
    """A rich renderable of every federation (a terminal)."""
    from rich.console import Group
    from rich.table import Table

    parts = []
    for f in federations:
        nodes = Table(*NODE_COLUMNS)
        for n in f.nodes:
            nodes.add_row(*node_row(n, now))
        parts += [*summary_lines(f, now), nodes]
    return Group(*parts)


def plain(federations: list[FederationStatus], now: float) -> str:
    """Every federation as plain lines, tab-separated node rows (not a terminal: a log, a pipe)."""
    lines = []
    for f in federations:
        lines += summary_lines(f, now)
        lines += ["\t".join(NODE_COLUMNS), *["\t".join(node_row(n, now)) for n in f.nodes]]
    return "\n".join(lines)


def show(state_dir: Path, url: str | None = None, watch: float | None = None) -> None:
    """Print the status once, or refresh it in place every `watch` seconds until Ctrl-C."""
    from rich.console import Console
    from rich.live import Live

    console = Console()
    federations = read_status(state_dir, url)
    if not federations:
        raise StatusError(f"{state_dir}'s records hold no federation yet")
    if watch is None and not console.is_terminal:
        print(plain(federations, time.time()))
        return
    if watch is None:
        console.print(render(federations, time.time()))
        return
    try:
        with Live(render(federations, time.time()), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(watch)
                live.update(render(read_status(state_dir, url), time.time()), refresh=True)
    except KeyboardInterrupt:
        pass
