"""A round's running sum and the spool files it is made of.

Invariant: the accumulator holds Σ weight·(the first `added_bytes` of each member's spool), and
its total_weight is Σ weight over the complete members. A member — an upload — can therefore
leave (refused, abandoned, a straggler) by rebuilding the sum from the others' spools, while the
others keep adding: chunks are added inside the accumulator's shared gate, a rebuild holds it
exclusively, and a chunk is written to its spool before it is added, so a rebuild never needs
bytes that are not on disk yet. Each round gets a fresh RoundSum, so ending a round never waits
for a rebuild of the last one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from aggregator.accumulator import StreamingAccumulator
from aggregator.errors import RoundClosed
from aggregator.secure_aggregation import SecAggRound
from protos.codec import TensorSpec
from protos.delta_encoding import FlatLayout


class Member(Protocol):
    """An upload whose bytes are (partly) in the sum."""

    node_id: str
    weight: float
    added_bytes: int  # a prefix of the spool; changed only inside the shared gate
    complete: bool  # its weight is counted
    cancelled: bool  # leaving: the next rebuild drops it

    def spool_paths(self) -> tuple[Path, ...]:
        """Where its bytes are, in the order to look (a spool renamed meanwhile is found)."""
        ...

    def flush(self) -> None: ...


@dataclass(eq=False)
class SpooledUpload:
    """A complete upload kept on disk by an earlier process (its session died with it)."""

    node_id: str
    path: Path
    weight: float
    added_bytes: int
    complete: bool = True
    cancelled: bool = False

    def spool_paths(self) -> tuple[Path, ...]:
        return (self.path,)

    def flush(self) -> None:
        pass


class RoundSum:
    def __init__(self, round_number: int, model_specs: Iterable[TensorSpec], encoding: str) -> None:
        self.round_number = round_number
        self.accumulator = StreamingAccumulator(model_specs, encoding)
        self._members: dict[Member, None] = {}  # arrival order; guarded by _mutex
        self._mutex = threading.Lock()
        self.retired = False  # the round ended: nobody reads this sum any more
        self.stale = False  # a rebuild failed part-way: rebuild before reading the sum
        # The commit turned the sum into the mean (and the new model) in place, to spare the
        # aggregator a model-sized buffer: only the commit may rebuild it now (to retry).
        self.consumed = False

    def add(self, member: Member, byte_offset: int, data: bytes) -> bool:
        """Add a chunk of `member`'s upload, already written to its spool. False: the fp32 sum
        overflowed (refuse the upload). A cancelled member adds nothing."""
        with self.accumulator.adding():
            if member.cancelled:
                raise RoundClosed(
                    f"round {self.round_number} closed while this upload was arriving"
                )
            with self._mutex:
                self._members.setdefault(member, None)
            finite = self.accumulator.add(byte_offset, data, member.weight)
            member.added_bytes += len(data)
        return finite

    def complete(self, member: Member) -> None:
        """Count the weight of an upload whose every byte is added."""
        with self._mutex:
            member.complete = True
            self.accumulator.add_weight(member.weight)

    def include(self, member: Member) -> None:
        """A complete upload from disk (start-up); `rebuild` adds its bytes."""
        with self._mutex:
            self._members[member] = None

    def rebuild(
        self,
        order: Callable[[list[Member]], list[Member]] | None = None,
        *,
        by_commit: bool = False,
    ) -> None:
        """Recompute the sum from the spools of the members not cancelled, in `order` if given
        (a deterministic fp32 sum), else in arrival order. A sum the commit consumed is left
        alone unless the commit itself asks (its buffer may be becoming the next model)."""
        acc = self.accumulator
        with acc.exclusive():
            if self.consumed and not by_commit:
                return
            self.consumed = False
            with self._mutex:
                self._members = {m: None for m in self._members if not m.cancelled}
                members = list(self._members)
            self.stale = True
            acc.reset()
            for m in order(members) if order else members:
                self._add_spool(m)
            with self._mutex:  # a completion may have landed meanwhile: count what is complete
                acc.total_weight = sum(m.weight for m in self._members if m.complete)
            self.stale = False

    def needs_rebuild(self) -> bool:
        """Whether the sum still holds bytes of cancelled uploads, a rebuild failed, or a
        commit attempt consumed it."""
        with self._mutex:
            return self.stale or self.consumed or any(m.cancelled for m in self._members)

    def _add_spool(self, member: Member) -> None:
        member.flush()
        for path in member.spool_paths():
            try:
                self.accumulator.add_file(path, member.weight, member.added_bytes)
                return
            except FileNotFoundError:
                continue
        if not member.cancelled:  # one cancelled meanwhile is dropped by the rebuild after this
            raise FileNotFoundError(f"the spool of {member.node_id}'s upload is missing")

    def mean(self) -> dict[str, torch.Tensor]:
        with self.accumulator.exclusive():
            return self.accumulator.mean()

    def consume_mean(self) -> dict[str, torch.Tensor]:
        """Σ wᵢ·Δᵢ / Σ wᵢ computed in the sum's own buffer (no model-sized copy); the sum is
        consumed: the caller may overwrite those tensors, and a retry must rebuild."""
        with self.accumulator.exclusive():
            self.consumed = True
            return self.accumulator.mean(in_place=True)

    def consume_unmasked_mean(
        self, sec: SecAggRound, tokens: dict[str, int]
    ) -> dict[str, torch.Tensor]:
        """The unmasked, dequantized mean of a secure round, chunk by chunk from the last, in
        the sum's own buffer widened to fp32 (each chunk of ring words is copied before floats
        overwrite it; see `StreamingAccumulator.widened`). The sum is consumed, as in
        `consume_mean`."""
        acc = self.accumulator
        with acc.exclusive():
            self.consumed = True
            out = acc.widened()
            sec.unmasked_mean_into(acc.raw_sum(), FlatLayout.of(acc.specs), tokens, out)
            return acc.as_tensors(out)
