"""One organisation's node spanning several hosts (torchrun's --nnodes/--node-rank/--rdzv-endpoint).

Two "hosts" on 127.0.0.1 are two separate `fedpt` processes, each with its own copy of the
corpus, its own shard cache and its own output folder, meeting only at the rendezvous endpoint.
Their result must equal one host running the same two ranks. Bad launch flags are one line.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from aggregator.checkpoints import CheckpointStore
from aggregator.config import (
    AggregatorConfig,
    FederationConfig,
    RoundConfig,
    ServerConfig,
    StoreConfig,
)
from aggregator.outer import OuterConfig
from aggregator.server import start_aggregator
from fedpt.cli import main
from model.config import ModelConfig
from node.parallel import Launch
from node.participant import NodeConfig, NodeConfigError, load_node_config
from tests.conftest import synthetic_documents, write_corpus
from tests.test_cli import SMALL_RUN, assert_same_weights, fedpt, step_losses

PROCESS_TIMEOUT = 300  # seconds for any one multi-process run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def host(root: Path, corpus: Path) -> tuple[Path, dict[str, str]]:
    """A host's own folder, with its own copy of the corpus (same files and mtimes), and an
    environment whose shard cache is in that folder: the hosts share no files."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(corpus, root / "corpus")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FEDPT_CACHE_DIR": str(root / "cache")}
    return root / "corpus", env


def run_together(commands: list[tuple[list[str], dict[str, str]]]) -> list[tuple[int, str]]:
    """Start every `fedpt` command at once and wait for all, within PROCESS_TIMEOUT in total;
    each gets its own process group, so a timeout also ends its torchrun and ranks."""
    procs = [
        subprocess.Popen([sys.executable, "-m", "fedpt", *map(str, argv)], env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        for argv, env in commands
    ]  # fmt: skip
    deadline = time.monotonic() + PROCESS_TIMEOUT
    results = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(deadline - time.monotonic(), 1))
            results.append((p.returncode, out))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=30)
    return results


def two_hosts(args: list[str], hosts: list[tuple[Path, Path, dict]]) -> list[tuple[int, str]]:
    """The same command on two hosts; `hosts` gives each one's corpus, output folder, env."""
    endpoint = f"127.0.0.1:{free_port()}"
    return run_together([
        (["train", "--data", corpus, "--out", out, *args, "--nnodes", "2", "--node-rank", str(rank),
          "--nproc-per-node", "1", "--rdzv-endpoint", endpoint], env)
        for rank, (corpus, out, env) in enumerate(hosts)
    ])  # fmt: skip


# ---- fedpt train ------------------------------------------------------------------------------
TRAIN = ["--steps", "6", "--checkpoint-every", "3", *SMALL_RUN]


@pytest.mark.slow
def test_two_hosts_train_like_one_host_with_two_ranks_and_resume(
    corpus_dir: Path, tmp_path: Path
) -> None:
    c0, env0 = host(tmp_path / "host0", corpus_dir)
    c1, env1 = host(tmp_path / "host1", corpus_dir)
    out0, out1 = tmp_path / "host0" / "run", tmp_path / "host1" / "run"
    results = two_hosts(TRAIN, [(c0, out0, env0), (c1, out1, env1)])
    for rc, out in results:
        assert rc == 0, out
    one = tmp_path / "one"
    fedpt("train", "--data", corpus_dir, "--out", one, "--nproc-per-node", "2", *TRAIN)

    assert json.loads((out0 / "run.json").read_text())["world_size"] == 2
    assert len(step_losses(out0)) == 6
    assert step_losses(out0) == pytest.approx(step_losses(one), abs=1e-5)
    assert_same_weights(out0, one, atol=1e-5)
    # Global rank 0 alone writes the run; host 1 packed its own shard cache and wrote nothing.
    assert not out1.exists()
    assert list((tmp_path / "host1" / "cache").glob("*/train/manifest.json"))

    # Resume on two hosts where only host 0 kept the checkpoint (host 1 has a fresh --out).
    cut = tmp_path / "host0" / "cut"
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copytree(out0 / "checkpoints" / "step_00000003", cut / "checkpoints" / "step_00000003")
    (cut / "checkpoints" / "latest").write_text("step_00000003\n")
    fresh = tmp_path / "host1" / "fresh"
    results = two_hosts([*TRAIN, "--resume"], [(c0, cut, env0), (c1, fresh, env1)])
    for rc, out in results:
        assert rc == 0, out
    assert "resumed from" in results[0][1]
    assert step_losses(cut) == step_losses(out0)[3:]
    assert_same_weights(cut, out0, atol=0)
    assert not fresh.exists()


@pytest.mark.slow
def test_hosts_with_different_data_are_refused(tmp_path: Path) -> None:
    a = write_corpus(tmp_path / "a", synthetic_documents(20, seed=1))
    b = write_corpus(tmp_path / "b", synthetic_documents(20, seed=2))
    c0, env0 = host(tmp_path / "host0", a)
    c1, env1 = host(tmp_path / "host1", b)
    results = two_hosts(
        ["--steps", "2", *SMALL_RUN],
        [(c0, tmp_path / "host0" / "run", env0), (c1, tmp_path / "host1" / "run", env1)],
    )
    for rc, out in results:
        assert rc != 0
        assert "fedpt: error: the ranks disagree on the data" in out, out
    assert not (tmp_path / "host0" / "run" / "model.safetensors").exists()


# ---- fedpt node join --------------------------------------------------------------------------
ROUNDS, H = 2, 3
MODEL = ModelConfig(dim=64, n_layers=2, n_heads=4, ffn_dim=128, max_seq_len=64)


def federation(root: Path, nodes: list[tuple[list[str], dict[str, str]]]) -> list[tuple[int, str]]:
    """An aggregator here and the given `fedpt node join` processes, run to the end; "{port}"
    in their arguments is the aggregator's port. The committed models stay in root."""
    config = AggregatorConfig(
        server=ServerConfig(port=0, long_poll_seconds=1.0, insecure=True),
        federation=FederationConfig(name="multihost", rounds=ROUNDS, inner_steps=H),
        model=MODEL,
        train={"micro_batch_size": 2, "seq_len": 32, "warmup_steps": 1},
        round=RoundConfig(min_nodes=1, timeout_seconds=120.0, start_grace_seconds=0.1),
        outer=OuterConfig(name="fedavg"),
        store=StoreConfig(state_dir=str(root / "aggregator")),
    )
    agg = start_aggregator(config, log=lambda _m: None)
    try:
        return run_together([
            (["node", "join", *(str(a).replace("{port}", str(agg.port)) for a in argv)], env)
            for argv, env in nodes
        ])  # fmt: skip
    finally:
        agg.stop(grace=0)


@pytest.mark.slow
def test_a_node_on_two_hosts_trains_like_one_host_with_two_ranks(
    corpus_dir: Path, tmp_path: Path
) -> None:
    common = ["--organisation", "acme", "--poll-seconds", "1"]
    c0, env0 = host(tmp_path / "host0", corpus_dir)
    c1, env1 = host(tmp_path / "host1", corpus_dir)
    endpoint = f"127.0.0.1:{free_port()}"
    multi = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-endpoint", endpoint]
    two = federation(tmp_path / "two", [
        (["--insecure", "--aggregator", "127.0.0.1:{port}", "--data", c0, "--work-dir",
          tmp_path / "host0" / "node", "--node-rank", "0", *multi, *common], env0),
        # Host 1 never talks to the aggregator: it needs neither its address nor a kit.
        (["--data", c1, "--work-dir", tmp_path / "host1" / "node", "--node-rank", "1", *multi,
          *common], env1),
    ])  # fmt: skip
    for rc, out in two:
        assert rc == 0, out
    assert "the federation has finished" in two[0][1]
    one_env = {**os.environ, "OMP_NUM_THREADS": "1", "FEDPT_CACHE_DIR": str(tmp_path / "cache")}
    one = federation(tmp_path / "one", [
        (["--insecure", "--aggregator", "127.0.0.1:{port}", "--data", corpus_dir, "--work-dir",
          tmp_path / "one" / "node", "--nproc-per-node", "2", *common], one_env),
    ])  # fmt: skip
    assert one[0][0] == 0, one[0][1]

    def losses(work_dir: Path) -> list[float]:
        lines = (work_dir / "rounds.jsonl").read_text().splitlines()
        return [json.loads(line)["train_loss"] for line in lines]

    assert len(losses(tmp_path / "host0" / "node")) == ROUNDS
    assert losses(tmp_path / "host0" / "node") == pytest.approx(
        losses(tmp_path / "one" / "node"), abs=1e-5
    )
    for version in range(1, ROUNDS + 1):
        a, _, _ = CheckpointStore(tmp_path / "two" / "aggregator" / "checkpoints").read(version)
        b, _, _ = CheckpointStore(tmp_path / "one" / "aggregator" / "checkpoints").read(version)
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=0, msg=name)
    assert not (tmp_path / "host1" / "node").exists()  # host 1 kept nothing


# ---- flag validation --------------------------------------------------------------------------
BAD_LAUNCHES = [
    (["--nnodes", "0"], "--nnodes must be at least 1"),
    (["--nproc-per-node", "0"], "--nproc-per-node must be at least 1"),
    (["--nnodes", "x"], "invalid int value"),
    (["--node-rank", "1"], "need --nnodes greater than 1"),
    (["--rdzv-endpoint", "127.0.0.1:29500"], "need --nnodes greater than 1"),
    (["--nnodes", "2", "--rdzv-endpoint", "127.0.0.1:29500"], "needs this host's --node-rank"),
    (["--nnodes", "2", "--node-rank", "0"], "needs this host's --node-rank and the --rdzv"),
    (["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "h:1"], "must be in 0..1"),
    (["--nnodes", "2", "--node-rank", "-1", "--rdzv-endpoint", "h:1"], "must be in 0..1"),
    (["--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "hostonly"], "HOST:PORT"),
    (["--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "h:70000"], "1..65535"),
    (["--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "::1:29500"], "HOST:PORT"),
    (["--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "h :1"], "HOST:PORT"),
]


@pytest.mark.parametrize("command", ["train", "node"])
@pytest.mark.parametrize("flags,message", BAD_LAUNCHES)
def test_bad_launch_flags_are_one_line(
    command: str, flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    base = {"train": ["train", "--data", str(tmp_path), "--out", str(tmp_path / "out")],
            "node": ["node", "join", "--data", str(tmp_path), "--insecure"]}[command]  # fmt: skip
    assert main([*base, *flags]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedpt: error:"), lines
    assert message in lines[0]
    assert not (tmp_path / "out").exists()


def test_a_bad_launch_ends_the_process_quickly_with_status_2(tmp_path: Path) -> None:
    started = time.monotonic()
    proc = fedpt("train", "--data", tmp_path, "--out", tmp_path / "out", "--nnodes", "2",
                 "--node-rank", "2", "--rdzv-endpoint", "127.0.0.1:1", check=False)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "fedpt: error: --node-rank must be in 0..1 for --nnodes 2, got 2"
    ]
    assert time.monotonic() - started < 60  # no rendezvous was attempted


def test_node_toml_takes_the_launch_keys(tmp_path: Path) -> None:
    toml = tmp_path / "node.toml"
    toml.write_text('[node]\ndata = "x"\nnnodes = 2\nnode_rank = 1\nrdzv_endpoint = "h0:29500"\n')
    cfg = load_node_config(toml, {})
    assert cfg.launch == Launch(nproc_per_node=1, nnodes=2, node_rank=1, rdzv_endpoint="h0:29500")
    assert cfg.launch.torchrun_args() == [
        "--nnodes=2", "--node-rank=1", "--rdzv-backend=static", "--rdzv-endpoint=h0:29500",
        "--nproc-per-node=1",
    ]  # fmt: skip
    toml.write_text('[node]\ndata = "x"\ninsecure = true\nnode_rank = "1"\n')
    with pytest.raises(NodeConfigError, match="node_rank"):
        load_node_config(toml, {})
    # Host 0 talks to the aggregator, so it still needs its kit (or --insecure).
    with pytest.raises(NodeConfigError, match="--kit"):
        NodeConfig(data="x", nnodes=2, node_rank=0, rdzv_endpoint="h0:29500")
