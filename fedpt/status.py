"""`fedpt status`: a federation at a glance, from a running aggregator or from its records.

  --aggregator HOST:PORT --kit OPERATOR_KIT  asks the running aggregator (GetFederationStatus, an
      RPC only an operator kit may call): its records plus what only its memory holds, each
      node's last call, the upload or pull it is in the middle of.
  --state-dir DIR  reads the aggregator's records alone, read-only by construction: the SQLite
      file is opened with `mode=ro` (a PostgreSQL URL in a read-only transaction), never through
      aggregator.store.Store, which migrates on open, so a running aggregator is neither
      migrated nor locked. A node's latest record (its join or last upload) stands in for its
      last call.

Both views are the same `pb.FederationStatus`, read by aggregator/status_records.py.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aggregator.status_records import ACCEPTING, size
from fedpt.energy_cost import EnergyPrices, energy_summary, kwh_text
from protos import federation_pb2 as pb

RPC_TIMEOUT_SECONDS = 10.0
NO_PRICES = EnergyPrices()


class StatusError(ValueError):
    """No federation where the user pointed; the message says what was found."""


@dataclass(frozen=True)
class Source:
    """Where the status comes from: a running aggregator, or a state folder's records."""

    state_dir: Path | None = None
    database_url: str | None = None
    aggregator: str | None = None
    kit: Path | None = None

    def read(self) -> list[pb.FederationStatus]:
        if self.aggregator is not None:
            return [ask_aggregator(self.aggregator, self.kit)]
        assert self.state_dir is not None
        return read_status(self.state_dir, self.database_url)


# ---- offline: the records ---------------------------------------------------------------------
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
                now: Callable[[], float] = time.time) -> list[pb.FederationStatus]:  # fmt: skip
    """Every federation the records hold, newest first."""
    from sqlalchemy import create_engine
    from sqlalchemy.exc import SQLAlchemyError

    from aggregator.status_records import read_federations

    engine = create_engine(database_url(state_dir, url))
    try:
        with engine.connect() as db:
            if not url or url.startswith("sqlite"):
                db.exec_driver_sql("PRAGMA query_only = ON")
            else:
                db.exec_driver_sql("SET TRANSACTION READ ONLY")
            return read_federations(db, state_dir, now())
    except SQLAlchemyError as e:
        raise StatusError(f"cannot read the aggregator's records: {e.__class__.__name__}: "
                          f"{str(e).splitlines()[0]}") from e  # fmt: skip
    finally:
        engine.dispose()


# ---- live: the running aggregator -------------------------------------------------------------
def ask_aggregator(address: str, kit_dir: Path | None,
                   timeout: float = RPC_TIMEOUT_SECONDS) -> pb.FederationStatus:  # fmt: skip
    """GetFederationStatus over mutual TLS with an operator kit."""
    import grpc

    from protos import federation_pb2_grpc as pb_grpc
    from protos import pki

    if kit_dir is None:
        raise StatusError("--aggregator needs --kit: an operator kit (fedpt ca issue --operator)")
    kit = pki.load_kit(kit_dir)
    if not kit.operator:
        raise StatusError(f"{kit_dir} is {kit.organisation!r}'s node kit; the federation's "
                          "status needs an operator kit (fedpt ca issue --operator)")  # fmt: skip
    with grpc.secure_channel(address, pki.channel_credentials(kit)) as channel:
        try:
            return pb_grpc.FederationStub(channel).GetFederationStatus(
                pb.FederationStatusRequest(), timeout=timeout)  # fmt: skip
        except grpc.RpcError as e:
            raise StatusError(f"the aggregator at {address} answered {e.code().name}: "
                              f"{e.details()}") from None  # fmt: skip


# ---- rendering --------------------------------------------------------------------------------
def _ago(then: float, now: float) -> str:
    if not then:
        return "-"
    seconds = max(0.0, now - then)
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def summary_lines(f: pb.FederationStatus, prices: EnergyPrices = NO_PRICES) -> list[str]:
    """The federation's and its round's state, and its energy, one line each."""
    now = f.as_of
    rounds = f"{f.model_version}/{f.total_rounds}" if f.total_rounds else f"{f.model_version}"
    pace = (f"{f.rounds_per_hour:.1f} rounds/h" if f.HasField("rounds_per_hour")
            else "pace n/a (fewer than 2 committed rounds)")  # fmt: skip
    eta = f", ETA {_duration(f.eta_seconds)}" if f.HasField("eta_seconds") else ""
    deadline = ""
    if f.round_deadline and f.round_state in ACCEPTING:
        deadline = f", deadline in {max(0.0, f.round_deadline - now):.0f} s"
    source = "live from the aggregator" if f.live else "from its records"
    in_flight = sum(n.upload_in_flight_bytes for n in f.nodes)
    uploads = (f"; uploads in flight: {size(in_flight)} from "
               f"{sum(bool(n.upload_in_flight_bytes) for n in f.nodes)} node(s)") if in_flight else ""  # fmt: skip
    measured = [n for n in f.nodes if n.HasField("energy_joules")]
    joules = sum(n.energy_joules for n in measured) if measured else None
    return [f"federation {f.name} ({f.status}, {source}): model version {rounds}, {f.committed} "
            f"committed, {f.failed} failed, {pace}{eta}",
            f"round {f.round}: {f.round_state}, started {_ago(f.round_started, now)}"
            f"{deadline}; last outcome: {f.last_outcome or '-'}{uploads}",
            energy_summary(joules, sum(n.measured_tokens for n in measured), prices)]  # fmt: skip


def node_columns(live: bool) -> tuple[str, ...]:
    seen = "last call" if live else "last record"
    return ("organisation", "node", seen, "doing", "uploaded", "downloaded", "last loss", "energy")


def node_row(n: pb.NodeStatus, now: float, live: bool) -> list[str]:
    loss = f"{n.last_loss:.4f}" if n.HasField("last_loss") and math.isfinite(n.last_loss) else "-"
    seen = _ago(n.last_call if live else n.last_record, now)
    energy = kwh_text(n.energy_joules if n.HasField("energy_joules") else None)
    return [n.organisation, n.node_id, seen, n.doing, size(n.uploaded_bytes),
            size(n.downloaded_bytes), loss, energy]  # fmt: skip


def render(federations: list[pb.FederationStatus], prices: EnergyPrices = NO_PRICES):
    """A rich renderable of every federation (a terminal)."""
    from rich.console import Group
    from rich.table import Table

    parts = []
    for f in federations:
        nodes = Table(*node_columns(f.live))
        for n in f.nodes:
            nodes.add_row(*node_row(n, f.as_of, f.live))
        parts += [*summary_lines(f, prices), nodes]
    return Group(*parts)


def plain(federations: list[pb.FederationStatus], prices: EnergyPrices = NO_PRICES) -> str:
    """Every federation as plain lines, tab-separated node rows (not a terminal: a log, a pipe)."""
    lines = []
    for f in federations:
        lines += summary_lines(f, prices)
        lines += ["\t".join(node_columns(f.live)),
                  *["\t".join(node_row(n, f.as_of, f.live)) for n in f.nodes]]  # fmt: skip
    return "\n".join(lines)


def show(source: Source, watch: float | None = None,
         prices: EnergyPrices = NO_PRICES) -> None:  # fmt: skip
    """Print the status once, or refresh it in place every `watch` seconds until Ctrl-C."""
    from rich.console import Console
    from rich.live import Live

    console = Console()
    federations = source.read()
    if not federations:
        raise StatusError(f"{source.state_dir}'s records hold no federation yet")
    if watch is None and not console.is_terminal:
        print(plain(federations, prices))
        return
    if watch is None:
        console.print(render(federations, prices))
        return
    try:
        with Live(render(federations, prices), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(watch)
                live.update(render(source.read(), prices), refresh=True)
    except KeyboardInterrupt:
        pass
