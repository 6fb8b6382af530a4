"""The fault matrix: nodes and the aggregator SIGKILLed at every step of a round, restarted on
their own state, and the federation's final global model compared bit for bit with that of an
uninterrupted run with the same (deterministic) settings.

Each run schedules several faults, one per round, so the matrix costs a few federations:
  plain text  a node dies while pulling, training and uploading; the aggregator dies with the
              round OPEN, TRAINING, COLLECTING, AGGREGATING, and with the new checkpoint
              written but not committed
  mTLS + secure aggregation
              a node dies after advertising its keys, after sharing them, while uploading its
              masked input and before unmasking; the aggregator dies while collecting
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.faults.harness import (
    ORGANISATIONS,
    Fault,
    RunResult,
    Settings,
    model_tensors,
    run_federation,
)

pytestmark = pytest.mark.faults

A, B, C = ORGANISATIONS
# Compressed both ways: a restarted node must re-encode its update from the residual it kept
# on disk, and a node that lost its copy of the last model pulls the whole model, yet every
# run ends on the same bits.
PLAIN = Settings(secure=False, rounds=5, delta_encoding="int8", download_encoding="int8")
# A node that loses its round keys cannot finish that round: the round fails at its deadline
# (or a stage's) and is retried, so these are short; the rounds themselves take seconds.
SECURE = Settings(secure=True, rounds=4, round_timeout=20.0, stage_timeout=10.0,
                  delta_encoding="masked-int16", download_encoding="int8")  # fmt: skip


@pytest.fixture(scope="module")
def plain_reference(tmp_path_factory: pytest.TempPathFactory) -> RunResult:
    return run_federation(tmp_path_factory.mktemp("plain-reference"), PLAIN)


@pytest.fixture(scope="module")
def secure_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One CA and set of kits for every secure run: the nodes' keys key their rounding."""
    return tmp_path_factory.mktemp("pki")


@pytest.fixture(scope="module")
def secure_reference(tmp_path_factory: pytest.TempPathFactory, secure_pki: Path) -> RunResult:
    return run_federation(tmp_path_factory.mktemp("secure-reference"), SECURE, pki_dir=secure_pki)


def committed(result: RunResult) -> list[int]:
    return [r[3] for r in result.rounds if r[1] == "COMMITTED"]


def assert_same_model(result: RunResult, reference: RunResult) -> None:
    got, want = model_tensors(result), model_tensors(reference)
    assert got.keys() == want.keys()
    different = [k for k in want if not torch.equal(got[k], want[k])]
    worst = max((float((got[k] - want[k]).abs().max()) for k in different), default=0.0)
    assert not different, f"{len(different)} tensors differ (max |Δ| {worst:.3g}): {different[:4]}"


def assert_carried_on(result: RunResult, faults: list[Fault], rounds: int) -> None:
    assert result.deaths == faults, f"faults that happened: {result.deaths}"
    assert committed(result) == list(range(1, rounds + 1)), result.rounds  # none lost or repeated
    for number, state, base, version in result.rounds:
        assert state in ("COMMITTED", "FAILED"), (number, state)
        if state == "COMMITTED":
            assert version == base + 1, (number, base, version)  # each built on the one before


def test_uninterrupted_runs_commit_every_round(
    plain_reference: RunResult, secure_reference: RunResult
) -> None:
    for reference, settings in ((plain_reference, PLAIN), (secure_reference, SECURE)):
        assert_carried_on(reference, [], settings.rounds)
        assert all(state == "COMMITTED" for _, state, _, _ in reference.rounds)


def test_nodes_killed_while_pulling_training_and_uploading(
    tmp_path: Path, plain_reference: RunResult
) -> None:
    faults = [Fault(A, "node.pull", 0), Fault(B, "node.train", 1), Fault(C, "node.upload", 3)]
    result = run_federation(tmp_path, PLAIN, faults)
    assert_carried_on(result, faults, PLAIN.rounds)
    # Each node came back within its round: nothing failed, nothing was retried.
    assert [r[1] for r in result.rounds] == ["COMMITTED"] * PLAIN.rounds
    assert_same_model(result, plain_reference)


def test_aggregator_killed_in_every_round_state(tmp_path: Path, plain_reference: RunResult) -> None:
    faults = [
        Fault("aggregator", "aggregator.open", 0),  # rounds are numbered from 0
        Fault("aggregator", "aggregator.training", 1),
        Fault("aggregator", "aggregator.collecting", 2),
        Fault("aggregator", "aggregator.aggregating", 3),
        Fault("aggregator", "aggregator.checkpointed", 4),
    ]
    result = run_federation(tmp_path, PLAIN, faults)
    assert_carried_on(result, faults, PLAIN.rounds)
    assert [r[1] for r in result.rounds] == ["COMMITTED"] * PLAIN.rounds  # resumed, not redone
    assert_same_model(result, plain_reference)
    restarts = [log for name, log in result.logs.items() if name.startswith("aggregator.")]
    assert any("recovery: round 2 is COLLECTING with 1 upload(s) kept" in log for log in restarts)
    assert any("recovery: removed uncommitted checkpoint" in log for log in restarts)


def test_secure_aggregation_survives_node_kills_at_every_stage(
    tmp_path: Path, secure_reference: RunResult, secure_pki: Path
) -> None:
    # A node that dies before its masked input is in loses its round keys: with every node
    # required the round fails and is retried from the same model. One that dies before
    # unmasking is a dropout the others' shares recover: that round still commits.
    faults = [
        Fault(A, "node.unmask", 0),
        Fault(B, "node.advertise", 1),
        Fault(C, "node.share", 3),
        Fault(A, "node.upload", 5),
    ]
    result = run_federation(tmp_path, SECURE, faults, pki_dir=secure_pki)
    assert_carried_on(result, faults, SECURE.rounds)
    assert [r[0] for r in result.rounds if r[1] == "FAILED"] == [1, 3, 5]
    assert_same_model(result, secure_reference)


def test_secure_aggregation_survives_an_aggregator_kill(
    tmp_path: Path, secure_reference: RunResult, secure_pki: Path
) -> None:
    faults = [Fault("aggregator", "aggregator.collecting", 1)]
    result = run_federation(tmp_path, SECURE, faults, pki_dir=secure_pki)
    assert_carried_on(result, faults, SECURE.rounds)
    failed = [r for r in result.rounds if r[1] == "FAILED"]
    assert [r[0] for r in failed] == [1]  # the interrupted round, retried from the same model
    assert_same_model(result, secure_reference)
