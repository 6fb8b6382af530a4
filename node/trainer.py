"""The inner trainer: AdamW with warmup + cosine, gradient accumulation, clipping, autocast.

Split by level: `train` (the inner loop: logging, evaluation, checkpoints) calls `train_step`
(one optimizer step over `grad_accum` micro-batches) which calls `_micro_step` (one forward and
backward). The federated round loop (later, in node/participant) calls `train` for H steps.

Which sequences a rank sees is a pure function of (seed, step, micro-step, rank): the global
batch of step s is sample positions [s·G, (s+1)·G) of one endless shuffled stream, and rank r's
micro-batch a is the slice starting at (a·world + r)·micro_batch. So a resumed run sees exactly
the batches an uninterrupted one would, and 2 ranks × 1 micro-batch see the same sequences as
1 rank × 2 micro-batches.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from model.config import ModelConfig
from model.gpt import GPT
from model.io import CheckpointError, weights_metadata
from model.train_config import TrainConfig
from node.checkpoint import (
    full_model_state,
    latest_checkpoint,
    load_checkpoint,
    read_state,
    save_checkpoint,
)
from node.evaluation import mean_loss
from node.metrics import MetricsLog, mfu, peak_flops
from node.parallel import (
    DistEnv,
    all_reduce_mean,
    autocast,
    autocast_dtype,
    decided_by_main,
    gradient_sync,
    parallelize,
)
from node.progress import step_bar
from node.schedule import lr_at
from node.shards import BatchSampler, TokenShards, get_batch

# Changing these between a checkpoint and its resumption would change the loss sequence.
RESUME_MUST_MATCH = (
    "micro_batch_size",
    "grad_accum",
    "seq_len",
    "lr",
    "min_lr_ratio",
    "warmup_steps",
    "weight_decay",
    "beta1",
    "beta2",
    "eps",
    "grad_clip",
    "seed",
    "precision",
    "steps",
    "schedule",
    "decay_fraction",
)
# What a checkpoint written before a setting existed trained with.
RESUME_DEFAULTS = {"schedule": "cosine", "decay_fraction": 0.2}


def add_proximal_gradient_(
    params: list[torch.nn.Parameter], anchors: list[torch.Tensor], mu: float
) -> None:
    """grad ← grad + μ·(θ − θ_anchor) for every parameter with a gradient: the gradient of
    the FedProx term μ/2·‖θ − θ_anchor‖²."""
    for p, anchor in zip(params, anchors, strict=True):
        if p.grad is not None:
            p.grad.add_(p.detach() - anchor, alpha=mu)


class TrainingError(RuntimeError):
    """Training cannot go on: the loss diverged, or a checkpoint does not match this run."""


@dataclass
class StepLog:
    step: int
    loss: float
    lr: float
    grad_norm: float
    tokens_per_second: float
    mfu: float | None


def build_optimizer(
    model: torch.nn.Module, cfg: TrainConfig, device: torch.device
) -> torch.optim.AdamW:
    """AdamW; matrices decay, norms and other vectors do not (GPT-2/LLaMA practice)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=device.type == "cuda"
    )


class Trainer:
    def __init__(
        self,
        model_config: ModelConfig,
        cfg: TrainConfig,
        train_data: TokenShards,
        *,
        env: DistEnv | None = None,
        val_data: TokenShards | None = None,
        tokenizer_spec: dict | None = None,
        out_dir: Path | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        if cfg.seq_len > model_config.max_seq_len:
            raise TrainingError(
                f"seq_len {cfg.seq_len} exceeds the model's max_seq_len {model_config.max_seq_len}"
            )
        self.cfg, self.model_config = cfg, model_config
        self.env = env or DistEnv()
        self.train_data, self.val_data = train_data, val_data
        self.tokenizer_spec = tokenizer_spec or {}
        self.out_dir = out_dir
        self._log = log if self.env.is_main else (lambda _msg: None)
        self.metrics = MetricsLog(
            out_dir / "metrics.jsonl" if out_dir and self.env.is_main else None
        )

        # Same seed on every rank: all replicas start identical without a broadcast.
        torch.manual_seed(cfg.seed)
        self.model = GPT(model_config).to(self.env.device)
        self.module = parallelize(self.model, cfg, self.env)
        self.optimizer = build_optimizer(self.model, cfg, self.env.device)
        self.sampler = BatchSampler(train_data.num_windows(cfg.seq_len), cfg.seed)
        self.amp_dtype = autocast_dtype(cfg, self.env.device)
        self.flops_per_token = model_config.flops_per_token(cfg.seq_len)
        self.peak_flops = peak_flops(self.env.device)
        self.step = 0
        self.tokens_seen = 0
        self.last_log: StepLog | None = None
        self.last_eval: tuple[int, float] | None = None  # (step, validation loss)
        # The round's global weights, for the proximal term (set by load_global when μ > 0).
        self._anchor: list[torch.Tensor] | None = None

    # ---- data ---------------------------------------------------------------------------------
    @property
    def global_batch_sequences(self) -> int:
        return self.cfg.micro_batch_size * self.cfg.grad_accum * self.env.world_size

    def _micro_batch(self, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        mb = self.cfg.micro_batch_size
        start = (
            self.step * self.global_batch_sequences
            + (micro_step * self.env.world_size + self.env.rank) * mb
        )
        x, y = get_batch(self.train_data, self.sampler.indices(start, mb), self.cfg.seq_len)
        non_blocking = self.env.device.type == "cuda"
        return x.to(self.env.device, non_blocking=non_blocking), y.to(
            self.env.device, non_blocking=non_blocking
        )

    # ---- one optimizer step -------------------------------------------------------------------
    def _micro_step(self, micro_step: int, sync: bool) -> torch.Tensor:
        x, y = self._micro_batch(micro_step)
        with gradient_sync(self.module, sync):
            with autocast(self.env.device, self.amp_dtype):
                _, loss = self.module(x, y)
            (loss / self.cfg.grad_accum).backward()
        return loss.detach()

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """One optimizer step. Returns (mean loss over all ranks, grad norm, lr) without a
        host sync: the tensors are read when the loop logs."""
        lr = lr_at(self.step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.env.device)
        for micro_step in range(self.cfg.grad_accum):
            loss_sum += self._micro_step(micro_step, sync=micro_step == self.cfg.grad_accum - 1)
        if self._anchor is not None:  # after the gradients are synchronised: the same on all ranks
            add_proximal_gradient_(
                list(self.model.parameters()), self._anchor, self.cfg.proximal_mu
            )
        grad_norm = self._clip_gradients()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += self.cfg.tokens_per_step(self.env.world_size)
        return all_reduce_mean(loss_sum / self.cfg.grad_accum, self.env), grad_norm, lr

    def _clip_gradients(self) -> torch.Tensor:
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor

    # ---- the inner loop -----------------------------------------------------------------------
    def train(self, num_steps: int) -> list[float]:
        """Run `num_steps` optimizer steps; returns their losses (mean over ranks)."""
        self.module.train()
        target = self.step + num_steps
        losses: list[float] = []
        pending: list[tuple[int, torch.Tensor, torch.Tensor, float]] = []
        interval_start, interval_tokens = time.perf_counter(), self.tokens_seen
        first = self.step
        # A terminal gets a bar (rank 0; node/progress.py); the log lines print above it.
        with step_bar("training", num_steps, enabled=self.env.is_main) as bar:
            while self.step < target:
                loss, grad_norm, lr = self.train_step()
                pending.append((self.step, loss, grad_norm, lr))
                if self.step % self.cfg.log_every == 0 or self.step == target:
                    elapsed = self._sync_and_time(interval_start)
                    rate = (self.tokens_seen - interval_tokens) / max(elapsed, 1e-9)
                    losses += self._flush(pending, rate)
                    pending = []
                    interval_start, interval_tokens = time.perf_counter(), self.tokens_seen
                    bar.update(self.step - first, rate=f"{rate:,.0f} tok/s",
                               loss=f"loss {losses[-1]:.4f}")  # fmt: skip
                else:
                    bar.update(self.step - first)
                if self._due(self.cfg.eval_every) and self.val_data is not None:
                    self.evaluate_and_log()
                    interval_start = time.perf_counter()  # evaluation time is not training time
                if self._due(self.cfg.checkpoint_every) and self.out_dir is not None:
                    self.save_checkpoint()
                    interval_start = time.perf_counter()
        return losses

    def _due(self, every: int) -> bool:
        return every > 0 and self.step % every == 0

    def _sync_and_time(self, since: float) -> float:
        if self.env.device.type == "cuda":
            torch.cuda.synchronize(self.env.device)
        return time.perf_counter() - since

    def _flush(self, pending: list, tokens_per_second: float) -> list[float]:
        """Read the pending step tensors back, refuse a diverged loss, log the last step."""
        losses = [float(loss) for _, loss, _, _ in pending]
        for (step, _, _, _), loss in zip(pending, losses, strict=True):
            if not math.isfinite(loss):
                raise TrainingError(
                    f"loss became {loss} at step {step}; lower lr or check the data"
                )
        step, _, grad_norm, lr = pending[-1]
        entry = StepLog(
            step=step,
            loss=losses[-1],
            lr=lr,
            grad_norm=float(grad_norm),
            tokens_per_second=tokens_per_second,
            mfu=mfu(tokens_per_second, self.flops_per_token, self.peak_flops, self.env.world_size),
        )
        self.metrics.write({"event": "train", **entry.__dict__})
        mfu_text = f" mfu {entry.mfu:.1%}" if entry.mfu is not None else ""
        self._log(
            f"step {step:>6} | loss {entry.loss:.4f} | lr {lr:.2e} | grad norm "
            f"{entry.grad_norm:.3f} | {tokens_per_second:,.0f} tok/s{mfu_text}"
        )
        self.last_log = entry
        return losses

    # ---- evaluation ---------------------------------------------------------------------------
    def evaluate(self, data: TokenShards | None = None) -> float | None:
        """Mean next-token loss on `data` (default: the validation split)."""
        data = data or self.val_data
        if data is None:
            return None
        return mean_loss(
            self.module,
            data,
            seq_len=self.cfg.seq_len,
            batch_size=self.cfg.micro_batch_size,
            max_batches=self.cfg.eval_batches,
            env=self.env,
            amp_dtype=self.amp_dtype,
        )

    def evaluate_and_log(self) -> float | None:
        """Validation loss at the current step, logged once (a repeated call reuses it)."""
        if self.last_eval is not None and self.last_eval[0] == self.step:
            return self.last_eval[1]
        loss = self.evaluate()
        if loss is not None:
            self.last_eval = (self.step, loss)
            self.metrics.write({"event": "eval", "step": self.step, "val_loss": loss})
            self._log(
                f"step {self.step:>6} | val loss {loss:.4f} | val ppl {math.exp(min(loss, 50)):.2f}"
            )
        return loss

    # ---- checkpoints --------------------------------------------------------------------------
    def checkpoint_root(self) -> Path:
        if self.out_dir is None:
            raise TrainingError("this trainer has no output folder to checkpoint into")
        return self.out_dir / "checkpoints"

    def save_checkpoint(self, extra: dict | None = None) -> Path:
        """A resumable checkpoint; `extra` (JSON) is kept in its state (node.checkpoint.read_state)."""
        directory = self.checkpoint_root() / f"step_{self.step:08d}"
        metadata = weights_metadata(self.model_config, self.tokenizer_spec, self.cfg.seq_len)
        state = {
            "extra": extra or {},
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "world_size": self.env.world_size,
            "model_config": self.model_config.to_dict(),
            "train_config": self.cfg.to_dict(),
            "tokenizer": self.tokenizer_spec,
        }
        save_checkpoint(
            directory,
            self.module,
            self.optimizer,
            is_main=self.env.is_main,
            tie_embeddings=self.model_config.tie_embeddings,
            weights_metadata=metadata,
            state=state,
        )
        self._log(f"step {self.step:>6} | checkpoint {directory}")
        return directory

    def latest_checkpoint(self) -> Path | None:
        """The checkpoint to resume from, as rank 0 (which writes them) sees it (collective)."""
        root = self.checkpoint_root()
        found = decided_by_main(
            lambda: str(latest_checkpoint(root) or ""), self.env, (CheckpointError,)
        )
        return Path(found) if found else None

    def checkpoint_folders(self) -> list[Path]:
        """Every kept checkpoint folder, oldest first, as rank 0 sees them (collective)."""
        root = self.checkpoint_root()
        return [
            Path(d)
            for d in decided_by_main(lambda: sorted(map(str, root.glob("step_*"))), self.env)
        ]

    def checkpoint_state(self, directory: Path) -> dict:
        """A checkpoint's saved state (node.checkpoint.read_state), read by rank 0 (collective)."""
        return decided_by_main(lambda: read_state(directory), self.env, (CheckpointError,))

    def load_checkpoint(self, directory: Path) -> None:
        state = load_checkpoint(directory, self.module, self.optimizer, self.env)
        if state["model_config"] != self.model_config.to_dict():
            raise TrainingError(f"checkpoint {directory} was made for another model config")
        if state["tokenizer"] != self.tokenizer_spec:
            raise TrainingError(f"checkpoint {directory} was made with another tokenizer")
        saved = {**RESUME_DEFAULTS, **state["train_config"]}
        changed = [k for k in RESUME_MUST_MATCH if saved.get(k) != getattr(self.cfg, k)]
        if changed or state["world_size"] * self.cfg.micro_batch_size * self.cfg.grad_accum != (
            self.global_batch_sequences
        ):
            raise TrainingError(
                f"cannot resume {directory}: changed settings {changed or ['world size']} would "
                "change the batches or the schedule"
            )
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self._log(f"resumed from {directory} at step {self.step}")

    def seek(self, step: int) -> None:
        """Continue the data order and learning-rate schedule from `step`."""
        self.step = step
        self.tokens_seen = step * self.cfg.tokens_per_step(self.env.world_size)

    # ---- federated rounds ---------------------------------------------------------------------
    def load_global(self, weights: dict[str, torch.Tensor]) -> None:
        """Overwrite the weights with the global model (a full state dict, on every rank)."""
        self.load_weights(weights, "global model")
        if self.cfg.proximal_mu > 0:  # sharded like the parameters under FSDP
            self._anchor = [p.detach().clone() for p in self.model.parameters()]

    def load_weights(self, weights: dict[str, torch.Tensor], source: str = "weights") -> None:
        """Overwrite the weights (a full state dict, on every rank); the optimizer and the step
        are left as they are."""
        options = StateDictOptions(full_state_dict=True, strict=False)
        # A copy: set_model_state_dict adds the tied output weight to the dict it is given.
        missing, unexpected = set_model_state_dict(self.module, dict(weights), options=options)
        missing = [m for m in missing if m != "output.weight"]  # tied to the embedding
        if missing or unexpected:
            raise TrainingError(
                f"{source} does not fit: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )

    def full_weights(self) -> dict[str, torch.Tensor]:
        """The local model's full weights on the CPU (collective under FSDP)."""
        return full_model_state(self.module, self.model_config.tie_embeddings)

    def reset_optimizer(self, momentum_only: bool = False) -> None:
        """Forget the inner optimizer's moments (the default keeps them across rounds); with
        `momentum_only`, only the first moment (the running gradient direction)."""
        if not momentum_only:
            self.optimizer.state.clear()
            return
        for state in self.optimizer.state.values():
            if "exp_avg" in state:
                state["exp_avg"].zero_()

    def close(self) -> None:
        self.metrics.close()
