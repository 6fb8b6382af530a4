"""Named points of the protocol where a test can have a process SIGKILL itself.

Fault-injection tests (tests/faults/) need a node or the aggregator to die at an exact moment —
half-way through a pull, between writing a checkpoint and committing it — which no outside timer
can hit reliably. Both sides call `reached(point, round)` there; with FEDPT_CRASH_AT naming that
point (and round), the process kills itself with SIGKILL: no handler, no flush, no cleanup, as
in a power cut. Unset (always, outside tests), `reached` is a dictionary lookup.

    FEDPT_CRASH_AT="node.pull@2"          the node dies in round 2's pull
    FEDPT_CRASH_AT="aggregator.aggregating"  the aggregator dies in the first round to aggregate
"""

from __future__ import annotations

import os
import signal
import sys

ENV = "FEDPT_CRASH_AT"

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


def _target() -> tuple[str, int | None] | None:
    spec = os.environ.get(ENV, "").strip()
    if not spec:
        return None
    point, _, round_text = spec.partition("@")
    if point not in POINTS:
        raise ValueError(f"{ENV}={spec!r}: unknown point (known: {', '.join(POINTS)})")
    return point, int(round_text) if round_text else None


_TARGET = _target()


def armed(point: str) -> bool:
    """Whether FEDPT_CRASH_AT names `point` (to split work only when a test needs to)."""
    return _TARGET is not None and _TARGET[0] == point


def reached(point: str, round_number: int | None = None) -> None:
    """SIGKILL this process if FEDPT_CRASH_AT names `point` (and this round)."""
    if _TARGET is None or _TARGET[0] != point:
        return
    if _TARGET[1] is not None and _TARGET[1] != round_number:
        return
    print(f"crash point {point} (round {round_number}): SIGKILL", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
