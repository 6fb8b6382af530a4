"""Secure aggregation costs, measured side by side in one run.

1. Masking at a node: quantize a P-parameter weighted delta and add the self mask and N−1
   pairwise masks (AES-256-CTR keystreams, mod 2^32): ns per parameter.
2. Unmasking at the aggregator: remove N survivors' self masks, plus the pairwise masks of one
   node that dropped after sharing its keys (N−1 more keystreams): ns per parameter, for the
   masks alone (the Shamir reconstructions are per node, not per parameter: timed separately).
3. A whole round with secure aggregation on and off: `fedpt simulate` (real aggregator and node
   processes over mutual TLS) with N nodes, tiny model, 1 inner step per round so the protocol
   dominates; median round wall time (start to commit) as recorded by the aggregator.

    python -m bench.secagg [--params-millions 8] [--nodes 4,8] [--rounds 3] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import median, print_table
from protos import secagg


def time_masking(params: int, nodes: int, repeats: int) -> tuple[float, float]:
    """(quantize ns/param, mask ns/param) at one node; the first run warms up and is dropped."""
    rng = np.random.default_rng(0)
    delta = (rng.standard_normal(params) * 1e-3).astype(np.float32)
    cfg = secagg.QuantizationConfig(clip=1.0, scale=secagg.choose_scale(1.0, nodes))
    self_seed = secagg.new_self_seed()
    pair_seeds = {f"peer-{i}": secagg.new_self_seed() for i in range(nodes - 1)}
    quantize, mask = [], []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        q = secagg.quantize(delta, cfg, rng)
        middle = time.perf_counter()
        secagg.mask_chunk(q, 0, self_seed, pair_seeds, "me")
        end = time.perf_counter()
        quantize.append((middle - start) / params * 1e9)
        mask.append((end - middle) / params * 1e9)
    return median(quantize[1:]), median(mask[1:])


def time_unmasking(params: int, nodes: int, repeats: int) -> tuple[float, float]:
    total = np.random.default_rng(1).integers(0, 2**32, params, dtype=np.uint32)
    seeds = [secagg.new_self_seed() for _ in range(nodes)]
    pair_masks = [(secagg.new_self_seed(), 1 if i % 2 else -1) for i in range(nodes - 1)]
    samples = []
    for _ in range(repeats + 1):
        work = total.copy()
        start = time.perf_counter()
        for offset in range(0, params, 1 << 20):
            secagg.unmask_chunk(work[offset : offset + (1 << 20)], offset, seeds, pair_masks)
        samples.append((time.perf_counter() - start) / params * 1e9)
    # Shamir: rebuild N self seeds and one mask key from t shares each.
    t = secagg.default_threshold(nodes)
    xs = list(range(1, nodes + 1))
    secrets_ = [secagg.split_secret(secagg.new_self_seed(), xs, t) for _ in range(nodes + 1)]
    start = time.perf_counter()
    for shares in secrets_:
        secagg.reconstruct_secret(dict(list(shares.items())[:t]), t)
    shamir_ms = (time.perf_counter() - start) * 1e3
    return median(samples[1:]), shamir_ms


def round_seconds(nodes: int, rounds: int, encoding: str, workdir: Path) -> float:
    out = workdir / f"sim-{nodes}-{encoding}"
    cmd = [sys.executable, "-m", "fedpt", "simulate", "--nodes", str(nodes), "--rounds", str(rounds),
           "--inner-steps", "1", "--delta-encoding", encoding, "--out", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(
            f"simulate failed ({encoding}, {nodes} nodes):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        )
    summary = json.loads((out / "summary.json").read_text())
    return median([r["round_seconds"] for r in summary["rounds"] if r["state"] == "COMMITTED"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params-millions", type=float, default=8.0)
    parser.add_argument("--nodes", default="4,8")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-rounds", action="store_true", help="only the per-parameter costs")
    args = parser.parse_args()
    params = int(args.params_millions * 1e6)
    node_counts = [int(n) for n in args.nodes.split(",")]

    rows = []
    for n in node_counts:
        quantize, mask = time_masking(params, n, args.repeats)
        unmask, shamir_ms = time_unmasking(params, n, args.repeats)
        rows.append(
            [n, quantize, n, mask, mask / n, 2 * n - 1, unmask, unmask / (2 * n - 1), shamir_ms]
        )
    print(
        f"per-parameter costs over {params / 1e6:.1f}M parameters, median of {args.repeats}, one core"
    )
    print_table(["N", "quantize ns/p", "node streams", "mask ns/p", "per stream", "agg streams",
                 "unmask ns/p", "per stream", "Shamir ms"], rows)  # fmt: skip
    if args.skip_rounds:
        return
    with tempfile.TemporaryDirectory() as tmp:
        round_rows = []
        for n in node_counts:
            off = round_seconds(n, args.rounds, "fp32", Path(tmp))
            on = round_seconds(n, args.rounds, "masked-int32", Path(tmp))
            round_rows.append([n, off, on, on / off])
    print(
        f"\nround wall time, `fedpt simulate` tiny model, 1 inner step, median of {args.rounds} rounds"
    )
    print_table(["N", "plain fp32 s", "secure agg s", "ratio"], round_rows)


if __name__ == "__main__":
    main()
