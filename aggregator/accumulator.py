"""Streaming aggregation: one flat fp32 accumulator, whatever the number of nodes.

An fp32 delta payload is its tensors' bytes end to end, so chunk bytes [a, b) are elements
[a/4, b/4) of one flat vector: each verified chunk is added (times the node's weight) straight
into the accumulator as it arrives, and no upload is ever held whole in memory. Aggregator
memory is global model + outer state + this accumulator.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from protos.codec import TensorSpec

READ_BYTES = 4 << 20


class StreamingAccumulator:
    """fp32 mode: Σ weight·values. Modular mode (secure aggregation): Σ values mod 2^32 of
    masked uint32 updates, exact whatever the order the chunks arrive in; no weights (the nodes
    weighted their deltas before masking)."""

    def __init__(self, specs: Iterable[TensorSpec], *, modular: bool = False) -> None:
        self.specs = list(specs)
        self.modular = modular
        dtype = "uint32" if modular else "float32"
        if any(s.dtype != dtype for s in self.specs):
            raise ValueError(f"this accumulator sums {dtype} tensors only")
        self.num_elements = sum(s.nbytes // 4 for s in self.specs)
        self._sum = np.zeros(self.num_elements, dtype=np.uint32 if modular else np.float32)
        self.total_weight = 0.0
        self.lock = threading.Lock()  # callers hold it across spool write + add (see uploads.py)

    def add(self, byte_offset: int, data: bytes, weight: float) -> bool:
        """Add weight · values, for `data` starting at `byte_offset` of a payload. Caller holds
        `lock`. False when the fp32 sum left the finite range (huge but finite values times a
        large weight): the caller must then refuse the upload and rebuild without it."""
        start = byte_offset // 4
        if self.modular:
            values = np.frombuffer(data, dtype="<u4")
            self._sum[start : start + len(values)] += values  # uint32 wraps: arithmetic mod 2^32
            return True
        values = np.frombuffer(data, dtype="<f4")
        segment = self._sum[start : start + len(values)]
        with np.errstate(over="ignore"):  # overflow is detected just below and refused
            segment += values * np.float32(weight)
        return bool(np.isfinite(segment).all())

    def add_weight(self, weight: float) -> None:
        self.total_weight += weight

    def reset(self) -> None:
        self._sum.fill(0.0)
        self.total_weight = 0.0

    def add_file(self, path: Path, weight: float) -> None:
        """Add a spooled payload prefix from disk, chunk by chunk (used to rebuild)."""
        offset = 0
        with open(path, "rb") as f:
            while data := f.read(READ_BYTES):
                self.add(offset, data, weight)
                offset += len(data)

    def modular_sum(self) -> np.ndarray:
        """A copy of the masked modular sum (to unmask without touching the running sum)."""
        return self._sum.copy()

    def mean(self) -> dict[str, torch.Tensor]:
        """Σ wᵢ·Δᵢ / Σ wᵢ as named tensors (views into one fresh buffer)."""
        if self.total_weight <= 0:
            raise ValueError("no weight accumulated")
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
