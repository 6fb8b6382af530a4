"""Outer optimizers: how a round's mean pseudo-gradient becomes the next global model.

Δ̄ = Σ wᵢ·(θ_global − θ_localᵢ) / Σ wᵢ (weights: tokens trained) is used like a gradient
(DiLoCo, Douillard et al. 2023; OpenDiLoCo; FedOpt, Reddi et al. 2021):

  fedavg    θ ← θ − lr·Δ̄                       lr 1: θ becomes the weighted mean of local models
  nesterov  b ← μ·b + Δ̄;  θ ← θ − lr·(Δ̄ + μ·b)   torch.optim.SGD(nesterov=True) with b₀ = 0
  adam      m ← β1·m + (1−β1)·Δ̄;  v ← β2·v + (1−β2)·Δ̄²;  m̂ = m/(1−β1ᵗ);  v̂ = v/(1−β2ᵗ)
            θ ← θ − lr·m̂/(√v̂ + ε)                torch.optim.Adam, no weight decay

Each rule is one per-tensor in-place kernel `_outer_*_`, shared by two wrappers: the pure
functions `outer_*_step` (update fresh copies; nothing passed in is modified) and the stateful
`OuterOptimizer`, which owns its state and updates it in place, so a step costs the new
parameters plus tensor-sized temporaries, never a second copy of the optimizer state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from model.delta import DeltaError, Tensors, check_finite, check_layout, shapes_of

OPTIMIZERS = ("fedavg", "nesterov", "adam")
DEFAULT_LR = {"fedavg": 1.0, "nesterov": 0.7, "adam": 1e-3}
STATE_KINDS = {"fedavg": (), "nesterov": ("momentum",), "adam": ("exp_avg", "exp_avg_sq")}


class OuterConfigError(ValueError):
    """An invalid [outer] setting, or saved outer state that does not fit this optimizer."""


@dataclass(frozen=True)
class OuterConfig:
    # "fedavg" | "nesterov" | "adam". FedAvg by default: with the tens of rounds measured here,
    # any outer step larger than the mean delta (lr > 1, or momentum) cost perplexity (README,
    # Rounds); DiLoCo's Nesterov 0.7/0.9 is for federations of hundreds of rounds.
    name: str = "fedavg"
    lr: float | None = None  # None: DEFAULT_LR[name]
    momentum: float = 0.9  # nesterov μ
    beta1: float = 0.9  # adam
    beta2: float = 0.99  # adam; FedAdam-style, shorter memory than torch's 0.999
    eps: float = 1e-8  # adam

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise OuterConfigError(
                f"[outer] name {self.name!r} is unknown; expected one of {', '.join(OPTIMIZERS)}"
            )
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise OuterConfigError(f"[outer] lr must be positive and finite, got {self.lr}")
        for key in ("momentum", "beta1", "beta2"):
            value = getattr(self, key)
            if not 0 <= value < 1:  # also refuses NaN
                raise OuterConfigError(f"[outer] {key} must be in [0, 1), got {value}")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise OuterConfigError(f"[outer] eps must be positive and finite, got {self.eps}")

    @property
    def effective_lr(self) -> float:
        return DEFAULT_LR[self.name] if self.lr is None else float(self.lr)


# ---- per-tensor kernels: update `param` (and state) in place ----------------------------------
def _outer_fedavg_(param: torch.Tensor, delta: torch.Tensor, lr: float) -> None:
    param.sub_(delta, alpha=lr)


def _outer_nesterov_(
    param: torch.Tensor, delta: torch.Tensor, buf: torch.Tensor, lr: float, mu: float
) -> None:
    buf.mul_(mu).add_(delta)
    param.sub_(delta.add(buf, alpha=mu), alpha=lr)  # the look-ahead: Δ̄ + μ·b


def _outer_adam_(
    param: torch.Tensor,
    delta: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
) -> None:
    exp_avg.mul_(beta1).add_(delta, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(delta, delta, value=1 - beta2)
    denom = exp_avg_sq.div(1 - beta2**step).sqrt_().add_(eps)  # √v̂ + ε: the one temporary
    update = torch.div(exp_avg, denom, out=denom).div_(1 - beta1**step)  # m̂/(√v̂ + ε), reused
    param.sub_(update, alpha=lr)


# ---- pure functions ---------------------------------------------------------------------------
def _fp32_copy(tensors: Tensors) -> dict[str, torch.Tensor]:
    return {n: t.detach().to(torch.float32, copy=True).contiguous() for n, t in tensors.items()}


def _checked(params: Tensors, delta: Tensors) -> dict[str, torch.Size]:
    shapes = shapes_of(params)
    check_layout(shapes, params, "global model")  # floating dtypes only
    check_layout(shapes, delta, "mean delta")
    check_finite(delta, "mean delta")
    return shapes


def outer_fedavg_step(params: Tensors, delta: Tensors, lr: float) -> dict[str, torch.Tensor]:
    """θ − lr·Δ̄ as new fp32 tensors."""
    _checked(params, delta)
    new = _fp32_copy(params)
    for name, p in new.items():
        _outer_fedavg_(p, delta[name].detach().float(), lr)
    return new


def outer_nesterov_step(
    params: Tensors, delta: Tensors, momentum_buf: Tensors, lr: float, mu: float
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(new params, new momentum buffer); pass zeros as the buffer on the first step."""
    check_layout(_checked(params, delta), momentum_buf, "momentum buffer")
    new, buf = _fp32_copy(params), _fp32_copy(momentum_buf)
    for name, p in new.items():
        _outer_nesterov_(p, delta[name].detach().float(), buf[name], lr, mu)
    return new, buf


def outer_adam_step(
    params: Tensors,
    delta: Tensors,
    exp_avg: Tensors,
    exp_avg_sq: Tensors,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(new params, new exp_avg, new exp_avg_sq). `step` is this step's number t, 1 on the
    first step (moments then zeros)."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise DeltaError(f"adam step must be an int ≥ 1, got {step!r}")
    shapes = _checked(params, delta)
    check_layout(shapes, exp_avg, "adam exp_avg")
    check_layout(shapes, exp_avg_sq, "adam exp_avg_sq")
    new, m, v = _fp32_copy(params), _fp32_copy(exp_avg), _fp32_copy(exp_avg_sq)
    for name, p in new.items():
        _outer_adam_(p, delta[name].detach().float(), m[name], v[name], step, lr, beta1, beta2, eps)
    return new, m, v


# ---- the stateful optimizer the aggregator keeps across rounds --------------------------------
ParamSpecs = Mapping[str, tuple[torch.Size, torch.dtype]] | Mapping[str, torch.Tensor]


class OuterOptimizer:
    """Outer optimizer state for one global model; `step` is all-or-nothing on bad input."""

    def __init__(self, config: OuterConfig, param_specs: ParamSpecs) -> None:
        self.config = config
        self.shapes: dict[str, torch.Size] = {}
        for name, spec in param_specs.items():
            shape, dtype = (spec.shape, spec.dtype) if isinstance(spec, torch.Tensor) else spec
            if not dtype.is_floating_point:
                raise DeltaError(f"outer optimizer: {name} has dtype {dtype}, expected floating")
            self.shapes[name] = torch.Size(shape)
        self.step_count = 0
        self._state = {
            kind: {n: torch.zeros(s, dtype=torch.float32) for n, s in self.shapes.items()}
            for kind in STATE_KINDS[config.name]
        }

    def step(
        self, params: Tensors, mean_delta: Tensors, *, out: Tensors | None = None
    ) -> dict[str, torch.Tensor]:
        """The next global model; the optimizer state moves one step. New fp32 tensors, or
        written into `out`'s fp32 tensors (which may be `mean_delta`'s own: each tensor's delta
        is used up before its result is copied over it), so that the aggregator holds no extra
        model-sized buffer: only one tensor's worth at a time."""
        check_layout(self.shapes, params, "global model")
        check_layout(self.shapes, mean_delta, "mean delta")
        check_finite(mean_delta, "mean delta")
        if out is not None:
            check_layout(self.shapes, out, "output")
        # Everything is checked: nothing below refuses, so state only changes on success.
        c, lr, t = self.config, self.config.effective_lr, self.step_count + 1
        new = {}
        for name, param in params.items():
            p = param.detach().to(torch.float32, copy=True).contiguous()
            d = mean_delta[name].detach().float()
            if c.name == "fedavg":
                _outer_fedavg_(p, d, lr)
            elif c.name == "nesterov":
                _outer_nesterov_(p, d, self._state["momentum"][name], lr, c.momentum)
            else:
                m, v = self._state["exp_avg"][name], self._state["exp_avg_sq"][name]
                _outer_adam_(p, d, m, v, t, lr, c.beta1, c.beta2, c.eps)
            if out is None:
                new[name] = p
            else:
                new[name] = out[name].copy_(p)
                del p
        self.step_count = t
        return new

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """{"<kind>.<param name>": tensor}; the optimizer's own tensors, not copies (they change
        in place on the next step: save or clone them before it)."""
        return {f"{k}.{n}": t for k, buf in self._state.items() for n, t in buf.items()}

    def state_meta(self) -> dict:
        """JSON-able: the optimizer, its step count and hyper-parameters."""
        c = self.config
        meta: dict = {"name": c.name, "step": self.step_count, "lr": c.effective_lr}
        if c.name == "nesterov":
            meta["momentum"] = c.momentum
        if c.name == "adam":
            meta.update(beta1=c.beta1, beta2=c.beta2, eps=c.eps)
        return meta

    def load_state(self, tensors: Tensors, meta: dict) -> None:
        """Restore exactly what `state_tensors`/`state_meta` saved. A different optimizer,
        hyper-parameter or model layout is refused, and leaves this optimizer unchanged."""
        expected = self.state_meta()
        if not isinstance(meta, dict) or meta.get("name") != self.config.name:
            found = meta.get("name") if isinstance(meta, dict) else meta
            raise OuterConfigError(
                f"saved outer optimizer is {found!r}, the config says {self.config.name!r}"
            )
        if set(meta) != set(expected):
            raise OuterConfigError(
                f"saved outer state has keys {sorted(meta)}, expected {sorted(expected)}"
            )
        for key in expected.keys() - {"name", "step"}:
            if meta[key] != expected[key]:
                raise OuterConfigError(
                    f"saved outer {key} is {meta[key]!r}, the config says {expected[key]!r}"
                )
        step = meta["step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise OuterConfigError(f"saved outer step must be an int ≥ 0, got {step!r}")
        names = {f"{k}.{n}": s for k in self._state for n, s in self.shapes.items()}
        try:
            check_layout(names, tensors, "saved outer state")
            check_finite(tensors, "saved outer state")
        except DeltaError as e:
            raise OuterConfigError(str(e)) from e
        for name, t in tensors.items():
            if t.dtype != torch.float32:
                raise OuterConfigError(f"saved outer state: {name} is {t.dtype}, not float32")
        self._state = {
            k: {n: tensors[f"{k}.{n}"].detach().clone().contiguous() for n in self.shapes}
            for k in self._state
        }
        self.step_count = step
