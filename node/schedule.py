"""The inner learning-rate schedule."""

from __future__ import annotations

import math

from model.train_config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to `lr` over `warmup_steps`, then by `cfg.schedule`:

    cosine    cosine decay to `lr * min_lr_ratio` at `cfg.steps`
    wsd       warmup-stable-decay: hold `lr`, then decay linearly to `lr * min_lr_ratio` over
              the last `decay_fraction` of the steps (never before the warm-up ends)
    constant  hold `lr`

    `step` is the 0-based index of the optimizer step about to be taken.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "wsd":
        start = wsd_decay_start(cfg)
        if step < start:
            return cfg.lr
        # Linear, not cosine: the decay is short, and a cosine-shaped one would spend its first
        # and last stretch nearly flat. A linear cooldown is the simple WSD form that Hägele et
        # al. 2024 (arXiv:2405.18392) found to match a full cosine schedule.
        progress = min(1.0, (step - start) / max(1, cfg.steps - start))
        return cfg.lr * (1.0 - (1.0 - cfg.min_lr_ratio) * progress)
    decay_steps = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


def wsd_decay_start(cfg: TrainConfig) -> int:
    """The step at which wsd's decay begins: `decay_fraction` of `steps` before the end, and
    not inside the warm-up."""
    return max(cfg.warmup_steps, cfg.steps - round(cfg.decay_fraction * cfg.steps))
