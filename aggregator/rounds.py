"""The round state machine and everything a round touches: nodes, uploads, the outer step,
durable commits, and recovery after a restart.

    OPEN ──(quorum of ready nodes)──► TRAINING ──(first upload complete)──► COLLECTING
      ▲                                   │ all participants uploaded, or deadline with a quorum
      │                                   ▼
      ├──────── COMMITTED ◄── checkpoint durable ── AGGREGATING
      └──────── FAILED  (deadline passed without a quorum: next round, same model)

A round moves to COMMITTED only after its checkpoint (global model + outer optimizer state) is
on disk (temp file, fsync, rename) and its sha256 is recorded, in the same transaction that
opens the next round. A restarted aggregator reloads the last committed checkpoint, drops any
checkpoint file written after it, and rebuilds the open round's sum from the completed uploads'
spool files. The servicer calls the public methods; refusals are `aggregator.errors.Refused`.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import re
import secrets
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from google.protobuf import json_format

from aggregator.accumulator import StreamingAccumulator
from aggregator.checkpoints import CheckpointStore, sha256_file
from aggregator.config import AggregatorConfig
from aggregator.errors import (
    AlreadyExists,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Refused,
    Unauthenticated,
    Unavailable,
)
from aggregator.outer import OuterConfigError, OuterOptimizer
from aggregator.secure_aggregation import SecAggRound, Stage
from aggregator.store import (
    CheckpointRow,
    MetricRow,
    NodeRow,
    RoundRow,
    Store,
    StoreError,
    SubmissionRow,
)
from aggregator.uploads import UploadSession
from model.gpt import GPT
from model.io import model_state
from model.tokenizer import ByteTokenizer, load_tokenizer
from model.train_config import TrainConfig
from protos import crash_points, secagg
from protos import federation_pb2 as pb
from protos.codec import CodecError, EncodedPayload, Manifest, TensorSpec, encode, specs_of

MAX_TOKENS_PER_UPDATE = 10**15
ORGANISATION_NAME = re.compile(r"[\w .@:/+-]{1,200}")  # matched with fullmatch: no trailing \n
# Fields of the spec a restarted aggregator may not change under a running federation.
FROZEN_SPEC_FIELDS = ("model_config_json", "tokenizer_json", "outer_optimizer", "delta_encoding")


class RoundState(enum.StrEnum):
    OPEN = "OPEN"
    TRAINING = "TRAINING"
    COLLECTING = "COLLECTING"
    AGGREGATING = "AGGREGATING"
    COMMITTED = "COMMITTED"
    FAILED = "FAILED"


ACCEPTING = (RoundState.TRAINING, RoundState.COLLECTING)


class RecoveryError(RuntimeError):
    """The state folder and database cannot be resumed with this configuration."""


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def build_spec(
    config: AggregatorConfig, model_config_json: str, tokenizer_spec: dict
) -> pb.FederationSpec:
    return pb.FederationSpec(
        name=config.federation.name,
        model_config_json=model_config_json,
        tokenizer_json=json.dumps(tokenizer_spec, sort_keys=True),
        train_config_json=json.dumps(config.train, sort_keys=True),
        inner_steps=config.federation.inner_steps,
        round_policy=pb.RoundPolicy(
            min_nodes=config.round.min_nodes,
            max_nodes=config.round.max_nodes,
            round_timeout_seconds=config.round.timeout_seconds,
        ),
        chunk_bytes=config.server.chunk_bytes,
        outer_optimizer=config.outer.name,
        total_rounds=config.federation.rounds,
        delta_encoding=config.delta_encoding,
    )


class Coordinator:
    def __init__(
        self,
        config: AggregatorConfig,
        store: Store,
        *,
        clock: Callable[[], float] = time.time,
        log: Callable[[str], None] = print,
        start_ticker: bool = True,
    ) -> None:
        self.config, self.store, self.clock, self.log = config, store, clock, log
        state_dir = Path(config.store.state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoints = CheckpointStore(state_dir / "checkpoints")
        self.uploads_dir = state_dir / "uploads"
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._ready: dict[str, float] = {}  # node id -> last GetTask
        self._sessions: dict[str, UploadSession] = {}  # this round's uploads in progress
        self._completed: dict[str, SubmissionRow] = {}  # this round's complete uploads
        self._quorum_since: float | None = None
        self._tokens: dict[str, NodeRow] = {}  # token digest -> node (cache of the store)
        self._by_organisation: dict[str, NodeRow] = {}  # certified organisation -> node
        self._dirty = False  # in-memory outer state may be ahead of the last checkpoint
        self._secagg: SecAggRound | None = None  # this round's secure aggregation, when on
        self._saw_stop: set[str] = set()  # nodes told that the federation has finished
        self._load_or_create_federation()
        with self._lock:  # failing a round notifies waiters, which needs the lock
            self._recover_round()
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick_forever, name="round-ticker", daemon=True)
        if start_ticker:
            self._ticker.start()

    # ---- start-up -----------------------------------------------------------------------------
    def _load_or_create_federation(self) -> None:
        cfg = self.config
        tokenizer_spec = (
            load_tokenizer({"kind": "bpe"}, cfg.federation.tokenizer).spec()
            if cfg.federation.tokenizer
            else ByteTokenizer().spec()
        )
        model_config = cfg.model.with_vocab(tokenizer_spec["vocab_size"])
        self.model_config = model_config
        spec = build_spec(cfg, model_config.to_json(), tokenizer_spec)
        found = self.store.find_federation(cfg.federation.name)
        if found is None:
            self.federation_id = str(uuid.uuid4())
            spec.federation_id = self.federation_id
            torch.manual_seed(cfg.federation.seed)
            params = {k: v.detach().clone() for k, v in model_state(GPT(model_config)).items()}
            self.outer = OuterOptimizer(cfg.outer, params)
            record = self.checkpoints.write(
                0, -1, params, self.outer.state_tensors(), self.outer.state_meta()
            )
            row = CheckpointRow(0, -1, str(record.path), record.sha256, record.nbytes, self.clock())
            self.store.create_federation(
                self.federation_id, cfg.federation.name, _spec_json(spec), row
            )
            self.log(
                f"federation {cfg.federation.name!r} created ({model_config.num_params() / 1e6:.2f}M params)"
            )
        else:
            self.federation_id, stored_json, _status = found
            spec.federation_id = self.federation_id
            stored = json_format.Parse(stored_json, pb.FederationSpec())
            changed = [f for f in FROZEN_SPEC_FIELDS if getattr(stored, f) != getattr(spec, f)]
            if changed:
                raise RecoveryError(
                    f"federation {cfg.federation.name!r} in {cfg.store.state_dir} was created with "
                    f"another {', '.join(changed)}; use another name or state folder"
                )
            row = self.store.latest_checkpoint(self.federation_id)
            for path in self.checkpoints.remove_newer_than(row.version):
                self.log(f"recovery: removed uncommitted checkpoint {path}")
            params, outer_tensors, meta = self.checkpoints.read(
                row.version, expected_sha256=row.sha256
            )
            self.outer = OuterOptimizer(cfg.outer, params)
            try:
                self.outer.load_state(outer_tensors, meta["outer"])
            except OuterConfigError as e:
                raise RecoveryError(
                    f"cannot resume the outer optimizer with this [outer] config: {e}"
                ) from e
            self.log(f"federation {cfg.federation.name!r} resumed at model version {row.version}")
        self.spec = spec
        self._install_global(params, row.version)
        self.accumulator = StreamingAccumulator(self.upload_specs, modular=self.secure)

    @property
    def secure(self) -> bool:
        return self.config.delta_encoding == "masked-int32"

    def _install_global(self, params: dict[str, torch.Tensor], version: int) -> None:
        self.params, self.version = params, version
        self.payload: EncodedPayload = encode(params, self.config.server.chunk_bytes)
        self.specs = specs_of(params)
        # With secure aggregation the updates are masked uint32 vectors of the model's shape.
        dtype = "uint32" if self.secure else "float32"
        self.upload_specs = [TensorSpec(s.name, s.shape, dtype) for s in self.specs]

    @property
    def weight_unit(self) -> float:
        """Tokens of one rank's round: a node sends Δ·num_tokens/weight_unit under secure
        aggregation, so the masked sum divided by Σ num_tokens/weight_unit is the weighted mean."""
        t = TrainConfig.from_dict(self.config.train)
        return float(
            self.config.federation.inner_steps * t.micro_batch_size * t.grad_accum * t.seq_len
        )

    def _recover_round(self) -> None:
        """Pick the current round up where the last process left it."""
        self.round = self.store.current_round(self.federation_id)
        spool = self._spool_dir(self.round.number)
        if self.round.state not in (*ACCEPTING, RoundState.AGGREGATING):
            return
        if self.secure:
            # The stages' keys and shares lived in the old process: this round cannot finish.
            self._fail_round("the aggregator restarted during secure aggregation")
            return
        for part in spool.glob("*.part"):  # uploads cut off by the restart: the nodes re-send
            part.unlink()
        for sub in self.store.submissions(self.federation_id, self.round.number):
            path = Path(sub.path)
            if not path.is_file() or sha256_file(path) != sub.sha256:
                raise RecoveryError(
                    f"upload {path} recorded for round {self.round.number} is missing or corrupt"
                )
            with self.accumulator.lock:
                self.accumulator.add_file(path, sub.num_tokens)
                self.accumulator.add_weight(sub.num_tokens)
            self._completed[sub.node_id] = sub
        self.log(
            f"recovery: round {self.round.number} is {self.round.state} with "
            f"{len(self._completed)} upload(s) kept"
        )

    # ---- nodes --------------------------------------------------------------------------------
    def join(self, organisation: str, capabilities: dict) -> tuple[NodeRow, str]:
        if not ORGANISATION_NAME.fullmatch(organisation or ""):
            raise InvalidArgument(
                "organisation must be 1-200 letters, digits, spaces or . @ : / + - _"
            )
        token = secrets.token_urlsafe(32)
        node_id = f"node-{uuid.uuid4().hex[:12]}"
        with self._lock:
            node = self._store_call(
                self.store.upsert_node,
                self.federation_id,
                node_id,
                organisation,
                token_digest(token),
                capabilities,
            )
            self._tokens = {d: n for d, n in self._tokens.items() if n.id != node.id}
            self._tokens[token_digest(token)] = node
            self._by_organisation[node.organisation] = node
        self.log(f"node {node.id} joined for {organisation!r}")
        return node, token

    def node_of_organisation(self, organisation: str) -> NodeRow:
        """The node a certified organisation registered with Join."""
        with self._lock:
            node = self._by_organisation.get(organisation)
            if node is None:
                nodes = self._store_call(self.store.nodes, self.federation_id)
                node = next((n for n in nodes if n.organisation == organisation), None)
                if node is None:
                    raise Unauthenticated(
                        f"organisation {organisation!r} has not joined: call Join first"
                    )
                self._by_organisation[organisation] = node
            return node

    def authenticate(self, token: str) -> NodeRow:
        digest = token_digest(token or "")
        with self._lock:
            node = self._tokens.get(digest)
            if node is None:
                node = self._store_call(self.store.node_by_token, self.federation_id, digest)
                if node is None:
                    raise Unauthenticated("unknown or revoked session: call Join first")
                self._tokens[digest] = node
            return node

    # ---- tasks --------------------------------------------------------------------------------
    def get_task(self, node_id: str, wait_seconds: float) -> pb.Task:
        """What `node_id` must do now; holds the call up to `wait_seconds` while it would WAIT."""
        if not math.isfinite(wait_seconds):  # NaN would make every comparison below false
            wait_seconds = 0.0
        wait = min(max(wait_seconds, 0.0), self.config.server.long_poll_seconds)
        give_up = time.monotonic() + wait
        with self._lock:
            while True:
                self._ready[node_id] = self.clock()
                if self.round.state == RoundState.OPEN:
                    crash_points.reached("aggregator.open", self.round.number)
                self._maybe_start_round()
                task = self._task_for(node_id)
                remaining = give_up - time.monotonic()
                if task.kind != pb.Task.WAIT or remaining <= 0:
                    return task
                # Wake at least twice a second: readiness and the start grace are time-based.
                self._changed.wait(timeout=min(remaining, 0.5))

    def _task_for(self, node_id: str) -> pb.Task:
        r = self.round
        if self.finished:
            self._saw_stop.add(node_id)
            return pb.Task(kind=pb.Task.STOP, message="the federation has finished")
        if self._secagg is not None and r.state in ACCEPTING:
            kind = self._secagg_task(node_id)
            if kind is not None:
                return pb.Task(kind=kind, round=r.number, model_version=r.base_version,
                               deadline_unix=r.deadline_at or 0.0)  # fmt: skip
        elif r.state in ACCEPTING and node_id in r.participants and node_id not in self._completed:
            return pb.Task(kind=pb.Task.TRAIN, round=r.number, model_version=r.base_version,
                           deadline_unix=r.deadline_at or 0.0)  # fmt: skip
        if r.state == RoundState.OPEN:
            ready = len(self._ready_nodes())
            message = f"waiting for a quorum: {ready} of {self.config.round.min_nodes} nodes ready"
        elif node_id in self._completed:
            message = f"update for round {r.number} received; waiting for the round to close"
        else:
            message = f"round {r.number} is running without this node; wait for the next one"
        return pb.Task(kind=pb.Task.WAIT, round=r.number, model_version=self.version,
                       retry_after_seconds=1.0, message=message)  # fmt: skip

    def _secagg_task(self, node_id: str) -> int | None:
        s = self._secagg
        if s.stage == Stage.ADVERTISE and node_id in s.participants and node_id not in s.keys:
            return pb.Task.SECAGG_ADVERTISE_KEYS
        if s.stage == Stage.SHARE and node_id in s.keys and node_id not in s.shared:
            return pb.Task.SECAGG_SHARE_KEYS
        if s.stage == Stage.MASKED_INPUT and node_id in s.shared and node_id not in self._completed:
            return pb.Task.TRAIN
        if s.stage == Stage.UNMASK and node_id in s.survivors and node_id not in s.unmask_requests:
            return pb.Task.SECAGG_UNMASK
        return None

    def every_node_saw_stop(self) -> bool:
        """Whether every node that ever joined has been told the federation finished."""
        with self._lock:
            nodes = self._store_call(self.store.nodes, self.federation_id)
            return {n.id for n in nodes} <= self._saw_stop

    @property
    def finished(self) -> bool:
        total = self.config.federation.rounds
        return total > 0 and self.version >= total

    def _ready_nodes(self) -> list[str]:
        window = self.config.server.long_poll_seconds + 2.0
        now = self.clock()
        return sorted(n for n, t in self._ready.items() if now - t <= window)

    # ---- round transitions (all under the lock) -----------------------------------------------
    def _maybe_start_round(self) -> None:
        if self.round.state != RoundState.OPEN or self.finished:
            return
        ready = self._ready_nodes()
        policy = self.config.round
        if len(ready) < policy.min_nodes:
            self._quorum_since = None
            return
        now = self.clock()
        self._quorum_since = self._quorum_since or now
        everyone = len(ready) >= len(self._tokens) or (
            policy.max_nodes and len(ready) >= policy.max_nodes
        )
        if not everyone and now - self._quorum_since < policy.start_grace_seconds:
            return
        participants = ready[: policy.max_nodes or None]
        deadline = now + policy.timeout_seconds
        self.round = self._store_call(
            self.store.start_round,
            self.federation_id,
            self.round.number,
            participants,
            now,
            deadline,
        )
        self._quorum_since = None
        crash_points.reached("aggregator.training", self.round.number)
        if self.secure:
            self._secagg = SecAggRound(
                self.federation_id, self.round.number, tuple(participants), policy.min_nodes,
                self.config.secagg.clip, self.config.secagg.threshold, self.weight_unit,
                self.config.secagg.stage_timeout_seconds, now,
            )  # fmt: skip
        self.log(
            f"round {self.round.number}: training with {len(participants)} node(s) from version {self.version}"
        )
        self._changed.notify_all()

    def _maybe_close_round(self) -> None:
        r = self.round
        if r.state == RoundState.AGGREGATING:
            self._aggregate()
            return
        if r.state not in ACCEPTING:
            return
        if self._secagg is not None:
            self._advance_secagg()
            return
        if set(r.participants) <= set(self._completed):
            self._aggregate()
        elif self.clock() >= (r.deadline_at or math.inf):
            if len(self._completed) >= self.config.round.min_nodes:
                stragglers = sorted(set(r.participants) - set(self._completed))
                self.log(
                    f"round {r.number}: deadline passed; excluding straggler(s) {', '.join(stragglers)}"
                )
                self._drop_sessions()
                self._aggregate()
            else:
                self._fail_round(
                    f"quorum not reached: {len(self._completed)} of {self.config.round.min_nodes} uploads by the deadline"
                )

    def _advance_secagg(self) -> None:
        s, now = self._secagg, self.clock()
        failure = s.advance(now)
        if failure is None and s.stage == Stage.MASKED_INPUT:
            all_in = set(s.shared) <= set(self._completed)
            if all_in or now >= (self.round.deadline_at or math.inf):
                self._drop_sessions()  # stragglers' partial uploads leave the sum
                failure = s.close_inputs(self._completed, now)
        if failure is not None:
            self._fail_round(f"secure aggregation: {failure}")
        elif s.stage == Stage.READY:
            self._aggregate()
        self._changed.notify_all()

    def _unmasked_mean(self) -> dict[str, torch.Tensor]:
        with self.accumulator.lock:
            total = self.accumulator.modular_sum()
        self._secagg.unmask_sum(total)
        cfg = secagg.QuantizationConfig(clip=self._secagg.clip, scale=self._secagg.scale)
        weights = self._secagg.total_weight({n: s.num_tokens for n, s in self._completed.items()})
        return self.accumulator.as_tensors(secagg.dequantize_sum(total, cfg) / np.float32(weights))

    def _aggregate(self) -> None:
        r = self.round
        try:
            if self._dirty:  # an earlier attempt failed part-way: start from the durable state
                self._reload_committed_state()
            self._store_call(
                self.store.set_round_state, self.federation_id, r.number, RoundState.AGGREGATING
            )
            crash_points.reached("aggregator.aggregating", r.number)
            if self._secagg is not None:
                mean_delta = self._unmasked_mean()
            else:
                if self.config.round.deterministic:
                    self._rebuild_accumulator(ordered=True)  # whatever the arrival order
                with self.accumulator.lock:
                    mean_delta = self.accumulator.mean()
            new_params = self.outer.step(self.params, mean_delta)
            version = self.version + 1
            record = self.checkpoints.write(
                version, r.number, new_params, self.outer.state_tensors(), self.outer.state_meta()
            )
            row = CheckpointRow(
                version, r.number, str(record.path), record.sha256, record.nbytes, self.clock()
            )
            crash_points.reached("aggregator.checkpointed", r.number)
            open_next = not (
                self.config.federation.rounds and version >= self.config.federation.rounds
            )
            self._store_call(
                self.store.commit_round,
                self.federation_id,
                r.number,
                row,
                self._round_metrics(),
                open_next,
            )
        except Exception as e:
            # Nothing was committed, but the outer step may have moved the optimizer state:
            # the next attempt reloads the last durable checkpoint first.
            self._dirty = True
            self.log(f"round {r.number}: aggregation failed, will retry: {e}")
            return
        uploads = len(self._completed)
        self._install_global(new_params, version)
        self._end_round()
        self.round = self.store.current_round(self.federation_id)
        self.log(f"round {r.number}: committed version {version} from {uploads} upload(s)")
        self._prune_checkpoints()
        self._changed.notify_all()

    def _round_metrics(self) -> list[MetricRow]:
        r = self.round
        rows = []
        for sub in self._completed.values():
            rows.append(MetricRow(r.number, sub.node_id, "train_loss", sub.train_loss))
            rows.append(MetricRow(r.number, sub.node_id, "num_tokens", float(sub.num_tokens)))
        rows.append(MetricRow(r.number, None, "nodes", float(len(self._completed))))
        rows.append(
            MetricRow(
                r.number, None, "round_seconds", self.clock() - (r.started_at or self.clock())
            )
        )
        return rows

    def _fail_round(self, outcome: str) -> None:
        r = self.round
        self._store_call(self.store.fail_round, self.federation_id, r.number, outcome)
        self.log(
            f"round {r.number}: failed ({outcome}); the next round starts from version {self.version}"
        )
        self._drop_sessions()
        self._end_round()
        self.round = self.store.current_round(self.federation_id)
        self._changed.notify_all()

    def _end_round(self) -> None:
        self._secagg = None
        self._completed.clear()
        self._drop_sessions()
        with self.accumulator.lock:
            self.accumulator.reset()
        shutil.rmtree(self._spool_dir(self.round.number), ignore_errors=True)

    def _reload_committed_state(self) -> None:
        row = self.store.latest_checkpoint(self.federation_id)
        params, outer_tensors, meta = self.checkpoints.read(row.version, expected_sha256=row.sha256)
        self.checkpoints.remove_newer_than(row.version)
        self.outer.load_state(outer_tensors, meta["outer"])
        self._install_global(params, row.version)
        self._dirty = False

    def _prune_checkpoints(self) -> None:
        keep = self.config.store.keep_checkpoints
        if keep:
            self.checkpoints.prune(keep, protect={self.version})

    def _drop_sessions(self) -> None:
        for session in self._sessions.values():
            session.discard()
        self._sessions.clear()
        self._rebuild_accumulator()

    def _rebuild_accumulator(self, *, ordered: bool = False) -> None:
        """Recompute the sum from the spools of complete and still-live uploads."""
        with self.accumulator.lock:
            self.accumulator.reset()
            completed = list(self._completed.values())
            for sub in self._in_node_order(completed) if ordered else completed:
                self.accumulator.add_file(Path(sub.path), sub.num_tokens)
                self.accumulator.add_weight(sub.num_tokens)
            for session in self._sessions.values():
                session.flush()
                self.accumulator.add_file(session.part_path, session.weight)

    def _in_node_order(self, submissions: Iterable[SubmissionRow]) -> list[SubmissionRow]:
        """By organisation: an order that is the same in every run of a federation (node ids
        are random), so that a deterministic fp32 sum is reproducible across runs."""
        organisation = {n.id: n.organisation for n in self.store.nodes(self.federation_id)}
        return sorted(submissions, key=lambda s: (organisation.get(s.node_id, ""), s.node_id))

    # ---- secure aggregation stages ------------------------------------------------------------
    def _secagg_round(self, number: int) -> SecAggRound:
        if self._secagg is None or number != self.round.number:
            raise Refused(
                f"round {number} has no secure aggregation in progress (current round {self.round.number})"
            )
        return self._secagg

    def advertise_keys(self, node_id: str, request: pb.AdvertiseKeysRequest, certificate_pem: bytes,
                       identity) -> None:  # fmt: skip
        with self._lock:
            self._secagg_round(request.round).advertise(node_id, request, certificate_pem, identity)
            self._changed.notify_all()

    def share_keys(self, node_id: str, request: pb.ShareKeysRequest) -> None:
        with self._lock:
            self._secagg_round(request.round).share(node_id, request)
            self._changed.notify_all()

    def secagg_state(self, node_id: str, number: int) -> pb.SecAggState:
        with self._lock:
            return self._secagg_round(number).state_for(node_id)

    def unmask(self, node_id: str, request: pb.UnmaskRequest) -> None:
        with self._lock:
            self._secagg_round(request.round).unmask(node_id, request)
            self._changed.notify_all()

    # ---- models -------------------------------------------------------------------------------
    def model_payload(self, version: int) -> EncodedPayload:
        with self._lock:
            if version != self.version:
                raise NotFound(
                    f"model version {version} is not served; the current version is {self.version}"
                )
            return self.payload

    # ---- uploads ------------------------------------------------------------------------------
    def begin_upload(self, node_id: str, header: pb.UpdateHeader) -> UploadSession:
        with self._lock:
            r = self._accepting_round(node_id, header.round)
            if self._secagg is not None:
                self._secagg.may_upload(node_id)
            if header.base_version != r.base_version:
                raise InvalidArgument(
                    f"round {r.number} trains from version {r.base_version}, not {header.base_version}"
                )
            if not 0 < header.num_tokens <= MAX_TOKENS_PER_UPDATE:
                raise InvalidArgument(
                    f"num_tokens must be in 1..{MAX_TOKENS_PER_UPDATE}, got {header.num_tokens}"
                )
            if not math.isfinite(header.train_loss):
                raise InvalidArgument("train_loss must be a finite number")
            try:
                manifest = Manifest.from_proto(
                    header.manifest,
                    expected=self.upload_specs,
                    max_total_bytes=self.payload.manifest.total_bytes,
                )
            except CodecError as e:
                raise InvalidArgument(f"update manifest refused: {e}") from e
            session = self._sessions.get(node_id)
            if session is not None and session.streaming:
                # Usually the node's previous connection, not yet seen to be gone: retryable.
                raise Unavailable("another upload from this node is still in progress")
            if session is not None and (session.manifest != manifest or header.first_chunk == 0):
                # A different payload, or a node starting over (e.g. restarted): drop the old bytes.
                self._discard_session(session)
                session = None
            received = session.chunks_received if session else 0
            if header.first_chunk != received:
                raise Refused(f"resume this upload from chunk {received}, not {header.first_chunk}")
            if session is None:
                session = UploadSession(node_id, r.number, manifest, float(header.num_tokens),
                                        header.train_loss, self._spool_dir(r.number),
                                        check_finite=not self.secure)  # fmt: skip
                self._sessions[node_id] = session
            session.streaming = True
            return session

    def _accepting_round(self, node_id: str, number: int) -> RoundRow:
        r = self.round
        if self.finished:
            raise Refused("the federation has finished")
        if number < r.number:
            raise Refused(f"round {number} is closed; the current round is {r.number}")
        if number > r.number:
            raise Refused(f"round {number} has not started; the current round is {r.number}")
        if r.state not in ACCEPTING:
            raise Refused(f"round {number} is not accepting uploads (it is {r.state})")
        if node_id not in r.participants:
            raise PermissionDenied(f"this node is not a participant of round {number}")
        if node_id in self._completed:
            raise AlreadyExists(f"this node's update for round {number} was already received")
        if self.clock() >= (r.deadline_at or math.inf):
            raise DeadlineExceeded(f"round {number} closed for uploads at its deadline")
        return r

    def add_chunk(self, session: UploadSession, chunk: pb.Chunk) -> None:
        session.add_chunk(chunk.index, chunk.data, self.accumulator)

    def end_upload(self, session: UploadSession) -> pb.PushReply:
        """The stream ended: complete the upload if every chunk arrived, else keep it to resume."""
        with self._lock:
            session.streaming = False
            if not session.verifier.complete:
                return pb.PushReply(chunks_received=session.chunks_received, complete=False)
            row = SubmissionRow(session.node_id, int(session.weight), session.train_loss,
                                session.manifest.total_bytes, session.sha256_hex,
                                str(session.delta_path), self.clock())  # fmt: skip
            try:
                self._accepting_round(
                    session.node_id, session.round_number
                )  # deadline may have passed
                session.finish(self.accumulator)
                self._store_call(
                    self.store.add_submission, self.federation_id, session.round_number, row
                )
            except Refused:
                self._discard_session(session)
                raise
            del self._sessions[session.node_id]
            self._completed[session.node_id] = row
            if self.round.state == RoundState.TRAINING:
                self._store_call(
                    self.store.set_round_state,
                    self.federation_id,
                    self.round.number,
                    RoundState.COLLECTING,
                )
                self.round = self.store.current_round(self.federation_id)
                crash_points.reached("aggregator.collecting", self.round.number)
            self.log(
                f"round {session.round_number}: update from {session.node_id} ({int(session.weight)} tokens)"
            )
            self._changed.notify_all()
            return pb.PushReply(chunks_received=session.chunks_received, complete=True)

    def reject_upload(self, session: UploadSession) -> None:
        """A refused upload leaves nothing behind: its bytes leave the spool and the sum."""
        with self._lock:
            self._discard_session(session)

    def release_upload(self, session: UploadSession) -> None:
        """The stream broke: keep what arrived so the node can resume."""
        with self._lock:
            session.streaming = False

    def _discard_session(self, session: UploadSession) -> None:
        session.discard()
        if self._sessions.get(session.node_id) is session:
            del self._sessions[session.node_id]
        self._rebuild_accumulator()

    def upload_status(self, node_id: str, number: int) -> pb.UploadStatus:
        with self._lock:
            if number == self.round.number:
                if node_id in self._completed:
                    return pb.UploadStatus(complete=True)
                session = self._sessions.get(node_id)
                return pb.UploadStatus(
                    chunks_received=session.chunks_received if session else 0, complete=False
                )
            if number > self.round.number or number < 0:
                raise NotFound(f"round {number} does not exist yet")
            done = {
                s.node_id
                for s in self._store_call(self.store.submissions, self.federation_id, number)
            }
            return pb.UploadStatus(complete=node_id in done)

    # ---- plumbing -----------------------------------------------------------------------------
    def _spool_dir(self, number: int) -> Path:
        return self.uploads_dir / f"round_{number:08d}"

    def _store_call(self, method, *args):
        try:
            return method(*args)
        except StoreError as e:
            raise Unavailable(str(e)) from e

    def tick(self) -> None:
        with self._lock:
            self._maybe_start_round()
            self._maybe_close_round()

    def _tick_forever(self) -> None:
        while not self._stop.wait(0.1):
            try:
                self.tick()
            except Exception as e:  # keep coordinating; the next tick retries
                self.log(f"round ticker: {e}")

    def close(self) -> None:
        self._stop.set()
        if self._ticker.is_alive():
            self._ticker.join(timeout=5)
        with self._lock:
            for session in self._sessions.values():
                session.cancelled = True
            self._changed.notify_all()


def _spec_json(spec: pb.FederationSpec) -> str:
    return json.dumps(
        json_format.MessageToDict(spec, preserving_proto_field_name=True), sort_keys=True
    )
