"""fedpt's trainer vs a bare minimal training loop: tokens/s over the same model and batches.

The bare loop is forward, backward, AdamW step, zero_grad on one fixed batch: the floor any
trainer's overhead is measured against. fedpt's trainer adds batch fetching from memory-mapped
shards, the LR schedule, gradient clipping, the loss/grad-norm bookkeeping and its logging.
"watched" is the same trainer as a node watched by its operator runs it: stdout a (pseudo-)
terminal, so its progress bar draws live, and a Prometheus endpoint (node/prometheus.py) serving,
updated after each repetition as after each round and scraped over HTTP. Repetitions alternate
between the three so machine noise hits them alike; medians are quoted.

    python bench/trainer_throughput.py [--preset tiny] [--steps 20] [--repeats 7]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pty
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import torch

from bench.common import median, print_table, random_shards
from model.config import preset
from model.gpt import GPT
from model.train_config import TrainConfig
from node.participant import RoundRecord
from node.prometheus import NodeMetrics
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


@contextlib.contextmanager
def on_a_terminal() -> Iterator[None]:
    """sys.stdout is a pseudo-terminal for the block (progress bars draw as on a real one);
    a thread drains what is drawn."""
    master, slave = pty.openpty()

    def drain() -> None:
        with contextlib.suppress(OSError):
            while os.read(master, 1 << 16):
                pass

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    terminal, saved = os.fdopen(slave, "w", buffering=1), sys.stdout
    sys.stdout = terminal
    try:
        yield
    finally:
        sys.stdout = saved
        terminal.close()
        reader.join(timeout=5)
        os.close(master)


def watched_seconds(trainer: Trainer, steps: int, metrics: NodeMetrics, url: str) -> float:
    """The trainer with its progress bar live, then the round's metrics recorded and scraped."""
    start = time.perf_counter()
    with on_a_terminal():
        losses = trainer.train(steps)
    metrics.record_round(RoundRecord(round=0, version=0, wait_seconds=0.0, pull_seconds=0.0,
                                     train_seconds=time.perf_counter() - start, push_seconds=0.0,
                                     train_loss=losses[-1], tokens=steps, pushed=True), steps)  # fmt: skip
    with urllib.request.urlopen(url, timeout=10) as reply:
        reply.read()
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
    steps_total = 2 * (args.repeats + 1) * args.steps
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

        metrics = NodeMetrics()
        url = f"http://127.0.0.1:{metrics.serve(0, '127.0.0.1')}/metrics"
        trainer_seconds(trainer, args.steps)  # warm-up: allocator, thread pools, first-touch pages
        watched_seconds(trainer, args.steps, metrics, url)
        bare_loop_seconds(bare, cfg, x, y, args.steps)
        fedpt_rates, watched_rates, bare_rates = [], [], []
        tokens = args.steps * tokens_per_step
        try:
            for _ in range(args.repeats):
                fedpt_rates.append(tokens / trainer_seconds(trainer, args.steps))
                watched_rates.append(tokens / watched_seconds(trainer, args.steps, metrics, url))
                bare_rates.append(tokens / bare_loop_seconds(bare, cfg, x, y, args.steps))
        finally:
            metrics.stop()

    ratios = [f / b for f, b in zip(fedpt_rates, bare_rates, strict=True)]
    watched = [w / b for w, b in zip(watched_rates, bare_rates, strict=True)]
    cost = [w / f for w, f in zip(watched_rates, fedpt_rates, strict=True)]
    print(f"preset {args.preset} ({model_config.num_params() / 1e6:.2f}M params), {tokens_per_step} tokens/step, "
          f"{torch.get_num_threads()} threads, {args.repeats} alternating repetitions of {args.steps} steps")  # fmt: skip
    print_table(
        ["loop", "median tok/s", "min tok/s", "max tok/s"],
        [
            ["bare", median(bare_rates), min(bare_rates), max(bare_rates)],
            ["fedpt trainer", median(fedpt_rates), min(fedpt_rates), max(fedpt_rates)],
            [
                "fedpt trainer, watched",
                median(watched_rates),
                min(watched_rates),
                max(watched_rates),
            ],
        ],
    )
    print(f"ratio fedpt/bare: median {median(ratios):.3f} (pairwise), {median(fedpt_rates) / median(bare_rates):.3f} "
          "(of medians); target >= 0.97")  # fmt: skip
    print(f"ratio watched (progress bar on a terminal + metrics endpoint)/bare: median "
          f"{median(watched):.3f} (pairwise), {median(watched_rates) / median(bare_rates):.3f} "
          "(of medians); target >= 0.97")  # fmt: skip
    print(f"ratio watched/unwatched fedpt trainer (the cost of watching alone): median "
          f"{median(cost):.3f} (pairwise)")  # fmt: skip


if __name__ == "__main__":
    main()
