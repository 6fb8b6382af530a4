"""Upload intake: who may upload what, the round's upload sessions and completed uploads, their
spool files and the round's running sum.

Bookkeeping (`sessions`, `completed`) changes under the shared lock; disk work never does. A
session's chunks are spooled and summed without the lock (aggregator/uploads.py); a completed
upload is fsynced and renamed without it, then recorded under it after checking again that the
round still takes it. Discarding a session only cancels it under the lock: its files are deleted
and the sum rebuilt without it by `settle()`, which the caller runs once the lock is released
(before it answers, so a refusal leaves nothing behind when the node hears of it).
"""

from __future__ import annotations

import math
import shutil
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from aggregator.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Refused,
    RoundClosed,
    Unavailable,
)
from aggregator.round_sum import Member, RoundSum, SpooledUpload
from aggregator.state import ACCEPTING, RecoveryError, RoundState, Shared
from aggregator.store import (
    BASE_VAL_LOSS,
    CPU_ENERGY,
    GPU_ENERGY,
    MetricRow,
    RoundRow,
    SubmissionRow,
)
from aggregator.uploads import UploadSession
from protos import crash_points
from protos import federation_pb2 as pb
from protos.codec import CodecError, Manifest, payload_digest_of_file

MAX_TOKENS_PER_UPDATE = 10**15
MAX_ENERGY_JOULES = 1e12  # a node's energy for one round: 1 TJ is a megawatt for 11 days
# Optional header fields kept with a completed upload as metric rows of the same name.
ENERGY_FIELDS = (GPU_ENERGY, CPU_ENERGY)


class UploadIntake:
    def __init__(self, shared: Shared, uploads_dir: Path) -> None:
        self.shared, self.uploads_dir = shared, uploads_dir
        self.sessions: dict[str, UploadSession] = {}  # this round's uploads in progress
        self.completed: dict[str, SubmissionRow] = {}  # this round's complete uploads
        self.round_sum = self._new_sum(shared.round.number)
        self._doomed: list[UploadSession] = []  # cancelled; files and sum wait for settle()
        self._stale_dirs: list[Path] = []  # spool folders of ended rounds
        self._settling = threading.Lock()  # held across settle's disk work: callers wait for it
        self._queued = 0  # discards and folders queued for settle() so far (under the lock)
        self._settled = 0  # how many of them settle() has done (under _settling)

    @property
    def accumulator(self):
        return self.round_sum.accumulator

    def _new_sum(self, number: int) -> RoundSum:
        s = self.shared
        return RoundSum(number, s.model.model_specs, s.config.delta_encoding)

    def spool_dir(self, number: int) -> Path:
        return self.uploads_dir / f"round_{number:08d}"

    # ---- start-up -----------------------------------------------------------------------------
    def recover(self, submissions: Iterable[SubmissionRow]) -> None:
        """Rebuild the open round's sum from its completed uploads' spools (before serving)."""
        spool = self.spool_dir(self.shared.round.number)
        for part in spool.glob("*.part"):  # uploads cut off by the restart: the nodes re-send
            part.unlink()
        for sub in submissions:
            path = Path(sub.path)
            chunk_bytes = self.shared.config.server.chunk_bytes
            if not path.is_file() or payload_digest_of_file(path, chunk_bytes).hex() != sub.sha256:
                raise RecoveryError(f"upload {path} recorded for round "
                                    f"{self.shared.round.number} is missing or corrupt")  # fmt: skip
            member = SpooledUpload(sub.node_id, path, float(sub.num_tokens), path.stat().st_size)
            self.round_sum.include(member)
            self.completed[sub.node_id] = sub
        self.round_sum.rebuild()

    # ---- the upload verbs ---------------------------------------------------------------------
    def begin(self, node_id: str, header: pb.UpdateHeader) -> UploadSession:
        """Admit a PushUpdate stream (caller holds the lock, then settles)."""
        s = self.shared
        r = self.accepting_round(node_id, header.round)
        if s.secagg is not None:
            s.secagg.may_upload(node_id)
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
        if header.HasField("base_val_loss") and not (
            math.isfinite(header.base_val_loss) and header.base_val_loss >= 0
        ):
            raise InvalidArgument("base_val_loss must be a finite, non-negative number")
        for field in ENERGY_FIELDS:
            joules = getattr(header, field)
            if header.HasField(field) and not (
                math.isfinite(joules) and 0 <= joules <= MAX_ENERGY_JOULES
            ):
                raise InvalidArgument(f"{field} must be a finite number of joules in "
                                      f"0..{MAX_ENERGY_JOULES:g}")  # fmt: skip
        try:
            manifest = Manifest.from_proto(
                header.manifest,
                expected=s.model.upload_specs,
                max_total_bytes=s.model.payload.manifest.total_bytes,
            )
        except CodecError as e:
            raise InvalidArgument(f"update manifest refused: {e}") from e
        session = self.sessions.get(node_id)
        if session is not None and session.streaming:
            # Usually the node's previous connection, not yet seen to be gone: retryable.
            raise Unavailable("another upload from this node is still in progress")
        if session is not None and (session.manifest != manifest or header.first_chunk == 0):
            # A different payload, or a node starting over (e.g. restarted): drop the old bytes.
            self.discard(session)
            session = None
        received = session.chunks_received if session else 0
        if header.first_chunk != received:
            raise Refused(f"resume this upload from chunk {received}, not {header.first_chunk}")
        if session is None:
            session = UploadSession(node_id, r.number, manifest, float(header.num_tokens),
                                    header.train_loss, self.spool_dir(r.number), self.round_sum,
                                    check_finite=not s.secure)  # fmt: skip
            self.sessions[node_id] = session
        # A resumed stream may bring the score the first one did not: the newest header's wins.
        if header.HasField("base_val_loss"):
            session.base_val_loss = header.base_val_loss
        for field in ENERGY_FIELDS:
            if header.HasField(field):
                setattr(session, field, getattr(header, field))
        session.streaming = True
        return session

    def accepting_round(self, node_id: str, number: int) -> RoundRow:
        s = self.shared
        r = s.round
        if s.finished:
            raise Refused("the federation has finished")
        if number < r.number:
            raise Refused(f"round {number} is closed; the current round is {r.number}")
        if number > r.number:
            raise Refused(f"round {number} has not started; the current round is {r.number}")
        if r.state not in ACCEPTING:
            raise Refused(f"round {number} is not accepting uploads (it is {r.state})")
        if node_id not in r.participants:
            raise PermissionDenied(f"this node is not a participant of round {number}")
        if node_id in self.completed:
            raise AlreadyExists(f"this node's update for round {number} was already received")
        if s.clock() >= (r.deadline_at or math.inf):
            raise RoundClosed(f"round {number} closed for uploads at its deadline")
        return r

    def end(self, session: UploadSession) -> pb.PushReply:
        """The stream ended: complete the upload if every chunk arrived, else keep it to resume.
        Caller holds no lock; settles afterwards."""
        s = self.shared
        with s.lock:
            if not session.verifier.complete:
                session.streaming = False
                return pb.PushReply(chunks_received=session.chunks_received, complete=False)
            # `streaming` stays set until it is recorded: no second stream may take it over
            # while it is made durable below.
            self._still_accepting(session)
        try:
            session.finish()  # fsync + rename: without the lock
        except BaseException:  # whatever went wrong, its spool is in an unknown state
            with s.lock:
                self.discard(session)
            raise
        with s.lock:
            self._still_accepting(session)  # the deadline may have passed meanwhile
            row = SubmissionRow(session.node_id, int(session.weight), session.train_loss,
                                session.manifest.total_bytes, session.sha256_hex,
                                str(session.delta_path), s.clock())  # fmt: skip
            # Stored with the submission, whatever the round's outcome: it scores the model
            # the round started from, not this update.
            scores = []
            if session.base_val_loss is not None:
                scores.append(MetricRow(session.round_number, session.node_id, BASE_VAL_LOSS,
                                        session.base_val_loss))  # fmt: skip
            for field in ENERGY_FIELDS:
                joules = getattr(session, field)
                if joules is not None:
                    scores.append(MetricRow(session.round_number, session.node_id, field, joules))
            try:
                s.store_call(s.store.add_submission, s.federation_id, session.round_number, row,
                             scores)  # fmt: skip
            except Refused:
                self.discard(session)
                raise
            session.streaming = False
            del self.sessions[session.node_id]
            self.completed[session.node_id] = row
            session.round_sum.complete(session)
            if s.round.state == RoundState.TRAINING:
                s.move_round(RoundState.COLLECTING)
                crash_points.reached("aggregator.collecting", s.round.number)
            s.log(f"round {session.round_number}: update from {session.node_id} "
                  f"({int(session.weight)} tokens)")  # fmt: skip
            s.changed.notify_all()
            return pb.PushReply(chunks_received=session.chunks_received, complete=True)

    def _still_accepting(self, session: UploadSession) -> None:
        """Refuse (and discard) a session its round no longer takes. Caller holds the lock."""
        try:
            if session.cancelled or self.sessions.get(session.node_id) is not session:
                raise RoundClosed(
                    f"round {session.round_number} closed while this upload was arriving"
                )
            self.accepting_round(session.node_id, session.round_number)
        except Refused:
            self.discard(session)
            raise

    def release(self, session: UploadSession) -> None:
        """The stream broke: keep what arrived so the node can resume. Caller holds the lock."""
        session.streaming = False

    def status(self, node_id: str, number: int) -> pb.UploadStatus:
        s = self.shared
        if number == s.round.number:
            if node_id in self.completed:
                return pb.UploadStatus(complete=True)
            session = self.sessions.get(node_id)
            return pb.UploadStatus(
                chunks_received=session.chunks_received if session else 0, complete=False
            )
        if number > s.round.number or number < 0:
            raise NotFound(f"round {number} does not exist yet")
        done = {sub.node_id for sub in s.store_call(s.store.submissions, s.federation_id, number)}
        return pb.UploadStatus(complete=node_id in done)

    # ---- leaving ------------------------------------------------------------------------------
    def discard(self, session: UploadSession) -> None:
        """Cancel a session: it adds nothing more, and `settle` deletes its bytes from disk and
        from the sum. Caller holds the lock."""
        session.cancelled = True
        session.streaming = False
        if self.sessions.get(session.node_id) is session:
            del self.sessions[session.node_id]
        if not session.discarded:  # its stream refused afterwards: one rebuild is enough
            session.discarded = True
            self._doomed.append(session)
            self._queued += 1

    def drop_sessions(self) -> None:
        """Cancel every upload still in progress (stragglers). Caller holds the lock."""
        for session in list(self.sessions.values()):
            self.discard(session)

    def end_round(self) -> None:
        """Forget this round's uploads; the next round starts a fresh sum (no waiting for this
        one's gate). Caller holds the lock; `settle` deletes the spool folder."""
        self.drop_sessions()
        self.completed.clear()
        self.round_sum.retired = True
        self._stale_dirs.append(self.spool_dir(self.shared.round.number))
        self._queued += 1
        self.round_sum = self._new_sum(self.shared.round.number + 1)

    def cancel_all(self) -> None:
        """Shutting down: streams in progress stop at their next chunk. Caller holds the lock."""
        for session in self.sessions.values():
            session.cancelled = True

    def settle(self) -> None:
        """Do the disk work discards left: rebuild sums without cancelled uploads, delete their
        spools and ended rounds' folders. Call without the shared lock; returns once everything
        pending when it was called is done (even if another thread took it on)."""
        with self.shared.lock:
            target = self._queued
        if self._settled >= target:
            return  # nothing queued, or another thread finished it already
        with self._settling:
            if self._settled >= target:
                return
            with self.shared.lock:
                doomed, self._doomed = self._doomed, []
                stale, self._stale_dirs = self._stale_dirs, []
                taken = self._queued
            try:
                for round_sum in {id(d.round_sum): d.round_sum for d in doomed}.values():
                    if not round_sum.retired:
                        round_sum.rebuild()  # on failure it stays marked stale (see commit)
            finally:
                for session in doomed:
                    session.delete_files()
                for folder in stale:
                    shutil.rmtree(folder, ignore_errors=True)
                self._settled = taken

    def rebuild(self, order: Callable[[list[Member]], list[Member]] | None = None) -> None:
        """Recompute the current sum from its spools (in `order`: a deterministic fp32 sum)."""
        self.round_sum.rebuild(order)
