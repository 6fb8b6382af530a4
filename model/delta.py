"""Pure delta math for federated rounds, with ONE sign convention: Δ = θ_global − θ_local.

A node starts from the global model, trains H inner steps and reports Δ. Like a gradient, Δ
points uphill (the node moved by −Δ), so every consumer *subtracts* it: θ ← θ − scale·Δ, and
applying a node's own Δ with scale 1 gives back its local model exactly.

State dicts are `dict[str, Tensor]`. All math is fp32 on fresh tensors; inputs are never
modified. Layout checks come first, so a bad input raises before any work is done.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

Tensors = Mapping[str, torch.Tensor]


class DeltaError(ValueError):
    """Tensors that cannot be combined: names, shapes, non-finite values or bad weights."""


def shapes_of(tensors: Tensors) -> dict[str, torch.Size]:
    return {name: t.shape for name, t in tensors.items()}


def check_layout(expected: Mapping[str, torch.Size], tensors: Tensors, what: str) -> None:
    """Refuse `tensors` unless it has exactly the names and shapes of `expected`, all floating."""
    missing = [n for n in expected if n not in tensors]
    unexpected = [n for n in tensors if n not in expected]
    if missing or unexpected:
        raise DeltaError(f"{what}: missing tensors {missing[:3]}, unexpected {unexpected[:3]}")
    for name, t in tensors.items():
        if t.shape != expected[name]:
            raise DeltaError(
                f"{what}: {name} has shape {tuple(t.shape)}, expected {tuple(expected[name])}"
            )
        if not t.is_floating_point():
            raise DeltaError(f"{what}: {name} has dtype {t.dtype}, expected a floating dtype")


def check_finite(tensors: Tensors, what: str) -> None:
    """Raise DeltaError naming the first tensor that holds a NaN or an Inf."""
    for name, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise DeltaError(f"{what}: {name} has NaN or Inf values")


def pseudo_gradient(global_params: Tensors, local_params: Tensors) -> dict[str, torch.Tensor]:
    """Δ = global − local in fp32, with the global model's names and order."""
    check_layout(shapes_of(global_params), local_params, "local model")
    return {
        name: g.detach().float() - local_params[name].detach().float()
        for name, g in global_params.items()
    }


def apply_delta(params: Tensors, delta: Tensors, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """params − scale·Δ as new fp32 tensors."""
    if not math.isfinite(scale):
        raise DeltaError(f"scale must be finite, got {scale}")
    check_layout(shapes_of(params), delta, "delta")
    return {
        name: torch.sub(p.detach().float(), delta[name].detach().float(), alpha=scale)
        for name, p in params.items()
    }


def weighted_mean(deltas: Sequence[Tensors], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Σ wᵢ·Δᵢ / Σ wᵢ (weights are typically tokens trained), in fp32.

    Sums first and divides once, like the streaming accumulator, so both agree."""
    if not deltas:
        raise DeltaError("no deltas to average")
    if len(weights) != len(deltas):
        raise DeltaError(f"{len(deltas)} deltas but {len(weights)} weights")
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not (math.isfinite(w) and w > 0):
            raise DeltaError(f"weight {i} must be positive and finite, got {w!r}")
    reference = shapes_of(deltas[0])
    for i, d in enumerate(deltas):
        check_layout(reference, d, f"delta {i}")
    total = math.fsum(float(w) for w in weights)
    out = {}
    for name, first in deltas[0].items():
        acc = first.detach().float() * float(weights[0])  # fresh: the only new tensor per name
        for d, w in zip(deltas[1:], weights[1:], strict=True):
            acc.add_(d[name].detach().float(), alpha=float(w))
        out[name] = acc.div_(total)
    return out
