"""A federation at a glance (`pb.FederationStatus`), read from the aggregator's records.

One reader for both views of `fedpt status`: offline, on a read-only connection to a state
folder's database (fedpt/status.py), and live, on the running aggregator's own engine before it
adds what only its memory holds (Coordinator.federation_status). Plain SELECTs only, one short
read each, so a running aggregator is neither migrated nor locked by an operator looking.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import Connection

from aggregator.store import CPU_ENERGY, DOWNLOAD_BYTES, GPU_ENERGY
from protos import federation_pb2 as pb

ACCEPTING = ("TRAINING", "COLLECTING")


def read_federations(db: Connection, state_dir: Path, now: float) -> list[pb.FederationStatus]:
    """Every federation the records hold, newest first."""
    rows = db.execute(text("SELECT id FROM federations ORDER BY created_at DESC")).all()
    return [read_federation(db, federation_id, state_dir, now) for (federation_id,) in rows]


def read_federation(db: Connection, federation_id: str, state_dir: Path,
                    now: float) -> pb.FederationStatus:  # fmt: skip
    name, spec_json, status = db.execute(text(
        "SELECT name, spec_json, status FROM federations WHERE id = :f"), {"f": federation_id}).one()  # fmt: skip
    spec = json.loads(spec_json)
    rounds = db.execute(text(
        "SELECT number, state, participants_json, started_at, deadline_at, finished_at, outcome "
        "FROM rounds WHERE federation_id = :f ORDER BY number"), {"f": federation_id}).all()  # fmt: skip
    version = db.execute(text("SELECT MAX(version) FROM checkpoints WHERE federation_id = :f"),
                         {"f": federation_id}).scalar() or 0  # fmt: skip
    current = rounds[-1]
    committed = [r for r in rounds if r.state == "COMMITTED"]
    total = int(spec.get("totalRounds", spec.get("total_rounds", 0)))
    finished = [r for r in rounds if r.finished_at]
    result = pb.FederationStatus(
        name=name, status=status, model_version=version, total_rounds=total,
        round=current.number, round_state=current.state,
        round_started=current.started_at or 0.0, round_deadline=current.deadline_at or 0.0,
        committed=len(committed), failed=sum(r.state == "FAILED" for r in rounds),
        last_outcome=finished[-1].outcome if finished else "", as_of=now,
    )  # fmt: skip
    if len(committed) >= 2 and committed[-1].finished_at and committed[0].started_at:
        hours = (committed[-1].finished_at - committed[0].started_at) / 3600
        if hours > 0:
            result.rounds_per_hour = len(committed) / hours
            if total and status != "finished":
                result.eta_seconds = max(0, total - version) / result.rounds_per_hour * 3600
    _add_nodes(db, result, federation_id, current, spool_dir(state_dir, current.number))
    return result


def spool_dir(state_dir: Path, number: int) -> Path:
    return state_dir / "uploads" / f"round_{number:08d}"


def _add_nodes(db: Connection, result: pb.FederationStatus, federation_id: str, current,
               spool: Path) -> None:  # fmt: skip
    uploads = db.execute(text(
        "SELECT s.node_id, s.nbytes, s.num_tokens, s.train_loss, s.completed_at, r.number "
        "FROM submissions s JOIN rounds r ON r.id = s.round_id WHERE r.federation_id = :f "
        "ORDER BY s.completed_at"), {"f": federation_id}).all()  # fmt: skip
    metrics = db.execute(text(
        "SELECT node_id, round_number, name, value FROM metrics WHERE federation_id = :f AND "
        "name IN (:g, :c, :d)"), {"f": federation_id, "g": GPU_ENERGY, "c": CPU_ENERGY,
                                  "d": DOWNLOAD_BYTES}).all()  # fmt: skip
    downloaded: dict[str, float] = defaultdict(float)
    energy: dict[tuple[str, int], float] = defaultdict(float)  # (node, round) -> joules
    for node_id, number, name, value in metrics:
        if name == DOWNLOAD_BYTES:
            downloaded[node_id] += value
        else:
            energy[node_id, number] += value
    nodes = db.execute(text("SELECT id, organisation, joined_at FROM nodes "
                            "WHERE federation_id = :f ORDER BY organisation"),
                       {"f": federation_id}).all()  # fmt: skip
    participants = set(json.loads(current.participants_json or "[]"))
    in_flight = _spooling(spool) if current.state in ACCEPTING else {}
    for node_id, organisation, joined_at in nodes:
        mine = [u for u in uploads if u.node_id == node_id]
        node = result.nodes.add(
            node_id=node_id, organisation=organisation, joined_at=joined_at,
            last_record=max([joined_at, *[u.completed_at for u in mine]]),
            uploaded_bytes=sum(u.nbytes for u in mine), downloaded_bytes=int(downloaded[node_id]),
            upload_in_flight_bytes=in_flight.get(node_id, 0),
            tokens=sum(u.num_tokens for u in mine),
        )  # fmt: skip
        if mine:
            node.last_loss = mine[-1].train_loss
        measured = [u for u in mine if (node_id, u.number) in energy]
        if measured:
            node.energy_joules = sum(energy[node_id, u.number] for u in measured)
            node.measured_tokens = sum(u.num_tokens for u in measured)
        node.doing = _doing(node, current, participants, {u.number for u in mine}, result.status)


def _doing(node: pb.NodeStatus, current, participants: set[str], uploaded: set[int],
           status: str) -> str:  # fmt: skip
    if status == "finished":
        return "finished"
    number = current.number
    if node.node_id not in participants or current.state not in (*ACCEPTING, "AGGREGATING"):
        return "waiting for the next round"
    if number in uploaded:
        return f"uploaded round {number}"
    if node.upload_in_flight_bytes:
        return f"uploading round {number} ({size(node.upload_in_flight_bytes)} so far)"
    if current.state == "AGGREGATING":
        return f"left out of round {number}"
    return f"training round {number}"


def _spooling(spool: Path) -> dict[str, int]:
    """Uploads arriving now: the open round's partial spool files, by node id."""
    found: dict[str, int] = {}
    for part in spool.glob("*.part") if spool.is_dir() else ():
        node_id = part.name.rsplit(".", 2)[0]
        try:
            found[node_id] = found.get(node_id, 0) + part.stat().st_size
        except FileNotFoundError:  # completed or dropped while we looked
            continue
    return found


def size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
