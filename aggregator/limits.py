"""Per-node limits on calls in flight, so that one node cannot starve the others.

gRPC Python runs every call on one of the server's worker threads ([server] max_workers), and a
GetTask long poll holds its thread for up to long_poll_seconds. Nothing in grpcio can tell one
peer's calls from another's before a thread is spent, so the limits are enforced first thing in
each handler, before any other work: a call over the node's limit costs one short-lived thread,
never a held one.

  calls       at most `max_calls` calls of one node in flight at once; more are refused with
              RESOURCE_EXHAUSTED (an honest node makes one or two at a time).
  long polls  at most `max_long_polls` GetTask calls of one node may wait; more are answered at
              once, as if they had asked not to wait (an honest node that lost a connection
              mid-poll may briefly have a second: it gets its task, never an error).
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Iterator

from aggregator.errors import ResourceExhausted


class NodeCallLimits:
    def __init__(self, max_calls: int, max_long_polls: int) -> None:
        self.max_calls, self.max_long_polls = max_calls, max_long_polls  # 0: unlimited
        self._lock = threading.Lock()
        self._calls: Counter[str] = Counter()
        self._polls: Counter[str] = Counter()

    @contextlib.contextmanager
    def call(self, node: str) -> Iterator[None]:
        """Hold one of `node`'s call slots for the body; RESOURCE_EXHAUSTED when none is free."""
        with self._lock:
            if self.max_calls and self._calls[node] >= self.max_calls:
                raise ResourceExhausted(
                    f"this node already has {self._calls[node]} calls in progress (the limit "
                    "per node, [server] max_calls_per_node)"
                )
            self._calls[node] += 1
        try:
            yield
        finally:
            self._release(self._calls, node)

    @contextlib.contextmanager
    def long_poll(self, node: str, wanted: bool = True) -> Iterator[bool]:
        """Whether this call may wait (it then holds a long-poll slot for the body)."""
        with self._lock:
            allowed = wanted and (
                not self.max_long_polls or self._polls[node] < self.max_long_polls
            )
            if allowed:
                self._polls[node] += 1
        try:
            yield allowed
        finally:
            if allowed:
                self._release(self._polls, node)

    def in_flight(self, node: str) -> tuple[int, int]:
        """(calls, long polls) of `node` now."""
        with self._lock:
            return self._calls[node], self._polls[node]

    def _release(self, counter: Counter[str], node: str) -> None:
        with self._lock:
            counter[node] -= 1
            if counter[node] <= 0:
                del counter[node]  # the counters hold only nodes with calls in flight
