"""Control-plane load: 256 lightweight clients on loopback against a real aggregator; p50/p99
latency and the error count of every control RPC.

A real aggregator runs as its own process (`python -m fedpt aggregator serve`, plain text on
127.0.0.1; --tls adds a second run over mutual TLS, with a throwaway CA and one startup kit per
client). `[round] min_nodes` is far above the number of clients, so round 0 stays OPEN: no round
starts, no model moves and every call is a control RPC. The clients are threads without torch,
spread over --processes worker processes (this script in its worker mode), so that the clients'
GIL is not what is measured; each client has its own channel and TCP connection, as separate
nodes would. Three phases, each released at once in every worker:

  connect  each client opens its channel (TCP, plus the TLS handshake with --tls)
  join     every client calls Join at the same moment (for the aggregator, each Join is one
           SQLite transaction, fsynced, under the coordinator's lock)
  load     for --seconds each client loops GetTask(wait_seconds=0), GetUploadStatus(round=0);
           --long-pollers of them instead hold GetTask(wait_seconds=--long-poll-seconds) back
           to back, like idle nodes waiting for a round. A long poll holds one of the
           aggregator's gRPC threads ([server] max_workers) for its whole wait; gRPC Python
           queues calls beyond max_workers (the server sets no maximum_concurrent_rpcs, so it
           never answers RESOURCE_EXHAUSTED for that) and they wait for a free thread.

Clients call back to back, without think time: the load phase finds the aggregator's saturation
throughput, and a latency there is mostly queueing (≈ calls in flight / calls per second); a real
node long-polls once per 10 s. --max-workers 64 (the README's default) with the default 64
long-pollers shows short calls queueing behind long polls for a free thread.
Latencies are those of the calls that succeeded (perf_counter around the blocking call); failed
calls are counted by status code, and the client waits 0.1 s before its next call. A task other
than WAIT would mean a round started: it is counted as unexpected. From /proc/PID of the
aggregator: RSS once it serves (idle), VmHWM over join + load (peak), its peak thread count and
its CPU seconds per phase; the clients' CPU seconds come from each worker's getrusage.
--repeats R starts a fresh aggregator R times and quotes medians (errors: totals).

    python -m bench.load [--clients 256] [--seconds 20] [--long-pollers 64] [--repeats 1] [--tls]

--flood N measures one misbehaving node instead (plain text, --max-workers threads): a flooder
process joins as one node and keeps N GetTask(wait 10 s) calls open from N threads (each
re-asks after the WAIT's retry_after, as a node would), while this process, every 50 ms for
--seconds, joins a new node and runs a health check. Twice, side by side: with the per-node
limits (the defaults: max_calls_per_node 16, max_long_polls_per_node 2) and without them (0). Printed: p50
and p99 of Join and of the health check, their errors, and how many of the flooder's polls the
server answered at once (in < 5 s) instead of holding a thread.

    python -m bench.load --flood 300 [--max-workers 256] [--seconds 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import os
import queue
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import grpc

from fedpt.simulate import wait_until_serving
from protos import federation_pb2 as pb
from protos import federation_pb2_grpc as pb_grpc
from protos import pki

# A worker imports only grpc, the generated stubs and protos.pki: bench.common, bench.aggregate
# and node.client import torch, so the parent imports them in the functions that need them.
SESSION_METADATA = "x-fedpt-session"  # node.client.SESSION_METADATA, checked in main()
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]  # a connection per client, not shared
ERROR_BACKOFF_S = 0.1
UNREACHABLE_QUORUM = 100_000  # [round] min_nodes: no round ever starts
REPO_ROOT = Path(__file__).resolve().parents[1]
ROWS = (  # (phase, key, label) in table order
    ("join", "connect", "connect"),
    ("join", "join", "Join"),
    ("load", "get_task", "GetTask (wait 0)"),
    ("load", "upload_status", "GetUploadStatus"),
    ("load", "long_poll", "GetTask long poll *"),
)
LOAD_RPCS = ("get_task", "upload_status", "long_poll")


class BenchError(RuntimeError):
    """A trial did not complete; the message says which step and why."""


# ---- the worker: one process, many clients ----------------------------------------------------
@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """What the parent hands a worker (as JSON on its command line)."""

    address: str
    first: int  # index of its first client; clients are called load-NNNN
    count: int
    pollers: list[int]  # indices of its clients that long-poll
    long_poll_s: float
    seconds: float
    rpc_timeout: float
    phase_timeout: float  # longest wait for a phase's command or barrier
    budget_s: float  # the worker exits by itself after this long, whatever happens
    kits: list[str]  # one startup kit folder per client with --tls, else empty


class Recorder:
    """Per RPC: latencies (ms) of the calls that succeeded, status codes of those that failed."""

    def __init__(self) -> None:
        self.ms: dict[str, list[float]] = defaultdict(list)
        self.errors: dict[str, Counter[str]] = defaultdict(Counter)
        self.unexpected: Counter[str] = Counter()  # task kinds other than WAIT
        self.ends: dict[str, float] = {}  # time.monotonic() at the end of the last call
        self.message = ""  # the last GetTask message

    def call(self, rpc: str, method: Callable[..., Any], request: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            reply = method(request, **kwargs)
        except grpc.RpcError as e:
            self.errors[rpc][e.code().name if isinstance(e, grpc.Call) else "UNKNOWN"] += 1
            reply = None
        else:
            self.ms[rpc].append((time.perf_counter() - start) * 1e3)
        self.ends[rpc] = time.monotonic()
        return reply

    def task(self, task: pb.Task | None) -> None:
        if task is not None:
            if task.kind != pb.Task.WAIT:
                self.unexpected[pb.Task.Kind.Name(task.kind)] += 1
            self.message = task.message

    def to_json(self, recorders: list[Recorder]) -> dict:
        """This recorder merged with `recorders`, as plain JSON."""
        everyone = [self, *recorders]
        rpcs = sorted({k for r in everyone for k in (*r.ms, *r.errors)})
        return {
            "ms": {k: [round(x, 4) for r in everyone for x in r.ms.get(k, [])] for k in rpcs},
            "errors": {k: dict(sum((r.errors.get(k, Counter()) for r in everyone), Counter()))
                       for k in rpcs},
            "unexpected": dict(sum((r.unexpected for r in everyone), Counter())),
            "ends": {k: max(r.ends.get(k, 0.0) for r in everyone) for k in rpcs},
            "message": next((r.message for r in everyone if r.message), ""),
        }  # fmt: skip


@dataclasses.dataclass
class Phases:
    """What a worker's main thread and its client threads synchronise on."""

    connected: threading.Barrier
    joined: threading.Barrier
    join: threading.Event = dataclasses.field(default_factory=threading.Event)
    load: threading.Event = dataclasses.field(default_factory=threading.Event)
    load_until: float = 0.0  # time.monotonic()


def open_channel(address: str, kit: pki.StartupKit | None) -> grpc.Channel:
    if kit is None:
        return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    return grpc.secure_channel(address, pki.channel_credentials(kit), options=CHANNEL_OPTIONS)


def run_client(
    spec: WorkerSpec, index: int, kit: pki.StartupKit | None, phases: Phases, rec: Recorder
) -> None:
    channel = open_channel(spec.address, kit)
    try:
        start = time.perf_counter()
        try:
            grpc.channel_ready_future(channel).result(timeout=spec.rpc_timeout)
            rec.ms["connect"].append((time.perf_counter() - start) * 1e3)
        except grpc.FutureTimeoutError:
            rec.errors["connect"]["TIMEOUT"] += 1
        stub = pb_grpc.FederationStub(channel)
        phases.connected.wait()
        if not phases.join.wait(spec.phase_timeout):
            return
        caps = pb.Capabilities(num_devices=0, device_kind="cpu", fedpt_version="bench-load")
        request = pb.JoinRequest(organisation=f"load-{index:04d}", capabilities=caps)
        reply = rec.call("join", stub.Join, request, timeout=spec.rpc_timeout)
        metadata = ((SESSION_METADATA, reply.session_token),) if reply is not None else ()
        phases.joined.wait()
        if not phases.load.wait(spec.phase_timeout):
            return
        poll, no_wait = pb.TaskRequest(wait_seconds=spec.long_poll_s), pb.TaskRequest()
        status, poller = pb.UploadStatusRequest(round=0), index in spec.pollers
        while time.monotonic() < phases.load_until:
            if poller:
                task = rec.call("long_poll", stub.GetTask, poll, metadata=metadata,
                                timeout=spec.long_poll_s + spec.rpc_timeout)  # fmt: skip
                ok = task is not None
            else:
                task = rec.call("get_task", stub.GetTask, no_wait, metadata=metadata,
                                timeout=spec.rpc_timeout)  # fmt: skip
                reply = rec.call("upload_status", stub.GetUploadStatus, status,
                                 metadata=metadata, timeout=spec.rpc_timeout)  # fmt: skip
                ok = task is not None and reply is not None
            rec.task(task)
            if not ok:
                time.sleep(ERROR_BACKOFF_S)
    finally:
        channel.close()


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def worker_main(spec: WorkerSpec) -> int:
    """Protocol with the parent, one JSON object a line on stdout, one word a line on stdin:
    -> {"event": "ready"}, <- join, -> {"event": "joined"}, <- load, -> {"event": "result", ...}."""
    watchdog = threading.Timer(spec.budget_s, lambda: os._exit(3))
    watchdog.daemon = True
    watchdog.start()

    def say(message: dict) -> None:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

    def expect(command: str) -> None:
        line = sys.stdin.readline().strip()  # EOF (the parent went away) reads as ""
        if line != command:
            raise BenchError(
                f"worker {spec.first}: expected {command!r} from the parent, got {line!r}"
            )

    kits = [pki.load_kit(Path(k)) for k in spec.kits] or [None] * spec.count
    phases = Phases(threading.Barrier(spec.count + 1, timeout=spec.phase_timeout),
                    threading.Barrier(spec.count + 1, timeout=spec.phase_timeout))  # fmt: skip
    recorders = [Recorder() for _ in range(spec.count)]
    threads = [
        threading.Thread(target=run_client, args=(spec, spec.first + i, kits[i], phases, rec),
                         name=f"client-{spec.first + i}", daemon=True)
        for i, rec in enumerate(recorders)
    ]  # fmt: skip
    for thread in threads:
        thread.start()
    phases.connected.wait()
    say({"event": "ready"})
    expect("join")
    phases.join.set()
    phases.joined.wait()
    say({"event": "joined"})
    expect("load")
    cpu, start = own_cpu_seconds(), time.monotonic()
    phases.load_until = start + spec.seconds
    phases.load.set()
    give_up = phases.load_until + spec.long_poll_s + spec.rpc_timeout + 5
    for thread in threads:
        thread.join(timeout=max(0.0, give_up - time.monotonic()))
    if any(t.is_alive() for t in threads):
        raise BenchError(f"worker {spec.first}: clients still in a call {give_up - start:.0f}s on")
    result = {"event": "result", "load_s": time.monotonic() - start,
              "cpu_s": own_cpu_seconds() - cpu, **recorders[0].to_json(recorders[1:])}  # fmt: skip
    # Each RPC's span: the load's start to the end of its last call (long polls run past --seconds).
    result["spans"] = {k: end - start for k, end in result.pop("ends").items()}
    say(result)
    return 0


# ---- the parent: workers, the aggregator, /proc ------------------------------------------------
class Worker:
    """A worker process: commands go to its stdin, JSON events come back from its stdout."""

    def __init__(self, spec: WorkerSpec, stderr_path: Path) -> None:
        self.spec, self.stderr_path = spec, stderr_path
        self._stderr = open(stderr_path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.load", "--worker", json.dumps(dataclasses.asdict(spec))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True,
            cwd=REPO_ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True).start()

    def _read(self, stream: IO[str] | None) -> None:
        assert stream is not None
        for line in stream:
            self._lines.put(line)
        self._lines.put(None)

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        except OSError as e:
            raise BenchError(f"worker {self.spec.first} is gone ({e}):\n{self.tail()}") from e

    def expect(self, event: str, give_up: float) -> dict:
        try:
            line = self._lines.get(timeout=max(0.0, give_up - time.monotonic()))
        except queue.Empty:
            raise BenchError(
                f"worker {self.spec.first}: no {event!r} in time:\n{self.tail()}"
            ) from None
        if line is None:
            self.proc.wait(timeout=10)
            raise BenchError(f"worker {self.spec.first} exited with status {self.proc.returncode} "
                             f"before {event!r}:\n{self.tail()}")  # fmt: skip
        message = json.loads(line)
        if message.get("event") != event:
            raise BenchError(f"worker {self.spec.first}: expected {event!r}, got {line[:200]}")
        return message

    def stop(self) -> None:
        if self.proc.poll() is None:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._stderr.close()

    def tail(self, lines: int = 15) -> str:
        text = self.stderr_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:]) if text else "(it printed nothing on stderr)"


def every_worker(
    workers: list[Worker], event: str, timeout: float, command: str = ""
) -> list[dict]:
    """Send `command` (if any) to every worker, then wait for `event` from each."""
    for worker in workers:
        if command:
            worker.send(command)
    give_up = time.monotonic() + timeout
    return [worker.expect(event, give_up) for worker in workers]


class ThreadPeak(threading.Thread):
    """The highest thread count of a process (/proc/PID/status Threads), sampled every 0.1 s."""

    def __init__(self, pid: int) -> None:
        super().__init__(name="thread-peak", daemon=True)
        self.pid, self.peak, self._done = pid, 0, threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.1):
            try:
                text = Path(f"/proc/{self.pid}/status").read_text()
            except OSError:
                return
            threads = next(int(line.split()[1]) for line in text.splitlines()
                           if line.startswith("Threads:"))  # fmt: skip
            self.peak = max(self.peak, threads)

    def stop(self) -> int:
        self._done.set()
        if self.is_alive():
            self.join(timeout=5)
        return self.peak


def wait_serving(address: str, proc: subprocess.Popen, kit: pki.StartupKit | None,
                 timeout: float) -> None:  # fmt: skip
    """Poll grpc.health.v1 (over mutual TLS with a client's kit, when given) until SERVING."""
    with open_channel(address, kit) as channel:
        if wait_until_serving(channel, proc, timeout):
            return
    if proc.poll() is not None:
        raise BenchError(f"the aggregator exited with status {proc.returncode}")
    raise BenchError(f"the aggregator was not SERVING within {timeout:.0f}s")


@dataclasses.dataclass(frozen=True)
class Kits:
    """A throwaway federation CA's startup kits: the aggregator's and one per client."""

    aggregator: Path
    clients: list[Path]


def issue_kits(root: Path, clients: int) -> Kits:
    ca = pki.init_ca(root / "ca", name="bench.load throwaway CA", days=1)
    aggregator = pki.issue_kit(ca, "aggregator", root / "kits" / "aggregator",
                               server_hosts=["127.0.0.1"], days=1)  # fmt: skip
    return Kits(aggregator, [pki.issue_kit(ca, f"load-{i:04d}", root / "kits" / f"load-{i:04d}",
                                           days=1) for i in range(clients)])  # fmt: skip


def write_config(path: Path, port: int, state_dir: Path, args: argparse.Namespace,
                 kits: Kits | None) -> None:  # fmt: skip
    from bench.aggregate import toml_table

    long_poll = max(10.0, args.long_poll_seconds)  # the server's cap on a GetTask wait
    server: dict[str, object] = {
        "host": "127.0.0.1", "port": port, "max_workers": args.max_workers,
        "long_poll_seconds": long_poll,
    }  # fmt: skip
    server.update({"kit": str(kits.aggregator)} if kits else {"insecure": True})
    sections = {
        "server": server,
        "federation": {"name": "bench-load", "rounds": 1},
        "round": {"min_nodes": UNREACHABLE_QUORUM},
        "store": {"state_dir": str(state_dir)},
    }
    path.write_text("\n".join(toml_table(k, v) for k, v in sections.items()))


def worker_specs(address: str, args: argparse.Namespace, kits: Kits | None) -> list[WorkerSpec]:
    n, p = args.clients, args.long_pollers
    pollers = [i for i in range(n) if (i + 1) * p // n > i * p // n]  # spread evenly
    bounds = [n * w // args.processes for w in range(args.processes + 1)]
    budget = 4 * args.timeout + args.seconds + args.long_poll_seconds + args.rpc_timeout
    return [
        WorkerSpec(address, lo, hi - lo, [i for i in pollers if lo <= i < hi],
                   args.long_poll_seconds, args.seconds, args.rpc_timeout, args.timeout, budget,
                   [str(k) for k in kits.clients[lo:hi]] if kits else [])
        for lo, hi in itertools.pairwise(bounds) if hi > lo
    ]  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Trial:
    ms: dict[str, list[float]]  # RPC -> latencies (ms) of the calls that succeeded
    errors: dict[str, Counter[str]]  # RPC -> status code -> count
    unexpected: Counter[str]
    message: str
    join_s: float  # "join" sent -> every client has its reply
    load_s: float  # the longest worker's load phase (its last call's end)
    spans: dict[str, float]  # RPC -> load start to the end of its last call (longest worker)
    agg_cpu_join: float
    agg_cpu_load: float
    client_cpu_load: float
    idle_rss: int
    peak_rss: int
    peak_threads: int


def trial(args: argparse.Namespace, root: Path, kits: Kits | None) -> Trial:
    from bench.aggregate import AggregatorProcess, cpu_seconds, free_port, reset_peak, status_bytes

    port = free_port()
    config = root / "aggregator.toml"
    write_config(config, port, root / "state", args, kits)
    agg = AggregatorProcess(config, root / "aggregator.log", port)
    workers: list[Worker] = []
    peak_threads = ThreadPeak(agg.pid)
    try:
        probe_kit = pki.load_kit(kits.clients[0]) if kits else None
        wait_serving(agg.address, agg.proc, probe_kit, args.timeout)
        time.sleep(1.0)  # let start-up settle
        idle_rss = status_bytes(agg.pid, "VmRSS")
        reset_peak(agg.pid)
        for i, spec in enumerate(worker_specs(agg.address, args, kits)):
            workers.append(Worker(spec, root / f"worker-{i}.log"))
        every_worker(workers, "ready", args.timeout)
        peak_threads.start()

        cpu, start = cpu_seconds(agg.pid), time.perf_counter()
        every_worker(workers, "joined", args.timeout, command="join")
        join_s, agg_cpu_join = time.perf_counter() - start, cpu_seconds(agg.pid) - cpu

        cpu = cpu_seconds(agg.pid)
        wait = args.seconds + args.long_poll_seconds + args.rpc_timeout + args.timeout
        results = every_worker(workers, "result", wait, command="load")
        agg_cpu_load = cpu_seconds(agg.pid) - cpu
        peak_rss = status_bytes(agg.pid, "VmHWM")
        for worker in workers:
            worker.proc.wait(timeout=args.timeout)
        ms: dict[str, list[float]] = defaultdict(list)
        errors: dict[str, Counter[str]] = defaultdict(Counter)
        for result in results:
            for rpc, values in result["ms"].items():
                ms[rpc].extend(values)
            for rpc, codes in result["errors"].items():
                errors[rpc].update(codes)
        return Trial(
            ms=dict(ms),
            errors=dict(errors),
            unexpected=sum((Counter(r["unexpected"]) for r in results), Counter()),
            message=next((r["message"] for r in results if r["message"]), ""),
            join_s=join_s,
            load_s=max(r["load_s"] for r in results),
            spans={k: max(r["spans"].get(k, 0.0) for r in results) for k in ms.keys() | errors},
            agg_cpu_join=agg_cpu_join,
            agg_cpu_load=agg_cpu_load,
            client_cpu_load=sum(r["cpu_s"] for r in results),
            idle_rss=idle_rss,
            peak_rss=peak_rss,
            peak_threads=peak_threads.stop(),
        )
    except BaseException:
        agg.stop()  # first, so that clients blocked in a call fail fast
        for worker in workers:
            worker.stop()
            print(f"--- worker {worker.spec.first} stderr (last lines) ---\n{worker.tail()}",
                  file=sys.stderr)  # fmt: skip
        print(f"--- aggregator log (last lines) ---\n{agg.log_tail()}", file=sys.stderr)
        raise
    finally:
        peak_threads.stop()
        for worker in workers:
            worker.stop()
        agg.stop()


# ---- report -----------------------------------------------------------------------------------
def percentiles(values: list[float]) -> list[float]:
    """p50, p90, p99 and max of `values` (NaN when empty)."""
    import numpy as np

    if not values:
        return [float("nan")] * 4
    return [*np.percentile(np.asarray(values), [50, 90, 99]).tolist(), max(values)]


def nan_median(values: list[float]) -> float:
    finite = [v for v in values if v == v]
    return statistics.median(finite) if finite else float("nan")


def report(title: str, trials: list[Trial], args: argparse.Namespace) -> None:
    from bench.common import print_table

    def med(f: Callable[[Trial], float]) -> float:
        return nan_median([f(t) for t in trials])

    def calls(t: Trial, rpc: str) -> int:
        return len(t.ms.get(rpc, [])) + t.errors.get(rpc, Counter()).total()

    def rate(t: Trial, rpc: str) -> float:  # load RPCs only (a span runs from the load's start)
        return calls(t, rpc) / t.spans[rpc] if t.spans.get(rpc, 0.0) > 0 else 0.0

    rows: list[list[object]] = []
    for phase, rpc, label in ROWS:
        if not any(calls(t, rpc) for t in trials):
            continue
        shift = args.long_poll_seconds * 1e3 if rpc == "long_poll" else 0.0
        stats = [[v - shift for v in percentiles(t.ms.get(rpc, []))] for t in trials]
        rows.append([phase, label, round(statistics.median(calls(t, rpc) for t in trials)),
                     nan_median([rate(t, rpc) for t in trials]) if phase == "load" else "-",
                     sum(t.errors.get(rpc, Counter()).total() for t in trials),
                     *(_ms(nan_median([s[k] for s in stats])) for k in range(4))])  # fmt: skip
    load_calls = [sum(calls(t, r) for r in LOAD_RPCS) for t in trials]
    rows.append(["load", "all", round(statistics.median(load_calls)),
                 nan_median([sum(rate(t, r) for r in LOAD_RPCS) for t in trials]),
                 sum(t.errors.get(r, Counter()).total() for t in trials for r in LOAD_RPCS),
                 "", "", "", ""])  # fmt: skip
    print(f"{title}: median of {len(trials)} repeat(s); latency of the calls that succeeded")
    print_table(["phase", "rpc", "calls", "calls/s", "errors", "p50 ms", "p90 ms", "p99 ms",
                 "max ms"], rows)  # fmt: skip
    if args.long_pollers:
        print(f"* long polls (wait {args.long_poll_seconds:g} s): ms beyond the wait, i.e. "
              "latency − wait")  # fmt: skip
    codes = sum((c for t in trials for c in t.errors.values()), Counter())
    print("errors by code: "
          + (", ".join(f"{k} {v}" for k, v in codes.most_common()) or "none"))  # fmt: skip
    unexpected = sum((t.unexpected for t in trials), Counter())
    print(f"tasks other than WAIT: {', '.join(f'{k} {v}' for k, v in unexpected.items()) or 'none'}"
          f"; the last GetTask said: {trials[-1].message!r}")  # fmt: skip
    total_calls = nan_median([float(c) for c in load_calls])
    print(
        f"all {args.clients} joined in {med(lambda t: t.join_s):.2f} s (aggregator CPU "
        f"{med(lambda t: t.agg_cpu_join):.2f} s); load phase {med(lambda t: t.load_s):.1f} s"
    )
    print(f"aggregator: RSS idle {med(lambda t: t.idle_rss) / 2**20:.0f} MiB, peak "
          f"{med(lambda t: t.peak_rss) / 2**20:.0f} MiB "
          f"(+{med(lambda t: t.peak_rss - t.idle_rss) / 2**20:.0f}); peak threads "
          f"{med(lambda t: t.peak_threads):.0f} (max_workers {args.max_workers}; each long poll "
          "holds one)")  # fmt: skip
    agg_cpu, client_cpu, load_s = (med(lambda t: t.agg_cpu_load), med(lambda t: t.client_cpu_load),
                                   med(lambda t: t.load_s))  # fmt: skip
    print(f"CPU over the load phase: aggregator {agg_cpu:.1f} s ({agg_cpu / load_s:.2f} cores, "
          f"{1e3 * agg_cpu / max(total_calls, 1):.3f} ms per call), clients {client_cpu:.1f} s "
          f"({client_cpu / load_s:.2f} cores), of {os.cpu_count()} cores")  # fmt: skip


def _ms(value: float) -> object:
    return "-" if value != value else value  # NaN: no call succeeded


# ---- main -------------------------------------------------------------------------------------
# ---- one node's long-poll flood --------------------------------------------------------------
FLOOD_WAIT_S = 10.0  # each flooding GetTask asks to wait this long (the server's cap)
PROBE_EVERY_S = 0.05


def flooder_main(address: str, polls: int, seconds: float) -> int:
    """The flooding node: join, then `polls` threads re-ask GetTask(wait 10 s) until `seconds`
    have passed; prints how many calls the server held (≥ 5 s) and answered at once."""
    channel = open_channel(address, None)
    stub = pb_grpc.FederationStub(channel)
    reply = stub.Join(pb.JoinRequest(organisation="flooder"), timeout=30)
    metadata = ((SESSION_METADATA, reply.session_token),)
    until, counts, lock = time.monotonic() + seconds, Counter(), threading.Lock()
    print("joined", flush=True)

    def poll() -> None:
        request = pb.TaskRequest(wait_seconds=FLOOD_WAIT_S)
        while time.monotonic() < until:
            start = time.monotonic()
            try:
                task = stub.GetTask(request, metadata=metadata, timeout=FLOOD_WAIT_S + 30)
                pause = task.retry_after_seconds
            except grpc.RpcError:
                pause = ERROR_BACKOFF_S
            with lock:
                counts["held" if time.monotonic() - start >= FLOOD_WAIT_S / 2 else "quick"] += 1
            time.sleep(pause)

    threads = [threading.Thread(target=poll, daemon=True) for _ in range(polls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + FLOOD_WAIT_S + 60)
    print(json.dumps(dict(counts)), flush=True)
    channel.close()
    return 0


@dataclasses.dataclass(frozen=True)
class FloodTrial:
    limited: bool
    join_ms: list[float]
    health_ms: list[float]
    errors: Counter[str]
    polls: dict[str, int]


def flood_trial(args: argparse.Namespace, root: Path, limited: bool) -> FloodTrial:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from aggregator.handlers import SERVICE_NAME
    from bench.aggregate import AggregatorProcess, free_port, toml_table

    port = free_port()
    config = root / "aggregator.toml"
    server = {"host": "127.0.0.1", "port": port, "max_workers": args.max_workers,
              "long_poll_seconds": FLOOD_WAIT_S, "insecure": True,
              **({} if limited else {"max_long_polls_per_node": 0, "max_calls_per_node": 0})}  # fmt: skip
    sections = {"server": server, "federation": {"name": "bench-flood", "rounds": 1},
                "round": {"min_nodes": UNREACHABLE_QUORUM}, "store": {"state_dir": str(root / "state")}}  # fmt: skip
    config.write_text("\n".join(toml_table(k, v) for k, v in sections.items()))
    agg = AggregatorProcess(config, root / "aggregator.log", port)
    flooder = None
    try:
        agg.wait_serving(args.timeout)
        flooder = subprocess.Popen(
            [sys.executable, "-m", "bench.load", "--flooder", json.dumps([agg.address, args.flood, args.seconds + 3])],
            stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT,
        )  # fmt: skip
        if flooder.stdout is None or flooder.stdout.readline().strip() != "joined":
            raise BenchError("the flooder did not join")
        time.sleep(3.0)  # its polls reach the server and take their threads
        join_ms, health_ms, errors = [], [], Counter()
        with open_channel(agg.address, None) as channel:
            stub, health = pb_grpc.FederationStub(channel), health_pb2_grpc.HealthStub(channel)
            check = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
            until, n = time.monotonic() + args.seconds, 0
            while time.monotonic() < until:
                join = pb.JoinRequest(organisation=f"probe-{n:05d}")
                for name, call in (
                    ("Join", functools.partial(stub.Join, join, timeout=args.rpc_timeout)),
                    ("health", functools.partial(health.Check, check, timeout=args.rpc_timeout)),
                ):
                    start = time.perf_counter()
                    try:
                        call()
                        (join_ms if name == "Join" else health_ms).append(
                            (time.perf_counter() - start) * 1e3
                        )
                    except grpc.RpcError as e:
                        errors[f"{name} {e.code().name}"] += 1
                n += 1
                time.sleep(PROBE_EVERY_S)
        out, _ = flooder.communicate(timeout=args.seconds + FLOOD_WAIT_S + 120)
        polls = json.loads(out.strip().splitlines()[-1])
        return FloodTrial(limited, join_ms, health_ms, errors, polls)
    finally:
        if flooder is not None and flooder.poll() is None:
            flooder.kill()
        agg.stop()


def _median_over(trials: list[FloodTrial], pick: Callable[[FloodTrial], float]) -> float:
    return statistics.median(pick(t) for t in trials)


def _median_over(trials: list[FloodTrial], pick: Callable[[FloodTrial], float]) -> float:
    return statistics.median(pick(t) for t in trials)


def flood(args: argparse.Namespace) -> None:
    print(f"bench.load --flood: one node keeps {args.flood} GetTask(wait {FLOOD_WAIT_S:g} s) open "
          f"while another joins and health is checked every {PROBE_EVERY_S * 1e3:g} ms for "
          f"{args.seconds:g} s; aggregator max_workers {args.max_workers}; {os.cpu_count()} cores; "
          f"{args.repeats} repeat(s), medians", flush=True)  # fmt: skip
    trials: dict[bool, list[FloodTrial]] = {True: [], False: []}
    for r in range(args.repeats):
        for limited in (True, False):
            with tempfile.TemporaryDirectory(prefix="fedpt-bench-flood-", dir=args.tmp_dir) as tmp:
                trials[limited].append(flood_trial(args, Path(tmp), limited))
            print(f"  repeat {r + 1}/{args.repeats} {'with' if limited else 'without'} limits "
                  "done", file=sys.stderr, flush=True)  # fmt: skip
    print()
    print(f"{'per-node limits':<22}{'Join p50':>10}{'Join p99':>10}{'health p50':>12}"
          f"{'health p99':>12}{'polls answered at once':>24}{'errors':>8}")  # fmt: skip
    for limited, ts in trials.items():
        med = functools.partial(_median_over, ts)
        join50 = med(lambda t: percentiles(t.join_ms)[0])
        join99 = med(lambda t: percentiles(t.join_ms)[2])
        health50 = med(lambda t: percentiles(t.health_ms)[0])
        health99 = med(lambda t: percentiles(t.health_ms)[2])
        quick = med(lambda t: t.polls.get("quick", 0))
        errors = sum(sum(t.errors.values()) for t in ts)
        label = "on (defaults)" if limited else "off"
        print(f"{label:<22}{join50:>8.1f}ms{join99:>8.1f}ms{health50:>10.1f}ms{health99:>10.1f}ms"
              f"{quick:>24.0f}{errors:>8}")  # fmt: skip
    on, off = trials[True], trials[False]
    ratio = statistics.median(percentiles(t.join_ms)[2] for t in off) / max(
        statistics.median(percentiles(t.join_ms)[2] for t in on), 1e-9
    )
    print(f"Join p99 without / with the limits: {ratio:.1f}x")


def run_mode(args: argparse.Namespace, kits: Kits | None) -> list[Trial]:
    from bench.aggregate import BenchError as AggregateBenchError  # its /proc readers raise it

    name = "mutual TLS" if kits else "plain text"
    trials = []
    for r in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="fedpt-bench-load-", dir=args.tmp_dir) as tmp:
            started = time.perf_counter()
            try:
                trials.append(trial(args, Path(tmp), kits))
            except (BenchError, AggregateBenchError, OSError, grpc.RpcError, pki.PKIError,
                    subprocess.SubprocessError, json.JSONDecodeError) as e:  # fmt: skip
                sys.exit(f"bench.load ({name}): {type(e).__name__}: {e}")
        print(f"  {name} repeat {r + 1}/{args.repeats}: {time.perf_counter() - started:.1f}s",
              file=sys.stderr, flush=True)  # fmt: skip
    return trials


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=256)
    parser.add_argument("--processes", type=int, default=4, help="client worker processes")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the load phase")
    parser.add_argument("--long-pollers", type=int, default=64,
                        help="clients that long-poll GetTask instead of short RPCs")  # fmt: skip
    parser.add_argument("--long-poll-seconds", type=float, default=2.0)
    parser.add_argument("--max-workers", type=int, default=300, help="aggregator gRPC threads")
    parser.add_argument("--repeats", type=int, default=1, help="fresh aggregators per mode")
    parser.add_argument("--tls", action="store_true", help="also measure over mutual TLS")
    parser.add_argument("--rpc-timeout", type=float, default=30.0, help="deadline of a call (s)")
    parser.add_argument("--timeout", type=float, default=120.0, help="limit of every other wait")
    parser.add_argument("--tmp-dir", type=Path, default=None, help="aggregator state and kits")
    parser.add_argument("--flood", type=int, default=0,
                        help="measure one node holding this many long polls instead")  # fmt: skip
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # a worker process's spec (JSON)
    parser.add_argument("--flooder", help=argparse.SUPPRESS)  # [address, polls, seconds]
    args = parser.parse_args()
    if args.worker:
        sys.exit(worker_main(WorkerSpec(**json.loads(args.worker))))
    if args.flooder:
        sys.exit(flooder_main(*json.loads(args.flooder)))
    if args.flood:
        if args.max_workers < 4 or args.seconds <= 0 or args.repeats < 1:
            parser.error("--max-workers ≥ 4, --seconds > 0, --repeats ≥ 1")
        flood(args)
        return
    if not 1 <= args.clients < UNREACHABLE_QUORUM or not 0 <= args.long_pollers <= args.clients:
        parser.error(
            f"need 1 ≤ --clients < {UNREACHABLE_QUORUM} and 0 ≤ --long-pollers ≤ --clients"
        )
    if args.processes < 1 or args.repeats < 1 or args.seconds <= 0 or args.max_workers < 4:
        parser.error("--processes, --repeats ≥ 1, --seconds > 0, --max-workers ≥ 4")
    if not 0 < args.long_poll_seconds <= 10:
        parser.error("--long-poll-seconds must be in (0, 10]")

    from node.client import SESSION_METADATA as NODE_SESSION_METADATA

    assert SESSION_METADATA == NODE_SESSION_METADATA
    busy = args.clients - args.long_pollers
    print(f"bench.load: {args.clients} clients in {min(args.processes, args.clients)} processes "
          f"({busy} loop GetTask(wait 0) + GetUploadStatus(round 0), {args.long_pollers} "
          f"long-poll GetTask(wait {args.long_poll_seconds:g} s)) for {args.seconds:g} s; "
          f"aggregator max_workers {args.max_workers}, min_nodes {UNREACHABLE_QUORUM} (no round "
          f"starts); {os.cpu_count()} cores shared by the aggregator and the clients",
          flush=True)  # fmt: skip
    results = {"plain text": run_mode(args, None)}
    if args.tls:
        with tempfile.TemporaryDirectory(prefix="fedpt-bench-load-kits-", dir=args.tmp_dir) as tmp:
            started = time.perf_counter()
            kits = issue_kits(Path(tmp), args.clients)
            issued = time.perf_counter() - started
            print(f"  issued {args.clients + 1} startup kits in {issued:.1f}s", file=sys.stderr,
                  flush=True)  # fmt: skip
            results["mutual TLS"] = run_mode(args, kits)
    for title, trials in results.items():
        print()
        report(title, trials, args)


if __name__ == "__main__":
    main()
