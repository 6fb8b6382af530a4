"""A fedpt federation on Flower's simulation engine (Ray): fedpt's ServerApp (aggregator/flower.py)
and one virtual SuperNode per organisation running fedpt's ClientApp (node/flower.py).

    python -m fedpt.flower_simulation --config aggregator.toml --nodes nodes.json [--ray-address auto]

nodes.json lists each virtual node's settings (the keys of a SuperNode's node-config: data,
work-dir, kit, organisation, ...), in partition order. Every ClientApp only waits for its
`fedpt node join --once` process, so each asks Ray for a fraction of a CPU: all of them run at
once, as a round needs its quorum polling together. `--ray-address auto` joins an existing Ray
cluster instead of starting one on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

# Flower offline: no telemetry, no update check, no dependency install for the app.
FLOWER_OFFLINE = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def run_flower_simulation(config_path: Path, nodes: list[dict], ray_address: str = "") -> None:
    for key, value in FLOWER_OFFLINE.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("FLWR_HOME", tempfile.mkdtemp(prefix="fedpt-flwr-"))
    from flwr.simulation import run_simulation

    from aggregator.config import load_config
    from aggregator.flower import server_app
    from node.flower import client_app

    config = load_config(config_path)
    cpus = os.cpu_count() or 1
    backend: dict = {"client_resources": {"num_cpus": min(1.0, cpus / max(1, len(nodes)))}}
    if ray_address:
        backend["init_args"] = {"address": ray_address}
    run_simulation(server_app(config), client_app(nodes), num_supernodes=len(nodes),
                   backend_config=backend)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="the aggregator.toml")
    parser.add_argument("--nodes", type=Path, required=True,
                        help="JSON list of each virtual node's node-config")  # fmt: skip
    parser.add_argument("--ray-address", default="", help="an existing Ray cluster (e.g. auto)")
    args = parser.parse_args()
    run_flower_simulation(args.config, json.loads(args.nodes.read_text()), args.ray_address)


if __name__ == "__main__":
    main()
