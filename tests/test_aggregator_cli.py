"""`fedpt aggregator serve` as a real process, and the documented aggregator.toml."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aggregator.config import AggregatorConfigError, config_from_dict, load_config
from tests.http2_floods import continuation_flood

README = Path(__file__).resolve().parent.parent / "README.md"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def readme_aggregator_toml() -> str:
    match = re.search(r"```toml\n(# aggregator\.toml.*?)```", README.read_text(), re.S)
    assert match, "README lost its aggregator.toml example"
    return match.group(1)


def test_the_readme_example_config_is_valid(tmp_path: Path) -> None:
    path = tmp_path / "aggregator.toml"
    path.write_text(readme_aggregator_toml())
    config = load_config(path)
    assert config.round.min_nodes >= 1 and config.outer.name in ("fedavg", "nesterov", "adam")


@pytest.mark.parametrize(
    "raw,words",
    [
        ({"server": {"prot": 1}}, "unknown [server] keys: prot"),
        ({"sever": {}}, "unknown sections sever"),
        ({"round": {"min_nodes": 0}}, "min_nodes"),
        ({"round": {"min_nodes": "2"}}, "'min_nodes' must be int"),
        ({"outer": {"name": "sgd"}}, "sgd"),
        ({"model": {"preset": "huge"}}, "unknown preset"),
        ({"train": {"lr": -1.0}}, "[train] lr"),
        ({"server": {"chunk_bytes": 3}}, "multiple of 4"),
        ({"server": {"malloc_mmap_threshold_bytes": 64 << 20}}, "0..32 MiB"),
        ({"server": {"malloc_arenas": -1}}, "malloc_arenas"),
        ({"server": {"malloc_trim_seconds": -1.0}}, "malloc_trim_seconds"),
        ({"server": {"insecure": False}}, "needs kit"),
        ({"federation": {"delta_encoding": "masked-int32"}}, "needs mutual TLS"),
    ],
)
def test_bad_config_names_the_key(raw: dict, words: str) -> None:
    merged = {"server": {"insecure": True}}  # so that only the key under test is wrong
    for section, values in raw.items():
        merged.setdefault(section, {}).update(values)
    with pytest.raises(AggregatorConfigError) as info:
        config_from_dict(merged)
    assert words in str(info.value)


def start_serving(tmp_path: Path, config: str = "") -> tuple[subprocess.Popen, int]:
    """`fedpt aggregator serve` in plain text (with this aggregator.toml, if any), once SERVING."""
    port = free_port()
    path = tmp_path / "aggregator.toml"
    path.write_text(config)
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedpt", "aggregator", "serve", "--config", str(path), "--insecure", "--port",
         str(port), "--state-dir", str(tmp_path / "state"), "--name", "cli-test", "--min-nodes", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    try:
        assert health(port, attempts=100) == health_pb2.HealthCheckResponse.SERVING
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, port


def health(port: int, attempts: int = 1) -> int | None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(attempts):
            try:
                request = health_pb2.HealthCheckRequest(service="fedpt.v1.Federation")
                return stub.Check(request, timeout=1 if attempts > 1 else 10).status
            except grpc.RpcError:
                time.sleep(0.2)
    return None


def resident_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) << 10
    raise AssertionError("no VmRSS")


def test_serve_starts_reports_health_and_stops_on_sigterm(tmp_path: Path) -> None:
    proc, _ = start_serving(tmp_path)
    try:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0, out
        assert "listening on 127.0.0.1" in out
        assert (tmp_path / "state" / "fedpt.db").is_file()
        assert (tmp_path / "state" / "checkpoints" / "global_v00000000.safetensors").is_file()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_memory_of_endless_header_blocks_is_given_back(tmp_path: Path) -> None:
    """grpc reads a header block that never ends to its end and builds an error string listing
    every field; glibc kept what was freed (~14 MiB per flood of tiny fields) until the
    aggregator fixed its mmap threshold and trims the heap every malloc_trim_seconds (its other
    malloc settings are the defaults)."""
    trim_seconds = 2.0
    proc, port = start_serving(tmp_path, f"[server]\nmalloc_trim_seconds = {trim_seconds}\n")
    try:
        time.sleep(trim_seconds + 1)  # start-up's garbage trimmed once, like the floods' below
        before = resident_bytes(proc.pid)
        for shape in ("fields", "fields", "fields", "value"):
            assert continuation_flood(port, 64, shape) > 0
        # Given back by the next trim: a bound far above the trim period, for a busy machine.
        give_up = time.monotonic() + 30 * trim_seconds
        while (grown := resident_bytes(proc.pid) - before) > 5 << 20:
            assert time.monotonic() < give_up, f"RSS still {grown / 2**20:+.1f} MiB after 4 floods"
            time.sleep(0.5)
        assert health(port) == health_pb2.HealthCheckResponse.SERVING
    finally:
        proc.kill()
        proc.wait()


def test_serve_with_a_bad_config_is_one_error_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\ninsecure = true\n[round]\nmin_nodes = 0\n")
    proc = subprocess.run(
        [sys.executable, "-m", "fedpt", "aggregator", "serve", "--config", str(bad)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "min_nodes" in proc.stderr
