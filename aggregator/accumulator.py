"""Streaming aggregation: one flat accumulator, whatever the number of nodes, summed by several
uploads at once.

A delta payload is its tensors' values end to end, so a chunk is a run of elements of one flat
vector: `decode` turns a chunk's bytes into (first element, values) — the one place where an
encoding's wire format is read — and each verified chunk is added (times the node's weight)
straight into the sum as it arrives; no upload is ever held whole in memory. Aggregator memory
is global model + outer state + this accumulator.

Concurrency: the sum is cut into stripes of STRIPE_ELEMENTS, each with its own lock, and numpy
releases the GIL while it adds, so uploads add in parallel — into different ranges, or into the
same range stripe by stripe (a stripe another upload holds is skipped and come back to). Work
on the whole sum (reset, rebuild, mean) takes `exclusive()`, which waits until every adder in
`adding()` has left.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from protos import secagg
from protos.codec import TensorSpec
from protos.delta_encoding import RING_BITS, decode_chunk, is_secure

READ_BYTES = 4 << 20
STRIPE_ELEMENTS = 1 << 18  # 1 MiB of fp32: a 4 MiB chunk spans ~4 stripes two uploads can share

# (byte offset of a chunk in its payload, the chunk's bytes) -> (first element, values)
Decoder = Callable[[int, bytes], tuple[int, np.ndarray]]


def _ring_words(ring: type, byte_offset: int, data: bytes) -> tuple[int, np.ndarray]:
    size = np.dtype(ring).itemsize
    return byte_offset // size, np.frombuffer(data, dtype=np.dtype(ring).newbyteorder("<"))


def _decoded(
    encoding: str, num_elements: int, byte_offset: int, data: bytes
) -> tuple[int, np.ndarray]:
    start, values = decode_chunk(encoding, byte_offset, data)
    return start, values[: max(0, num_elements - start)]  # an int8 payload's padding


class Gate:
    """Many holders of `shared()` at once, or one holder of `exclusive()` alone. A waiting
    exclusive holder goes first (new shared holders wait), so a rebuild is not starved by a
    steady stream of chunks. Not re-entrant."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._shared = 0
        self._exclusive = False
        self._waiting = 0  # exclusive holders waiting

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive or self._waiting:
                self._cond.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                if not self._shared:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            while self._exclusive or self._shared:
                self._cond.wait()
            self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


class StreamingAccumulator:
    """Plain encodings (fp32, bf16, int8): Σ weight·decoded values, in fp32. Secure encodings
    (masked-int32/16/8): Σ values mod 2^bits of the masked updates, exact whatever the order the
    chunks arrive in; no weights (the nodes weighted their deltas before masking)."""

    def __init__(self, model_specs: Iterable[TensorSpec], encoding: str = "fp32") -> None:
        self.specs = list(model_specs)  # the model's fp32 tensors, whatever travels
        if any(s.dtype != "float32" for s in self.specs):
            raise ValueError("the accumulator's layout is the model's float32 tensors")
        self.encoding = encoding
        self.modular = is_secure(encoding)
        self.num_elements = sum(s.nbytes // 4 for s in self.specs)
        # One fp32 word per element whatever the ring: a narrow ring's sum fills the front of
        # the buffer (np.zeros maps pages lazily: the rest costs nothing until touched), and
        # the commit widens it into the fp32 mean in place (`widened`), so a secure round
        # never holds the sum and the mean side by side.
        self._words = np.zeros(self.num_elements, dtype=np.float32)
        if self.modular:
            ring = secagg.RING_DTYPES[RING_BITS[encoding]]
            self.decode: Decoder = lambda offset, data: _ring_words(ring, offset, data)
            self._sum = self._words.view(ring)[: self.num_elements]
        else:
            self.decode = lambda offset, data: _decoded(encoding, self.num_elements, offset, data)
            self._sum = self._words
        self.total_weight = 0.0
        stripes = -(-self.num_elements // STRIPE_ELEMENTS) or 1
        self._stripes = [threading.Lock() for _ in range(stripes)]
        self._gate = Gate()

    def adding(self) -> contextlib.AbstractContextManager[None]:
        """Hold while calling `add` (many threads at once)."""
        return self._gate.shared()

    def exclusive(self) -> contextlib.AbstractContextManager[None]:
        """Hold to reset, rebuild or read the whole sum: no `add` runs meanwhile."""
        return self._gate.exclusive()

    def add(self, byte_offset: int, data: bytes, weight: float) -> bool:
        """Add weight · values, for `data` starting at `byte_offset` of a payload. Caller holds
        `adding()` or `exclusive()`. False when the fp32 sum left the finite range (huge but
        finite values times a large weight): the caller must then refuse the upload and rebuild
        without it."""
        start, values = self.decode(byte_offset, data)
        if not len(values):
            return True
        first, last = start // STRIPE_ELEMENTS, (start + len(values) - 1) // STRIPE_ELEMENTS
        finite, busy = True, []
        for stripe in range(first, last + 1):
            lock = self._stripes[stripe]
            if not lock.acquire(blocking=False):  # another upload is there: do the rest first
                busy.append(stripe)
                continue
            try:
                finite &= self._add_stripe(stripe, start, values, weight)
            finally:
                lock.release()
        for stripe in busy:
            with self._stripes[stripe]:
                finite &= self._add_stripe(stripe, start, values, weight)
        return finite

    def _add_stripe(self, stripe: int, start: int, values: np.ndarray, weight: float) -> bool:
        """The part of `values` (elements from `start`) that falls in `stripe`; its lock held."""
        lo = max(stripe * STRIPE_ELEMENTS, start)
        hi = min((stripe + 1) * STRIPE_ELEMENTS, start + len(values))
        segment, part = self._sum[lo:hi], values[lo - start : hi - start]
        if self.modular:
            segment += part  # unsigned words wrap: arithmetic mod 2^bits
            return True
        with np.errstate(over="ignore"):  # overflow is detected just below and refused
            segment += part * np.float32(weight)
        return bool(np.isfinite(segment).all())

    def add_weight(self, weight: float) -> None:
        self.total_weight += weight

    def reset(self) -> None:
        """Caller holds `exclusive()`."""
        self._sum.fill(0)
        self.total_weight = 0.0

    def add_file(self, path: Path, weight: float, nbytes: int | None = None) -> None:
        """Add the first `nbytes` (default: all) of a spooled payload from disk, chunk by chunk
        (used to rebuild). Caller holds `exclusive()`."""
        offset = 0
        with open(path, "rb") as f:
            while nbytes is None or offset < nbytes:
                want = READ_BYTES if nbytes is None else min(READ_BYTES, nbytes - offset)
                data = f.read(want)
                if not data:
                    break
                self.add(offset, data, weight)
                offset += len(data)
        if nbytes is not None and offset != nbytes:
            raise OSError(f"{path} holds {offset} bytes, {nbytes} were added from it")

    def raw_sum(self) -> np.ndarray:
        """The running sum itself (no copy), to read chunk by chunk. Caller holds `exclusive()`."""
        return self._sum

    def widened(self) -> np.ndarray:
        """The sum's buffer as one float32 per element, starting at the same address as
        `raw_sum()`: element i's float covers ring words ≥ i, so writing floats from the last
        element down never overwrites a ring word not yet read. Caller holds `exclusive()`."""
        return self._words

    def mean(self, *, in_place: bool = False) -> dict[str, torch.Tensor]:
        """Σ wᵢ·Δᵢ / Σ wᵢ as named tensors: views into one fresh buffer, or into the sum itself
        (`in_place`: the sum is gone). Caller holds `exclusive()`."""
        if self.total_weight <= 0:
            raise ValueError("no weight accumulated")
        if in_place:
            return self.as_tensors(
                np.divide(self._sum, np.float32(self.total_weight), out=self._sum)
            )
        return self.as_tensors(self._sum / np.float32(self.total_weight))

    def as_tensors(self, flat_values: np.ndarray) -> dict[str, torch.Tensor]:
        """Cut a flat fp32 vector in this accumulator's layout into named tensors."""
        flat = torch.from_numpy(flat_values)
        out, start = {}, 0
        for spec in self.specs:
            n = spec.nbytes // 4
            out[spec.name] = flat[start : start + n].view(spec.shape)
            start += n
        return out
