"""`TrainConfig`: everything about the inner loop that is not the model's shape.

It lives in model/ beside ModelConfig because both sides use it: the aggregator checks it and
sends it to every node in the federation spec; the node trains with it."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from model.config import dataclass_from_dict

PRECISIONS = ("auto", "fp32", "bf16")
PARALLEL_MODES = ("ddp", "fsdp")
SCHEDULES = ("cosine", "wsd", "constant")  # node/schedule.py: lr_at


class TrainConfigError(ValueError):
    """A training option is out of range or unknown."""


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 200  # optimizer steps
    micro_batch_size: int = 8  # sequences per rank per forward pass
    grad_accum: int = 1  # micro-batches per optimizer step
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine and wsd decay to lr * min_lr_ratio
    warmup_steps: int = 20  # linear warm-up from 0 (also the re-warm of `fedpt train --init-from`)
    # After the warm-up: cosine to lr * min_lr_ratio at `steps` | wsd (warmup-stable-decay: hold
    # lr, then decay linearly over the last decay_fraction of the steps) | constant (hold lr).
    schedule: str = "cosine"
    decay_fraction: float = 0.2  # wsd: the share of `steps` spent decaying
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    # FedProx (Li et al. 2020): each inner step adds μ·(θ − θ_global) to the gradient, i.e.
    # minimises loss + μ/2·‖θ − θ_global‖², holding a node near the round's global model on
    # non-IID data. 0: off. Only federated rounds have a global model; `fedpt train` ignores it.
    proximal_mu: float = 0.0
    seed: int = 0
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False
    activation_checkpointing: bool = False
    parallel: str = "ddp"  # how several ranks share the work: ddp | fsdp (FSDP2)
    eval_every: int = 0  # steps between validation passes; 0: only at the end
    eval_batches: int = 16
    checkpoint_every: int = 0  # steps between resumable checkpoints; 0: only at the end
    log_every: int = 10

    def __post_init__(self) -> None:
        positive = (
            "steps",
            "micro_batch_size",
            "grad_accum",
            "seq_len",
            "eval_batches",
            "log_every",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise TrainConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "grad_clip", "weight_decay",
                     "proximal_mu"):  # fmt: skip
            if getattr(self, name) < 0:
                raise TrainConfigError(f"{name} must not be negative, got {getattr(self, name)}")
        if not math.isfinite(self.proximal_mu):
            raise TrainConfigError(f"proximal_mu must be a finite number, got {self.proximal_mu}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise TrainConfigError(f"lr must be a positive number, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise TrainConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.schedule not in SCHEDULES:
            raise TrainConfigError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not (math.isfinite(self.decay_fraction) and 0 < self.decay_fraction <= 1):
            raise TrainConfigError(f"decay_fraction must be in (0, 1], got {self.decay_fraction}")
        if self.precision not in PRECISIONS:
            raise TrainConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.parallel not in PARALLEL_MODES:
            raise TrainConfigError(
                f"parallel must be one of {PARALLEL_MODES}, got {self.parallel!r}"
            )

    def tokens_per_step(self, world_size: int) -> int:
        return self.micro_batch_size * self.grad_accum * world_size * self.seq_len

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        return dataclass_from_dict(cls, data, "train config", TrainConfigError)
