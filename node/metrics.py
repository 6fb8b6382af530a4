"""Throughput and model-FLOPs utilisation (MFU)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

# Dense bf16 tensor-core peak per GPU, from the vendors' datasheets (no sparsity).
PEAK_BF16_FLOPS = {
    "H200": 989.5e12,
    "H100 SXM": 989.5e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989.5e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
}


def peak_flops(device: torch.device) -> float | None:
    """Peak bf16 FLOP/s of `device`; FEDPT_PEAK_FLOPS overrides; None when unknown (CPU)."""
    if override := os.environ.get("FEDPT_PEAK_FLOPS"):
        return float(override)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS.items():  # most specific names come first
        if key in name:
            return flops
    return None


def mfu(
    tokens_per_second: float, flops_per_token: int, peak: float | None, world_size: int
) -> float | None:
    """Achieved model FLOP/s over the peak of all devices; None when the peak is unknown."""
    if not peak:
        return None
    return tokens_per_second * flops_per_token / (peak * world_size)


class MetricsLog:
    """Append-only JSON lines, one record per event; flushed so a crash loses nothing logged."""

    def __init__(self, path: Path | None) -> None:
        self._file = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def write(self, record: dict) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record, sort_keys=True) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
