"""Named points of the protocol where a test can have a process SIGKILL itself.

Fault-injection tests (tests/faults/) need a node or the aggregator to die at an exact moment —
half-way through a pull, between writing a checkpoint and committing it — which no outside timer
can hit reliably. Both sides call `reached(point, round)` there; with FEDPT_CRASH_AT naming that
point (and round), the process kills itself with SIGKILL: no handler, no flush, no cleanup, as
in a power cut.

Inert unless the testing switch FEDPT_TESTING=1 is set as well (the fault harness sets both):
a stray FEDPT_CRASH_AT in an operator's environment can never kill a production aggregator.
Without the switch `reached` is one cached lookup; the variable is read on first use, and
`check()` (called by the CLI before any work) turns a bad value into one error line.

    FEDPT_TESTING=1 FEDPT_CRASH_AT="node.pull@2"     the node dies in round 2's pull
    FEDPT_TESTING=1 FEDPT_CRASH_AT="aggregator.aggregating"  the aggregator dies in the first
                                                     round to aggregate
"""

from __future__ import annotations

import functools
import os
import signal
import sys

ENV = "FEDPT_CRASH_AT"
SWITCH = "FEDPT_TESTING"

POINTS = (
    "node.pull",  # the first chunk of the global model has arrived
    "node.train",  # half of the round's inner steps are done
    "node.upload",  # the first chunk of the update is sent
    "node.advertise",  # this round's keys were advertised
    "node.share",  # the key shares were sent
    "node.unmask",  # about to send the unmasking shares
    "aggregator.open",  # a node asked for work while the round is OPEN
    "aggregator.training",  # the round's start (TRAINING) is committed
    "aggregator.collecting",  # the first complete upload is committed (COLLECTING)
    "aggregator.aggregating",  # AGGREGATING is committed; the new checkpoint is not written
    "aggregator.checkpointed",  # the new checkpoint file is durable; the commit is not
)


class CrashPointError(ValueError):
    """FEDPT_CRASH_AT names no crash point (with the testing switch on)."""


@functools.cache
def _target() -> tuple[str, int | None] | None:
    if os.environ.get(SWITCH) != "1":
        return None
    spec = os.environ.get(ENV, "").strip()
    if not spec:
        return None
    point, _, round_text = spec.partition("@")
    if point not in POINTS:
        raise CrashPointError(f"{ENV}={spec!r}: unknown point (known: {', '.join(POINTS)})")
    try:
        return point, int(round_text) if round_text else None
    except ValueError:
        raise CrashPointError(f"{ENV}={spec!r}: the round after @ must be an integer") from None


def check() -> None:
    """Raise CrashPointError now for a bad FEDPT_CRASH_AT, not at the first crash point."""
    _target()


def armed(point: str) -> bool:
    """Whether FEDPT_CRASH_AT names `point` (to split work only when a test needs to)."""
    target = _target()
    return target is not None and target[0] == point


def reached(point: str, round_number: int | None = None) -> None:
    """SIGKILL this process if FEDPT_CRASH_AT names `point` (and this round)."""
    target = _target()
    if target is None or target[0] != point:
        return
    if target[1] is not None and target[1] != round_number:
        return
    print(f"crash point {point} (round {round_number}): SIGKILL", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
