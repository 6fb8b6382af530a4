"""Where federated averaging loses to synchronous data-parallel training at equal tokens.

In one process, no aggregator: N trainers (fedpt's own Trainer, the federation's inner settings:
`tiny`, micro-batch 8 × 128, AdamW lr 3e-3, 240 steps), one per built-in organisation, each on
its own data, compared at the same tokens and the same sequential steps with

  dp          one model; every step averages the gradients of one micro-batch from every
              organisation and takes one AdamW step (synchronous data-parallel over the sites)
  fed:H:LR    every H steps the N local models are averaged (FedAvg, outer lr LR: θ ← θ +
              LR·(mean − θ)) and loaded back into every trainer, which keeps its own AdamW
              moments (as fedpt's nodes do); fed:1:1 averages after every step, the limit of
              federated averaging with the most communication

Each model is scored like bench.convergence's (held-out perplexity, the mean over the
organisations' validation splits). fed:H:1 at H = 10 matches `fedpt simulate`'s federation up
to the order of data and the float32 sum, so the rows separate what rounds cost (H > 1) from
what averaging independently Adam-normalised updates costs (fed:1:1 against dp).

    python -m bench.local_averaging dp fed:1:1 fed:5:1 [fed:1:1.5 ...] [--steps 240] [--nodes 4]
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from bench.convergence import Contender, federation_orgs, held_out_sets, score
from model.config import preset
from model.gpt import GPT
from model.tokenizer import ByteTokenizer
from model.train_config import TrainConfig
from node.local_training import cache_dir
from node.schedule import lr_at
from node.shards import TokenShards, prepare_data
from node.trainer import Trainer


def make_trainers(orgs: list[str], cfg: TrainConfig) -> list[Trainer]:
    """One trainer per organisation, all starting from the federation's initial model (seed 0)
    with their own data order."""
    torch.manual_seed(0)
    initial = GPT(preset("tiny")).state_dict()
    trainers = []
    for i, org in enumerate(orgs):
        train = TokenShards(
            prepare_data(f"builtin:{org}", ByteTokenizer(), cache_dir())[0] / "train"
        )
        trainer = Trainer(preset("tiny"), TrainConfig.from_dict({**cfg.to_dict(), "seed": i}),
                          train, log=lambda _m: None)  # fmt: skip
        trainer.load_global(initial)
        trainers.append(trainer)
    return trainers


def federated(trainers: list[Trainer], steps: int, h: int, outer_lr: float) -> torch.nn.Module:
    global_model = {k: v.float().clone() for k, v in trainers[0].model.state_dict().items()}
    for _ in range(steps // h):
        for trainer in trainers:
            trainer.train(h)
        states = [t.model.state_dict() for t in trainers]
        for name, value in global_model.items():
            mean = sum(s[name].float() for s in states) / len(states)
            global_model[name] = value + outer_lr * (mean - value)
        for trainer in trainers:
            trainer.load_global(global_model)
    return trainers[0].model


def data_parallel(trainers: list[Trainer], steps: int, cfg: TrainConfig) -> torch.nn.Module:
    """Trainer 0's model and optimizer; each step one micro-batch from every trainer's data."""
    model, optimizer = trainers[0].model, trainers[0].optimizer
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        for trainer in trainers:
            trainer.step = step
            x, y = trainer._micro_batch(0)
            _, loss = model(x, y)
            (loss / len(trainers)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "runs", nargs="+", help="dp, or fed:H:LR (FedAvg every H steps, outer lr LR)"
    )
    parser.add_argument("--steps", type=int, default=240, help="inner steps per organisation")
    parser.add_argument("--nodes", type=int, default=4, help="organisations (built-in, in order)")
    parser.add_argument("--eval-batches", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(2)
    orgs = federation_orgs(args.nodes)
    cfg = TrainConfig(steps=args.steps, log_every=10**9)
    val = held_out_sets(orgs, cache_dir())
    results: dict[str, float] = {}
    for run in args.runs:
        kind, *rest = run.split(":")
        if kind not in ("dp", "fed") or (kind == "fed" and len(rest) != 2):
            raise SystemExit(f"{run!r}: expected dp or fed:H:LR")
        started = time.perf_counter()
        trainers = make_trainers(orgs, cfg)
        if kind == "dp":
            model = data_parallel(trainers, args.steps, cfg)
        else:
            h, lr = int(rest[0]), float(rest[1])
            if args.steps % h:
                raise SystemExit(f"{run!r}: H must divide --steps {args.steps}")
            model = federated(trainers, args.steps, h, lr)
        scored = Contender(run, "", 0, 0.0, model.eval())
        score(scored, val, args.eval_batches, 8)
        results[run] = scored.mean_loss(list(val))
        print(f"{run:>12}  mean ppl {math.exp(results[run]):.3f}  mean bits/byte "
              f"{scored.mean_bpb(list(val))}  ({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip
    if "dp" in results:
        print()
        for run, loss in results.items():
            print(f"{run:>12}  / dp {math.exp(loss - results['dp']):.3f}")


if __name__ == "__main__":
    main()
