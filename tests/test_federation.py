"""A real federation on loopback: an aggregator and two `fedpt node join` processes, one of them
behind a recording TCP proxy. Checks that it completes, that each committed global model is the
outer step applied to the nodes' own deltas (recomputed here independently), and that no
training data crosses the wire."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
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
from model.config import ModelConfig
from model.io import load_tensors
from tests.conftest import synthetic_documents, write_corpus

ROUNDS, H, LR, MU = 2, 4, 0.7, 0.9
CANARY = "ZQX-canary-7f3a9c: payroll of acme for 2026 is private"
MODEL = ModelConfig(dim=64, n_layers=2, n_heads=4, ffn_dim=128, max_seq_len=64)


class RecordingProxy:
    """Forwards 127.0.0.1:port to an upstream address and keeps every byte, both directions."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.sent = bytearray()  # client -> server
        self.received = bytearray()  # server -> client
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            for src, dst, sink in (
                (client, upstream, self.sent),
                (upstream, client, self.received),
            ):
                t = threading.Thread(target=self._pump, args=(src, dst, sink), daemon=True)
                t.start()
                self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, sink: bytearray) -> None:
        try:
            while data := src.recv(1 << 16):
                with self._lock:
                    sink.extend(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._stop.set()
        self._listener.close()


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("federation")
    config = AggregatorConfig(
        server=ServerConfig(port=0, long_poll_seconds=1.0, insecure=True),
        # fp32 both ways: the committed models are recomputed from the nodes' saved deltas.
        federation=FederationConfig(
            name="fed-test",
            rounds=ROUNDS,
            inner_steps=H,
            delta_encoding="fp32",
            download_encoding="fp32",
        ),
        model=MODEL,
        train={"micro_batch_size": 4, "seq_len": 32, "warmup_steps": 2},
        round=RoundConfig(min_nodes=2, timeout_seconds=120.0, start_grace_seconds=0.5),
        outer=OuterConfig(name="nesterov", lr=LR, momentum=MU),
        store=StoreConfig(state_dir=str(root / "aggregator")),
    )
    agg = start_aggregator(config, log=lambda _m: None)
    proxy = RecordingProxy(agg.port)
    corpora = {
        "acme": write_corpus(
            root / "acme", [f"{CANARY}\n{d}" for d in synthetic_documents(30, seed=1)]
        ),
        "globex": write_corpus(root / "globex", synthetic_documents(30, seed=2)),
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FEDPT_CACHE_DIR": str(root / "cache")}
    procs = {}
    for org, port in (("acme", proxy.port), ("globex", agg.port)):
        cmd = [sys.executable, "-m", "fedpt", "node", "join", "--insecure", "--aggregator", f"127.0.0.1:{port}",
               "--data", str(corpora[org]), "--organisation", org, "--work-dir", str(root / org),
               "--save-deltas", "--poll-seconds", "1"]  # fmt: skip
        if org == "acme":  # globex only scores the final model
            cmd += ["--personalise-steps", "3", "--personalise-mode", "lora"]
        procs[org] = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
    try:
        outputs = {org: p.communicate(timeout=240)[0] for org, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
        version = agg.coordinator.version
        agg.stop(grace=0)
        proxy.close()
    return {"root": root, "procs": procs, "outputs": outputs, "version": version, "proxy": proxy,
            "corpora": corpora}  # fmt: skip


def test_two_nodes_two_rounds_complete(federation: dict) -> None:
    for org, proc in federation["procs"].items():
        assert proc.returncode == 0, federation["outputs"][org]
        assert "the federation has finished" in federation["outputs"][org]
    assert federation["version"] == ROUNDS


def test_committed_models_are_the_outer_step_of_the_nodes_own_deltas(federation: dict) -> None:
    root = federation["root"]
    checkpoints = CheckpointStore(root / "aggregator" / "checkpoints")
    theta, _, _ = checkpoints.read(0)
    momentum = {k: torch.zeros_like(v) for k, v in theta.items()}
    for r in range(ROUNDS):
        deltas, weights = [], []
        for org in ("acme", "globex"):
            tensors, meta = load_tensors(root / org / "deltas" / f"round_{r:08d}.safetensors")
            assert int(meta["base_version"]) == r
            deltas.append(tensors)
            weights.append(float(meta["num_tokens"]))
        expected_next = {}
        for name in theta:
            mean = sum(w * d[name] for w, d in zip(weights, deltas, strict=True)) / sum(weights)
            momentum[name] = MU * momentum[name] + mean  # Nesterov, written out by hand
            expected_next[name] = theta[name] - LR * (mean + MU * momentum[name])
        committed, _, _ = checkpoints.read(r + 1)
        for name in theta:
            torch.testing.assert_close(
                committed[name], expected_next[name], atol=1e-6, rtol=1e-5, msg=name
            )
        theta = committed


def test_no_training_data_crosses_the_wire(federation: dict) -> None:
    proxy: RecordingProxy = federation["proxy"]
    wire = bytes(proxy.sent) + bytes(proxy.received)
    assert len(proxy.sent) > 0 and len(proxy.received) > 0, "the proxy saw no traffic"
    canary = CANARY.encode()
    as_tokens = b"".join(b.to_bytes(2, "little") for b in canary)  # byte tokenizer, uint16 shards
    for needle in (canary, canary[:16], as_tokens[:32]):
        assert needle not in wire
    # Nothing but manifests and weights leaves the node: its uploads are ROUNDS deltas of the
    # model's size plus small framing and control messages.
    model_bytes = MODEL.with_vocab(259).num_params() * 4
    assert len(proxy.sent) < ROUNDS * model_bytes * 1.05 + 200_000
    assert len(proxy.received) < (ROUNDS + 1) * model_bytes * 1.05 + 200_000


def test_the_node_process_reports_per_round_timings(federation: dict) -> None:
    import json

    lines = (federation["root"] / "acme" / "rounds.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["round"] for r in records] == list(range(ROUNDS))
    assert all(
        r["pushed"] and r["train_seconds"] > 0 and r["tokens"] == H * 4 * 32 for r in records
    )


def test_each_node_reports_its_private_validation_loss_of_every_global_model(
    federation: dict,
) -> None:
    import json

    from aggregator.store import Store
    from model.gpt import GPT
    from model.io import load_model, load_weights_into
    from model.tokenizer import ByteTokenizer
    from model.train_config import TrainConfig
    from node.parallel import DistEnv
    from node.personalise import validation_loss
    from node.shards import TokenShards, prepare_data

    root = federation["root"]
    store = Store(f"sqlite:///{root / 'aggregator' / 'fedpt.db'}")
    try:
        fid, _, _ = store.find_federation("fed-test")
        org_of = {n.id: n.organisation for n in store.nodes(fid)}
        reported = {(org_of[m.node_id], m.round_number): m.value
                    for m in store.metrics(fid) if m.name == "base_val_loss"}  # fmt: skip
    finally:
        store.close()
    assert set(reported) == {(o, r) for o in ("acme", "globex") for r in range(ROUNDS)}
    # What a node reports is its validation split scored with the inner loop's settings:
    # recomputed here from the checkpoints, exactly.
    inner = TrainConfig(micro_batch_size=4, seq_len=32, warmup_steps=2)
    checkpoints = CheckpointStore(root / "aggregator" / "checkpoints")
    for org in ("acme", "globex"):
        shards, _ = prepare_data(str(federation["corpora"][org]), ByteTokenizer(), root / "cache")
        val = TokenShards(shards / "val")
        for version in range(ROUNDS + 1):
            params, _, _ = checkpoints.read(version)
            model = GPT(MODEL.with_vocab(ByteTokenizer().vocab_size))
            load_weights_into(model, params)
            expected = validation_loss(model, val, inner, DistEnv())
            if version < ROUNDS:
                assert reported[(org, version)] == expected, (org, version)
            else:  # the final model: pulled after STOP, scored, kept at the node
                report = json.loads((root / org / "final" / "report.json").read_text())
                assert report["version"] == ROUNDS and report["global_val_loss"] == expected
                final, _ = load_model(root / org / "final" / "global.safetensors")
                assert all(torch.equal(final.state_dict()[k], v) for k, v in params.items())
    personalised = json.loads((root / "acme" / "final" / "report.json").read_text())["personalised"]
    assert personalised["mode"] == "lora" and personalised["steps"] == 3
    assert personalised["val_loss"] < personalised["global_val_loss"]
    assert (root / "acme" / "final" / "personalised.safetensors").is_file()
    assert not (root / "globex" / "final" / "personalised.safetensors").exists()


def test_a_node_personalises_the_final_model_on_demand(federation: dict, tmp_path: Path) -> None:
    import json

    from model.io import load_model

    root, out = federation["root"], tmp_path / "own.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FEDPT_CACHE_DIR": str(root / "cache")}
    cmd = [sys.executable, "-m", "fedpt", "node", "personalise", "--work-dir", str(root / "globex"),
           "--data", str(federation["corpora"]["globex"]), "--steps", "4", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["mode"] == "full" and report["steps"] == 4
    assert report["model"] == str(root / "globex" / "final" / "global.safetensors")
    assert report["val_loss"] < report["global_val_loss"]
    final, _ = load_model(root / "globex" / "final" / "global.safetensors")
    own, _ = load_model(out)
    assert own.config == final.config
    assert not all(torch.equal(own.state_dict()[k], v) for k, v in final.state_dict().items())


def test_a_node_waits_for_an_absent_aggregator_and_then_takes_part(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on yet
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    corpus = write_corpus(tmp_path / "corpus", synthetic_documents(20, seed=3))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "FEDPT_CACHE_DIR": str(tmp_path / "cache"),
    }
    cmd = [sys.executable, "-m", "fedpt", "node", "join", "--insecure", "--aggregator", f"127.0.0.1:{port}", "--data",
           str(corpus), "--work-dir", str(tmp_path / "node"), "--poll-seconds", "1"]  # fmt: skip
    node = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(node.stdout), daemon=True)
    reader.start()
    agg = None
    try:
        give_up = time.monotonic() + 90
        while not any("retrying" in line for line in lines):  # the node is trying to reach us
            assert node.poll() is None and time.monotonic() < give_up, "".join(lines)
            time.sleep(0.1)
        config = AggregatorConfig(
            server=ServerConfig(port=port, long_poll_seconds=1.0, insecure=True),
            federation=FederationConfig(name="late", rounds=1, inner_steps=2),
            model=MODEL,
            train={"micro_batch_size": 2, "seq_len": 32, "warmup_steps": 1},
            round=RoundConfig(min_nodes=1, timeout_seconds=60.0, start_grace_seconds=0.1),
            store=StoreConfig(state_dir=str(tmp_path / "aggregator")),
        )
        agg = start_aggregator(config, log=lambda _m: None)
        node.wait(timeout=120)
        reader.join(timeout=10)
    finally:
        if node.poll() is None:
            node.kill()
        if agg is not None:
            agg.stop(grace=0)
    out = "".join(lines)
    assert node.returncode == 0, out
    assert "aggregator unavailable" in out and "retrying" in out
    assert "the federation has finished" in out
