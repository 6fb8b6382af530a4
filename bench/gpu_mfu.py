"""MFU of fedpt's trainer on one GPU: presets × attention kernel (flash-attn vs torch SDPA), bf16.

MFU = achieved model FLOP/s (6·N + 12·L·d·T per token, PaLM's count) / the GPU's dense bf16 peak.
Each configuration trains through the real Trainer (fused AdamW, bf16 autocast, clipping) on a
random-token shard set with the preset's own vocabulary; the first steps (warm-up, autotuning)
are not timed, and the median of the timed windows is quoted.

    python -m bench.gpu_mfu [--presets 125m,1b] [--seq-len 2048] [--steps 10] [--repeats 5]

Needs CUDA; prints why and exits 0 without it (CI has no GPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import tempfile
import time
from pathlib import Path

import torch

from bench.common import median, print_table, random_shards
from model import attention
from model.config import preset
from model.train_config import TrainConfig
from node.metrics import peak_flops
from node.parallel import DistEnv
from node.trainer import Trainer

MICRO_BATCH = {"125m": 16, "350m": 8, "1b": 4, "7b": 1}


def use_backend(name: str) -> None:
    os.environ["FEDPT_DISABLE_FLASH_ATTN"] = "0" if name == "flash" else "1"
    attention._flash_attn_func.cache_clear()


def measure(preset_name: str, backend: str, args: argparse.Namespace, data_dir: Path) -> dict:
    use_backend(backend)
    model_config = dataclasses.replace(preset(preset_name), max_seq_len=args.seq_len)
    micro_batch = args.micro_batch_size or MICRO_BATCH.get(preset_name, 4)
    cfg = TrainConfig(steps=10_000, micro_batch_size=micro_batch, seq_len=args.seq_len, precision="bf16",
                      warmup_steps=10, log_every=args.steps, compile=args.compile,
                      activation_checkpointing=args.activation_checkpointing)  # fmt: skip
    data = random_shards(
        data_dir / preset_name, model_config.vocab_size, tokens=8 * micro_batch * args.seq_len * 16
    )
    env = DistEnv(device=torch.device("cuda", 0))
    trainer = Trainer(model_config, cfg, data, env=env, log=lambda _m: None)
    probe = torch.empty(1, 1, 1, 8, device="cuda", dtype=torch.bfloat16)
    assert attention.backend_for(probe) == backend, f"{backend} kernel not available"
    torch.cuda.reset_peak_memory_stats()
    trainer.train(args.warmup_steps)
    rates = []
    for _ in range(args.repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        trainer.train(args.steps)  # ends with a host read of the losses: a full sync
        rates.append(args.steps * cfg.tokens_per_step(1) / (time.perf_counter() - start))
    rate = median(rates)
    peak = peak_flops(env.device)
    result = {
        "preset": preset_name,
        "backend": backend,
        "micro_batch": micro_batch,
        "tok/s": rate,
        "MFU %": 100 * rate * model_config.flops_per_token(args.seq_len) / peak
        if peak
        else float("nan"),
        "peak GiB": torch.cuda.max_memory_allocated() / 2**30,
    }
    del trainer
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", default="125m,1b")
    parser.add_argument("--backends", default="flash,sdpa")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch-size", type=int, default=0, help="0: a per-preset default")
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--activation-checkpointing", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_mfu: skipped, CUDA is not available on this machine")
        return
    backends = args.backends.split(",")
    if "flash" in backends and not attention.flash_attn_available():
        print(
            "gpu_mfu: flash-attn is not installed (pip install 'fedpt[gpu]'); measuring SDPA only"
        )
        backends = [b for b in backends if b != "flash"]
    print(
        f"{torch.cuda.get_device_name()} | torch {torch.__version__} | seq_len {args.seq_len} | bf16 autocast"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.presets.split(","):
            for backend in backends:
                r = measure(name, backend, args, Path(tmp))
                rows.append(list(r.values()))
                print(
                    f"  measured {name} {backend}: {r['tok/s']:,.0f} tok/s, MFU {r['MFU %']:.1f}%",
                    flush=True,
                )
    print_table(["preset", "attention", "micro-batch", "median tok/s", "MFU %", "peak GiB"], rows)


if __name__ == "__main__":
    main()
