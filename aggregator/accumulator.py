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
    def __init__(self, specs: Iterable[TensorSpec]) -> None:
        self.specs = list(specs)
        if any(s.dtype != "float32" for s in self.specs):
            raise ValueError("the accumulator sums float32 deltas only")
        self.num_elements = sum(s.nbytes // 4 for s in self.specs)
        self._sum = np.zeros(self.num_elements, dtype=np.float32)
        self.total_weight = 0.0
        self.lock = threading.Lock()  # callers hold it across spool write + add (see uploads.py)

    def add(self, byte_offset: int, data: bytes, weight: float) -> None:
        """Add weight · values, for `data` starting at `byte_offset` of a payload. Caller holds `lock`."""
        values = np.frombuffer(data, dtype="<f4")
        start = byte_offset // 4
        segment = self._sum[start : start + len(values)]
        # In place, in two steps, so no temporary of the segment's size is kept around.
        segment += values * np.float32(weight)

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

    def mean(self) -> dict[str, torch.Tensor]:
        """Σ wᵢ·Δᵢ / Σ wᵢ as named tensors (views into one fresh buffer)."""
        if self.total_weight <= 0:
            raise ValueError("no weight accumulated")
        flat = torch.from_numpy(self._sum / np.float32(self.total_weight))
        out, start = {}, 0
        for spec in self.specs:
            n = spec.nbytes // 4
            out[spec.name] = flat[start : start + n].view(spec.shape)
            start += n
        return out
