"""The SQL store, against SQLite and a real PostgreSQL server."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from aggregator.schema import Base
from aggregator.store import (
    CheckpointRow,
    DuplicateError,
    MetricRow,
    Store,
    StoreError,
    SubmissionRow,
)

FED = "fed-1"


def initial_checkpoint() -> CheckpointRow:
    return CheckpointRow(
        version=0, round_number=-1, path="/ck/v0", sha256="a" * 64, nbytes=10, created_at=1.0
    )


@pytest.fixture
def store(database_url: str):
    s = Store(database_url)
    s.create_federation(FED, "demo", '{"spec": 1}', initial_checkpoint())
    yield s
    s.close()


def test_migrations_match_the_models(database_url: str) -> None:
    store = Store(database_url)
    with store.engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    store.close()
    Store(database_url).close()  # migrating an up-to-date database is a no-op


def test_federation_nodes_and_tokens(store: Store) -> None:
    assert store.find_federation("demo") == (FED, '{"spec": 1}', "running")
    assert store.find_federation("other") is None
    a = store.upsert_node(FED, "node-a", "acme", "t" * 64, {"num_devices": 1})
    again = store.upsert_node(FED, "node-other-id", "acme", "u" * 64, {"num_devices": 2})
    assert again.id == a.id == "node-a"  # a returning organisation keeps its id
    assert store.node_by_token(FED, "t" * 64) is None  # the old session token is revoked
    assert store.node_by_token(FED, "u" * 64).capabilities == {"num_devices": 2}
    store.upsert_node(FED, "node-b", "globex", "v" * 64, {})
    assert [n.id for n in store.nodes(FED)] == ["node-a", "node-b"]


def test_round_lifecycle_commit_is_one_transaction(store: Store) -> None:
    r0 = store.current_round(FED)
    assert (r0.number, r0.state, r0.base_version) == (0, "OPEN", 0)
    store.upsert_node(FED, "node-a", "acme", "t" * 64, {})
    started = store.start_round(FED, 0, ["node-a"], started_at=10.0, deadline_at=20.0)
    assert started.participants == ("node-a",) and started.state == "TRAINING"
    sub = SubmissionRow("node-a", 1000, 2.5, 40, "b" * 64, "/up/a", 12.0)
    store.add_submission(FED, 0, sub)
    with pytest.raises(DuplicateError):
        store.add_submission(FED, 0, sub)
    assert store.submissions(FED, 0) == [sub]
    ck = CheckpointRow(1, 0, "/ck/v1", "c" * 64, 10, 13.0)
    store.commit_round(FED, 0, ck, [MetricRow(0, "node-a", "train_loss", 2.5)], open_next=True)
    rounds = store.rounds(FED)
    assert [(r.number, r.state) for r in rounds] == [(0, "COMMITTED"), (1, "OPEN")]
    assert rounds[0].result_version == 1 and rounds[1].base_version == 1
    assert store.latest_checkpoint(FED) == ck
    assert store.metrics(FED) == [MetricRow(0, "node-a", "train_loss", 2.5)]


def test_a_failed_commit_changes_nothing(store: Store) -> None:
    store.start_round(FED, 0, [], 1.0, 2.0)
    before = store.snapshot()
    duplicate_version = CheckpointRow(0, 0, "/ck/dup", "d" * 64, 10, 3.0)  # version 0 exists
    with pytest.raises(DuplicateError):
        store.commit_round(
            FED, 0, duplicate_version, [MetricRow(0, None, "x", 1.0)], open_next=True
        )
    assert store.snapshot() == before


def test_failed_round_reopens_on_the_same_model(store: Store) -> None:
    store.start_round(FED, 0, ["n"], 1.0, 2.0)
    store.fail_round(FED, 0, "quorum not reached")
    rounds = store.rounds(FED)
    assert [(r.number, r.state, r.base_version) for r in rounds] == [
        (0, "FAILED", 0),
        (1, "OPEN", 0),
    ]
    assert rounds[0].outcome == "quorum not reached"


def test_last_round_finishes_the_federation(store: Store) -> None:
    store.start_round(FED, 0, [], 1.0, 2.0)
    store.commit_round(FED, 0, CheckpointRow(1, 0, "/v1", "e" * 64, 1, 1.0), [], open_next=False)
    assert store.find_federation("demo")[2] == "finished"
    assert store.current_round(FED).state == "COMMITTED"


def test_unknown_round_and_unreachable_database_are_clear_errors(store: Store, tmp_path) -> None:
    with pytest.raises(StoreError, match="round 7 does not exist"):
        store.set_round_state(FED, 7, "TRAINING")
    with pytest.raises(StoreError, match="cannot open database"):
        Store("postgresql+psycopg://nobody:secret@127.0.0.1:1/none?connect_timeout=2")


def test_password_is_never_in_an_error_message() -> None:
    with pytest.raises(StoreError) as info:
        Store("postgresql+psycopg://nobody:hunter2@127.0.0.1:1/none?connect_timeout=2")
    assert "hunter2" not in str(info.value)


def _open_when_released(url: str, release, failures) -> None:
    release.wait()
    try:
        Store(url).close()
    except Exception as e:  # reported to the parent, which asserts on it
        failures.put(f"{type(e).__name__}: {e}")


def test_schema_creation_is_serialised_when_processes_open_a_fresh_database_at_once(
    database_url: str,
) -> None:
    # Without the migration lock, several processes upgrading a fresh database race in
    # Alembic ("table alembic_version already exists"); released together, 4 of them hit it.
    import multiprocessing

    spawn = multiprocessing.get_context("spawn")
    release, failures = spawn.Event(), spawn.Queue()
    openers = [spawn.Process(target=_open_when_released, args=(database_url, release, failures))
               for _ in range(4)]  # fmt: skip
    for p in openers:
        p.start()
    release.set()
    for p in openers:
        p.join(timeout=120)
    assert [p.exitcode for p in openers] == [0] * 4
    errors = [failures.get() for _ in range(failures.qsize())]
    assert errors == []
    store = Store(database_url)
    with store.engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    store.close()
