"""The aggregator when its resources fail: the disk fills up (a real write failure: the
process's file-size limit, RLIMIT_FSIZE, makes writes past it fail with EFBIG, as a full disk
fails them with ENOSPC) and the database becomes unreachable (PostgreSQL behind a TCP proxy
that the test cuts). Each gets a clear UNAVAILABLE, commits nothing partial, and the service
carries on when the resource returns, with the same result as if nothing had happened."""

from __future__ import annotations

import contextlib
import dataclasses
import resource
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from sqlalchemy.engine import make_url

from aggregator.checkpoints import sha256_file
from aggregator.outer import OuterConfig
from model.config import ModelConfig
from protos import federation_pb2 as pb
from protos.codec import encode
from tests.test_aggregator import (
    join,
    make_config,
    raw_push,
    state_fingerprint,
    train_tasks,
    wait_for_version,
)

# ~2.3 MB of fp32 weights: a checkpoint with Nesterov momentum is twice that, an upload once.
MODEL = ModelConfig(dim=128, n_layers=2, n_heads=4, ffn_dim=512, max_seq_len=32)
CHUNK = 256 << 10
LR, MU = 0.7, 0.9


@contextlib.contextmanager
def file_size_limit(nbytes: int) -> Iterator[None]:
    """Writes past `nbytes` in any file fail with EFBIG (Python ignores SIGXFSZ)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def config(tmp_path: Path, database_url: str | None = None):
    base = make_config(tmp_path, database_url, model=MODEL)
    return dataclasses.replace(
        base,
        server=dataclasses.replace(base.server, chunk_bytes=CHUNK),
        outer=OuterConfig(name="nesterov", lr=LR, momentum=MU),
    )


def deltas(global0: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    out = []
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        out.append({k: 0.01 * torch.randn(v.shape, generator=g) for k, v in global0.items()})
    return out


def expected_first_step(global0, d_a, d_b) -> dict[str, torch.Tensor]:
    """Nesterov's first outer step on the equal-weight mean: θ − lr·(Δ̄ + μ·Δ̄)."""
    return {k: global0[k] - LR * (1 + MU) * (d_a[k] + d_b[k]) / 2 for k in global0}


def header(tokens: int = 1000) -> pb.UpdateHeader:
    return pb.UpdateHeader(round=0, base_version=0, num_tokens=tokens, train_loss=2.0)


def assert_running_sum_empty(agg) -> None:
    acc = agg.coordinator.accumulator
    assert acc.total_weight == 0 and not np.any(acc._sum)


def test_disk_full_while_an_upload_arrives(tmp_path: Path, serve) -> None:
    agg = serve(config(tmp_path))
    a, b = join(agg, "acme", "globex")
    train_tasks([a, b])
    global0 = a.pull_model(0)
    d_a, d_b = deltas(global0)
    payload = encode(d_a, CHUNK)
    before = state_fingerprint(agg, tmp_path / "state")
    limit = file_size_limit(payload.manifest.total_bytes // 2)
    with limit, pytest.raises(grpc.RpcError) as refused:
        raw_push(a, header(), payload)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "could not store this upload" in refused.value.details(), refused.value.details()
    assert state_fingerprint(agg, tmp_path / "state") == before  # no row, no spool left
    assert_running_sum_empty(agg)
    # Space is back: the same upload goes through, and the round commits the right model.
    assert a.push_update(0, 0, d_a, num_tokens=1000, train_loss=2.0).complete
    assert b.push_update(0, 0, d_b, num_tokens=1000, train_loss=2.0).complete
    wait_for_version(agg, 1)
    for k, v in expected_first_step(global0, d_a, d_b).items():
        torch.testing.assert_close(agg.coordinator.params[k], v, atol=1e-6, rtol=1e-5)


def test_disk_full_when_the_new_checkpoint_is_written(tmp_path: Path, serve) -> None:
    logs: list[str] = []
    agg = serve(config(tmp_path))
    agg.coordinator.log = logs.append
    a, b = join(agg, "acme", "globex")
    train_tasks([a, b])
    global0 = a.pull_model(0)
    d_a, d_b = deltas(global0)
    model_bytes = encode(d_a, CHUNK).manifest.total_bytes
    checkpoints = tmp_path / "state" / "checkpoints"
    # Uploads (1x the model) fit; the checkpoint (model + momentum, 2x) does not.
    with file_size_limit(model_bytes * 3 // 2):
        assert a.push_update(0, 0, d_a, num_tokens=1000, train_loss=2.0).complete
        assert b.push_update(0, 0, d_b, num_tokens=1000, train_loss=2.0).complete
        give_up = time.monotonic() + 10
        while not any("aggregation failed, will retry" in line for line in logs):
            assert time.monotonic() < give_up, logs
            time.sleep(0.05)
        time.sleep(1.0)  # the ticker retries meanwhile, and fails again
        fed = agg.coordinator.federation_id
        assert agg.store.latest_checkpoint(fed).version == 0
        assert agg.coordinator.version == 0
        assert [r.state for r in agg.store.rounds(fed)] == ["AGGREGATING"]  # not committed
        assert sorted(p.name for p in checkpoints.iterdir()) == ["global_v00000000.safetensors"]
    assert any("File too large" in line for line in logs), logs
    wait_for_version(agg, 1)
    latest = agg.store.latest_checkpoint(agg.coordinator.federation_id)
    assert latest.version == 1 and sha256_file(Path(latest.path)) == latest.sha256
    # The failed attempts left no trace in the outer optimizer: one Nesterov step, exactly.
    for k, v in expected_first_step(global0, d_a, d_b).items():
        torch.testing.assert_close(agg.coordinator.params[k], v, atol=1e-6, rtol=1e-5)


class CuttableProxy:
    """127.0.0.1:port forwarded to the database; `cut` closes every connection and the
    listening socket (new connections are refused), `restore` listens on the port again."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self.port = 0
        self.restore()

    def restore(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            upstream = socket.create_connection(self.upstream)
            with self._lock:
                self._sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(1 << 16):
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        with contextlib.suppress(OSError):  # wakes the blocked accept() (close alone may not)
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            self._sockets.clear()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_database_unreachable_then_back(tmp_path: Path, serve, database_url: str) -> None:
    url = make_url(database_url)
    proxy = CuttableProxy((url.host or "127.0.0.1", url.port or 5432))
    via_proxy = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    agg = serve(config(tmp_path, via_proxy))
    a, b = join(agg, "acme", "globex")
    train_tasks([a, b])
    global0 = a.pull_model(0)
    d_a, d_b = deltas(global0)
    before = state_fingerprint(agg, tmp_path / "state")
    proxy.cut()
    try:
        with pytest.raises(grpc.RpcError) as refused:
            raw_push(a, header(), encode(d_a, CHUNK))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "unavailable" in refused.value.details(), refused.value.details()
        # The database URL's credentials never reach a node (the details may name the host).
        assert f"{url.username}:{url.password}@" not in refused.value.details()
        assert via_proxy not in refused.value.details()
        assert_running_sum_empty(agg)
        # Control calls that need no database keep working meanwhile.
        assert a.upload_status(0).chunks_received == 0
    finally:
        proxy.restore()
    assert state_fingerprint(agg, tmp_path / "state") == before  # no row, no spool left
    assert a.push_update(0, 0, d_a, num_tokens=1000, train_loss=2.0).complete
    assert b.push_update(0, 0, d_b, num_tokens=1000, train_loss=2.0).complete
    wait_for_version(agg, 1)
    for k, v in expected_first_step(global0, d_a, d_b).items():
        torch.testing.assert_close(agg.coordinator.params[k], v, atol=1e-6, rtol=1e-5)
    # The commit opened round 1; whether it has started depends only on whether the nodes'
    # last GetTask (before the outage) is still within the readiness window: either is right.
    states = [r.state for r in agg.store.rounds(agg.coordinator.federation_id)]
    assert states[0] == "COMMITTED" and states[1:] in (["OPEN"], ["TRAINING"]), states
    proxy.cut()
