"""Nodes coming and going in a running federation of real processes: a node that joins late
starts from the latest global model, and a straggler (frozen with SIGSTOP past the round's
deadline) is excluded from that round and takes part again afterwards."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from tests.faults.harness import ORGANISATIONS, FaultyFederation, Settings

pytestmark = pytest.mark.faults

A, B, C = ORGANISATIONS
# A quorum of two, and a deadline the two quick nodes meet easily (a round takes ~1 s); enough
# rounds that the federation is still running when the late node has started (a few seconds).
SETTINGS = Settings(secure=False, rounds=25, min_nodes=2, round_timeout=6.0)


class Script:
    """What the test does as rounds go by: start C once version 1 is committed, with A and B
    paused until it has joined (a node takes seconds to start; rounds a fraction of one, and
    the federation would be over); freeze it as soon as an update of its is accepted (rounds
    take a fraction of a second, so it is usually still counted as ready and made a participant
    of the next round), and let it go once a round it was a participant of has closed without
    it. On a busy machine its last poll may be too long ago by then (a node counts as ready for
    long_poll_seconds + 2 s after it polled), and the next round starts without it: then it is
    let go, and frozen again after its next accepted update."""

    def __init__(self) -> None:
        self.phase = "wait-for-version-1"
        self.joined_after_version = -1
        self.first_round = -1
        self.after = -1  # the round of its latest accepted update before the freeze
        self.frozen_round = -1

    def __call__(self, fed: FaultyFederation) -> None:
        rounds = fed.rounds()
        committed = [r[3] for r in rounds if r[1] == "COMMITTED"]
        if self.phase == "wait-for-version-1" and committed:
            for org in (A, B):
                fed.signal(org, signal.SIGSTOP)
            self.joined_after_version = max(r[3] for r in fed.rounds() if r[1] == "COMMITTED")
            fed.start(C)
            self.phase = "wait-for-join"
        elif self.phase == "wait-for-join" and C in fed.organisations():
            for org in (A, B):
                fed.signal(org, signal.SIGCONT)
            self.phase = "wait-for-an-update"
        elif self.phase == "wait-for-an-update":
            mine = [
                r[0] for r in rounds if r[0] > self.after and C in r[4] and C in fed.uploaders(r[0])
            ]
            if mine:
                fed.signal(C, signal.SIGSTOP)
                self.first_round = mine[0] if self.first_round < 0 else self.first_round
                self.after = mine[-1]
                self.phase = "frozen"
        elif self.phase == "frozen":
            # (It may have squeezed one more round in before it stopped: not that one.)
            later = [r for r in rounds if r[0] > self.after and r[1] != "OPEN"  # started
                     and C not in fed.uploaders(r[0])]  # fmt: skip
            if later and C not in later[0][4]:  # its readiness lapsed: the round went on without it
                fed.signal(C, signal.SIGCONT)
                self.after = later[0][0]
                self.phase = "wait-for-an-update"
            elif later and later[0][1] in ("COMMITTED", "FAILED"):
                self.frozen_round = later[0][0]
                fed.signal(C, signal.SIGCONT)
                self.phase = "released"


def test_late_joiner_and_straggler(tmp_path: Path) -> None:
    fed = FaultyFederation(tmp_path, SETTINGS, [])
    script = Script()
    fed.run(first=(A, B), while_running=script)
    assert script.phase == "released", f"the script stopped at {script.phase}"
    rounds = {r[0]: r for r in fed.rounds()}
    committed = [r[3] for r in rounds.values() if r[1] == "COMMITTED"]
    assert committed == list(range(1, SETTINGS.rounds + 1))

    # The late joiner's first round trained from the latest model at the time, version ≥ 1.
    first = rounds[script.first_round]
    assert first[2] >= script.joined_after_version >= 1
    records = [json.loads(line) for line in (tmp_path / "nodes" / C / "rounds.jsonl").open()]
    assert records[0]["round"] == script.first_round and records[0]["version"] == first[2]

    # The straggler: a participant of the frozen round, excluded from it, which still committed.
    frozen = rounds[script.frozen_round]
    assert C in frozen[4] and frozen[1] == "COMMITTED"
    assert fed.uploaders(script.frozen_round) == [A, B]
    later = [n for n in rounds if n > script.frozen_round and C in fed.uploaders(n)]
    assert later, f"{C} took no part after round {script.frozen_round}: {fed.rounds()}"
    log = (tmp_path / f"{C}.1.log").read_text()
    # Thawed, it found its round closed: its upload refused, or its model no longer served.
    assert (f"round {script.frozen_round}: update not taken" in log
            or f"round {script.frozen_round}: skipped, the model moved on" in log), log  # fmt: skip
