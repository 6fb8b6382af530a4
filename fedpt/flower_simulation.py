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
import sys
import tempfile
import threading
from pathlib import Path

# Flower offline: no telemetry, no update check, no dependency install for the app.
FLOWER_OFFLINE = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}
# Ray starts its workers at niceness 15. A ClientApp actor only waits on its `fedpt node join`
# process, which inherits that niceness: beside any other work on the machine a node's training
# would get a sliver of a CPU and miss its round's deadline. fedpt's nodes are the workload.
RAY_SETTINGS = {"RAY_worker_niceness": "0"}


class FlowerEngineError(RuntimeError):
    """Flower's simulation engine or fedpt's ServerApp failed; the message says why."""


def run_flower_simulation(config_path: Path, nodes: list[dict], ray_address: str = "") -> None:
    for key, value in {**FLOWER_OFFLINE, **RAY_SETTINGS}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("FLWR_HOME", tempfile.mkdtemp(prefix="fedpt-flwr-"))
    from flwr.simulation import run_simulation

    from aggregator.config import load_config
    from aggregator.flower import server_app
    from node.flower import client_app

    config = load_config(config_path)
    _start_ray(ray_address)
    cpus = os.cpu_count() or 1
    backend: dict = {"client_resources": {"num_cpus": min(1.0, cpus / max(1, len(nodes)))}}
    # run_simulation runs the ServerApp in a thread of its own and the virtual SuperNodes (Ray)
    # in this one. When the engine dies (its actors cannot start, a raylet is killed) it raises here
    # while the ServerApp would wait for replies that cannot come: `engine_stopped` ends the
    # ServerApp's loop at once.
    engine_stopped = threading.Event()
    app = server_app(config, engine_stopped=engine_stopped)
    try:
        run_simulation(app, client_app(nodes), num_supernodes=len(nodes), backend_config=backend)
    except Exception as error:
        raise FlowerEngineError(_reason(error)) from error
    finally:
        engine_stopped.set()


def _start_ray(address: str) -> None:
    """Start (or join) Ray before anything else runs, rather than leave it to Flower's engine.

    Ray gives its raylet a fixed 30 s to register at start-up (ray/_private/node.py). Inside
    run_simulation that window overlaps the ServerApp starting fedpt's aggregator (database
    migrations, the initial model), and a busy machine missed it: "The current node timed out
    during startup". Started here, Ray has the process to itself; Flower's engine then finds it
    initialised and uses it. The workers get this process's import path, as Flower gives them.
    """
    import ray

    try:
        # "local": a new instance of this run's own. Left empty, Ray would join whatever cluster
        # `ray start` last left on this machine (/tmp/ray/ray_current_cluster), dead ones too.
        ray.init(address=address or "local", include_dashboard=False,
                 runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path)}})  # fmt: skip
    except Exception as error:
        raise FlowerEngineError(f"Ray did not start: {_reason(error)}") from error


def _reason(error: BaseException) -> str:
    """Flower wraps the failure that stopped it ("An error was encountered..."): the innermost
    cause is the one to report."""
    while error.__cause__ is not None:
        error = error.__cause__
    return f"{type(error).__name__}: {error}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="the aggregator.toml")
    parser.add_argument("--nodes", type=Path, required=True,
                        help="JSON list of each virtual node's node-config")  # fmt: skip
    parser.add_argument("--ray-address", default="", help="an existing Ray cluster (e.g. auto)")
    args = parser.parse_args()
    try:
        run_flower_simulation(args.config, json.loads(args.nodes.read_text()), args.ray_address)
    except FlowerEngineError as error:
        print(f"fedpt: error: the federation on Flower's engine failed: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
