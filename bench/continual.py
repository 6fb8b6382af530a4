"""Continual pretraining: what re-warming the learning rate costs on the old data and buys on the
new.

A model is trained on organisation A of the built-in corpus (`fedpt train`, warm-up then cosine
to lr·min_lr_ratio), then continued on organisation B from that same final model for the same
number of steps, with the same batches, in several ways (`fedpt train --init-from`):

  rewarm     re-warm to the peak lr over --warmup steps, then cosine down again (the default
             schedule of a new run)
  no-rewarm  constant lr at A's final lr (lr·min_lr_ratio), no warm-up: A's schedule carried on
  wsd        re-warm, hold the peak, decay linearly over the last 20% of the steps

Every model is scored on the held-out (validation) split of A and of B, with windows of the
training length. All runs use the byte tokenizer and the `tiny` preset; with the defaults they
take about 2 minutes on 2 idle CPU cores. A needs enough steps to be worth forgetting: after 200
steps on A, more training on B (Python code too) lowers the loss on A whatever the schedule.

    python -m bench.continual [--a web] [--b systems] [--steps-a 800] [--steps-b 200]
                              [--modes rewarm,no-rewarm,wsd] [--out runs/continual]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench.common import empty_run_folder, print_table, run_fedpt
from model.io import load_model
from model.tokenizer import ByteTokenizer
from model.train_config import TrainConfig
from node.builtin_corpus import list_organisations
from node.evaluation import mean_loss
from node.local_training import cache_dir
from node.parallel import DistEnv
from node.schedule import lr_at
from node.shards import TokenShards, prepare_data

MODES = ("rewarm", "no-rewarm", "wsd")


def mode_flags(mode: str, lr: float, warmup: int) -> list[str]:
    """`fedpt train` flags of one way to continue (the steps, data and batches are shared)."""
    final_lr = lr * TrainConfig().min_lr_ratio  # where A's cosine ended
    if mode == "rewarm":
        return ["--lr", str(lr), "--warmup-steps", str(warmup), "--schedule", "cosine"]
    if mode == "no-rewarm":
        return ["--lr", str(final_lr), "--warmup-steps", "0", "--schedule", "constant"]
    if mode == "wsd":
        return ["--lr", str(lr), "--warmup-steps", str(warmup), "--schedule", "wsd",
                "--decay-fraction", "0.2"]  # fmt: skip
    raise SystemExit(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")


def held_out_loss(weights: Path, val: TokenShards, seq_len: int, batches: int) -> float:
    model, _ = load_model(weights)
    loss = mean_loss(model, val, seq_len=seq_len, batch_size=8, max_batches=batches,
                     env=DistEnv())  # fmt: skip
    if loss is None:
        raise SystemExit(f"a validation split has no {seq_len}-token window")
    return loss


def lr_path(run: Path) -> str:
    """The lr of the run's first step, its highest and its last, from the schedule it trained
    with."""
    cfg = TrainConfig.from_dict(json.loads((run / "run.json").read_text())["train_config"])
    lrs = [lr_at(step, cfg) for step in range(cfg.steps)]
    return f"{lrs[0]:.1e} / {max(lrs):.1e} / {lrs[-1]:.1e}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    orgs = list_organisations()
    parser.add_argument("--a", default="web", choices=orgs, help="the first organisation")
    parser.add_argument("--b", default="systems", choices=orgs, help="the one continued on")
    parser.add_argument("--steps-a", type=int, default=800, help="steps on A (default 800)")
    parser.add_argument("--steps-b", type=int, default=200, help="steps on B per way (default 200)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak lr (default 3e-3)")
    parser.add_argument("--warmup", type=int, default=10, help="(re-)warm-up steps (default 10)")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (default 64)")
    parser.add_argument("--micro-batch-size", type=int, default=8, help="sequences per step")
    parser.add_argument("--eval-batches", type=int, default=16, help="held-out batches of 8")
    parser.add_argument("--modes", default=",".join(MODES), help="ways to continue on B")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: a temp dir)")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    for mode in modes:
        mode_flags(mode, args.lr, args.warmup)  # refuses an unknown one before any training
    if args.a == args.b:
        raise SystemExit("--a and --b must be different organisations")
    root = empty_run_folder(args.out or Path(tempfile.mkdtemp(prefix="fedpt-continual-")))
    cache = cache_dir()
    common = ["--seq-len", str(args.seq_len), "--micro-batch-size", str(args.micro_batch_size),
              "--eval-batches", str(args.eval_batches), "--log-every", "25"]  # fmt: skip
    started = time.perf_counter()

    def train(name: str, flags: list[str]) -> Path:
        seconds = run_fedpt(["train", "--out", str(root / name), *common, *flags],
                            root / f"{name}.log", cache=cache, timeout=3600)  # fmt: skip
        print(f"{name}: {seconds:.0f} s", flush=True)
        return root / name

    a_run = train("a", ["--data", f"builtin:{args.a}", "--steps", str(args.steps_a), "--lr",
                        str(args.lr), "--warmup-steps", str(args.warmup)])  # fmt: skip
    runs = {"A only": a_run}
    for mode in modes:
        runs[mode] = train(mode, ["--data", f"builtin:{args.b}", "--steps", str(args.steps_b),
                                  "--init-from", str(a_run),
                                  *mode_flags(mode, args.lr, args.warmup)])  # fmt: skip

    tokenizer = ByteTokenizer()
    val = {org: TokenShards(prepare_data(f"builtin:{org}", tokenizer, cache)[0] / "val")
           for org in (args.a, args.b)}  # fmt: skip
    rows, results = [], {}
    for name, run in runs.items():
        losses = {org: held_out_loss(run / "model.safetensors", data, args.seq_len,
                                     args.eval_batches) for org, data in val.items()}  # fmt: skip
        results[name] = {"lr first/max/last": lr_path(run), **losses}
        steps_b = 0 if name == "A only" else args.steps_b
        rows.append([name, args.steps_a, steps_b, lr_path(run), losses[args.a], losses[args.b]])
    print(f"\nA = builtin:{args.a}, B = builtin:{args.b}; tiny preset, {args.micro_batch_size} x "
          f"{args.seq_len} tokens per step, peak lr {args.lr}, warm-up {args.warmup}; held-out "
          f"loss on each organisation's validation split ({args.eval_batches} batches of 8)\n")  # fmt: skip
    print_table(["model", "steps A", "steps B", "lr first / max / last", f"val loss A ({args.a})",
                 f"val loss B ({args.b})"], [[*r[:4], f"{r[4]:.4f}", f"{r[5]:.4f}"] for r in rows])  # fmt: skip
    (root / "continual.json").write_text(json.dumps(results, indent=2))
    print(f"\n{time.perf_counter() - started:.0f} s; runs in {root}")


if __name__ == "__main__":
    main()
