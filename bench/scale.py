"""Rounds at scale over loopback, per delta encoding: a real aggregator process and real node
processes exchanging synthetic deltas (no training), with secure aggregation on and off.

For each (preset, nodes, encoding) a fresh aggregator runs as its own process (`python -m fedpt
aggregator serve --config ...` on 127.0.0.1; plain text for fp32 / bf16 / int8, mutual TLS with
a throwaway CA and one startup kit per organisation for masked-int32 / -16 / -8), for --repeats
rounds with exactly --nodes nodes and the --outer optimizer (fedavg by default: no outer state
in the aggregator's memory). Each node is a process (bench/scale_node.py) doing what
node/participant.py does minus training: join, long-poll GetTask, the secure-aggregation stages,
pull the model, draw a random fp32 Δ of its shapes (N(0,1) · 1e-3: random, never constant,
since a transport that deduplicates would flatter constant data), encode it into a spool file
with protos.delta_encoding.encode_update_in_place and push it with AggregatorClient.push_payload.

This process runs a prober that, at 20 Hz each, calls GetTask(wait_seconds=0) as node 0 (its
session token, or its certificate under mutual TLS: GetTask only reads state, so the prober does
not change the round) and grpc.health.v1 Check. A GetTask reply carries the aggregator's current
model version, which is how a commit is seen (also by the nodes' long polls; the earlier wins).

Per round (medians over the rounds of a row are printed; every round is in --out's JSON):
  up B/p        upload bytes on the wire per parameter: the update manifest's total_bytes / params
  down B/p      download bytes per parameter: the chunk bytes a node's pull received / params;
                with --download-encoding bf16 | int8 a node holding the last version gets the
                outer update instead ("down as": update; round 0 always pulls the model)
  node ×M       a node's peak RSS (VmHWM from TRAIN to its push complete) / the model's fp32 bytes
  node extra ×M (that peak − the node's RSS after Join − the most it holds on purpose: model +
                delta, or the delta alone with --free-model) / model bytes, and in MB: the
                encoder's and the transport's own memory (encoding pieces, gRPC buffers, heap
                glibc keeps after a free). Worst node; "peak in" names the phase of its peak
                (pull, draw, encode, push; each phase's VmHWM is read and reset at its end).
  agg ×M        the aggregator's peak RSS over the round (VmHWM, reset when the last version
                was seen committed) / model bytes; agg idle ×M: its RSS before round 0
  round s       from the first node's GetTask TRAIN to the new version committed (seen served),
                minus the slowest node's time drawing its random delta (it stands in for
                training, which is not what is measured)
  accum MB/s    upload bytes of all nodes / (last upload complete − first chunk sent): the rate
                into the aggregator's streaming accumulator
  commit s      last upload complete → new version served (secure: includes the unmask stage)
  p99 ms        of the prober's GetTask and health calls overlapping a commit window (last upload
                complete → new version served), pooled over the rounds; and over the whole row
Targets are printed next to the figures (✓ / ✗). A row that fails (e.g. an encoding the
aggregator does not accept yet) is reported with the reason, and the other rows go on.

Memory (M = the model's fp32 bytes; plus ~0.45 GiB per process for Python, torch and gRPC): a
node holds the pulled model and its delta (2 M; 1 M with --free-model, which `auto` picks when
2 M per node does not fit), the aggregator its model, the running sum and, while committing, the
mean and the new model (planned as 4 M with fedavg, 5 M nesterov, 6 M adam; measured on this
tree with fedavg: a peak of 3.0 M in all at 512 MiB, 3.1-3.4 M beyond its idle process at
128 MiB). Before starting, the bench adds these up and refuses (one line, exit 2) a
configuration that does not fit in the memory available (default: MemAvailable, at most 24 GiB;
--memory-gib overrides). On a 24 GiB machine:
  350m (360M params, M = 1.44 GB) × 4 nodes: aggregator ~5.8 GiB + 4 × ~3.3 GiB (model kept) ≈
        19.6 GiB; with less than that available, `auto` frees the model (4 × ~2.0 GiB): fits.
  1b (1.10B params, M = 4.40 GB) × 2 nodes: aggregator ~16.8 GiB + 2 × ~5.2 GiB even with the
        model freed ≈ 27.6 GiB: refused (with an aggregator at the 3 M target it would be
        ~23.5 GiB, still more than a shared 24 GiB machine has available).
  --params-mib 512 (135M params) × 2 nodes: ~6 GiB: fits (the Flower comparison round).
Disk: the aggregator spools every upload and keeps checkpoints; the nodes spool their update.

    python -m bench.scale --preset small --nodes 2 --encodings fp32,masked-int32 --repeats 3
    python -m bench.scale --params-mib 512 --nodes 2 --encodings fp32      # vs Flower's ~114 s
    python -m bench.scale --preset 350m --nodes 4 --out runs/scale-350m
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aggregator.handlers import SERVICE_NAME
from bench.aggregate import AggregatorProcess, free_port, toml_table
from bench.common import (
    empty_run_folder,
    median,
    meminfo_bytes,
    print_table,
    proc_status_bytes,
    reset_peak_rss,
)
from fedpt.simulate import wait_until_serving
from model.config import PRESETS, ConfigError, ModelConfig, preset
from model.tokenizer import SPECIAL_TOKENS
from protos import federation_pb2 as pb
from protos import federation_pb2_grpc as pb_grpc
from protos import pki
from protos.delta_encoding import (
    ENCODINGS,
    PLAIN_ENCODINGS,
    RING_BITS,
    is_secure,
    wire_bytes_per_param,
)

GIB = 1 << 30
BYTE_VOCAB = 320  # the byte-level tokenizer's 259 tokens, rounded up to 64
PROBE_HZ = 20.0
TICKER_FAILURES = 50  # identical "round ticker:" errors in a row (5 s) mean a stuck round
PROCESS_BASE = int(0.45 * GIB)  # interpreter + torch + gRPC, per process (measured ~0.35 GiB)
# Model-sized buffers the aggregator holds at its peak (commit): model, running sum, mean, new
# model (+ outer state); measured on this tree, rounded up. See the module docstring.
AGGREGATOR_MODELS = {"fedavg": 4.0, "nesterov": 5.0, "adam": 6.0}
NODE_SLACK = 0.15  # a node's buffers beyond what it holds on purpose, × model (pieces, gRPC)
TARGETS = {
    "node_extra": 0.25,  # secure-path node memory beyond model + delta, × model
    "agg_peak": 3.0,  # aggregator peak RSS, × model
    "p99_commit_ms": 100.0,  # GetTask(wait_seconds=0) p99 while a commit runs
    "int8_bpp": 1.05,  # plain int8 upload bytes per parameter
    "secure_bpp": 2.1,  # secure upload bytes per parameter
    "accum_mbps": 500.0,  # MB/s into the accumulator
    "flower_speedup": 10.0,  # the 512 MiB 2-node fp32 round vs Flower 1.41
}


class BenchError(RuntimeError):
    """A row did not complete; the message says where and why."""


# ---- the model -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Shape:
    label: str
    model: ModelConfig  # with the vocabulary the aggregator will use

    @property
    def params(self) -> int:
        return self.model.num_params()

    @property
    def model_bytes(self) -> int:
        return 4 * self.params

    @property
    def needs_tokenizer(self) -> bool:
        # Without a tokenizer the aggregator uses the byte-level one (320 ids): a preset's own
        # vocabulary needs a tokenizer of that size (bench.scale writes a synthetic one).
        return self.model.vocab_size > BYTE_VOCAB


def shape_for_mib(mib: float) -> ModelConfig:
    """A LLaMA-style shape (byte vocabulary) whose fp32 size is about `mib` MiB: the narrowest
    width that needs at most 24 layers, then the SwiGLU width trimmed to land near the target."""
    target = int(mib * (1 << 20) / 4)
    for dim in (128, 256, 512, 1024, 2048, 4096):
        ffn = -(-int(2.75 * dim) // 64) * 64
        base = ModelConfig(vocab_size=BYTE_VOCAB, dim=dim, n_layers=1, n_heads=max(1, dim // 64),
                           ffn_dim=ffn)  # fmt: skip
        per_layer = 4 * dim * dim + 3 * dim * ffn + 2 * dim  # attention, SwiGLU, norms
        layers = max(1, round((target - BYTE_VOCAB * dim - dim) / per_layer))
        if layers <= 24 or dim == 4096:
            fixed = BYTE_VOCAB * dim + dim + layers * (4 * dim * dim + 2 * dim)
            ffn = max(64, round((target - fixed) / (3 * dim * layers) / 64) * 64)
            return dataclasses.replace(base, n_layers=layers, ffn_dim=ffn)
    raise AssertionError("unreachable")


def shapes_from_args(args: argparse.Namespace) -> list[Shape]:
    if args.params_mib is not None:
        model = shape_for_mib(args.params_mib)
        return [Shape(f"{args.params_mib:g}MiB", model)]
    overrides = {k: v for k, v in (("dim", args.dim), ("n_layers", args.layers),
                                   ("n_heads", args.heads), ("ffn_dim", args.ffn_dim)) if v}  # fmt: skip
    shapes = []
    for name in args.preset.split(","):
        model = dataclasses.replace(preset(name), **overrides)
        if not model.vocab_size > BYTE_VOCAB:
            model = dataclasses.replace(model, vocab_size=BYTE_VOCAB)
        shapes.append(Shape(name + ("*" if overrides else ""), model))
    return shapes


def write_synthetic_tokenizer(path: Path, vocab_size: int) -> None:
    """A word-level tokenizer JSON with `vocab_size` ids (never used to tokenize: it only gives
    the aggregator's model the preset's vocabulary, hence its parameter count)."""
    from tokenizers import Tokenizer, models

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"t{i}": i for i in range(len(vocab), vocab_size)})
    path.write_text(Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS[-1])).to_str())


# ---- what fits -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Plan:
    shape: Shape
    nodes: int
    free_model: bool
    memory: int  # bytes of RAM needed, all processes
    aggregator: int
    per_node: int
    disk: int  # bytes of disk needed by the largest row

    def describe(self) -> str:
        return (f"{self.shape.label} × {self.nodes} nodes needs ~{self.memory / GIB:.1f} GiB "
                f"(aggregator ~{self.aggregator / GIB:.1f}, {self.nodes} × "
                f"~{self.per_node / GIB:.1f} per node{', model freed' if self.free_model else ''})")  # fmt: skip


def plan(shape: Shape, nodes: int, outer: str, free_model: str, limit: int,
         encodings: list[str], download: str) -> Plan:  # fmt: skip
    m = shape.model_bytes
    aggregator = PROCESS_BASE + int(AGGREGATOR_MODELS[outer] * m)
    if download != "fp32":  # the outer update, encoded, is served besides the model
        aggregator += int(wire_bytes_per_param(download, shape.params) * shape.params)

    def need(free: bool) -> tuple[int, int]:
        per_node = PROCESS_BASE + int(((1.0 if free else 2.0) + NODE_SLACK) * m)
        return aggregator + nodes * per_node + PROCESS_BASE, per_node  # + this process

    # A compressed download is added into the model a node kept: it cannot free it.
    free = download == "fp32" and (
        free_model == "yes" or (free_model == "auto" and need(False)[0] > limit)
    )
    memory, per_node = need(free)
    wire = max(wire_bytes_per_param(e, shape.params) for e in encodings) * shape.params
    outer_state = {"fedavg": 0, "nesterov": 1, "adam": 2}[outer]
    # Spools: every upload at the aggregator and at its node; checkpoints: ≤ 3 versions.
    disk = int(2 * nodes * wire + 3 * (1 + outer_state) * m)
    return Plan(shape, nodes, free, memory, aggregator, per_node, disk)


# ---- the aggregator's configuration ------------------------------------------------------------
def write_config(path: Path, shape: Shape, nodes: int, encoding: str, args: argparse.Namespace,
                 port: int, state_dir: Path, kit: Path | None, tokenizer: Path | None) -> None:  # fmt: skip
    model = {k: v for k, v in shape.model.to_dict().items() if v is not None}
    del model["vocab_size"]  # the aggregator takes it from the tokenizer
    server: dict[str, object] = {"host": "127.0.0.1", "port": port, "long_poll_seconds": 2.0,
                                 "stop_linger_seconds": 5.0}  # fmt: skip
    server |= {"kit": str(kit)} if kit else {"insecure": True}
    federation: dict[str, object] = {"name": "bench-scale", "rounds": args.repeats,
                                     "inner_steps": 1, "delta_encoding": encoding,
                                     "download_encoding": args.download_encoding}  # fmt: skip
    if tokenizer is not None:
        federation["tokenizer"] = str(tokenizer)
    sections: dict[str, dict[str, object]] = {
        "server": server,
        "federation": federation,
        "model": model,
        "round": {"min_nodes": nodes, "max_nodes": nodes, "timeout_seconds": args.timeout,
                  "start_grace_seconds": 0.2},
        "outer": {"name": args.outer},
        "store": {"state_dir": str(state_dir), "keep_checkpoints": 1},
    }  # fmt: skip
    if is_secure(encoding):
        # The random deltas are N(0, 1e-3²): a public bound of 0.01 never clips them (6σ), and
        # keeps narrow rings' quantization steps as fine as a realistic bound would.
        sections["secagg"] = {"clip": 0.01, "stage_timeout_seconds": min(600.0, args.timeout)}
    path.write_text("\n".join(toml_table(k, v) for k, v in sections.items()))


def make_kits(root: Path, nodes: int) -> tuple[Path, list[Path]]:
    """A throwaway federation CA, the aggregator's kit (serving 127.0.0.1) and one per node."""
    pki.init_ca(root / "ca")
    aggregator = pki.issue_kit(root / "ca", "aggregator", root / "aggregator",
                               server_hosts=["127.0.0.1"])  # fmt: skip
    return aggregator, [
        pki.issue_kit(root / "ca", f"org-{i}", root / f"org-{i}") for i in range(nodes)
    ]


def open_channel(address: str, kit: Path | None) -> grpc.Channel:
    if kit is None:
        return grpc.insecure_channel(address)
    return grpc.secure_channel(address, pki.channel_credentials(pki.load_kit(kit)))


# ---- the prober -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Sample:
    rpc: str  # "gettask" | "health"
    start: float  # time.monotonic()
    end: float
    ok: bool
    version: int  # GetTask: the model version the reply names; STOP: a large number; else -1

    @property
    def ms(self) -> float:
        return 1000 * (self.end - self.start)


STOPPED = 1 << 62


class Prober:
    """Two threads, each one call every 1/PROBE_HZ s (back to back when a call takes longer)."""

    def __init__(self, channel: grpc.Channel, token: str) -> None:
        self.samples: list[Sample] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._stub = pb_grpc.FederationStub(channel)
        self._health = health_pb2_grpc.HealthStub(channel)
        self._metadata = (("x-fedpt-session", token),)
        self._threads = [threading.Thread(target=self._loop, args=(rpc,), daemon=True, name=rpc)
                         for rpc in ("gettask", "health")]  # fmt: skip

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=10)

    def _call(self, rpc: str) -> tuple[bool, int]:
        if rpc == "health":
            reply = self._health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                                       timeout=5.0)  # fmt: skip
            return reply.status == health_pb2.HealthCheckResponse.SERVING, -1
        task = self._stub.GetTask(pb.TaskRequest(wait_seconds=0.0), metadata=self._metadata,
                                  timeout=5.0)  # fmt: skip
        return True, STOPPED if task.kind == pb.Task.STOP else task.model_version

    def _loop(self, rpc: str) -> None:
        period = 1.0 / PROBE_HZ
        while not self._stop.is_set():
            start = time.monotonic()
            try:
                ok, version = self._call(rpc)
            except grpc.RpcError:
                ok, version = False, -1
            end = time.monotonic()
            with self._lock:
                self.samples.append(Sample(rpc, start, end, ok, version))
            self._stop.wait(max(0.0, period - (end - start)))

    def version(self) -> int:
        """The newest model version a GetTask reply named (STOPPED after the last round)."""
        with self._lock:
            seen = [s.version for s in self.samples if s.rpc == "gettask" and s.ok]
        return max(seen, default=-1)

    def seen_after(self, version: int) -> float:
        """When a GetTask reply first named a version newer than `version` (inf: never)."""
        with self._lock:
            ends = [s.end for s in self.samples if s.rpc == "gettask" and s.version > version]
        return min(ends, default=math.inf)


def p99(samples: list[Sample]) -> float:
    ok = [s.ms for s in samples if s.ok]
    return float(np.percentile(ok, 99)) if ok else math.nan


def overlapping(
    samples: list[Sample], rpc: str, windows: list[tuple[float, float]]
) -> list[Sample]:
    return [
        s for s in samples if s.rpc == rpc and any(s.start < b and s.end > a for a, b in windows)
    ]


# ---- one row: (shape, nodes, encoding) ----------------------------------------------------------
@dataclasses.dataclass
class RoundFigures:
    version: int
    up_bpp: float
    down_bpp: float
    down_update: bool  # every node got the outer update (not the whole model)
    node_peak_x: float  # worst node
    node_extra_x: float  # worst node, worst phase
    node_extra_mb: float
    node_extra_phase: str  # the phase of that node's peak: pull, draw, encode or push
    agg_peak_x: float
    round_s: float
    draw_s: float  # the slowest node's random-delta drawing, left out of round_s
    pull_s: float  # the slowest node's pull
    encode_s: float  # the slowest node's encoding
    accum_mbps: float
    commit_s: float
    commit_window: tuple[float, float]


@dataclasses.dataclass
class RowResult:
    shape: str
    nodes: int
    encoding: str
    free_model: bool
    model_bytes: int
    params: int = 0
    agg_idle_x: float = math.nan
    rounds: list[RoundFigures] = dataclasses.field(default_factory=list)
    p99_commit_gettask_ms: float = math.nan
    p99_commit_health_ms: float = math.nan
    commit_samples: int = 0
    p99_all_gettask_ms: float = math.nan
    p99_all_health_ms: float = math.nan
    failed_probes: int = 0
    error: str = ""
    seconds: float = 0.0

    def med(self, name: str) -> float:
        values = [getattr(r, name) for r in self.rounds]
        return median(values) if values else math.nan

    def down(self) -> tuple[float, str]:
        """Download B/p: the median over the rounds that came as an outer update, if any (the
        first round always pulls the whole model), else over all rounds."""
        updates = [r.down_bpp for r in self.rounds if r.down_update]
        if updates:
            return median(updates), "update"
        return self.med("down_bpp"), "model" if self.rounds else "–"


class Row:
    """Runs one aggregator and its nodes for --repeats rounds in `root`, then cleans up."""

    def __init__(self, plan_: Plan, encoding: str, args: argparse.Namespace, root: Path,
                 kits: tuple[Path, list[Path]] | None, tokenizer: Path | None) -> None:  # fmt: skip
        self.plan, self.encoding, self.args, self.root = plan_, encoding, args, root
        self.kits, self.tokenizer = kits, tokenizer
        self.result = RowResult(plan_.shape.label, plan_.nodes, encoding, plan_.free_model,
                                plan_.shape.model_bytes)  # fmt: skip
        self.nodes: list[subprocess.Popen] = []
        self.node_logs: list = []
        self.agg: AggregatorProcess | None = None
        self.prober: Prober | None = None
        self.channel: grpc.Channel | None = None
        self.agg_peaks: dict[int, int] = {}
        self._next_log_check = 0.0

    @property
    def secure(self) -> bool:
        return is_secure(self.encoding)

    def run(self) -> RowResult:
        started = time.monotonic()
        try:
            self._run()
        except (BenchError, grpc.RpcError, OSError, TimeoutError) as e:
            why = f"{e.code().name}: {e.details()}" if isinstance(e, grpc.Call) else str(e)
            self.result.error = why.strip().splitlines()[-1] if why.strip() else type(e).__name__
        finally:
            self._cleanup()
            self.result.seconds = time.monotonic() - started
        return self.result

    def _run(self) -> None:
        args, n = self.args, self.plan.nodes
        give_up = time.monotonic() + args.timeout
        port = free_port()
        agg_kit = self.kits[0] if self.secure and self.kits else None
        node_kits = self.kits[1][:n] if self.secure and self.kits else [None] * n
        config = self.root / "aggregator.toml"
        write_config(config, self.plan.shape, n, self.encoding, args, port, self.root / "state",
                     agg_kit, self.tokenizer)  # fmt: skip
        self.agg = AggregatorProcess(config, self.root / "aggregator.log", port)
        address = self.agg.address
        with open_channel(address, node_kits[0]) as channel:
            if not wait_until_serving(channel, self.agg.proc, min(600.0, args.timeout)):
                raise BenchError(f"aggregator: {self._agg_failure()}")
        time.sleep(0.5)  # let start-up settle before the idle reading
        idle = proc_status_bytes(self.agg.pid, "VmRSS")
        self.result.agg_idle_x = idle / self.plan.shape.model_bytes
        reset_peak_rss(self.agg.pid)

        token_file = self.root / "node-0.token"
        for i in range(n):
            self._start_node(i, address, node_kits[i], token_file if i == 0 else None)
        while not token_file.is_file() or not token_file.read_text():
            self._check_alive(give_up)
            time.sleep(0.05)
        self.channel = open_channel(address, node_kits[0])
        self.prober = Prober(self.channel, token_file.read_text())
        self.prober.start()
        self._follow_rounds(give_up)
        self.prober.stop()
        self._collect()

    def _start_node(self, i: int, address: str, kit: Path | None, token_file: Path | None) -> None:
        log = open(self.root / f"node-{i}.log", "wb")  # noqa: SIM115 (closed in _cleanup)
        self.node_logs.append(log)
        cmd = [sys.executable, "-m", "bench.scale_node", "--address", address,
               "--organisation", f"org-{i}", "--records", str(self.root / f"node-{i}.jsonl"),
               "--spool", str(self.root / f"node-{i}"), "--timeout", str(self.args.timeout)]  # fmt: skip
        cmd += ["--kit", str(kit)] if kit else []
        cmd += ["--token-file", str(token_file)] if token_file else []
        cmd += ["--free-model"] if self.plan.free_model else []
        self.nodes.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL,
                                           env={**os.environ, "PYTHONUNBUFFERED": "1"}))  # fmt: skip

    def _follow_rounds(self, give_up: float) -> None:
        """Until every node has exited (after STOP): at each commit seen, the aggregator's peak
        RSS of that round, then a reset for the next."""
        assert self.prober is not None and self.agg is not None
        version = 0
        while any(p.poll() is None for p in self.nodes):
            self._check_alive(give_up)
            seen = self.prober.version()
            if seen > version and version < self.args.repeats:
                self.agg_peaks[version] = proc_status_bytes(self.agg.pid, "VmHWM")
                reset_peak_rss(self.agg.pid)
                version = min(seen, self.args.repeats)
            time.sleep(0.02)
        self._check_alive(give_up)

    def _check_alive(self, give_up: float) -> None:
        assert self.agg is not None
        for i, p in enumerate(self.nodes):
            if p.poll() not in (None, 0):
                raise BenchError(f"node org-{i}: {self._node_failure(i)}")
        if time.monotonic() > give_up:
            raise TimeoutError(
                f"the row ran past --timeout {self.args.timeout:.0f}s; the aggregator's last "
                f"line: {self.agg.log_tail(1)}"
            )
        if time.monotonic() > self._next_log_check:
            self._next_log_check = time.monotonic() + 1.0
            self._check_ticker()
        if self.agg.proc.poll() is not None and any(p.poll() is None for p in self.nodes):
            raise BenchError(f"aggregator: {self._agg_failure()}")

    def _check_ticker(self) -> None:
        """The aggregator's round ticker logs an exception and retries every 0.1 s: the same
        error for TICKER_FAILURES ticks in a row means the round cannot move (say, an encoding
        the aggregator cannot aggregate yet), so the row fails now instead of at --timeout."""
        assert self.agg is not None
        tail = self.agg.log_path.read_text(errors="replace").splitlines()[-TICKER_FAILURES:]
        if len(tail) == TICKER_FAILURES and len(set(tail)) == 1 and "round ticker:" in tail[0]:
            raise BenchError(f"aggregator stuck: {tail[0].strip()}")

    def _node_failure(self, i: int) -> str:
        for record in _read_jsonl(self.root / f"node-{i}.jsonl"):
            if "error" in record:
                return record["error"]
        tail = (self.root / f"node-{i}.log").read_text(errors="replace").strip().splitlines()
        return tail[-1] if tail else f"exited with status {self.nodes[i].returncode}"

    def _agg_failure(self) -> str:
        assert self.agg is not None
        lines = self.agg.log_path.read_text(errors="replace").splitlines()
        for line in reversed(lines):  # the last error line says most
            if "error" in line.lower() or "failed" in line.lower():
                return line.strip()
        status = self.agg.proc.poll()
        return f"exited with status {status}" if status is not None else "not SERVING in time"

    def _collect(self) -> None:
        assert self.prober is not None
        m = self.plan.shape.model_bytes
        records: dict[int, list[dict]] = {}
        for i in range(self.plan.nodes):
            for record in _read_jsonl(self.root / f"node-{i}.jsonl"):
                records.setdefault(record["version"], []).append(record)
        samples = list(self.prober.samples)
        windows = []
        for version in sorted(records):
            recs = records[version]
            if len(recs) != self.plan.nodes:
                raise BenchError(f"round from version {version}: {len(recs)} of "
                                 f"{self.plan.nodes} nodes pushed")  # fmt: skip
            commit = min(self.prober.seen_after(version), *(r["committed_seen_at"] for r in recs))
            last_push = max(r["pushed_at"] for r in recs)
            draw = max(r["drawn_at"] - r["pulled_at"] for r in recs)
            params = recs[0]["params"]
            worst = max(_node_extra(r) for r in recs)
            self.result.params = params
            windows.append((last_push, commit))
            self.result.rounds.append(RoundFigures(
                version=version,
                up_bpp=median([r["upload_bytes"] / r["params"] for r in recs]),
                down_bpp=median([r["download_bytes"] / r["params"] for r in recs]),
                down_update=all(r["compressed_download"] for r in recs),
                node_peak_x=max(max(r["phase_peaks"].values()) for r in recs) / m,
                node_extra_x=worst[0] / m,
                node_extra_mb=worst[0] / 1e6,
                node_extra_phase=worst[1],
                agg_peak_x=self.agg_peaks.get(version, 0) / m or math.nan,
                round_s=commit - min(r["train_at"] for r in recs) - draw,
                draw_s=draw,
                pull_s=max(r["pulled_at"] - r["train_at"] for r in recs),
                encode_s=max(r["encoded_at"] - r["drawn_at"] for r in recs),
                accum_mbps=sum(r["upload_bytes"] for r in recs)
                / max(1e-9, last_push - min(r["first_chunk_at"] for r in recs)) / 1e6,
                commit_s=commit - last_push,
                commit_window=(last_push, commit),
            ))  # fmt: skip
        during = overlapping(samples, "gettask", windows)
        self.result.p99_commit_gettask_ms = p99(during)
        self.result.commit_samples = len(during)
        self.result.p99_commit_health_ms = p99(overlapping(samples, "health", windows))
        self.result.p99_all_gettask_ms = p99([s for s in samples if s.rpc == "gettask"])
        self.result.p99_all_health_ms = p99([s for s in samples if s.rpc == "health"])
        self.result.failed_probes = sum(not s.ok for s in samples)

    def _cleanup(self) -> None:
        """Every process this row started ends here (SIGTERM, then SIGKILL), logs are kept."""
        if self.prober is not None:
            self.prober.stop()
        if self.channel is not None:
            self.channel.close()
        for p in self.nodes:
            if p.poll() is None:
                p.terminate()
        for p in self.nodes:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=15)
        for log in self.node_logs:
            log.close()
        if self.agg is not None:
            self.agg.stop()


def _node_extra(record: dict) -> tuple[int, str]:
    """(bytes, phase): a node's peak RSS over the round beyond its RSS after Join and beyond the
    most it held on purpose (model + delta, or the delta alone when it freed the model), and the
    phase of that peak. Against the round's peak, not per phase: heap freed in one phase (glibc
    keeps it) is reused by the next, so a phase's own excess can be memory the round needs anyway.
    """
    peaks = record["phase_peaks"]
    phase = max(peaks, key=peaks.get)
    return peaks[phase] - record["idle_rss"] - max(record["phase_held"].values()), phase


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a node killed mid-line
            continue
    return out


# ---- report ------------------------------------------------------------------------------------
def _mark(value: float, ok: bool | None) -> str:
    if math.isnan(value):
        return "–"
    text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"
    return text if ok is None else f"{text} {'✓' if ok else '✗'}"


def _upload_target(encoding: str) -> float | None:
    if encoding == "int8":
        return TARGETS["int8_bpp"]
    return TARGETS["secure_bpp"] if is_secure(encoding) else None


def report(results: list[RowResult], args: argparse.Namespace) -> None:
    failures: list[str] = []

    def status(r: RowResult) -> str:
        if not r.error:
            return f"ok ({len(r.rounds)})"
        failures.append(f"({len(failures) + 1}) {r.shape} × {r.nodes} {r.encoding}: {r.error}")
        return f"FAILED ({len(failures)})"

    wire_rows, time_rows = [], []
    for r in results:
        st = status(r)
        up = r.med("up_bpp")
        up_target = _upload_target(r.encoding)
        extra = r.med("node_extra_x")
        agg = r.med("agg_peak_x")
        wire_rows.append([
            r.shape, r.nodes, r.encoding, st,
            _mark(up, None if up_target is None else up <= up_target), _mark(r.down()[0], None),
            r.down()[1],
            _mark(r.med("node_peak_x"), None),
            _mark(extra, extra <= TARGETS["node_extra"] if is_secure(r.encoding) else None),
            _mark(r.med("node_extra_mb"), None),
            statistics.mode([f.node_extra_phase for f in r.rounds]) if r.rounds else "–",
            _mark(r.agg_idle_x, None), _mark(agg, agg <= TARGETS["agg_peak"]),
            "freed" if r.free_model else "kept",
        ])  # fmt: skip
        accum = r.med("accum_mbps")
        p99c = r.p99_commit_gettask_ms
        time_rows.append([
            r.shape, r.nodes, r.encoding, _mark(r.med("round_s"), None),
            _mark(r.med("pull_s"), None), _mark(r.med("draw_s"), None),
            _mark(r.med("encode_s"), None), _mark(r.med("commit_s"), None),
            _mark(accum, accum >= TARGETS["accum_mbps"]),
            _mark(p99c, p99c <= TARGETS["p99_commit_ms"]), _mark(r.p99_commit_health_ms, None),
            r.commit_samples, _mark(r.p99_all_gettask_ms, None), _mark(r.p99_all_health_ms, None),
        ])  # fmt: skip
    print()
    print("wire and memory (medians over rounds; ×M = / the model's fp32 bytes)")
    print_table(["model", "nodes", "encoding", "rounds", "up B/p (int8≤1.05 sec≤2.1)",
                 "down B/p", "down as", "node ×M", "node extra ×M (sec≤0.25)", "extra MB", "peak in", "agg idle ×M",
                 "agg peak ×M (≤3)", "pulled model"], wire_rows)  # fmt: skip
    print()
    print("time (medians over rounds; seconds unless marked; p99 of the prober's calls)")
    print_table(["model", "nodes", "encoding", "round s", "pull s", "draw s (excl.)",
                 "encode s", "commit s", "accum MB/s (≥500)", "p99 GetTask commit ms (≤100)",
                 "p99 health commit ms", "commit samples", "p99 GetTask all ms",
                 "p99 health all ms"], time_rows)  # fmt: skip
    for line in failures:
        print(line)
    _flower_note(results, args.flower_baseline_seconds)


def _flower_note(results: list[RowResult], baseline: float) -> None:
    target = baseline / TARGETS["flower_speedup"]
    rows = [r for r in results if r.encoding == "fp32" and r.nodes == 2 and not r.error
            and abs(r.model_bytes / (512 << 20) - 1) < 0.1]  # fmt: skip
    print()
    if not rows:
        print(f"Flower 1.41 round-tripped a 512 MiB model with 2 nodes in ~{baseline:.0f} s on this "
              f"machine class; the target is ≤ {target:.1f} s (run --params-mib 512 --nodes 2 "
              "--encodings fp32 to measure it).")  # fmt: skip
    for r in rows:
        s = r.med("round_s")
        print(f"512 MiB fp32 round with 2 nodes: {s:.1f} s vs Flower 1.41's ~{baseline:.0f} s = "
              f"{baseline / s:.1f}× faster (target ≥ {TARGETS['flower_speedup']:.0f}×, ≤ "
              f"{target:.1f} s: {'✓' if s <= target else '✗'})")  # fmt: skip


# ---- main --------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="small",
                        help=f"comma list of model presets ({', '.join(PRESETS)})")  # fmt: skip
    parser.add_argument("--dim", type=int, help="custom shape: override the preset's width")
    parser.add_argument("--layers", type=int, help="custom shape: override its layer count")
    parser.add_argument("--heads", type=int, help="custom shape: override its head count")
    parser.add_argument("--ffn-dim", type=int, help="custom shape: override its SwiGLU width")
    parser.add_argument("--params-mib", type=float,
                        help="a custom shape of about this many MiB of fp32 (replaces --preset)")  # fmt: skip
    parser.add_argument("--nodes", default="2", help="comma list of node counts")
    parser.add_argument("--encodings", default=",".join(ENCODINGS), help="comma list")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per row (medians)")
    parser.add_argument("--outer", default="fedavg", choices=sorted(AGGREGATOR_MODELS))
    parser.add_argument("--download-encoding", default="fp32", choices=PLAIN_ENCODINGS,
                        help="[federation] download_encoding: nodes holding the last version "
                             "get the outer update in it (bf16, int8) instead of the model")  # fmt: skip
    parser.add_argument("--free-model", default="auto", choices=("auto", "yes", "no"),
                        help="nodes drop the pulled model before drawing the delta "
                             "(auto: when keeping it would not fit)")  # fmt: skip
    parser.add_argument("--memory-gib", type=float, default=None,
                        help="RAM the run may use (default: MemAvailable, at most 24)")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=None,
                        help="limit per row in seconds (default: from the model size)")  # fmt: skip
    parser.add_argument("--flower-baseline-seconds", type=float, default=114.0,
                        help="Flower 1.41's 512 MiB 2-node round measured on this machine class")  # fmt: skip
    parser.add_argument("--tmp-dir", type=Path, default=None, help="where state is spooled")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for results.json and every row's logs")  # fmt: skip
    args = parser.parse_args()
    try:
        args.node_counts = [int(n) for n in args.nodes.split(",")]
        args.shapes = shapes_from_args(args)
    except (ValueError, ConfigError) as e:
        parser.error(str(e))
    args.encoding_list = [e.strip() for e in args.encodings.split(",") if e.strip()]
    unknown = sorted(set(args.encoding_list) - set(ENCODINGS))
    if unknown:
        parser.error(f"unknown encodings {', '.join(unknown)}; choose from {', '.join(ENCODINGS)}")
    if args.free_model == "yes" and args.download_encoding != "fp32":
        parser.error("--free-model yes needs --download-encoding fp32 (an update is added into "
                     "the model a node kept)")  # fmt: skip
    if args.repeats < 1 or min(args.node_counts) < 1:
        parser.error("--repeats and every --nodes value must be at least 1")
    for n in args.node_counts:
        for e in args.encoding_list:
            if is_secure(e) and n * 2 >= 2 ** (RING_BITS[e] - 1):
                parser.error(f"{e} cannot sum {n} nodes")
    return args


def main() -> None:
    args = parse_args()
    limit = int(min(24 * GIB, meminfo_bytes("MemAvailable")) if args.memory_gib is None
                else args.memory_gib * GIB)  # fmt: skip
    plans = [plan(s, n, args.outer, args.free_model, limit, args.encoding_list,
                  args.download_encoding) for s in args.shapes for n in args.node_counts]  # fmt: skip
    for p in plans:  # refuse before starting anything
        if p.memory > limit:
            print(f"bench.scale: {p.describe()}, more than the {limit / GIB:.1f} GiB available; "
                  "choose fewer nodes or a smaller preset", file=sys.stderr)  # fmt: skip
            sys.exit(2)
    tmp_parent = args.tmp_dir or Path(tempfile.gettempdir())
    disk = max(p.disk for p in plans)
    if shutil.disk_usage(tmp_parent).free < disk + GIB:
        print(f"bench.scale: needs ~{disk / GIB:.1f} GiB free in {tmp_parent}", file=sys.stderr)
        sys.exit(2)
    out = empty_run_folder(args.out) if args.out else None

    print(f"{os.cpu_count()} cores (load average {os.getloadavg()[0]:.1f}: other work on the "
          f"machine skews the times), {limit / GIB:.1f} GiB usable; {args.repeats} round(s) per "
          f"row, outer {args.outer}, download {args.download_encoding}; nodes draw N(0, 1e-3²) "
          "deltas", flush=True)  # fmt: skip
    results: list[RowResult] = []
    with tempfile.TemporaryDirectory(prefix="fedpt-bench-scale-", dir=args.tmp_dir) as tmp:
        root = Path(tmp)
        kits = None
        if any(is_secure(e) for e in args.encoding_list):
            kits = make_kits(root / "pki", max(args.node_counts))
        for p in plans:
            tokenizer = None
            if p.shape.needs_tokenizer:
                tokenizer = root / f"tokenizer-{p.shape.model.vocab_size}.json"
                if not tokenizer.exists():
                    write_synthetic_tokenizer(tokenizer, p.shape.model.vocab_size)
            print(f"{p.shape.label}: {p.shape.params / 1e6:.1f}M params = "
                  f"{p.shape.model_bytes / 1e6:,.0f} MB fp32; {p.describe()}", flush=True)  # fmt: skip
            for encoding in args.encoding_list:
                results.append(run_row(p, encoding, args, root, kits, tokenizer, out))
    report(results, args)
    print(f"load average at the end: {os.getloadavg()[0]:.1f} ({os.cpu_count()} cores)")
    if out is not None:
        rows = [dataclasses.asdict(r) for r in results]
        (out / "results.json").write_text(json.dumps({"args": sys.argv[1:], "rows": rows},
                                                     indent=1, default=str))  # fmt: skip
        print(f"\nresults and logs in {out}")


def run_row(p: Plan, encoding: str, args: argparse.Namespace, root: Path,
            kits: tuple[Path, list[Path]] | None, tokenizer: Path | None,
            out: Path | None) -> RowResult:  # fmt: skip
    row_args = argparse.Namespace(**vars(args))
    if row_args.timeout is None:  # generous: ~20 MB/s per node and round, plus start-up
        row_args.timeout = 180.0 + args.repeats * p.nodes * p.shape.model_bytes / 20e6
    name = f"{p.shape.label}-{p.nodes}-{encoding}"
    folder = root / name
    folder.mkdir()
    result = Row(p, encoding, row_args, folder, kits, tokenizer).run()
    line = "ok" if not result.error else f"FAILED: {result.error}"
    print(f"  {name}: {line} ({result.seconds:.0f} s)", flush=True)
    if out is not None:  # logs only; spools and checkpoints are removed with the temp folder
        logs = out / "logs" / name
        logs.mkdir(parents=True)
        for f in folder.iterdir():
            if f.suffix in (".log", ".jsonl", ".toml"):
                shutil.copy2(f, logs / f.name)
    shutil.rmtree(folder, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
