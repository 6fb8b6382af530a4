"""fedpt's trainer vs a bare minimal training loop: tokens/s over the same model and batches.

The bare loop is forward, backward, AdamW step, zero_grad on one fixed batch: the floor any
trainer's overhead is measured against. fedpt's trainer adds batch fetching from memory-mapped
shards, the LR schedule, gradient clipping, the loss/grad-norm bookkeeping and its logging.
Repetitions alternate between the two so machine noise hits both alike; medians are quoted.

    python bench/trainer_throughput.py [--preset tiny] [--steps 20] [--repeats 7]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from bench.common import median, print_table, random_shards
from model.config import preset
from model.gpt import GPT
from model.train_config import TrainConfig
from node.trainer import Trainer


def bare_loop_seconds(
    model: GPT, cfg: TrainConfig, x: torch.Tensor, y: torch.Tensor, steps: int
) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                            weight_decay=cfg.weight_decay)  # fmt: skip
    start = time.perf_counter()
    for _ in range(steps):
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def trainer_seconds(trainer: Trainer, steps: int) -> float:
    start = time.perf_counter()
    trainer.train(steps)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument(
        "--steps", type=int, default=20, help="optimizer steps per timed repetition"
    )
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    model_config = preset(args.preset)
    steps_total = (args.repeats + 1) * args.steps
    cfg = TrainConfig(steps=steps_total, micro_batch_size=args.micro_batch_size, seq_len=args.seq_len,
                      log_every=args.steps, warmup_steps=5)  # fmt: skip
    tokens_per_step = cfg.tokens_per_step(1)
    with tempfile.TemporaryDirectory() as tmp:
        data = random_shards(Path(tmp), model_config.vocab_size, tokens=2_000_000)
        trainer = Trainer(model_config, cfg, data, log=lambda _m: None)
        torch.manual_seed(0)
        bare = GPT(model_config)
        x, y = (
            t
            for t in torch.randint(
                0, model_config.vocab_size, (2, args.micro_batch_size, args.seq_len)
            )
        )

        trainer_seconds(trainer, args.steps)  # warm-up: allocator, thread pools, first-touch pages
        bare_loop_seconds(bare, cfg, x, y, args.steps)
        fedpt_rates, bare_rates = [], []
        for _ in range(args.repeats):
            fedpt_rates.append(args.steps * tokens_per_step / trainer_seconds(trainer, args.steps))
            bare_rates.append(
                args.steps * tokens_per_step / bare_loop_seconds(bare, cfg, x, y, args.steps)
            )

    ratios = [f / b for f, b in zip(fedpt_rates, bare_rates, strict=True)]
    print(f"preset {args.preset} ({model_config.num_params() / 1e6:.2f}M params), {tokens_per_step} tokens/step, "
          f"{torch.get_num_threads()} threads, {args.repeats} alternating repetitions of {args.steps} steps")  # fmt: skip
    print_table(
        ["loop", "median tok/s", "min tok/s", "max tok/s"],
        [
            ["bare", median(bare_rates), min(bare_rates), max(bare_rates)],
            ["fedpt trainer", median(fedpt_rates), min(fedpt_rates), max(fedpt_rates)],
        ],
    )
    print(f"ratio fedpt/bare: median {median(ratios):.3f} (pairwise), {median(fedpt_rates) / median(bare_rates):.3f} "
          "(of medians); target >= 0.97")  # fmt: skip


if __name__ == "__main__":
    main()
