"""Personalisation: an organisation's own model, the global model adapted on its private data.

A federation's global model serves every organisation's data at once; a few steps on one
organisation's own shards make it that organisation's model (FedAvg + fine-tuning, Wang et al.
2019; Collins et al. 2022). Two ways, `[node] personalise_mode`:

  full   every weight is fine-tuned. AdamW starts from the moments the node's inner loop kept
         (its round state, when there is one): the node simply trains one more stretch on its
         own data from the final model. Fresh moments make Adam's first steps ±lr on every
         weight, which undid more than a few steps adapt (measured: README, Personalisation).
  lora   every weight stays frozen; each projection W of the attention and MLP blocks gets a
         low-rank update W + (α/r)·B·A (Hu et al. 2021). B starts at zero, so step 0 is the
         global model. Only A and B train (r·(d_in + d_out) weights per matrix, a few percent of
         the model) and AdamW keeps moments for them alone. When training ends the update is
         merged into W, so the result is an ordinary weights file (`fedpt eval`, `generate`).

The learning rate warms up over the first tenth of the steps to its peak (by default the rate
the federation's inner schedule ended at, 3x that for LoRA) and then follows the inner
schedule's shape (by default a cosine to `min_lr_ratio` of it: node.schedule.lr_at). The batches continue the node's own data
stream where the federation's rounds left it, so a personalised model and a model trained
alone for the same number of steps see the same sequences.

It runs in one process (a node's first rank): it is a few steps, and under LoRA the optimizer
state is small.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from model.gpt import GPT
from model.io import load_weights_into, model_state
from model.train_config import TrainConfig
from node.checkpoint import load_checkpoint
from node.evaluation import mean_loss
from node.parallel import DistEnv, autocast, autocast_dtype
from node.schedule import lr_at
from node.shards import BatchSampler, TokenShards, get_batch
from node.trainer import build_optimizer

MODES = ("full", "lora")


class PersonaliseError(ValueError):
    """A personalisation setting is out of range."""


@dataclass(frozen=True)
class PersonaliseConfig:
    steps: int = 0  # 0: no personalisation
    mode: str = "full"  # "full" | "lora"
    lr: float | None = None  # peak lr; None: where the inner schedule ends (LoRA: 3x it)
    lora_rank: int = 8
    lora_alpha: float = 16.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise PersonaliseError(
                f"personalise_mode must be one of {', '.join(MODES)}, got {self.mode!r}"
            )
        if self.steps < 0:
            raise PersonaliseError(f"personalise_steps must not be negative, got {self.steps}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise PersonaliseError(f"personalise_lr must be positive and finite, got {self.lr}")
        if self.lora_rank < 1:
            raise PersonaliseError(f"lora_rank must be at least 1, got {self.lora_rank}")
        if not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise PersonaliseError(f"lora_alpha must be positive, got {self.lora_alpha}")

    def peak_lr(self, inner: TrainConfig) -> float:
        if self.lr is not None:
            return self.lr
        # The rate the federation's schedule ended at: a fresh optimizer at the peak rate
        # undoes more than it adapts (measured: README, Personalisation). Low-rank updates start
        # at zero and move few weights: they take a larger step.
        end = lr_at(inner.steps, inner)  # cosine and wsd: lr·min_lr_ratio; constant: lr
        return end * (3.0 if self.mode == "lora" else 1.0)


class LowRankUpdate(nn.Module):
    """A parametrization of a Linear weight W [out, in]: W + (α/r)·B·A."""

    def __init__(
        self, out_features: int, in_features: int, rank: int, alpha: float,
        generator: torch.Generator | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.a = nn.Parameter(torch.empty(rank, in_features))
        # nn.Linear's own initialisation
        nn.init.kaiming_uniform_(self.a, a=math.sqrt(5), generator=generator)
        self.b = nn.Parameter(torch.zeros(out_features, rank))
        self.scale = alpha / rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.scale * (self.b @ self.a)


def adapted_linears(model: GPT) -> list[tuple[str, nn.Linear]]:
    """The projections LoRA adapts: every Linear inside the blocks (not the tied output)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "output"]


def add_lora(model: GPT, rank: int, alpha: float, seed: int = 0) -> list[nn.Parameter]:
    """Freeze `model` and give each adapted projection a zero low-rank update; the trainable
    parameters (the A and B factors). A is drawn from `seed`: the same run, the same model."""
    for p in model.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    trainable = []
    for _, linear in adapted_linears(model):
        out_features, in_features = linear.weight.shape
        rank_here = min(rank, out_features, in_features)
        update = LowRankUpdate(out_features, in_features, rank_here, alpha, generator)
        parametrize.register_parametrization(linear, "weight", update.to(linear.weight.device))
        trainable += [update.a, update.b]
    return trainable


def merge_lora(model: GPT) -> None:
    """Fold every low-rank update into its weight: a plain model again, trainable throughout."""
    for _, linear in adapted_linears(model):
        if parametrize.is_parametrized(linear, "weight"):
            parametrize.remove_parametrizations(linear, "weight", leave_parametrized=True)
    for p in model.parameters():
        p.requires_grad_(True)


@dataclass
class Personalised:
    model: GPT  # the personalised model (LoRA merged), eval mode
    mode: str
    steps: int
    lr: float
    trainable_params: int
    global_val_loss: float | None  # the global model on the node's validation split
    val_loss: float | None  # the personalised model on it
    seconds: float

    def report(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "model"}


def loss_text(loss: float | None) -> str:
    return "n/a (the validation split has no full window)" if loss is None else f"{loss:.4f}"


def validation_loss(
    model: nn.Module, val: TokenShards, cfg: TrainConfig, env: DistEnv
) -> float | None:
    """The node's validation figure: the inner loop's evaluation settings (Trainer.evaluate)."""
    return mean_loss(model, val, seq_len=cfg.seq_len, batch_size=cfg.micro_batch_size,
                     max_batches=cfg.eval_batches, env=env,
                     amp_dtype=autocast_dtype(cfg, env.device))  # fmt: skip


def personalise(
    global_model: GPT,
    train: TokenShards,
    val: TokenShards | None,
    inner: TrainConfig,
    pcfg: PersonaliseConfig,
    *,
    start_step: int,
    inner_state: Path | None = None,
    env: DistEnv | None = None,
) -> Personalised:
    """Adapt a copy of `global_model` for `pcfg.steps` steps of the inner batch size on `train`,
    from sample position `start_step` x batch of the node's stream (seed `inner.seed`).
    `inner_state`: a round-state checkpoint folder whose AdamW moments full fine-tuning starts
    from (any number of ranks wrote it: it holds full state dicts)."""
    if pcfg.steps < 1:
        raise PersonaliseError("personalisation needs at least one step")
    env = env or DistEnv()
    started = time.perf_counter()
    model = GPT(global_model.config).to(env.device)
    peak = pcfg.peak_lr(inner)
    schedule = dataclasses.replace(inner, steps=pcfg.steps, lr=peak,
                                   warmup_steps=max(1, pcfg.steps // 10))  # fmt: skip
    optimizer: torch.optim.Optimizer | None = None
    if pcfg.mode == "full":
        optimizer = build_optimizer(model, schedule, env.device)
        if inner_state is not None:  # its weights are the node's local model: replaced below
            load_checkpoint(inner_state, model, optimizer, env)
    load_weights_into(model, model_state(global_model), source="global model")
    global_val = validation_loss(model, val, inner, env) if val is not None else None
    if pcfg.mode == "lora":
        params = add_lora(model, pcfg.lora_rank, pcfg.lora_alpha, seed=inner.seed)
        optimizer = torch.optim.AdamW(params, lr=peak, betas=(inner.beta1, inner.beta2),
                                      eps=inner.eps, weight_decay=0.0)  # fmt: skip
    else:
        params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    sampler = BatchSampler(train.num_windows(inner.seq_len), inner.seed)
    batch = inner.micro_batch_size * inner.grad_accum
    amp_dtype = autocast_dtype(inner, env.device)
    model.train()
    for step in range(pcfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, schedule)
        position = (start_step + step) * batch
        for micro in range(inner.grad_accum):
            ids = sampler.indices(position + micro * inner.micro_batch_size, inner.micro_batch_size)
            x, y = get_batch(train, ids, inner.seq_len)
            with autocast(env.device, amp_dtype):
                _, loss = model(x.to(env.device), y.to(env.device))
            if not torch.isfinite(loss):
                raise PersonaliseError(
                    f"personalisation diverged at step {step} (loss {float(loss)}): lower its lr"
                )
            (loss / inner.grad_accum).backward()
        if inner.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, inner.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if pcfg.mode == "lora":
        merge_lora(model)
    model.eval()
    val_loss = validation_loss(model, val, inner, env) if val is not None else None
    return Personalised(model, pcfg.mode, pcfg.steps, peak, trainable, global_val, val_loss,
                        time.perf_counter() - started)  # fmt: skip
