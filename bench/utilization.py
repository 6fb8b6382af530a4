"""Share of a node's wall time spent training (vs pulling, pushing and waiting) at several H,
measured on real federations, and what it extrapolates to for a 125m model on an H100.

Measured. For each H in --inner-steps, one federation runs through the real command,
`fedpt simulate --nodes 2 --rounds R --inner-steps H` (tiny preset, an aggregator and 2 node
processes on 127.0.0.1, one thread each; mutual TLS, and secure aggregation unless
--delta-encoding fp32). Every node writes nodes/NAME/rounds.jsonl, one
node.participant.RoundRecord per round:

  wait   from asking for the round's task to getting it: the other node finishing the previous
         round, the aggregator closing it (secure aggregation's unmasking stage, outer step,
         checkpoint), starting this one (secure aggregation's key advertising and sharing
         stages), the long-poll wake-ups
  pull   pull θ_global (chunked, sha256-verified) and load it into the trainer
  train  the H inner steps
  push   Δ = θ_global − θ_local (clipped, quantized and masked under secure aggregation), hash,
         stream it up, until the aggregator acknowledges

  training share (one node) = Σ train / Σ (wait + pull + train + push) over its rounds

Also read, from the aggregator's database, per round: slack = last upload completed − first
upload completed (how long the faster node waits for the slower one), and commit = last upload
completed → the round's COMMITTED row (unmasking stage, outer step, checkpoint written and
fsynced, DB transaction). Both are spent inside the nodes' next wait, with the start of the
next round.

Excluded: round 0's wait (set to 0: it is start-up, the other nodes still joining and the
quorum's start grace), and everything outside the rounds, which the records do not cover
(process start, join, data loading, building the trainer; the final poll for STOP). Quoted per H:
medians over all (node, round) records of each part (wait: rounds ≥ 1 only) and the median over
nodes of the training share. With R = 3 each node contributes 3 pulls/trains/pushes and 2 waits.

Extrapolated. Per round a node pulls the model and pushes its Δ, both fp32, and waits for the
aggregator's commit (no overlap with training, no stragglers):
  t_over   = 4·P / pull rate + 4·P / push rate + t_commit
  t_step   = tokens/step × 6·P / (MFU × peak FLOP/s)        (6 FLOPs per parameter and token)
  share(H) = H·t_step / (H·t_step + t_over)
  smallest H for a target share s = s/(1−s) · t_over/t_step
P is the 125m preset's parameter count. Assumed (flags): tokens/step, MFU, peak (or t_step
itself, --step-seconds), the links (--link-mbps) and t_commit, whose default of 2 s estimates a
Nesterov step over P fp32 values plus ≈1 GB of model and momentum written, fsynced and hashed
(the tiny model's few-MB commit says little about that). Measured: this machine's loopback, the
tiny model's fp32 bytes over the median pull and push seconds. A 4 MB pull or push is mostly
fixed cost (RPC set-up, hashing, loading weights, computing Δ), so that rate understates what
loopback gives a 500 MB model.

    python -m bench.utilization [--inner-steps 10,50,200,500] [--rounds 3] [--link-mbps 1000,10000]
                                [--mfu 0.4] [--peak-tflops 989.5] [--gpu-tokens-per-step 524288]
                                [--step-seconds S] [--commit-seconds 2] [--delta-encoding fp32]

On 2 CPU cores the defaults take about 6 minutes, H=500 alone about 3½ (3 rounds × 500 steps
per node at ≈8k tokens/s each); --inner-steps 10,50,200 takes about 2½.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from aggregator.store import Store
from bench.common import (
    empty_run_folder,
    federation_spec,
    median,
    node_round_records,
    print_table,
    run_fedpt,
)
from model.config import ModelConfig, preset
from node.local_training import cache_dir
from protos.delta_encoding import ENCODINGS

PARTS = ("wait_seconds", "pull_seconds", "train_seconds", "push_seconds")


@dataclass(frozen=True)
class Measured:
    inner_steps: int
    wall_seconds: float
    model_bytes: int
    records: dict[str, list[dict]]  # node name -> RoundRecord dicts
    slack_seconds: list[float]  # per committed round: last upload complete - first
    commit_seconds: list[float]  # per committed round: last upload complete -> COMMITTED
    delta_encoding: str  # from the federation spec: masked-int32 = secure aggregation

    def node_share(self, rounds: list[dict]) -> float:
        busy = sum(r["train_seconds"] for r in rounds)
        total = sum(r[p] for r in rounds for p in PARTS if not (p == "wait_seconds" and r["round"] == 0))  # fmt: skip
        return busy / total

    def shares(self) -> list[float]:
        return [self.node_share(rs) for rs in self.records.values()]

    def part(self, name: str) -> list[float]:
        rows = [r for rs in self.records.values() for r in rs]
        return [r[name] for r in rows if not (name == "wait_seconds" and r["round"] == 0)]

    def tokens_per_second(self) -> list[float]:
        return [r["tokens"] / r["train_seconds"] for rs in self.records.values() for r in rs]


def measure(h: int, args: argparse.Namespace, root: Path, cache: Path) -> Measured:
    run = root / f"h{h}"
    sim_args = ["simulate", "--nodes", str(args.nodes), "--rounds", str(args.rounds), "--inner-steps", str(h),
                "--preset", args.preset, "--out", str(run)]  # fmt: skip
    if args.delta_encoding is not None:
        sim_args += ["--delta-encoding", args.delta_encoding]
    print(f"running fedpt {' '.join(sim_args)}", flush=True)
    seconds = run_fedpt(sim_args, root / "logs" / f"h{h}.log", cache=cache, timeout=args.timeout,
                        ok_codes=(0, 1))  # fmt: skip
    spec = federation_spec(run)
    model_config = ModelConfig.from_dict(json.loads(spec["model_config_json"]))
    records = node_round_records(run)
    if len(records) != args.nodes or any(len(rs) != args.rounds for rs in records.values()):
        counts = {n: len(rs) for n, rs in records.items()}
        raise SystemExit(f"H={h}: expected {args.rounds} rounds from {args.nodes} nodes, got {counts}")  # fmt: skip
    print(f"  {seconds:.1f} s")
    slack, commit = aggregator_times(run, spec["federation_id"])
    encoding = spec.get("delta_encoding", "?")
    return Measured(h, seconds, 4 * model_config.num_params(), records, slack, commit, encoding)


def aggregator_times(run: Path, federation_id: str) -> tuple[list[float], list[float]]:
    """Per committed round, from the database: (last upload − first upload, last upload →
    COMMITTED), in seconds."""
    store = Store(f"sqlite:///{(run / 'aggregator' / 'fedpt.db').resolve()}")
    try:
        slack, commit = [], []
        for r in store.rounds(federation_id):
            done = sorted(s.completed_at for s in store.submissions(federation_id, r.number))
            if r.state == "COMMITTED" and done and r.finished_at is not None:
                slack.append(done[-1] - done[0])
                commit.append(r.finished_at - done[-1])
        return slack, commit
    finally:
        store.close()


def share(h: float, t_step: float, t_comm: float) -> float:
    return h * t_step / (h * t_step + t_comm)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--inner-steps", default="10,50,200,500", help="comma-separated H to measure")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--preset", default="tiny", help="the model the federations train")
    parser.add_argument("--delta-encoding", choices=("auto", *ENCODINGS), default=None,
                        help="passed to fedpt simulate (its default: auto = secure aggregation)")  # fmt: skip
    parser.add_argument("--link-mbps", default="1000,10000", help="assumed links, Mbit/s, comma-separated")  # fmt: skip
    parser.add_argument("--gpu-preset", default="125m", help="the model extrapolated to")
    parser.add_argument("--mfu", type=float, default=0.40, help="assumed model FLOPs utilisation")
    parser.add_argument("--peak-tflops", type=float, default=989.5, help="assumed peak, dense bf16 (H100 SXM)")  # fmt: skip
    parser.add_argument("--gpu-tokens-per-step", type=int, default=524_288, help="assumed tokens per optimizer step")  # fmt: skip
    parser.add_argument("--step-seconds", type=float, default=None, help="GPU seconds per optimizer step, instead of the formula")  # fmt: skip
    parser.add_argument("--commit-seconds", type=float, default=2.0, help="assumed aggregator commit per round for the GPU model")  # fmt: skip
    parser.add_argument("--project-h", default="50,100,500,1000", help="H to extrapolate to")
    parser.add_argument("--target", type=float, default=0.97, help="training share to reach")
    parser.add_argument("--out", type=Path, help="keep the run folders here (default: a temp dir)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="token shard cache (default: $FEDPT_CACHE_DIR or ~/.cache/fedpt/shards)")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per federation")
    args = parser.parse_args()
    hs = [int(x) for x in args.inner_steps.split(",") if x]
    links = [float(x) for x in args.link_mbps.split(",") if x]
    project = [int(x) for x in args.project_h.split(",") if x]
    if not hs or min(hs) < 1 or args.rounds < 2 or args.nodes < 1:
        raise SystemExit("--inner-steps must list H ≥ 1, --rounds must be ≥ 2, --nodes ≥ 1")
    if not 0 < args.target < 1 or not 0 < args.mfu <= 1 or min(links, default=1) <= 0:
        raise SystemExit("--target and --mfu must be in (0, 1), --link-mbps positive")

    cache = (args.cache_dir or cache_dir()).resolve()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedpt-utilization-") as tmp:
        root = empty_run_folder(args.out or Path(tmp))
        runs = [measure(h, args, root, cache) for h in hs]
        if args.out is not None:
            print(f"run folders kept in {root}")

    # ---- measured -------------------------------------------------------------------------------
    model_bytes = runs[0].model_bytes
    print()
    print(f"MEASURED: {args.nodes} nodes x {args.rounds} rounds of `fedpt simulate`, preset {args.preset} "
          f"({model_bytes / 4e6:.2f}M params, {model_bytes / 1e6:.1f} MB fp32), 127.0.0.1, mutual TLS, "
          f"delta encoding {', '.join(sorted({m.delta_encoding for m in runs}))}")  # fmt: skip
    rows = []
    for m in runs:
        shares = m.shares()
        rows.append([m.inner_steps, f"{median(m.part('train_seconds')):.2f}", f"{median(m.part('pull_seconds')):.3f}",
                     f"{median(m.part('push_seconds')):.3f}", f"{median(m.part('wait_seconds')):.3f}",
                     f"{median(m.slack_seconds):.3f}" if m.slack_seconds else "-",
                     f"{median(m.commit_seconds):.3f}" if m.commit_seconds else "-",
                     f"{median(m.tokens_per_second()):,.0f}", f"{100 * median(shares):.1f}%",
                     f"{100 * min(shares):.1f}%", f"{m.wall_seconds:.1f}"])  # fmt: skip
    print_table(["H", "train s", "pull s", "push s", "wait s", "slack s", "commit s", "node tok/s", "train share", "min node", "run s"], rows)  # fmt: skip
    print("per-round medians over nodes and rounds; wait leaves out round 0 (start-up); slack (last "
          "upload − first) and commit (last upload → committed) are the aggregator's, per round; "
          "train share = Σ train / Σ (wait + pull + train + push) per node, median (and min) over nodes")  # fmt: skip
    print(f"a node's wait = its slack (0 for the slower node) + commit + starting the next round (with secure "
          f"aggregation: its key stages). On "
          f"this 2-core machine the {args.nodes} nodes, the aggregator and the simulation's evaluation "
          "of each new global model share the cores, so the nodes' speeds drift apart (slack) and "
          "'train' is slowed by the others: neither is what separate machines would see.")  # fmt: skip

    pulls = [s for m in runs for s in m.part("pull_seconds")]
    pushes = [s for m in runs for s in m.part("push_seconds")]
    pull_rate, push_rate = model_bytes / median(pulls), model_bytes / median(pushes)
    print(f"loopback (mutual TLS), measured: {model_bytes / 1e6:.1f} MB / median pull {median(pulls):.3f} s = {pull_rate / 1e6:.0f} MB/s; "
          f"/ median push {median(pushes):.3f} s = {push_rate / 1e6:.0f} MB/s ({len(pulls)} pulls and pushes)")  # fmt: skip

    # ---- extrapolated ---------------------------------------------------------------------------
    gpu = preset(args.gpu_preset)
    params = gpu.num_params()
    gpu_bytes = 4 * params
    peak = args.peak_tflops * 1e12
    t_step = args.step_seconds or args.gpu_tokens_per_step * 6 * params / (args.mfu * peak)
    t_commit = args.commit_seconds
    print()
    print(f"EXTRAPOLATED to preset {args.gpu_preset} on one GPU:")
    print(f"  P = {params / 1e6:.1f}M params (from the preset); fp32 model and Δ = 4·P = {gpu_bytes / 1e6:.0f} MB each way per round")  # fmt: skip
    if args.step_seconds:
        print(f"  t_step = {t_step:.3f} s   [given by --step-seconds]")
    else:
        print(f"  t_step = tokens/step x 6·P / (MFU x peak) = {args.gpu_tokens_per_step:,} x 6 x {params / 1e6:.1f}M / "
              f"({args.mfu:g} x {args.peak_tflops:g} TFLOP/s) = {t_step:.3f} s   [tokens/step, MFU, peak: assumed]")  # fmt: skip
    print(f"  t_over = 4·P / pull rate + 4·P / push rate + t_commit, t_commit = {t_commit:g} s [assumed]; "
          "share(H) = H·t_step / (H·t_step + t_over); no stragglers, no overlap of transfer and training")  # fmt: skip
    ratio = args.target / (1 - args.target)
    link_rows: list[tuple[str, float, float]] = [
        (f"{mbps:g} Mbit/s (assumed)", mbps * 1e6 / 8, mbps * 1e6 / 8) for mbps in links
    ]
    link_rows.append(("loopback mTLS (measured)", pull_rate, push_rate))
    rows = []
    for name, down, up in link_rows:
        t_comm = gpu_bytes / down + gpu_bytes / up
        t_over = t_comm + t_commit
        min_h = math.ceil(ratio * t_over / t_step)
        rows.append([name, f"{t_comm:.2f}", f"{t_over:.2f}", *[f"{100 * share(h, t_step, t_over):.1f}%" for h in project],
                     f"{min_h:,}"])  # fmt: skip
    print_table(["link", "t_comm s", "t_over s", *[f"H={h}" for h in project], f"min H for {100 * args.target:g}%"], rows)  # fmt: skip
    met = [name for name, down, up in link_rows
           if share(500, t_step, gpu_bytes / down + gpu_bytes / up + t_commit) >= args.target]  # fmt: skip
    print(
        f"target >= {100 * args.target:g}% at H=500: met on {', '.join(met) if met else 'no link listed'}"
    )
    print(f"bench wall time {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
