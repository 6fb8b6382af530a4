"""The Coordinator: the one object the servicer calls, a thin facade over the jobs that run a
federation, each in its own module:

    federation.py   create the federation, or resume it from its last committed checkpoint
    membership.py   Join, session tokens, certified organisations
    admissions.py   under a scheduler (Flower): the one-time tokens a Join must carry
    lifecycle.py    the round state machine: tasks, start, close, fail, secure-aggregation stages
    intake.py       uploads: admit, spool and sum chunks, complete, refuse, resume, status
    commit.py       outer step, durable checkpoint, database commit, the new version served
    state.py        what they share: the current round and model, and the lock guarding them

No lock is held across disk I/O: the commit's outer step, checkpoint and re-encoding, upload
fsyncs and rebuilds of the running sum all run outside the shared lock, so Join, GetTask,
upload status and health answer promptly whatever the aggregator is busy with. Refusals are
`aggregator.errors.Refused`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from aggregator.accumulator import StreamingAccumulator
from aggregator.admissions import Admissions
from aggregator.checkpoints import CheckpointStore
from aggregator.commit import Committer
from aggregator.config import AggregatorConfig
from aggregator.downloads import OuterUpdate
from aggregator.errors import NotFound, Refused
from aggregator.federation import FROZEN_SPEC_FIELDS, build_spec, open_federation
from aggregator.intake import MAX_TOKENS_PER_UPDATE, UploadIntake
from aggregator.lifecycle import RoundLifecycle
from aggregator.membership import Membership, token_digest
from aggregator.secure_aggregation import SecAggRound
from aggregator.state import ACCEPTING, GlobalModel, RecoveryError, RoundState, Shared
from aggregator.status_records import read_federation, size
from aggregator.store import NodeRow, RoundRow, Store
from aggregator.uploads import UploadSession
from protos import federation_pb2 as pb
from protos.codec import EncodedPayload, SpooledPayload, TensorSpec

__all__ = ["ACCEPTING", "FROZEN_SPEC_FIELDS", "MAX_TOKENS_PER_UPDATE", "Coordinator",
           "RecoveryError", "RoundState", "build_spec", "token_digest"]  # fmt: skip


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
        self.config, self.store = config, store
        state_dir = Path(config.store.state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        checkpoints = CheckpointStore(state_dir / "checkpoints")
        opened = open_federation(config, store, checkpoints, clock=clock, log=log)
        self.federation_id, self.spec, self.model_config = (
            opened.federation_id, opened.spec, opened.model_config
        )  # fmt: skip
        model = GlobalModel.build(opened.params, opened.version, config.server.chunk_bytes,
                                  encoding=config.delta_encoding,
                                  update_scale=opened.update_scale)  # fmt: skip
        self.shared = Shared(config, store, self.federation_id, self.spec, model,
                             clock=clock, log=log)  # fmt: skip
        self.state_dir = state_dir
        self._pulls: dict[str, tuple[int, int]] = {}  # node id -> (version, bytes sent so far)
        self.membership = Membership(self.shared)
        self.intake = UploadIntake(self.shared, state_dir / "uploads")
        self.committer = Committer(self.shared, self.intake, checkpoints, opened.outer)
        self.lifecycle = RoundLifecycle(self.shared, self.membership, self.intake, self.committer)
        self.shared.metrics.watch(self._nodes_connected, lambda: self.shared.model.version,
                                  lambda: self.shared.round.number)  # fmt: skip
        self.lifecycle.recover()
        self.intake.settle()  # a round failed at start-up leaves its spool folder to delete
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick_forever, name="round-ticker", daemon=True)
        if start_ticker:
            self._ticker.start()

    # ---- what the shared state says -----------------------------------------------------------
    def _nodes_connected(self) -> float:
        """Nodes seen by GetTask within the long-poll window (a metric: NaN when busy)."""
        if not self.lock.acquire(timeout=1.0):
            return float("nan")
        try:
            return float(len(self.lifecycle._ready_nodes()))
        finally:
            self.lock.release()

    @property
    def lock(self) -> threading.RLock:
        return self.shared.lock

    @property
    def log(self) -> Callable[[str], None]:
        return self.shared.log

    @log.setter
    def log(self, log: Callable[[str], None]) -> None:
        self.shared.log = log

    @property
    def round(self) -> RoundRow:
        return self.shared.round

    @property
    def version(self) -> int:
        return self.shared.model.version

    @property
    def params(self) -> dict[str, torch.Tensor]:
        return self.shared.model.params

    @property
    def payload(self) -> EncodedPayload:
        return self.shared.model.payload

    @property
    def upload_specs(self) -> tuple[TensorSpec, ...]:
        return self.shared.model.upload_specs

    @property
    def accumulator(self) -> StreamingAccumulator:
        """The current round's running sum."""
        return self.intake.accumulator

    @property
    def secure(self) -> bool:
        return self.shared.secure

    @property
    def finished(self) -> bool:
        return self.shared.finished

    @property
    def weight_unit(self) -> float:
        return self.lifecycle.weight_unit

    # ---- nodes --------------------------------------------------------------------------------
    def join(self, organisation: str, capabilities: dict, admission_token: str = "",
             curation: pb.DataCuration | None = None) -> tuple[NodeRow, str]:  # fmt: skip
        return self.membership.join(organisation, capabilities, admission_token, curation)

    def require_admission(self) -> Admissions:
        """From now on a Join needs a token from the returned Admissions (a scheduler's)."""
        self.membership.admissions = self.membership.admissions or Admissions()
        return self.membership.admissions

    def schedule_rounds(self) -> None:
        """From now on rounds start only when start_round names their nodes (a scheduler's)."""
        with self.lock:
            self.lifecycle.scheduled = True

    def start_round(self, node_ids: list[str]) -> int:
        """Start the open round with these member nodes; its number."""
        with self.lock:
            self.lifecycle.start_round(node_ids)
            return self.shared.round.number

    def node_of_organisation(self, organisation: str) -> NodeRow:
        return self.membership.node_of_organisation(organisation)

    def authenticate(self, token: str) -> NodeRow:
        return self.membership.authenticate(token)

    # ---- tasks --------------------------------------------------------------------------------
    def get_task(
        self, node_id: str, wait_seconds: float, final_model: bool = False,
        still_wanted: Callable[[], bool] | None = None,
    ) -> pb.Task:  # fmt: skip
        return self.lifecycle.get_task(node_id, wait_seconds, final_model, still_wanted)

    def every_node_saw_stop(self) -> bool:
        return self.lifecycle.every_node_saw_stop()

    # ---- secure aggregation stages ------------------------------------------------------------
    def _secagg_round(self, number: int) -> SecAggRound:
        sec, current = self.shared.secagg, self.shared.round.number
        if sec is None or number != current:
            raise Refused(
                f"round {number} has no secure aggregation in progress (current round {current})"
            )
        return sec

    def advertise_keys(self, node_id: str, request: pb.AdvertiseKeysRequest, certificate_pem: bytes,
                       identity) -> None:  # fmt: skip
        with self.lock:
            self._secagg_round(request.round).advertise(node_id, request, certificate_pem, identity)
            self.shared.changed.notify_all()

    def share_keys(self, node_id: str, request: pb.ShareKeysRequest) -> None:
        with self.lock:
            self._secagg_round(request.round).share(node_id, request)
            self.shared.changed.notify_all()

    def secagg_stage(self, number: int) -> str | None:
        """The stage round `number`'s secure aggregation is in; None once it is over (or
        before it starts)."""
        with self.lock:
            sec = self.shared.secagg
            if sec is None or self.shared.round.number != number:
                return None
            return str(sec.stage)

    def secagg_members(self, number: int, stage: str) -> list[str]:
        """Who the round's stage `stage` expects an answer from: the participants (keys), the
        nodes that advertised keys (shares), that shared (masked input), that sent a masked
        update (unmask)."""
        with self.lock:
            sec = self._secagg_round(number)
            return {"ADVERTISE": list(sec.participants), "SHARE": sec.u1, "MASKED_INPUT": sec.u2,
                    "UNMASK": list(sec.survivors)}.get(stage, [])  # fmt: skip

    def secagg_state(self, node_id: str, number: int) -> pb.SecAggState:
        with self.lock:
            return self._secagg_round(number).state_for(node_id)

    def unmask(self, node_id: str, request: pb.UnmaskRequest) -> None:
        with self.lock:
            self._secagg_round(request.round).unmask(node_id, request)
            self.shared.changed.notify_all()

    # ---- models -------------------------------------------------------------------------------
    def model_payload(
        self, version: int, from_previous: bool = False
    ) -> tuple[EncodedPayload | SpooledPayload, pb.TensorManifest]:
        """What a pull of `version` streams, and its manifest: the compressed outer update
        when the node holds the version before and there is one, else the whole model."""
        model = self.shared.model  # swapped whole: no lock needed to read one version
        if version != model.version:
            raise NotFound(
                f"model version {version} is not served; the current version is {model.version}"
            )
        if from_previous and model.update is not None:
            return model.update.payload, model.update.manifest_proto()
        return model.payload, model.payload.manifest.to_proto()

    def pulling(self, node_id: str, version: int, sent: int) -> None:
        """A pull of `version` to `node_id` has sent `sent` bytes so far (for the status)."""
        self._pulls[node_id] = (version, sent)  # one dict store: no lock needed

    def downloaded(self, node_id: str, nbytes: int) -> None:
        """A pull stream ended after `nbytes`: tallied against the current round, recorded
        when the round ends (aggregator/traffic.py)."""
        self._pulls.pop(node_id, None)
        self.shared.downloads.add(self.shared.round.number, node_id, nbytes)

    def federation_status(self) -> pb.FederationStatus:
        """The records' view of this federation, plus what only this process's memory holds:
        each node's last call, the uploads and pulls in flight."""
        s = self.shared
        with self.store.engine.connect() as db:
            status = read_federation(db, self.federation_id, self.state_dir, s.clock())
        with self.lock:  # a few dict reads
            status.live, status.as_of = True, s.clock()
            ready, sessions = dict(self.lifecycle.ready), dict(self.intake.sessions)
            completed = set(self.intake.completed)
            open_round = s.round.number
        sent = s.downloads.of_round(open_round)  # not recorded until the round ends
        for node in status.nodes:
            node.last_call = ready.get(node.node_id, 0.0)
            node.downloaded_bytes += sent.get(node.node_id, 0)
            session, pull = sessions.get(node.node_id), self._pulls.get(node.node_id)
            if session is not None and node.node_id not in completed:
                received = session.added_bytes
                node.upload_in_flight_bytes = received
                node.doing = (f"uploading round {session.round_number} ({size(received)} of "
                              f"{size(session.manifest.total_bytes)})")  # fmt: skip
                if not session.streaming:
                    node.doing += ", stream cut: waiting for it to resume"
            elif pull is not None and status.status != "finished":
                node.doing = f"pulling model version {pull[0]} ({size(pull[1])} so far)"
        return status

    def download_update(self, version: int) -> OuterUpdate | None:
        """The compressed update to `version` this process serves, if any."""
        model = self.shared.model
        return model.update if model.version == version else None

    # ---- uploads ------------------------------------------------------------------------------
    def begin_upload(self, node_id: str, header: pb.UpdateHeader) -> UploadSession:
        try:
            with self.lock:
                return self.intake.begin(node_id, header)
        finally:
            self.intake.settle()  # a session it replaced leaves disk and sum before any chunk

    def add_chunk(self, session: UploadSession, chunk: pb.Chunk) -> None:
        metrics, nbytes = self.shared.metrics, len(chunk.data)
        metrics.received(nbytes)
        start = time.perf_counter()
        session.add_chunk(chunk.index, chunk.data)  # no lock: uploads add in parallel
        metrics.accumulated(nbytes, time.perf_counter() - start)

    def end_upload(self, session: UploadSession) -> pb.PushReply:
        """The stream ended: complete the upload if every chunk arrived, else keep it to resume."""
        try:
            return self.intake.end(session)
        finally:
            self.intake.settle()

    def reject_upload(self, session: UploadSession) -> None:
        """A refused upload leaves nothing behind: its bytes leave the spool and the sum."""
        with self.lock:
            self.intake.discard(session)
        self.intake.settle()

    def release_upload(self, session: UploadSession) -> None:
        """The stream broke: keep what arrived so the node can resume."""
        with self.lock:
            self.intake.release(session)

    def upload_status(self, node_id: str, number: int) -> pb.UploadStatus:
        with self.lock:
            return self.intake.status(node_id, number)

    # ---- the ticker ---------------------------------------------------------------------------
    def tick(self) -> None:
        with self.lock:
            self.lifecycle.maybe_start_round()
            job = self.lifecycle.maybe_close_round()
        try:
            self.intake.settle()  # stragglers dropped: their spools go, the sum is rebuilt
        finally:
            if job is not None:  # begun: run it whatever happened, it ends the commit
                self.committer.run(job)  # the heavy part, without the lock
            self.intake.settle()  # the ended round's spool folder

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
        with self.lock:
            self.intake.cancel_all()
            self.shared.changed.notify_all()
