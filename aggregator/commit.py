"""Committing a round: outer step, durable checkpoint, database commit, the new version served.

    begin (lock)       record AGGREGATING; snapshot the round, the model it trained from, its
                       uploads and its sum                       ── crash point aggregator.aggregating
    run (no lock)      mean delta → outer step → checkpoint (temp, fsync, rename, sha256)
                                                                 ── crash point aggregator.checkpointed
                       encode (hash) the new model for serving, beside the checkpoint
    run (lock)         commit the round row with the checkpoint's sha256 (and open the next
                       round) in one transaction; swap in the new version; wake waiting nodes

The minutes a large model spends in the middle step hold no lock: nodes keep polling (told to
wait), joining and asking about uploads. Only one commit runs at a time (`begin` says None while
one is under way; the ticker calls it ten times a second). The round row moves to COMMITTED only
after the checkpoint is durable. If anything fails, nothing is swapped in. A failure the same
inputs would meet again (secret shares that do not rebuild, a mean update that is not finite:
PERMANENT_FAILURES) fails the round, with its reason in the database, and the federation moves
on; any other (disk, database) leaves the round AGGREGATING and is retried with a growing pause.
The outer optimizer may have stepped, so the next attempt first reloads the last durable
checkpoint's optimizer state (`_dirty`). A restarted aggregator does the same from the
database. If the database did commit although the call failed (its answer lost), the next
attempt finds that version in the database and installs it instead of stepping again.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from aggregator.checkpoints import CheckpointStore
from aggregator.downloads import compress_step
from aggregator.errors import Refused
from aggregator.federation import UPDATE_SCALE_KEY, update_scale_of
from aggregator.intake import UploadIntake
from aggregator.outer import OuterOptimizer
from aggregator.round_sum import Member, RoundSum
from aggregator.secure_aggregation import SecAggRound
from aggregator.state import GlobalModel, RoundState, Shared
from aggregator.store import CheckpointRow, MetricRow, RoundRow, SubmissionRow
from model.delta import DeltaError
from protos import crash_points

# A failed commit is retried after 0.2 s, doubling up to this: a full disk or a lost database
# connection heals on its own, and each attempt re-reads the last checkpoint.
MAX_RETRY_SECONDS = 5.0
# Failures that the same round's inputs would hit again on every attempt: the round fails.
PERMANENT_FAILURES = (Refused, DeltaError)


@dataclass(frozen=True)
class CommitJob:
    """What the outer step needs, taken under the lock: nothing here changes meanwhile (the
    round is AGGREGATING, so no upload is admitted or completed)."""

    round: RoundRow
    base: GlobalModel  # the version the round trained from
    completed: tuple[SubmissionRow, ...]
    round_sum: RoundSum
    secagg: SecAggRound | None  # READY: only read from here on
    reload: bool  # an earlier attempt failed part-way: start from the durable state


class Committer:
    def __init__(
        self,
        shared: Shared,
        intake: UploadIntake,
        checkpoints: CheckpointStore,
        outer: OuterOptimizer,
    ) -> None:
        self.shared, self.intake, self.checkpoints, self.outer = shared, intake, checkpoints, outer
        self._running = False  # a job is between begin and the end of run (under the lock)
        self._dirty = False  # in-memory outer state may be ahead of the last checkpoint
        self._failures = 0  # consecutive transient failures of this round's commit
        self._retry_at = 0.0  # no attempt before this time (shared.clock)
        self.permanent_failure: str | None = None  # why this round can never commit
        self._aggregating_since: float | None = None  # this process moved the round there

    def begin(self) -> CommitJob | None:
        """Mark the round AGGREGATING and snapshot it; None if a commit is under way or the
        database refused. Caller holds the lock, then calls `run` without it."""
        s = self.shared
        if self._running or self.permanent_failure is not None or s.clock() < self._retry_at:
            return None
        try:
            if s.round.state != RoundState.AGGREGATING:
                s.move_round(RoundState.AGGREGATING)
                self._aggregating_since = s.clock()
                s.metrics.phase("training", s.round.started_at, self._aggregating_since)
        except Exception as e:
            self._failed(s.round.number, e)
            return None
        crash_points.reached("aggregator.aggregating", s.round.number)
        self._running = True
        intake = self.intake
        return CommitJob(s.round, s.model, tuple(intake.completed.values()), intake.round_sum,
                         s.secagg, self._dirty)  # fmt: skip

    def run(self, job: CommitJob) -> None:
        """The outer step and the checkpoint without the lock, then the commit under it."""
        s, r = self.shared, job.round
        aggregating_since = self._aggregating_since  # installing the new version clears it
        try:
            if job.reload and self._reload(job):
                return
            mean_delta = self._mean_delta(job)
            scale = self._update_scale(job, mean_delta)
            # The new model overwrites the mean's buffer, tensor by tensor.
            new_params = self.outer.step(job.base.params, mean_delta, out=mean_delta)
            del mean_delta
            version = job.base.version + 1
            chunk_bytes = s.config.server.chunk_bytes
            download, update_path, update_manifest = (
                s.config.federation.download_encoding,
                None,
                None,
            )
            if download != "fp32":  # the new model is what the compressed update rebuilds
                update_path = self.checkpoints.root / f"update_v{version:08d}.payload"
                new_params, update_manifest = compress_step(
                    job.base.params, new_params, download, update_path, chunk_bytes, version
                )
            extra = {UPDATE_SCALE_KEY: json.dumps(scale)} if scale is not None else {}
            extra |= s.model_description
            # Serving needs every chunk's hash, the checkpoint its file's: both only read the
            # new model, so they run side by side (hashing and file writes release the GIL).
            with ThreadPoolExecutor(1, thread_name_prefix="commit-encode") as pool:
                building = pool.submit(
                    GlobalModel.build, new_params, version, chunk_bytes,
                    encoding=s.config.delta_encoding, update_path=update_path,
                    update_manifest=update_manifest, update_scale=scale,
                )  # fmt: skip
                record = self.checkpoints.write(version, r.number, new_params,
                                                self.outer.state_tensors(),
                                                self.outer.state_meta(), extra)  # fmt: skip
                row = CheckpointRow(
                    version, r.number, str(record.path), record.sha256, record.nbytes, s.clock()
                )
                crash_points.reached("aggregator.checkpointed", r.number)
                model = building.result()
            total = s.config.federation.rounds
            open_next = not (total and version >= total)
            with s.lock:
                s.store_call(s.store.commit_round, s.federation_id, r.number, row,
                             self._metrics(job), open_next)  # fmt: skip
                self._install(model)
        except Exception as e:
            self._failed(r.number, e)
            return
        finally:
            with s.lock:
                self._running = False
        self._failures, self._retry_at = 0, 0.0
        now = s.clock()
        s.metrics.round_ended("committed", r.started_at, now)
        s.metrics.phase("aggregating", aggregating_since, now)
        s.log(f"round {r.number}: committed version {version} from {len(job.completed)} upload(s)")
        self._prune_checkpoints()

    def _mean_delta(self, job: CommitJob) -> dict[str, torch.Tensor]:
        """The mean update, computed in the round sum's own buffer where it can be (the sum is
        consumed: a retry rebuilds it from the spools)."""
        rs = job.round_sum
        if self.shared.config.round.deterministic and job.secagg is None:
            rs.rebuild(order=self._in_node_order, by_commit=True)  # whatever the arrival order
        elif rs.needs_rebuild():  # stragglers' partial uploads leave the sum; or a retry
            rs.rebuild(by_commit=True)
        if job.secagg is None:
            return rs.consume_mean()
        tokens = {sub.node_id: sub.num_tokens for sub in job.completed}
        return rs.consume_unmasked_mean(job.secagg, tokens)

    @staticmethod
    def _update_scale(job: CommitJob, mean_delta: dict[str, torch.Tensor]) -> list[float] | None:
        """Secure rounds: each tensor's RMS of the mean update × the largest node weight, the
        public scale the next round's clip bounds follow (lifecycle._clips)."""
        sec = job.secagg
        if sec is None:
            return None
        heaviest = max(sub.num_tokens for sub in job.completed) / sec.weight_unit
        return [float(t.float().pow(2).mean().sqrt()) * heaviest for t in mean_delta.values()]

    def _in_node_order(self, members: list[Member]) -> list[Member]:
        """By organisation: an order that is the same in every run of a federation (node ids
        are random), so that a deterministic fp32 sum is reproducible across runs."""
        s = self.shared
        nodes = s.store_call(s.store.nodes, s.federation_id)
        organisation = {n.id: n.organisation for n in nodes}
        return sorted(members, key=lambda m: (organisation.get(m.node_id, ""), m.node_id))

    def _metrics(self, job: CommitJob) -> list[MetricRow]:
        r, now = job.round, self.shared.clock()
        rows = []
        for sub in job.completed:
            rows.append(MetricRow(r.number, sub.node_id, "train_loss", sub.train_loss))
            rows.append(MetricRow(r.number, sub.node_id, "num_tokens", float(sub.num_tokens)))
        rows.append(MetricRow(r.number, None, "nodes", float(len(job.completed))))
        rows.append(MetricRow(r.number, None, "round_seconds", now - (r.started_at or now)))
        return rows + self.shared.downloads.rows(r.number)

    def _install(self, model: GlobalModel) -> None:
        """Serve the committed version and move on to the next round. Caller holds the lock."""
        s = self.shared
        next_round = s.store.current_round(s.federation_id)  # may fail: then nothing changes
        s.model = model
        s.downloads.forget_through(s.round.number)
        self.round_ended()
        self.intake.end_round()
        s.secagg = None
        s.round = next_round
        s.changed.notify_all()

    def _reload(self, job: CommitJob) -> bool:
        """Back to the last durable state; True if that is this round's commit (installed)."""
        s = self.shared
        row = s.store_call(s.store.latest_checkpoint, s.federation_id)
        params, outer_tensors, meta = self.checkpoints.read(row.version, expected_sha256=row.sha256)
        if row.version == job.base.version:
            self.checkpoints.remove_newer_than(row.version)  # the failed attempt's file
            self.outer.load_state(outer_tensors, meta["outer"])
            self._dirty = False
            return False
        self.outer.load_state(outer_tensors, meta["outer"])
        model = GlobalModel.build(params, row.version, s.config.server.chunk_bytes,
                                  encoding=s.config.delta_encoding,
                                  update_scale=update_scale_of(meta))  # fmt: skip
        with s.lock:
            self._install(model)
        self._dirty = False
        s.log(f"round {job.round.number}: found version {row.version} committed; serving it")
        return True

    def _failed(self, number: int, error: Exception) -> None:
        # Nothing was committed, but the outer step may have moved the optimizer state: the
        # next attempt (or the next round's commit) reloads the last durable checkpoint first.
        self._dirty = True
        if isinstance(error, PERMANENT_FAILURES):
            self.permanent_failure = str(error)  # the lifecycle fails the round
            self.shared.log(f"round {number}: aggregation failed for good: {error}")
            return
        self._failures += 1
        delay = min(MAX_RETRY_SECONDS, 0.2 * 2 ** (self._failures - 1))
        self._retry_at = self.shared.clock() + delay
        self.shared.log(f"round {number}: aggregation failed, will retry in {delay:.1f} s: {error}")

    def round_ended(self) -> None:
        """A new round: its commit starts with a clean slate (the reload flag stays)."""
        self._failures, self._retry_at, self.permanent_failure = 0, 0.0, None
        self._aggregating_since = None

    def _prune_checkpoints(self) -> None:
        keep = self.shared.config.store.keep_checkpoints
        if keep:
            self.checkpoints.prune(keep, protect={self.shared.model.version})
        served = self.shared.model.update
        for old in self.checkpoints.root.glob("update_v*.payload"):  # only the served one is read
            if served is None or old != served.payload.path:
                old.unlink(missing_ok=True)
