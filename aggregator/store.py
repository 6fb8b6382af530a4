"""Durable aggregator state behind one small interface, on SQLite (default) or PostgreSQL.

Every method is one transaction: a round's commit (checkpoint row, round COMMITTED, metrics, the
next round OPEN) either happens whole or not at all. The schema is created and upgraded by the
Alembic migrations in aggregator/migrations, never by `create_all`, so a database made by an
older fedpt is upgraded in place. For an in-memory store use `sqlite://` (tests do).
"""

from __future__ import annotations

import fcntl
import json
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import create_engine, event, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from aggregator import schema

MIGRATIONS = Path(__file__).parent / "migrations"


class StoreError(RuntimeError):
    """The database refused or could not be reached; the message says which and why."""


class DuplicateError(StoreError):
    """A row that must be unique already exists (e.g. a second upload for one round)."""


@dataclass(frozen=True)
class NodeRow:
    id: str
    organisation: str
    capabilities: dict
    joined_at: float


@dataclass(frozen=True)
class RoundRow:
    number: int
    state: str
    base_version: int
    participants: tuple[str, ...]
    started_at: float | None
    deadline_at: float | None
    finished_at: float | None
    result_version: int | None
    outcome: str


@dataclass(frozen=True)
class SubmissionRow:
    node_id: str
    num_tokens: int
    train_loss: float
    nbytes: int
    sha256: str
    path: str
    completed_at: float


@dataclass(frozen=True)
class CheckpointRow:
    version: int
    round_number: int
    path: str
    sha256: str
    nbytes: int
    created_at: float


# A node's loss of the model a round started from, on its own private validation split.
BASE_VAL_LOSS = "base_val_loss"
# The energy a node measured for a round's local work, in joules (absent: not measured).
GPU_ENERGY = "gpu_energy_joules"
CPU_ENERGY = "cpu_energy_joules"
# Bytes of model and outer update sent to a node during a round (aggregator/traffic.py).
DOWNLOAD_BYTES = "download_bytes"


@dataclass(frozen=True)
class MetricRow:
    round_number: int
    node_id: str | None
    name: str
    value: float


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        in_memory = url in ("sqlite://", "sqlite:///:memory:")
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            # One shared connection keeps an in-memory database alive across sessions.
            poolclass=StaticPool if in_memory else None,
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            if not in_memory:
                cursor.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer
                cursor.execute("PRAGMA synchronous=FULL")  # a commit survives power loss
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision.

    Safe when several processes open a fresh database at once: Alembic reads the revision table
    and then creates it, so two unserialised upgrades race ("alembic_version already exists").
    SQLite files are serialised with an advisory file lock beside the database (SQLite is
    local to one host), PostgreSQL with a transaction-level advisory lock."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with _migration_file_lock(engine), engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "head")


_MIGRATION_LOCK = 0x66656470  # "fedp": the advisory lock id fedpt's migrations take


@contextmanager
def _migration_file_lock(engine: Engine) -> Iterator[None]:
    database = engine.url.database if engine.url.get_backend_name() == "sqlite" else None
    if not database or database == ":memory:":
        yield
        return
    with open(f"{database}.migrate-lock", "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes
        yield


class Store:
    def __init__(self, url: str) -> None:
        self.url = url
        try:
            self.engine = make_engine(url)
            migrate(self.engine)
        except SQLAlchemyError as e:
            raise StoreError(f"cannot open database {_redact(url)}: {_reason(e)}") from e
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _transaction(self) -> Iterator[Session]:
        try:
            with self._sessions.begin() as session:
                yield session
        except IntegrityError as e:
            raise DuplicateError(f"database refused a duplicate: {_reason(e)}") from e
        except OperationalError as e:
            raise StoreError(f"database {_redact(self.url)} unavailable: {_reason(e)}") from e

    # ---- federation ---------------------------------------------------------------------------
    def find_federation(self, name: str) -> tuple[str, str, str] | None:
        """(id, spec_json, status) of the federation called `name`, if it exists."""
        with self._transaction() as s:
            row = s.scalar(select(schema.Federation).where(schema.Federation.name == name))
            return (row.id, row.spec_json, row.status) if row else None

    def create_federation(
        self, federation_id: str, name: str, spec_json: str, initial: CheckpointRow
    ) -> None:
        """The federation, its initial checkpoint (version 0) and round 0, OPEN."""
        with self._transaction() as s:
            s.add(schema.Federation(id=federation_id, name=name, spec_json=spec_json,
                                    status="running", created_at=time.time()))  # fmt: skip
            s.flush()
            s.add(_checkpoint(federation_id, initial))
            s.add(schema.Round(federation_id=federation_id, number=0, state="OPEN",
                               base_version=initial.version))  # fmt: skip

    def set_federation_status(self, federation_id: str, status: str) -> None:
        with self._transaction() as s:
            s.get_one(schema.Federation, federation_id).status = status

    # ---- nodes --------------------------------------------------------------------------------
    def upsert_node(
        self,
        federation_id: str,
        node_id: str,
        organisation: str,
        token_sha256: str,
        capabilities: dict,
    ) -> NodeRow:
        """Register an organisation's node, or give a returning one a new session token.
        Returns the stored row (a returning node keeps its id)."""
        with self._transaction() as s:
            row = s.scalar(
                select(schema.Node).where(
                    schema.Node.federation_id == federation_id,
                    schema.Node.organisation == organisation,
                )
            )
            if row is None:
                row = schema.Node(id=node_id, federation_id=federation_id, organisation=organisation,
                                  token_sha256=token_sha256, capabilities_json=json.dumps(capabilities),
                                  joined_at=time.time())  # fmt: skip
                s.add(row)
            else:
                row.token_sha256 = token_sha256
                row.capabilities_json = json.dumps(capabilities)
            return _node(row)

    def node_by_token(self, federation_id: str, token_sha256: str) -> NodeRow | None:
        with self._transaction() as s:
            row = s.scalar(
                select(schema.Node).where(
                    schema.Node.federation_id == federation_id,
                    schema.Node.token_sha256 == token_sha256,
                )
            )
            return _node(row) if row else None

    def nodes(self, federation_id: str) -> list[NodeRow]:
        with self._transaction() as s:
            rows = s.scalars(
                select(schema.Node)
                .where(schema.Node.federation_id == federation_id)
                .order_by(schema.Node.id)
            )
            return [_node(r) for r in rows]

    # ---- rounds -------------------------------------------------------------------------------
    def current_round(self, federation_id: str) -> RoundRow:
        with self._transaction() as s:
            row = s.scalar(
                select(schema.Round)
                .where(schema.Round.federation_id == federation_id)
                .order_by(schema.Round.number.desc())
                .limit(1)
            )
            if row is None:
                raise StoreError(f"federation {federation_id} has no rounds")
            return _round(row)

    def rounds(self, federation_id: str) -> list[RoundRow]:
        with self._transaction() as s:
            rows = s.scalars(
                select(schema.Round)
                .where(schema.Round.federation_id == federation_id)
                .order_by(schema.Round.number)
            )
            return [_round(r) for r in rows]

    def start_round(
        self,
        federation_id: str,
        number: int,
        participants: list[str],
        started_at: float,
        deadline_at: float,
    ) -> RoundRow:
        with self._transaction() as s:
            row = self._round_row(s, federation_id, number)
            row.state = "TRAINING"
            row.participants_json = json.dumps(participants)
            row.started_at, row.deadline_at = started_at, deadline_at
            return _round(row)

    def set_round_state(self, federation_id: str, number: int, state: str) -> None:
        with self._transaction() as s:
            self._round_row(s, federation_id, number).state = state

    def commit_round(
        self,
        federation_id: str,
        number: int,
        checkpoint: CheckpointRow,
        metrics: list[MetricRow],
        open_next: bool,
    ) -> None:
        """Record the durable checkpoint and move the round to COMMITTED, with its metrics and
        (unless the federation ends) the next round OPEN on the new version, in one transaction."""
        now = time.time()
        with self._transaction() as s:
            row = self._round_row(s, federation_id, number)
            s.add(_checkpoint(federation_id, checkpoint))
            row.state, row.result_version, row.finished_at = "COMMITTED", checkpoint.version, now
            row.outcome = "committed"
            s.add_all(_metric(federation_id, m, now) for m in metrics)
            if open_next:
                s.add(schema.Round(federation_id=federation_id, number=number + 1, state="OPEN",
                                   base_version=checkpoint.version))  # fmt: skip
            else:
                s.get_one(schema.Federation, federation_id).status = "finished"

    def fail_round(self, federation_id: str, number: int, outcome: str,
                   metrics: Iterable[MetricRow] = ()) -> None:  # fmt: skip
        """The round ends without a commit; the next one starts from the same model."""
        with self._transaction() as s:
            row = self._round_row(s, federation_id, number)
            row.state, row.outcome, row.finished_at = "FAILED", outcome, time.time()
            now = time.time()
            s.add_all(_metric(federation_id, m, now) for m in metrics)
            s.add(schema.Round(federation_id=federation_id, number=number + 1, state="OPEN",
                               base_version=row.base_version))  # fmt: skip

    @staticmethod
    def _round_row(s: Session, federation_id: str, number: int) -> schema.Round:
        row = s.scalar(
            select(schema.Round).where(
                schema.Round.federation_id == federation_id, schema.Round.number == number
            )
        )
        if row is None:
            raise StoreError(f"round {number} does not exist")
        return row

    # ---- submissions --------------------------------------------------------------------------
    def add_submission(
        self, federation_id: str, number: int, sub: SubmissionRow,
        metrics: Iterable[MetricRow] = (),
    ) -> None:  # fmt: skip
        """Record a completed upload, and the metrics its node sent with it (one transaction)."""
        with self._transaction() as s:
            round_id = self._round_row(s, federation_id, number).id
            s.add(schema.Submission(round_id=round_id, node_id=sub.node_id, num_tokens=sub.num_tokens,
                                    train_loss=sub.train_loss, nbytes=sub.nbytes, sha256=sub.sha256,
                                    path=sub.path, completed_at=sub.completed_at))  # fmt: skip
            now = time.time()
            s.add_all(_metric(federation_id, m, now) for m in metrics)

    def submissions(self, federation_id: str, number: int) -> list[SubmissionRow]:
        with self._transaction() as s:
            round_id = self._round_row(s, federation_id, number).id
            rows = s.scalars(
                select(schema.Submission)
                .where(schema.Submission.round_id == round_id)
                .order_by(schema.Submission.node_id)
            )
            return [
                SubmissionRow(
                    r.node_id,
                    r.num_tokens,
                    r.train_loss,
                    r.nbytes,
                    r.sha256,
                    r.path,
                    r.completed_at,
                )
                for r in rows
            ]

    # ---- checkpoints and metrics --------------------------------------------------------------
    def latest_checkpoint(self, federation_id: str) -> CheckpointRow:
        with self._transaction() as s:
            row = s.scalar(
                select(schema.Checkpoint)
                .where(schema.Checkpoint.federation_id == federation_id)
                .order_by(schema.Checkpoint.version.desc())
                .limit(1)
            )
            if row is None:
                raise StoreError(f"federation {federation_id} has no checkpoint")
            return CheckpointRow(
                row.version, row.round_number, row.path, row.sha256, row.nbytes, row.created_at
            )

    def metrics(self, federation_id: str) -> list[MetricRow]:
        with self._transaction() as s:
            rows = s.scalars(
                select(schema.Metric)
                .where(schema.Metric.federation_id == federation_id)
                .order_by(schema.Metric.id)
            )
            return [MetricRow(r.round_number, r.node_id, r.name, r.value) for r in rows]

    def snapshot(self) -> dict[str, list[tuple]]:
        """Every row of every table, for tests that assert a refusal changed nothing."""
        with self._transaction() as s:
            out = {}
            for table in schema.Base.metadata.sorted_tables:
                out[table.name] = sorted(tuple(r) for r in s.execute(table.select()).all())
            return out


def _node(row: schema.Node) -> NodeRow:
    return NodeRow(row.id, row.organisation, json.loads(row.capabilities_json), row.joined_at)


def _round(row: schema.Round) -> RoundRow:
    return RoundRow(
        number=row.number,
        state=row.state,
        base_version=row.base_version,
        participants=tuple(json.loads(row.participants_json or "[]")),
        started_at=row.started_at,
        deadline_at=row.deadline_at,
        finished_at=row.finished_at,
        result_version=row.result_version,
        outcome=row.outcome or "",
    )


def _checkpoint(federation_id: str, c: CheckpointRow) -> schema.Checkpoint:
    return schema.Checkpoint(federation_id=federation_id, version=c.version, round_number=c.round_number,
                             path=c.path, sha256=c.sha256, nbytes=c.nbytes, created_at=c.created_at)  # fmt: skip


def _metric(federation_id: str, m: MetricRow, now: float) -> schema.Metric:
    return schema.Metric(federation_id=federation_id, round_number=m.round_number, node_id=m.node_id,
                         name=m.name, value=m.value, created_at=now)  # fmt: skip


def _reason(error: SQLAlchemyError) -> str:
    orig = getattr(error, "orig", None)
    return str(orig or error).strip().splitlines()[0]


def _redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable database URL>"
