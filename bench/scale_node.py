"""A synthetic node for bench.scale: what node/participant.py does in a round, minus training.

    join ─► long-poll GetTask ─► secure-aggregation stages (advertise / share / unmask)
         ─► TRAIN: pull θ_global, draw a random fp32 Δ of the model's shapes (N(0, 1) · 1e-3),
            encode it (protos.delta_encoding.encode_update: from memory for fp32, else a spool file) and push
            it (AggregatorClient.push_payload), like Participant._encode / _push
         ─► long-poll until the next version is served ─► ... until STOP

Random, never constant: a transport that deduplicates or compresses would flatter constant data.
No residual is carried between rounds (a real node with a lossy encoding also holds its
residual, 1× model, between rounds). The pulled model is kept until the next round, as the
participant keeps it: with a compressed [federation] download_encoding the next version comes as
the outer update added into it. With --free-model it is dropped before the delta is drawn (the
node then holds one model's worth, not two, and always pulls the whole model).

One JSON line per round goes to --records (times from time.monotonic, which on Linux is one clock
for every process of the machine, so bench.scale can line them up with its prober); a failure
writes {"error": ...} there and exits 1. Every wait is bounded by --timeout.

    python -m bench.scale_node --address 127.0.0.1:7450 --organisation org-0 --records r.jsonl \
        --spool DIR [--kit KIT] [--token-file F] [--free-model] [--timeout 600]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import time
import traceback
import zlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import torch

from bench.common import proc_status_bytes, reset_peak_rss
from model.train_config import TrainConfig
from node.client import AggregatorClient
from node.round_order import ADMISSION_TOKEN_ENV
from node.secure_aggregation import NodeSecAgg
from protos import federation_pb2 as pb
from protos import pki
from protos.delta_encoding import encode_update, is_secure, plain_rounding_key

SECAGG_STAGES = (pb.Task.SECAGG_ADVERTISE_KEYS, pb.Task.SECAGG_SHARE_KEYS, pb.Task.SECAGG_UNMASK)
DELTA_STD = 1e-3
TRAIN_LOSS = 2.0  # any finite number: the aggregator only records it


@dataclasses.dataclass
class RoundRecord:
    round: int
    version: int
    train_at: float  # GetTask said TRAIN
    pulled_at: float
    drawn_at: float  # the random delta exists (this stands in for training)
    encoded_at: float
    first_chunk_at: float  # the first chunk was handed to gRPC
    pushed_at: float  # PushUpdate answered complete
    committed_seen_at: float  # a GetTask first showed a newer version (or STOP)
    upload_bytes: int  # the manifest's total_bytes
    download_bytes: int  # payload bytes of the pull (chunk data received, retries included)
    compressed_download: bool  # the pull was the outer update from the version held
    params: int
    model_bytes: int  # fp32 bytes of the model
    idle_rss: int  # VmRSS after Join, before the first pull
    round_start_rss: int  # VmRSS when TRAIN arrived
    # Per phase (pull, draw, encode, push): VmHWM over the phase (reset at its start), and what
    # the node held on purpose in it: the pulled model (unless freed), the delta once drawn.
    phase_peaks: dict[str, int]
    phase_held: dict[str, int]
    freed_model: bool


class CountingStub:
    """The client's stub, counting the chunk bytes PullModel streams deliver."""

    def __init__(self, stub: object) -> None:
        self._stub, self.pulled = stub, 0

    def __getattr__(self, name: str) -> object:
        return getattr(self._stub, name)

    def PullModel(self, request: pb.PullRequest, **kwargs: object) -> Iterator:
        for message in self._stub.PullModel(request, **kwargs):
            if message.WhichOneof("payload") == "chunk":
                self.pulled += len(message.chunk.data)
            yield message


class SyntheticNode:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.give_up = time.monotonic() + args.timeout
        kit = pki.load_kit(args.kit) if args.kit else None
        self.kit = kit
        # Under fedpt's Flower ServerApp the Join needs the TRAIN message's token.
        token = os.environ.get(ADMISSION_TOKEN_ENV, "")
        self.client = AggregatorClient(args.address, args.organisation, kit=kit,
                                       rpc_timeout=args.rpc_timeout, admission_token=token)  # fmt: skip
        self.secagg: NodeSecAgg | None = None
        self.spec = pb.FederationSpec()
        self.tokens = 0
        self.idle_rss = 0
        self.held: tuple[int, dict[str, torch.Tensor]] | None = None  # version, model
        # Counts the model bytes each pull receives (a compressed update is smaller).
        self.stub = CountingStub(self.client.stub)
        self.client.stub = self.stub
        self.records = open(args.records, "a")  # noqa: SIM115 (closed in run)

    def write(self, record: dict) -> None:
        self.records.write(json.dumps(record) + "\n")
        self.records.flush()

    def remaining(self) -> float:
        left = self.give_up - time.monotonic()
        if left <= 0:
            raise TimeoutError(
                f"{self.args.organisation}: ran past --timeout {self.args.timeout:.0f}s"
            )
        return left

    def run(self) -> None:
        try:
            reply = self.client.join()
            self.spec = reply.spec
            if self.args.token_file:  # the bench's prober polls GetTask as this node
                Path(self.args.token_file).write_text(reply.session_token)
            if is_secure(self.spec.delta_encoding):
                if self.kit is None:
                    raise RuntimeError("a secure federation needs --kit")
                self.secagg = NodeSecAgg(self.client, self.kit, self.spec.federation_id,
                                         self.spec.name)  # fmt: skip
            train = TrainConfig.from_dict(json.loads(self.spec.train_config_json or "{}"))
            # One rank's round: num_tokens / weight_unit = 1, so a secure node sends Δ · 1.
            self.tokens = self.spec.inner_steps * train.tokens_per_step(1)
            gc.collect()
            self.idle_rss = proc_status_bytes("self", "VmRSS")
            self.loop()
        finally:
            self.client.close()
            self.records.close()

    def loop(self) -> None:
        pending: RoundRecord | None = None
        while True:
            task = self.client.get_task(wait_seconds=min(self.args.poll_seconds, self.remaining()))
            now = time.monotonic()
            if pending is not None and (
                task.kind == pb.Task.STOP or task.model_version > pending.version
            ):
                pending.committed_seen_at = now
                self.write(dataclasses.asdict(pending))
                pending = None
            if task.kind == pb.Task.STOP:
                return
            if task.kind in SECAGG_STAGES:
                self.secagg_stage(task)
            elif task.kind == pb.Task.TRAIN:
                pending = self.round(task, now)

    def secagg_stage(self, task: pb.Task) -> None:
        if self.secagg is None:
            raise RuntimeError("the aggregator asked for secure aggregation on a plain federation")
        stage = {pb.Task.SECAGG_ADVERTISE_KEYS: self.secagg.advertise,
                 pb.Task.SECAGG_SHARE_KEYS: self.secagg.share,
                 pb.Task.SECAGG_UNMASK: self.secagg.unmask}[task.kind]  # fmt: skip
        stage(task.round)

    def fetch(self, version: int) -> tuple[dict[str, torch.Tensor], bool]:
        """Model `version` as Participant._fetch_global gets it: the compressed outer update
        added into the version held when the federation sends updates, else the whole model.
        True when it came as an update."""
        held, self.held = self.held, None
        encoding = self.spec.download_encoding
        if held is not None and held[0] == version - 1 and encoding not in ("", "fp32"):
            weights = self.client.pull_from_previous(version, held[1], encoding)
            if weights is not None:
                return weights, True
            held = None
        into = held[1] if held is not None else None  # the old version's memory takes the new
        del held
        return self.client.pull_model(version, into=into), False

    def round(self, task: pb.Task, train_at: float) -> RoundRecord:
        gc.collect()  # last round's buffers are gone before the peak is reset
        round_start_rss = proc_status_bytes("self", "VmRSS")
        peaks: dict[str, int] = {}
        held: dict[str, int] = {}

        def phase_ends(name: str, held_bytes: int) -> None:
            peaks[name], held[name] = proc_status_bytes("self", "VmHWM"), held_bytes
            reset_peak_rss("self")

        reset_peak_rss("self")
        self.stub.pulled = 0
        model, compressed = self.fetch(task.model_version)
        pulled_at = time.monotonic()
        shapes = {name: tuple(t.shape) for name, t in model.items()}
        model_bytes = sum(t.nbytes for t in model.values())
        params = sum(t.numel() for t in model.values())
        phase_ends("pull", model_bytes)
        if self.args.free_model:
            del model
            gc.collect()
            model = None
        else:  # kept, as Participant keeps it: the next compressed download is added into it
            self.held = (task.model_version, model)
        kept = model_bytes if model is not None else 0
        # Differs per node and round.
        seed = zlib.crc32(f"{self.args.organisation}/{task.round}".encode())
        g = torch.Generator().manual_seed(seed)
        delta = {n: torch.randn(s, generator=g).mul_(DELTA_STD) for n, s in shapes.items()}
        drawn_at = time.monotonic()
        kept += sum(t.nbytes for t in delta.values())
        phase_ends("draw", kept)
        encoding = self.spec.delta_encoding or "fp32"
        secure = None
        if self.secagg is not None and task.round not in self.secagg.rounds:
            raise RuntimeError(
                f"round {task.round}: TRAIN came without the secure-aggregation key stages "
                f"(the aggregator does not run secure aggregation for {encoding})"
            )
        if self.secagg is not None:
            secure = self.secagg.secure_params(task.round, self.tokens, len(delta))
            key = self.secagg.rounding_key(task.model_version)
        else:
            key = plain_rounding_key(self.spec.name, self.client.organisation, task.model_version)
        path = Path(self.args.spool) / "update.payload"
        payload = encode_update(delta, encoding, path, self.spec.chunk_bytes,
                                rounding_key=key, secure=secure)  # fmt: skip
        encoded_at = time.monotonic()
        phase_ends("encode", kept)
        first_chunk = [0.0]

        def progress(chunks: int) -> None:
            if chunks >= 1 and not first_chunk[0]:
                first_chunk[0] = time.monotonic()

        reply = self.client.push_payload(task.round, task.model_version, payload, self.tokens,
                                         TRAIN_LOSS, progress=progress)  # fmt: skip
        pushed_at = time.monotonic()
        if not reply.complete:
            raise RuntimeError(f"round {task.round}: the upload did not complete")
        phase_ends("push", kept)
        del model, delta
        path.unlink(missing_ok=True)
        return RoundRecord(
            round=task.round, version=task.model_version, train_at=train_at, pulled_at=pulled_at,
            drawn_at=drawn_at, encoded_at=encoded_at, first_chunk_at=first_chunk[0] or pushed_at,
            pushed_at=pushed_at, committed_seen_at=0.0, upload_bytes=payload.manifest.total_bytes,
            download_bytes=self.stub.pulled, compressed_download=compressed, params=params,
            model_bytes=4 * params,
            idle_rss=self.idle_rss, round_start_rss=round_start_rss, phase_peaks=peaks,
            phase_held=held, freed_model=self.args.free_model,
        )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--address", required=True)
    parser.add_argument("--organisation", required=True)
    parser.add_argument("--records", type=Path, required=True, help="JSON lines out")
    parser.add_argument("--spool", type=Path, required=True, help="folder for the encoded update")
    parser.add_argument("--kit", type=Path, default=None, help="startup kit: mutual TLS")
    parser.add_argument("--token-file", type=Path, default=None)
    parser.add_argument("--free-model", action="store_true")
    parser.add_argument("--poll-seconds", type=float, default=2.0)
    parser.add_argument("--rpc-timeout", type=float, default=120.0)
    parser.add_argument("--timeout", type=float, default=600.0, help="limit of the whole run (s)")
    args = parser.parse_args()
    args.spool.mkdir(parents=True, exist_ok=True)
    node = SyntheticNode(args)
    try:
        node.run()
    except Exception as e:  # reported per row by bench.scale, which reads the records file
        if isinstance(e, grpc.Call):
            why = f"{e.code().name}: {e.details()}"
        else:
            why = f"{type(e).__name__}: {e}"
        with open(args.records, "a") as f:
            f.write(json.dumps({"error": why}) + "\n")
        traceback.print_exc()
        sys.exit(1)


if __name__ == "__main__":
    main()
