"""fedpt on Flower: the ServerApp (aggregator/flower.py) and ClientApp (node/flower.py) on Flower's
simulation engine, against the same federation run natively. Skipped without the `flower` extra."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from aggregator.store import Store
from fedpt.simulate import free_port
from model.io import load_tensors
from node.flower import FlowerNodeError, Order, join_command, node_command

ORGS = ("web", "systems")


def aggregator_toml(state_dir: Path, port: int) -> str:
    return f"""[server]
host = "127.0.0.1"
port = {port}
insecure = true
long_poll_seconds = 2.0
[federation]
name = "flower-test"
rounds = 2
inner_steps = 3
delta_encoding = "fp32"
download_encoding = "fp32"
[model]
preset = "tiny"
[round]
min_nodes = {len(ORGS)}
start_grace_seconds = 0.5
timeout_seconds = 300
deterministic = true
[train]
micro_batch_size = 4
seq_len = 64
[store]
state_dir = "{state_dir}"
"""


def node_settings(root: Path) -> list[dict]:
    return [{"data": f"builtin:{org}", "work-dir": str(root / "nodes" / org), "organisation": org,
             "insecure": True} for org in ORGS]  # fmt: skip


def run_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def global_model_path(state_dir: Path, version: int) -> Path:
    return state_dir / "checkpoints" / f"global_v{version:08d}.safetensors"


def global_model(state_dir: Path, version: int = 2) -> dict[str, torch.Tensor]:
    return load_tensors(global_model_path(state_dir, version))[0]


def run_on_flower(
    root: Path,
    env: dict | None = None,
    timeout: float = 900,
    fresh: bool = True,
    more: tuple[str, ...] = (),
) -> subprocess.CompletedProcess:
    if fresh:
        root.mkdir(parents=True)
        (root / "aggregator.toml").write_text(aggregator_toml(root / "state", 0))
        (root / "nodes.json").write_text(json.dumps(node_settings(root)))
    return subprocess.run(
        [sys.executable, "-m", "fedpt.flower_simulation", "--config", str(root / "aggregator.toml"),
         "--nodes", str(root / "nodes.json"), *more],
        capture_output=True, text=True, timeout=timeout, env=env or run_env(),
    )  # fmt: skip


def run_natively(root: Path) -> None:
    root.mkdir(parents=True)
    port = free_port()
    (root / "aggregator.toml").write_text(aggregator_toml(root / "state", port))
    logs = root / "logs"
    logs.mkdir()
    commands = {"aggregator": [sys.executable, "-m", "fedpt", "aggregator", "serve", "--config",
                               str(root / "aggregator.toml")]}  # fmt: skip
    for settings in node_settings(root):
        # the long-running node: every round in one process
        commands[settings["organisation"]] = join_command(settings, f"127.0.0.1:{port}")
    processes = {}
    try:
        for name, command in commands.items():
            with open(logs / f"{name}.log", "w") as log:
                processes[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                                   env=run_env())  # fmt: skip
        for name, proc in processes.items():
            assert proc.wait(timeout=900) == 0, (logs / f"{name}.log").read_text()[-3000:]
    finally:
        for proc in processes.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def native_model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The reference: the same federation run natively (`fedpt aggregator serve` and two
    `fedpt node join`), once for the tests that compare against it."""
    root = tmp_path_factory.mktemp("native") / "run"
    run_natively(root)
    model = global_model(root / "state")
    initial = global_model(root / "state", 0)
    assert any(not torch.equal(initial[name], tensor) for name, tensor in model.items())
    return model


def assert_same_model(on_flower: dict[str, torch.Tensor], native: dict[str, torch.Tensor]) -> None:
    assert on_flower.keys() == native.keys()
    for name, tensor in native.items():
        torch.testing.assert_close(on_flower[name], tensor, rtol=0, atol=1e-6, msg=name)


def node_rounds(work_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (work_dir / "rounds.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_federation_on_flowers_engine_equals_the_native_one(
    tmp_path: Path, native_model: dict[str, torch.Tensor]
) -> None:
    """Same seed and settings (fp32, deterministic sum): the ServerApp and ClientApps give the
    global model `fedpt aggregator serve` and `fedpt node join` give, and every node kept its
    round log and scored the final model."""
    flower = run_on_flower(tmp_path / "flower")
    assert flower.returncode == 0, flower.stdout[-3000:] + flower.stderr[-3000:]
    assert_same_model(global_model(tmp_path / "flower" / "state"), native_model)
    for org in ORGS:
        work_dir = tmp_path / "flower" / "nodes" / org
        rounds = node_rounds(work_dir)
        assert [r["round"] for r in rounds] == [0, 1] and all(r["pushed"] for r in rounds)
        report = json.loads((work_dir / "final" / "report.json").read_text())
        assert report["version"] == 2 and report["global_val_loss"] > 0


@pytest.mark.slow
def test_a_killed_server_app_resumes_from_fedpts_database(
    tmp_path: Path, native_model: dict[str, torch.Tensor]
) -> None:
    """The whole Flower run (ServerApp, Ray, every node process) is SIGKILLed once round 0 has
    committed; started again on the same state, the ServerApp resumes at version 1 from fedpt's
    database, round 0 is not trained again, and the final model is the uninterrupted one."""
    root = tmp_path / "flower"
    root.mkdir()
    (root / "aggregator.toml").write_text(aggregator_toml(root / "state", 0))
    (root / "nodes.json").write_text(json.dumps(node_settings(root)))
    command = [sys.executable, "-m", "fedpt.flower_simulation", "--config",
               str(root / "aggregator.toml"), "--nodes", str(root / "nodes.json")]  # fmt: skip
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=run_env(), start_new_session=True)  # fmt: skip
    seen = []
    try:
        for line in first.stdout:  # ends when the run does: bounded by its own deadlines
            seen.append(line)
            if line.startswith("flower: round 0 over"):
                break
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the ServerApp, Ray and the node processes
        first.wait(timeout=60)
    assert seen and seen[-1].startswith("flower: round 0 over"), "".join(seen)[-3000:]
    assert not global_model_path(root / "state", 2).exists()

    second = run_on_flower(root, fresh=False)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resumed at model version 1" in second.stdout
    assert "round 0:" not in second.stdout  # round 0 is not run again
    assert_same_model(global_model(root / "state"), native_model)
    for org in ORGS:
        rounds = node_rounds(root / "nodes" / org)
        assert [r["round"] for r in rounds if r["pushed"]] == [0, 1]


def test_ray_that_cannot_start_ends_the_run_at_once_with_one_line(tmp_path: Path) -> None:
    """Ray cannot start (its temporary folder cannot be made): the run ends before serving an
    aggregator that no node could reach, with one error line naming the cause."""
    env = {**run_env(), "RAY_TMPDIR": str(tmp_path / "not-a-folder" / "ray")}
    (tmp_path / "not-a-folder").write_text("a file where Ray wants a folder")
    proc = run_on_flower(tmp_path / "run", env=env, timeout=240)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stderr.splitlines()[-1].startswith("fedpt: error: ")
    assert "Ray did not start: NotADirectoryError" in proc.stderr.splitlines()[-1]
    assert proc.stderr.count("fedpt: error:") == 1 and "Traceback" not in proc.stderr
    assert "aggregator listening" not in proc.stdout


def test_a_ray_cluster_that_cannot_host_a_node_stops_the_server_app_at_once(tmp_path: Path) -> None:
    """`--ray-address` joins an existing Ray cluster, here one with no CPU (`ray start --head
    --num-cpus 0` on 127.0.0.1), where Flower's engine cannot place a single ClientApp and
    stops. The ServerApp, already serving the aggregator and waiting for replies, stops with it
    at once (not after its 10-minute reply deadline), and the run ends with one error line."""
    port = free_port()
    ray = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--num-cpus", "0",
         "--port", str(port), "--node-ip-address", "127.0.0.1", "--include-dashboard=false",
         "--disable-usage-stats"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=run_env(),
    )  # fmt: skip
    try:
        proc = run_on_flower(
            tmp_path / "run", timeout=300, more=("--ray-address", f"127.0.0.1:{port}")
        )
    finally:
        ray.terminate()  # `ray start --block` stops the cluster's processes as it exits
        ray.wait(timeout=60)
        # ... but leaves its address behind, where a bare ray.init() would look for a cluster.
        left = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        if left.is_file() and left.read_text().strip().endswith(f":{port}"):
            left.unlink()
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "aggregator listening" in proc.stdout  # the ServerApp was serving
    assert proc.stderr.splitlines()[-1].startswith("fedpt: error: ")
    assert "ActorPool is empty" in proc.stderr.splitlines()[-1]


def test_without_ray_address_a_run_starts_its_own_ray_beside_a_cluster_left_behind(
    tmp_path: Path,
) -> None:
    """`ray start` leaves its cluster's address in <ray temp dir>/ray_current_cluster, and Ray
    joins that cluster when asked for no address, even a dead one. Without --ray-address the run
    starts a Ray of its own: its ClientApps run (here they refuse node settings that name no
    data, which ends the run at once), instead of Ray waiting minutes for a dead cluster."""
    # A short path: Ray's Unix sockets live under it, and their names are limited to 107 bytes.
    ray_tmp = Path(tempfile.mkdtemp(prefix="fedpt-ray-", dir="/tmp"))
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")
    root = tmp_path / "run"
    root.mkdir()
    (root / "aggregator.toml").write_text(aggregator_toml(root / "state", 0))
    (root / "nodes.json").write_text(json.dumps([{"work-dir": str(root / "n0")},
                                                 {"work-dir": str(root / "n1")}]))  # fmt: skip
    try:
        proc = run_on_flower(root, env={**run_env(), "RAY_TMPDIR": str(ray_tmp)}, timeout=240,
                             fresh=False)  # fmt: skip
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stderr.splitlines()[-1]
    assert last.startswith("fedpt: error: ") and "no node took part in round 0" in last
    assert "needs data" in last


def test_node_settings_come_from_the_supernode_and_bad_ones_are_refused(tmp_path: Path) -> None:
    order = Order("train", "agg.example:7450", 3, 2, "ab" * 32, "secret-token")
    command = node_command({"data": "/corpus", "work-dir": "/w", "kit": "/kits/acme", "devices": 2,
                            "partition-id": 0}, order)  # fmt: skip
    assert command[command.index("--aggregator") + 1] == "agg.example:7450"
    assert command[command.index("--kit") + 1] == "/kits/acme"
    assert command[command.index("--nproc-per-node") + 1] == "2"
    assert command[command.index("--expect-round") + 1] == "3"
    assert command[command.index("--expect-model") + 1] == "2:" + "ab" * 32
    assert "--once" in command and "--insecure" not in command
    assert "secret-token" not in command  # it goes in the environment, out of `ps`
    assert "--secagg-by-scheduler" not in command
    record = {"aggregator": "agg.example:7450", "round": 3, "version": 2, "model-sha256": "ab" * 32,
              "token": "t", "secagg-stages": "messages"}  # fmt: skip
    staged = node_command({"data": "/corpus", "work-dir": "/w"}, Order.from_record("train", record))
    assert "--secagg-by-scheduler" in staged  # the stage messages answer keys, shares, unmask
    final = node_command(
        {"data": "/corpus", "work-dir": "/w"}, dataclasses.replace(order, kind="evaluate")
    )
    assert "--expect-round" not in final  # the final model: no round to train
    with pytest.raises(FlowerNodeError, match="unknown node-config keys: dta"):
        node_command({"dta": "/corpus", "work-dir": "/w"}, order)
    with pytest.raises(FlowerNodeError, match="needs data"):
        node_command({"work-dir": "/w"}, order)


@pytest.mark.slow
def test_fedpt_simulate_on_flowers_engine_with_secure_aggregation(tmp_path: Path) -> None:
    """`fedpt simulate --engine flower` with its defaults (mutual TLS, masked-int16 secure
    aggregation): each round's key, share and unmask stages are Flower messages, every answer
    verified by the ServerApp; the TRAIN message's process masks with the secrets they kept."""
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "fedpt", "simulate", "--engine", "flower", "--nodes", "2", "--rounds", "2",
         "--inner-steps", "3", "--seq-len", "64", "--micro-batch-size", "4", "--no-alone", "--out", str(out)],
        capture_output=True, text=True, timeout=900, env=run_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [(r["state"], r["nodes"]) for r in summary["rounds"]] == [("COMMITTED", 2)] * 2
    assert summary["final_val_loss"] < summary["initial_val_loss"]
    store = Store(f"sqlite:///{out / 'aggregator' / 'fedpt.db'}")
    try:
        _, spec_json, _ = store.find_federation("simulation")
    finally:
        store.close()
    # A masked round commits only once its survivors have unmasked: every stage was answered.
    assert json.loads(spec_json)["delta_encoding"] == "masked-int16"
    server_log = (out / "logs" / "flower.log").read_text()
    for number in (0, 1):
        for stage in ("keys", "shares", "unmask"):
            line = f"flower: round {number}: {stage} from 2 of 2 SuperNodes verified"
            assert line in server_log, server_log[-3000:]
    for org in ORGS:
        log = (out / "nodes" / org / "flower.log").read_text()
        assert log.count("== train message") == 2 and log.count("== evaluate message") == 1
        assert log.count("--secagg-by-scheduler") == 2
        assert not list((out / "nodes" / org / "secagg").glob("round-*"))  # gone once unmasked
        assert (out / "nodes" / org / "final" / "personalised.safetensors").is_file()
