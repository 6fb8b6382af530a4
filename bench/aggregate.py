"""N uploads of a P-parameter delta through a real aggregator on loopback, for N = 2, 8, 32:
MB/s received, and the aggregator's peak memory as a multiple of the model size.

For each N, a real aggregator runs as its own process (`python -m fedpt aggregator serve`,
plain text on 127.0.0.1 with fp32 deltas, i.e. `insecure = true` and no secure aggregation; one
round with exactly N nodes, Nesterov outer step) with a model of
about 50M parameters (--dim/--layers/--heads/--ffn-dim change it). N clients in this process,
one thread each, join and long-poll until each has its TRAIN task. Then, each phase starting
on a barrier so the N transfers overlap:

  pull     every client pulls the global model (AggregatorClient.pull_model, chunk-verified);
           pull MB/s = N × model bytes / (last pull ends − first pull starts)
  upload   every client streams the same delta (zeros + 1e-4 noise, the model's names and
           shapes, 1000 tokens) in PushUpdate; the aggregator verifies each 4 MiB chunk
           (sha256, NaN/Inf), adds it into its running sum and spools it to disk.
           upload MB/s = N × delta bytes / (last push completes − first push starts).
           The delta is encoded (hashed) once, before the clock starts, and every client sends
           those chunks, so the figure is the server's receive path; --push-update has every
           client call AggregatorClient.push_update instead, which hashes the delta again per node.
  commit   the last upload completes the round; a client long-polls until GetTask says STOP
           (version 1 is committed: outer step, checkpoint written and fsynced).

Memory is read from /proc/PID of the aggregator process only (the clients live here):
  idle RSS   VmRSS once it serves and before any node joins: interpreter, torch, gRPC, global
             model, outer state (Nesterov momentum), the accumulator
  peak RSS   VmHWM from then until version 1 is committed; it is reset (/proc/PID/clear_refs)
             at each phase's start, so the start-up transient is left out and the peak of each
             phase is known
  ×model     divided by the model's fp32 bytes
CPU time (utime + stime) is read over the pull and upload phases, for the aggregator and for
this process (the N clients): it says which side a transfer rate is bound by. How much of an
upload the aggregator buffers depends on timing, so the upload peak varies between runs:
--repeats R runs each N R times, each with a fresh aggregator, and quotes medians.

    python -m bench.aggregate [--nodes 2,8,32] [--repeats 1] [--dim 1024 --layers 4]
                              [--server KEY=VALUE ...]

The bench process holds N pulled models at once (N × model bytes); the aggregator spools
N × model bytes to disk (--tmp-dir) until the round commits.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import grpc
import torch

from bench.common import median, print_table
from fedpt.simulate import wait_until_serving
from model.config import ConfigError, ModelConfig, preset
from node.client import SESSION_METADATA, AggregatorClient, TransferError
from protos import federation_pb2 as pb
from protos.codec import CodecError, EncodedPayload, encode, update_messages

BYTE_VOCAB = 259  # the byte-level tokenizer the aggregator uses when [federation] has none
NUM_TOKENS = 1000
T = TypeVar("T")


class BenchError(RuntimeError):
    """A trial did not complete; the message says which step and why."""


@dataclasses.dataclass(frozen=True)
class Trial:
    model_bytes: int
    upload_mbps: float
    pull_mbps: float
    pull_cpu: tuple[float, float]  # CPU seconds (aggregator, clients) during the pull phase
    upload_cpu: tuple[float, float]  # the same for the upload phase
    commit_s: float  # last upload complete -> a client sees STOP (version 1 committed)
    idle_rss: int
    startup_peak: int  # VmHWM before the first reset: the start-up transient
    peak_pull: int  # VmHWM per phase (bytes)
    peak_upload: int
    peak_commit: int

    @property
    def peak(self) -> int:
        return max(self.peak_pull, self.peak_upload, self.peak_commit)


# ---- the aggregator process -------------------------------------------------------------------
def stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the command name: [0] is the state, [11] utime, [12] stime."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        fields = ["X"]
    if fields[0] in "ZX":
        raise BenchError(f"the aggregator (pid {pid}) has exited")
    return fields


def status_bytes(pid: int, key: str) -> int:
    """A `kB` field of /proc/PID/status (VmRSS, VmHWM) in bytes."""
    stat_fields(pid)
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise BenchError(f"/proc/{pid}/status has no {key}")


def reset_peak(pid: int) -> None:
    """Set VmHWM to the current VmRSS (Linux ≥ 4.0)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError as e:
        raise BenchError(f"cannot reset the peak RSS via /proc/{pid}/clear_refs: {e}") from e


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process, from /proc/PID/stat."""
    fields = stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuClock:
    """CPU seconds (utime + stime) spent by the aggregator and by this process since start()."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._start = (0.0, 0.0)

    def _now(self) -> tuple[float, float]:
        own = resource.getrusage(resource.RUSAGE_SELF)
        return cpu_seconds(self.pid), own.ru_utime + own.ru_stime

    def start(self) -> None:
        self._start = self._now()

    def elapsed(self) -> tuple[float, float]:
        now = self._now()
        return now[0] - self._start[0], now[1] - self._start[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def toml_table(name: str, values: dict[str, object]) -> str:
    lines = [f"[{name}]"]
    for key, value in values.items():
        text = json.dumps(value) if isinstance(value, str) else repr(value).lower()
        lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"


def write_config(
    path: Path, model: ModelConfig, nodes: int, port: int, state_dir: Path, server: dict
) -> None:
    fields = dataclasses.asdict(model)
    del fields["vocab_size"]  # the aggregator sets it from the tokenizer
    sections = {
        # Plain text and fp32 deltas: the streaming path this bench measures (mutual TLS and
        # secure aggregation's masked-int32 uploads are not measured here).
        "server": {"host": "127.0.0.1", "port": port, "long_poll_seconds": 2.0,
                   "max_workers": max(64, 2 * nodes + 8), "insecure": True, **server},
        "federation": {"name": "bench-aggregate", "rounds": 1, "delta_encoding": "fp32"},
        "model": {k: v for k, v in fields.items() if v is not None},
        "round": {"min_nodes": nodes, "max_nodes": nodes, "timeout_seconds": 600.0,
                  "start_grace_seconds": 0.5},
        "outer": {"name": "nesterov"},
        "store": {"state_dir": str(state_dir)},
    }  # fmt: skip
    path.write_text("\n".join(toml_table(k, v) for k, v in sections.items()))


class AggregatorProcess:
    """`python -m fedpt aggregator serve` in a child process, its output in a log file."""

    def __init__(self, config: Path, log_path: Path, port: int) -> None:
        self.log_path, self.address = log_path, f"127.0.0.1:{port}"
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fedpt", "aggregator", "serve", "--config", str(config)],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},  # the log is complete when it is read
        )  # fmt: skip
        self.pid = self.proc.pid

    def wait_serving(self, timeout: float) -> None:
        """Poll the grpc.health.v1 service until it says SERVING."""
        with grpc.insecure_channel(self.address) as channel:
            if wait_until_serving(channel, self.proc, timeout):
                return
        if self.proc.poll() is not None:
            raise BenchError(f"the aggregator exited with status {self.proc.returncode}")
        raise BenchError(f"the aggregator was not SERVING within {timeout:.0f}s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        self._log.close()

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:]) if text else "(it printed nothing)"


# ---- the clients ------------------------------------------------------------------------------
def run_phase(
    pool: ThreadPoolExecutor, n: int, work: Callable[[int], T], timeout: float,
    before_start: Callable[[], None] = lambda: None,
) -> tuple[list[T], float]:  # fmt: skip
    """Run work(0..n-1) on n threads released together; (results, first start → last end)."""
    barrier = threading.Barrier(n + 1)
    spans: list[tuple[float, float]] = [(0.0, 0.0)] * n

    def timed(i: int) -> T:
        barrier.wait(timeout)
        start = time.perf_counter()
        result = work(i)
        spans[i] = (start, time.perf_counter())
        return result

    futures: list[Future[T]] = [pool.submit(timed, i) for i in range(n)]
    try:
        before_start()
    except BaseException:
        barrier.abort()  # release the workers now, not after `timeout`
        raise
    with contextlib.suppress(threading.BrokenBarrierError):  # a worker failed: its future says why
        barrier.wait(timeout)
    give_up = time.monotonic() + timeout
    results = [f.result(timeout=max(0.0, give_up - time.monotonic())) for f in futures]
    return results, max(e for _, e in spans) - min(s for s, _ in spans)


def until_train(client: AggregatorClient, timeout: float) -> pb.Task:
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        task = client.get_task(wait_seconds=2.0)
        if task.kind == pb.Task.TRAIN:
            return task
        if task.kind == pb.Task.STOP:
            raise BenchError(f"{client.organisation} got STOP before training: {task.message}")
    raise BenchError(f"{client.organisation} got no TRAIN task within {timeout:.0f}s")


def until_stop(client: AggregatorClient, timeout: float) -> None:
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        if client.get_task(wait_seconds=2.0).kind == pb.Task.STOP:
            return
    raise BenchError(f"version 1 was not committed within {timeout:.0f}s")


def small_delta(model: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(v.shape, generator=g) * 1e-4 for k, v in model.items()}


def push_payload(
    client: AggregatorClient, token: str, task: pb.Task, payload: EncodedPayload, timeout: float
) -> pb.PushReply:
    """The messages AggregatorClient.push_update sends, from an already encoded payload."""
    header = pb.UpdateHeader(round=task.round, base_version=task.model_version,
                             num_tokens=NUM_TOKENS, train_loss=2.0)  # fmt: skip
    return client.stub.PushUpdate(
        update_messages(header, payload), metadata=((SESSION_METADATA, token),), timeout=timeout
    )


# ---- one trial --------------------------------------------------------------------------------
def trial(model: ModelConfig, nodes: int, args: argparse.Namespace, root: Path) -> Trial:
    port = free_port()
    config = root / "aggregator.toml"
    write_config(config, model, nodes, port, root / "state", args.server)
    agg = AggregatorProcess(config, root / "aggregator.log", port)
    clients: list[AggregatorClient] = []
    pool = ThreadPoolExecutor(max_workers=nodes, thread_name_prefix="node")
    try:
        agg.wait_serving(args.timeout)
        time.sleep(1.0)  # let start-up settle
        idle_rss, startup_peak = status_bytes(agg.pid, "VmRSS"), status_bytes(agg.pid, "VmHWM")
        reset_peak(agg.pid)

        tokens = []
        for i in range(nodes):
            clients.append(AggregatorClient(agg.address, f"org-{i}", rpc_timeout=args.timeout))
            tokens.append(clients[-1].join().session_token)
        tasks, _ = run_phase(pool, nodes, lambda i: until_train(clients[i], args.timeout),
                             args.timeout)  # fmt: skip
        if len({(t.round, t.model_version) for t in tasks}) != 1:
            raise BenchError("the clients were given different rounds or versions")

        def pull(i: int) -> dict[str, torch.Tensor] | int:
            tensors = clients[i].pull_model(tasks[i].model_version)
            return tensors if i == 0 else sum(t.nbytes for t in tensors.values())

        clock = CpuClock(agg.pid)
        pulled, pull_wall = run_phase(pool, nodes, pull, args.timeout, clock.start)
        pull_cpu = clock.elapsed()
        global_model = pulled[0]
        assert isinstance(global_model, dict)
        model_bytes = sum(t.nbytes for t in global_model.values())
        if any(p != model_bytes for p in pulled[1:]):
            raise BenchError("the clients pulled models of different sizes")
        del pulled
        peak_pull = status_bytes(agg.pid, "VmHWM")

        delta = small_delta(global_model)
        del global_model
        payload = encode(delta, clients[0].spec.chunk_bytes if clients[0].spec else 4 << 20)

        def push(i: int) -> pb.PushReply:
            if args.push_update:
                return clients[i].push_update(tasks[i].round, tasks[i].model_version, delta,
                                              num_tokens=NUM_TOKENS, train_loss=2.0)  # fmt: skip
            return push_payload(clients[i], tokens[i], tasks[i], payload, args.timeout)

        def upload_starts() -> None:
            reset_peak(agg.pid)
            clock.start()

        replies, push_wall = run_phase(pool, nodes, push, args.timeout, upload_starts)
        peak_upload, upload_cpu = status_bytes(agg.pid, "VmHWM"), clock.elapsed()
        reset_peak(agg.pid)
        pushed_at = time.perf_counter()
        if not all(r.complete for r in replies):
            raise BenchError("an upload was not complete")

        until_stop(clients[0], args.timeout)
        peak_commit = status_bytes(agg.pid, "VmHWM")
        commit_s = time.perf_counter() - pushed_at
        return Trial(
            model_bytes=model_bytes,
            upload_mbps=nodes * payload.manifest.total_bytes / push_wall / 1e6,
            pull_mbps=nodes * model_bytes / pull_wall / 1e6,
            pull_cpu=pull_cpu,
            upload_cpu=upload_cpu,
            commit_s=commit_s,
            idle_rss=idle_rss,
            startup_peak=startup_peak,
            peak_pull=peak_pull,
            peak_upload=peak_upload,
            peak_commit=peak_commit,
        )
    except BaseException:
        agg.stop()  # first, so that blocked clients fail fast
        print(f"--- aggregator log (last lines) ---\n{agg.log_tail()}", file=sys.stderr)
        raise
    finally:
        agg.stop()
        for client in clients:
            client.close()
        pool.shutdown(wait=True, cancel_futures=True)


# ---- main -------------------------------------------------------------------------------------
def run_trials(model: ModelConfig, params: int, n: int, args: argparse.Namespace) -> list[Trial]:
    trials = []
    for r in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="fedpt-bench-agg-", dir=args.tmp_dir) as tmp:
            need = (n + 5) * 4 * params  # spool + checkpoints (model + momentum, v0 and v1)
            if shutil.disk_usage(tmp).free < need:
                sys.exit(f"bench.aggregate: N={n} needs {need / 1e9:.1f} GB free in {tmp}")
            started = time.perf_counter()
            try:
                trials.append(trial(model, n, args, Path(tmp)))
            except (BenchError, grpc.RpcError, TransferError, CodecError, TimeoutError,
                    threading.BrokenBarrierError, OSError) as e:  # fmt: skip
                why = f"{e.code().name}: {e.details()}" if isinstance(e, grpc.Call) else e
                sys.exit(f"bench.aggregate: N={n}: {type(e).__name__}: {why}")
            print(f"  N={n} repeat {r + 1}/{args.repeats}: {time.perf_counter() - started:.1f}s",
                  file=sys.stderr, flush=True)  # fmt: skip
    return trials


def summary_rows(n: int, trials: list[Trial]) -> tuple[list, list, list]:
    """Medians over the repeats: the main row, the memory-by-phase row, the CPU row."""

    def med(f: Callable[[Trial], float]) -> float:
        return median([f(t) for t in trials])

    mb = trials[0].model_bytes
    spread = [(t.peak - t.idle_rss) / mb for t in trials]

    def x(f: Callable[[Trial], float]) -> str:  # a median as a multiple of the model
        return f"{med(f) / mb:.2f}"

    main_row = [n, mb / 1e6, med(lambda t: t.upload_mbps), med(lambda t: t.pull_mbps),
                med(lambda t: t.upload_cpu[0]), x(lambda t: t.idle_rss), x(lambda t: t.peak),
                x(lambda t: t.peak - t.idle_rss)]  # fmt: skip
    memory_row = [n, x(lambda t: t.startup_peak), x(lambda t: t.peak_pull - t.idle_rss),
                  x(lambda t: t.peak_upload - t.idle_rss), x(lambda t: t.peak_commit - t.idle_rss),
                  med(lambda t: t.commit_s),
                  f"{min(spread):.2f}–{max(spread):.2f}"]  # fmt: skip
    cpu_row = [n, med(lambda t: t.pull_cpu[0]), med(lambda t: t.pull_cpu[1]),
               med(lambda t: t.upload_cpu[0]), med(lambda t: t.upload_cpu[1])]  # fmt: skip
    return main_row, memory_row, cpu_row


def report(results: dict[int, list[Trial]]) -> None:
    main_rows, memory_rows, cpu_rows = zip(
        *(summary_rows(n, trials) for n, trials in results.items()), strict=True
    )
    print_table(["N", "model MB", "upload MB/s", "pull MB/s", "agg CPU s (upload)",
                 "idle RSS ×model", "peak RSS ×model", "peak − idle ×model"], list(main_rows))  # fmt: skip
    print("×model: the aggregator's resident memory divided by the model's fp32 bytes. "
          "Streaming aggregation should keep peak − idle roughly constant in N (the figure to "
          "watch); a design that buffers every upload would grow it by ~1×model per node.")  # fmt: skip
    print()
    print("where the peak is (×model): the start-up VmHWM (not in the peak above), and peak − idle")
    print(
        "per phase (each phase's VmHWM, reset at its start; commit starts at the RSS uploads left)"
    )
    header = ["N", "start-up peak", "join + pull", "upload", "commit", "commit s",
              "peak − idle, min–max"]  # fmt: skip
    print_table(header, list(memory_rows))
    print()
    print("CPU seconds per phase: the aggregator process, and the N clients (this process)")
    print_table(["N", "pull: aggregator", "pull: clients", "upload: aggregator",
                 "upload: clients"], list(cpu_rows))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", default="2,8,32", help="comma-separated values of N")
    parser.add_argument("--repeats", type=int, default=1, help="fresh aggregators per N")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--ffn-dim", type=int, default=2816)
    parser.add_argument("--push-update", action="store_true",
                        help="clients call push_update (re-encodes the delta per node)")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=300.0, help="limit of every wait (s)")
    parser.add_argument("--tmp-dir", type=Path, default=None, help="where state is spooled")
    parser.add_argument("--server", action="append", default=[], metavar="KEY=VALUE",
                        help="an aggregator.toml [server] setting (a TOML value), repeatable")  # fmt: skip
    args = parser.parse_args()
    try:
        args.server = {k: v for item in args.server for k, v in tomllib.loads(item).items()}
    except tomllib.TOMLDecodeError as e:
        parser.error(f"--server takes KEY=VALUE with a TOML value: {e}")
    try:
        node_counts = [int(n) for n in args.nodes.split(",")]
    except ValueError:
        parser.error(f"--nodes must be comma-separated integers, got {args.nodes!r}")
    if args.repeats < 1 or min(node_counts) < 1:
        parser.error("--repeats and every --nodes value must be at least 1")

    try:
        model = dataclasses.replace(preset("small"), dim=args.dim, n_layers=args.layers,
                                    n_heads=args.heads, ffn_dim=args.ffn_dim)  # fmt: skip
    except ConfigError as e:
        parser.error(str(e))
    params = model.with_vocab(BYTE_VOCAB).num_params()
    print(f"model: {params / 1e6:.2f}M params = {4 * params / 1e6:.1f} MB fp32 (d={args.dim}, "
          f"{args.layers} layers); N = {args.nodes}; {args.repeats} repeat(s); "
          f"{os.cpu_count()} cores; uploads via "
          f"{'push_update' if args.push_update else 'one pre-encoded payload'}"
          f"{''.join(f'; [server] {k} = {v!r}' for k, v in args.server.items())}", flush=True)  # fmt: skip
    report({n: run_trials(model, params, n, args) for n in node_counts})


if __name__ == "__main__":
    main()
