"""One model round on a real Flower deployment, through Flower's own transport and through
fedpt's data plane under fedpt's Flower apps, side by side in one run.

Each row gets a fresh deployment (tests/flower_deployment.py): a SuperLink with TLS and
SuperNode authentication and --nodes registered SuperNodes on 127.0.0.1, then `flwr run` of:
  flower  bench/flower_apps/transport: the ServerApp sends the model (random fp32 weights of
          bench.scale's shape for --params-mib) to every SuperNode as an ArrayRecord; each
          ClientApp answers with a random delta of the same shapes (N(0, 1) · 1e-3) as an
          ArrayRecord; the ServerApp pulls the replies one by one, adding each into a running
          sum and dropping it, then adds the mean into the model.
  fedpt   bench/flower_apps/fedpt: fedpt's ServerApp (aggregator/flower.py) serving fedpt's
          aggregator with the same shape (fp32 deltas, fedavg, mutual TLS with a throwaway
          federation CA), whose TRAIN messages name its data plane; each ClientApp runs
          bench/scale_node.py (join, pull, a random delta of the same law, push) instead of
          training. Flower carries the control messages only.
Neither row trains: what is measured is moving the model down and the deltas up, and summing.

  round s   the ServerApp's push of the round's messages → the new model exists (flower: the
            mean of the last reply added; fedpt: the commit logged)
  ClientApps in s  push → the slowest node's ClientApp begins handling its message (Flower
            delivers it: the SuperNode's poll, a flwr-clientapp process, the message's content)
  peak GiB  the highest sum of RSS over every process of the deployment (SuperLink, SuperNodes,
            flower-superexec, flwr-serverapp, flwr-clientapp and the node processes), read
            from /proc 10 times a second from `flwr run` to the run's end
  idle GiB  that sum just before `flwr run` (the Flower processes waiting)
The last lines print flower / fedpt for both. Random weights, never constant: Flower
deduplicates identical chunks, so constant weights would flatter it.

    python -m bench.flower --params-mib 512 --nodes 2
    python -m bench.flower --params-mib 16 --nodes 2 --rows fedpt      # a quick look
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.common import empty_run_folder, print_table, proc_status_bytes
from bench.scale import Shape, make_kits, shape_for_mib, write_config
from fedpt.simulate import free_port
from tests.flower_deployment import DeploymentError, FlowerDeployment

REPO = Path(__file__).resolve().parents[1]
APPS = {"flower": REPO / "bench" / "flower_apps" / "transport",
        "fedpt": REPO / "bench" / "flower_apps" / "fedpt"}  # fmt: skip
GIB = 1 << 30


class MemorySampler(threading.Thread):
    """The highest sum of VmRSS over the deployment's processes, read every `period` s."""

    def __init__(self, deployment: FlowerDeployment, period: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.deployment, self.period = deployment, period
        self.peak = 0
        self.stopped = threading.Event()

    def total(self) -> int:
        total = 0
        for pid in self.deployment.pids():
            with contextlib.suppress(OSError):  # ended between the listing and the reading
                total += proc_status_bytes(pid, "VmRSS")
        return total

    def run(self) -> None:
        while not self.stopped.wait(self.period):
            self.peak = max(self.peak, self.total())


def read_events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def push_time(row: str, events: list[dict]) -> float:
    """When the ServerApp pushed the round's messages."""
    if row == "flower":
        return next(e["t"] for e in events if e["event"] == "push")
    return next(e["t"] for e in events if e["event"] == "log" and e["line"].startswith("flower: ")
                and "SuperNodes connected" in e["line"])  # fmt: skip


def timings(row: str, events: list[dict]) -> dict[str, float]:
    """round s, and when the slowest node's ClientApp began handling its message."""
    pushed = push_time(row, events)
    if row == "flower":
        done = next(e["t"] for e in events if e["event"] == "done")
    else:
        done = next(e["t"] for e in events if e["event"] == "log"
                    and e["line"].startswith("round 0: committed"))  # fmt: skip
    started = max(e["t"] for e in events if e["event"] == "clientapp")
    return {"round_seconds": done - pushed, "clientapp_seconds": started - pushed}


def run_row(row: str, root: Path, args: argparse.Namespace) -> dict:
    events = root / "events.jsonl"
    env = {"PYTHONPATH": str(REPO), "FEDPT_BENCH_EVENTS": str(events), "OMP_NUM_THREADS": "1"}
    run_config: dict[str, object] = {"params-mib": args.params_mib, "nodes": args.nodes}
    node_settings = [{} for _ in range(args.nodes)]
    if row == "fedpt":
        aggregator_kit, kits = make_kits(root / "pki", args.nodes)
        config = root / "aggregator.toml"
        settings = argparse.Namespace(repeats=1, download_encoding="fp32", timeout=args.timeout,
                                      outer="fedavg")  # fmt: skip
        write_config(config, Shape(f"{args.params_mib:g}MiB", shape_for_mib(args.params_mib)),
                     args.nodes, "fp32", settings, free_port(), root / "state", aggregator_kit,
                     None)  # fmt: skip
        run_config = {"aggregator-config": str(config)}
        node_settings = [{"organisation": f"org-{i}", "kit": str(kit),
                          "work-dir": str(root / "nodes" / f"org-{i}")}
                         for i, kit in enumerate(kits)]  # fmt: skip
    with FlowerDeployment(root / "flower", env=env) as flower:
        flower.start_superlink()
        for i, settings in enumerate(node_settings):
            private, public = flower.supernode_key(f"node-{i}")
            flower.register(public, f"node-{i}")
            flower.start_supernode(f"node-{i}", private, settings)
        for i in range(args.nodes):
            flower.wait_connected(f"node-{i}")
        sampler = MemorySampler(flower)
        idle = sampler.total()
        sampler.start()
        try:
            run_id = flower.run_app(APPS[row], run_config)
            status = flower.wait_finished(run_id, timeout=args.timeout)
        finally:
            sampler.stopped.set()
            sampler.join()
        if status["status"] != "finished:completed":
            raise DeploymentError(f"{row}: {status}\n{flower.run_log(run_id)[-3000:]}")
    return {"row": row, **timings(row, read_events(events)), "peak_bytes": sampler.peak,
            "idle_bytes": idle}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params-mib", type=float, default=512.0,
                        help="the model's fp32 size in MiB (bench.scale's shape; default 512)")  # fmt: skip
    parser.add_argument("--nodes", type=int, default=2, help="SuperNodes (default 2)")
    parser.add_argument("--rows", default="flower,fedpt", help="which rows, in order")
    parser.add_argument("--timeout", type=float, default=1800.0, help="limit of each run (s)")
    parser.add_argument("--out", type=Path, default=None,
                        help="an empty work folder (default: a new temporary one); "
                             "results.json goes there")  # fmt: skip
    args = parser.parse_args()
    rows = [r for r in args.rows.split(",") if r]
    if not rows or set(rows) - set(APPS) or args.nodes < 1 or args.params_mib <= 0:
        print(f"fedpt: error: --rows takes {', '.join(APPS)}; --nodes ≥ 1; --params-mib > 0",
              file=sys.stderr)  # fmt: skip
        sys.exit(2)
    out = empty_run_folder(args.out or Path(tempfile.mkdtemp(prefix="fedpt-bench-flower-")))
    model = shape_for_mib(args.params_mib)
    print(f"{args.params_mib:g} MiB model ({model.num_params() / 1e6:.0f}M params), "
          f"{args.nodes} SuperNodes, one round per row")  # fmt: skip
    results = []
    for row in rows:
        started = time.monotonic()
        results.append(run_row(row, out / row, args))
        print(f"{row}: done in {time.monotonic() - started:.0f} s", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print_table(["row", "round s", "ClientApps in s", "peak GiB", "idle GiB"],
                [[r["row"], f"{r['round_seconds']:.1f}", f"{r['clientapp_seconds']:.1f}",
                  f"{r['peak_bytes'] / GIB:.2f}", f"{r['idle_bytes'] / GIB:.2f}"]
                 for r in results])  # fmt: skip
    by_row = {r["row"]: r for r in results}
    if {"flower", "fedpt"} <= by_row.keys():
        flower, fedpt = by_row["flower"], by_row["fedpt"]
        print(f"round: flower / fedpt = {flower['round_seconds'] / fedpt['round_seconds']:.1f}×; "
              f"peak memory: flower / fedpt = {flower['peak_bytes'] / fedpt['peak_bytes']:.1f}×")  # fmt: skip


if __name__ == "__main__":
    main()
