"""What the aggregator sent each node: the model (or outer-update) bytes of every pull stream,
tallied per round in memory and recorded with the round's end (its commit, or its failure).

A pull changes nothing stored by itself (fuzzing checks that valid and invalid calls alike
leave the database as it was); the bytes reach the `metrics` table in the same transaction
that ends the round. Pulls of the final model, after the last commit, are not recorded; an
aggregator restart loses the open round's tally.
"""

from __future__ import annotations

import threading
from collections import defaultdict

from aggregator.store import DOWNLOAD_BYTES, MetricRow


class DownloadTally:
    def __init__(self) -> None:
        self._lock = threading.Lock()  # pulls end on the server's worker threads
        self._bytes: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def add(self, round_number: int, node_id: str, nbytes: int) -> None:
        if nbytes > 0:
            with self._lock:
                self._bytes[round_number][node_id] += nbytes

    def of_round(self, round_number: int) -> dict[str, int]:
        """node id -> bytes sent during round `round_number` so far."""
        with self._lock:
            return dict(self._bytes.get(round_number, {}))

    def rows(self, round_number: int) -> list[MetricRow]:
        """The round's metric rows (not forgotten: a commit that fails is retried)."""
        return [MetricRow(round_number, node, DOWNLOAD_BYTES, float(n))
                for node, n in sorted(self.of_round(round_number).items())]  # fmt: skip

    def forget_through(self, round_number: int) -> None:
        """Drop the tallies of `round_number` and earlier (recorded with their round's end)."""
        with self._lock:
            for number in [n for n in self._bytes if n <= round_number]:
                del self._bytes[number]
