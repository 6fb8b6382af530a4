"""The round lifecycle: what each node must do now, and when a round starts, closes or fails.

    OPEN ──(quorum of ready nodes)──► TRAINING ──(first upload complete)──► COLLECTING
      ▲                                   │ all participants uploaded, or deadline with a quorum
      │                                   ▼
      ├──────── COMMITTED ◄── checkpoint durable ── AGGREGATING   (aggregator/commit.py)
      └──────── FAILED  (deadline passed without a quorum: next round, same model)

Every transition happens under the shared lock and is recorded in the database first. Closing
a round hands over to the committer, which does the heavy part without the lock; meanwhile the
round is AGGREGATING and every node is told to wait.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from aggregator.commit import CommitJob, Committer
from aggregator.errors import Refused
from aggregator.intake import UploadIntake
from aggregator.membership import Membership
from aggregator.secure_aggregation import SecAggRound, Stage
from aggregator.state import ACCEPTING, RoundState, Shared
from model.train_config import TrainConfig
from protos import crash_points
from protos import federation_pb2 as pb
from protos.delta_encoding import RING_BITS


class RoundLifecycle:
    def __init__(
        self, shared: Shared, membership: Membership, intake: UploadIntake, committer: Committer
    ) -> None:
        self.shared, self.membership, self.intake, self.committer = (
            shared, membership, intake, committer
        )  # fmt: skip
        self.ready: dict[str, float] = {}  # node id -> last GetTask
        self._quorum_since: float | None = None
        self.saw_stop: set[str] = set()  # nodes told that the federation has finished
        # A scheduler (the Flower ServerApp) names each round's participants: start_round.
        self.scheduled = False

    def recover(self) -> None:
        """Pick the current round up where the last process left it (before serving)."""
        s = self.shared
        if s.round.state not in (*ACCEPTING, RoundState.AGGREGATING):
            return
        if s.secure:
            # The stages' keys and shares lived in the old process: this round cannot finish.
            with s.lock:  # failing a round notifies waiters, which needs the lock
                self.fail_round("the aggregator restarted during secure aggregation")
            return
        self.intake.recover(s.store.submissions(s.federation_id, s.round.number))
        s.log(f"recovery: round {s.round.number} is {s.round.state} with "
              f"{len(self.intake.completed)} upload(s) kept")  # fmt: skip

    # ---- tasks --------------------------------------------------------------------------------
    def get_task(
        self, node_id: str, wait_seconds: float, final_model: bool = False,
        still_wanted: Callable[[], bool] | None = None,
    ) -> pb.Task:  # fmt: skip
        """What `node_id` must do now; holds the call up to `wait_seconds` while it would WAIT
        (and, with `still_wanted`, while the caller is still there: a call whose client gave up
        gives its thread back within half a second). `final_model`: a node that will pull the
        final model after STOP (not yet told)."""
        s = self.shared
        if not math.isfinite(wait_seconds):  # NaN would make every comparison below false
            wait_seconds = 0.0
        wait = min(max(wait_seconds, 0.0), s.config.server.long_poll_seconds)
        give_up = time.monotonic() + wait
        with s.lock:
            while True:
                self.ready[node_id] = s.clock()
                if s.round.state == RoundState.OPEN:
                    crash_points.reached("aggregator.open", s.round.number)
                self.maybe_start_round()
                if s.finished and final_model:
                    # Not yet `saw_stop`: the aggregator stays up while this node pulls the
                    # final model (at most stop_linger_seconds), until it asks without the flag.
                    return pb.Task(kind=pb.Task.STOP, model_version=s.model.version,
                                   message="the federation has finished: pull the final model")  # fmt: skip
                task = self._task_for(node_id)
                remaining = give_up - time.monotonic()
                if task.kind != pb.Task.WAIT or remaining <= 0:
                    return task
                if still_wanted is not None and not still_wanted():
                    return task  # nobody is listening: free the thread
                # Wake at least twice a second: readiness and the start grace are time-based.
                s.changed.wait(timeout=min(remaining, 0.5))

    def _task_for(self, node_id: str) -> pb.Task:
        s, completed = self.shared, self.intake.completed
        r = s.round
        if s.finished:
            self.saw_stop.add(node_id)
            return pb.Task(kind=pb.Task.STOP, model_version=s.model.version,
                           message="the federation has finished")  # fmt: skip
        if s.secagg is not None and r.state in ACCEPTING:
            kind = self._secagg_task(s.secagg, node_id)
            if kind is not None:
                return pb.Task(kind=kind, round=r.number, model_version=r.base_version,
                               deadline_unix=r.deadline_at or 0.0)  # fmt: skip
        elif r.state in ACCEPTING and node_id in r.participants and node_id not in completed:
            return pb.Task(kind=pb.Task.TRAIN, round=r.number, model_version=r.base_version,
                           deadline_unix=r.deadline_at or 0.0)  # fmt: skip
        if r.state == RoundState.OPEN:
            ready = len(self._ready_nodes())
            message = f"waiting for a quorum: {ready} of {s.config.round.min_nodes} nodes ready"
        elif r.state == RoundState.AGGREGATING:
            message = (f"round {r.number} is being aggregated; model version "
                       f"{s.model.version + 1} follows")  # fmt: skip
        elif node_id in completed:
            message = f"update for round {r.number} received; waiting for the round to close"
        else:
            message = f"round {r.number} is running without this node; wait for the next one"
        return pb.Task(kind=pb.Task.WAIT, round=r.number, model_version=s.model.version,
                       retry_after_seconds=1.0, message=message)  # fmt: skip

    def _secagg_task(self, sec: SecAggRound, node_id: str) -> int | None:
        completed = self.intake.completed
        if sec.stage == Stage.ADVERTISE and node_id in sec.participants and node_id not in sec.keys:
            return pb.Task.SECAGG_ADVERTISE_KEYS
        if sec.stage == Stage.SHARE and node_id in sec.keys and node_id not in sec.shared:
            return pb.Task.SECAGG_SHARE_KEYS
        if sec.stage == Stage.MASKED_INPUT and node_id in sec.shared and node_id not in completed:
            return pb.Task.TRAIN
        if (
            sec.stage == Stage.UNMASK
            and node_id in sec.survivors
            and node_id not in sec.unmask_requests
        ):
            return pb.Task.SECAGG_UNMASK
        return None

    def every_node_saw_stop(self) -> bool:
        """Whether every node that ever joined has been told the federation finished."""
        s = self.shared
        nodes = s.store_call(s.store.nodes, s.federation_id)
        with s.lock:
            return {n.id for n in nodes} <= self.saw_stop

    def _ready_nodes(self) -> list[str]:
        s = self.shared
        window = s.config.server.long_poll_seconds + 2.0
        now = s.clock()
        return sorted(n for n, t in self.ready.items() if now - t <= window)

    # ---- transitions (caller holds the lock) --------------------------------------------------
    def maybe_start_round(self) -> None:
        s = self.shared
        if s.round.state != RoundState.OPEN or s.finished or self.scheduled:
            return
        ready = self._ready_nodes()
        policy = s.config.round
        if len(ready) < policy.min_nodes:
            self._quorum_since = None
            return
        now = s.clock()
        self._quorum_since = self._quorum_since or now
        everyone = len(ready) >= self.membership.known_nodes() or (
            policy.max_nodes and len(ready) >= policy.max_nodes
        )
        if not everyone and now - self._quorum_since < policy.start_grace_seconds:
            return
        self._quorum_since = None
        self._start(ready[: policy.max_nodes or None], now)

    def start_round(self, participants: list[str]) -> None:
        """Start the open round with these nodes, as a scheduler decided (`scheduled`)."""
        s, policy = self.shared, self.shared.config.round
        if s.round.state != RoundState.OPEN or s.finished:
            raise Refused(f"round {s.round.number} is {s.round.state}, not open")
        known = {n.id for n in s.store_call(s.store.nodes, s.federation_id)}
        if unknown := sorted(set(participants) - known):
            raise Refused(f"not members of this federation: {', '.join(unknown)}")
        if len(set(participants)) < policy.min_nodes:
            raise Refused(f"{len(set(participants))} node(s); [round] min_nodes is "
                          f"{policy.min_nodes}")  # fmt: skip
        self._start(sorted(set(participants))[: policy.max_nodes or None], s.clock())

    def _start(self, participants: list[str], now: float) -> None:
        s, policy = self.shared, self.shared.config.round
        deadline = now + policy.timeout_seconds
        s.round = s.store_call(s.store.start_round, s.federation_id, s.round.number,
                               participants, now, deadline)  # fmt: skip
        crash_points.reached("aggregator.training", s.round.number)
        if s.secure:
            s.secagg = SecAggRound(
                s.federation_id, s.round.number, tuple(participants), policy.min_nodes,
                self._clips(), s.config.secagg.threshold, self.weight_unit,
                s.config.secagg.stage_timeout_seconds, now, RING_BITS[s.config.delta_encoding],
            )  # fmt: skip
        s.log(f"round {s.round.number}: training with {len(participants)} node(s) "
              f"from version {s.model.version}")  # fmt: skip
        s.changed.notify_all()

    @property
    def weight_unit(self) -> float:
        """Tokens of one rank's round: a node sends Δ·num_tokens/weight_unit under secure
        aggregation, so the masked sum divided by Σ num_tokens/weight_unit is the weighted mean."""
        cfg = self.shared.config
        t = TrainConfig.from_dict(cfg.train)
        return float(cfg.federation.inner_steps * t.micro_batch_size * t.grad_accum * t.seq_len)

    def _clips(self) -> tuple[float, ...]:
        """Public per-tensor clip bounds of a secure round: `[secagg] clip_rms_multiple` times
        the scale of the last mean update (its RMS × the largest node weight), tensor by tensor,
        once one is known; `[secagg] clip` before (and for a tensor that did not move)."""
        s, cfg = self.shared, self.shared.config.secagg
        scale = s.model.update_scale
        if not cfg.clip_rms_multiple or scale is None or len(scale) != len(s.model.model_specs):
            return (cfg.clip,) * len(s.model.model_specs)
        return tuple(cfg.clip_rms_multiple * u if u > 0 else cfg.clip for u in scale)

    def maybe_close_round(self) -> CommitJob | None:
        """Close the round when it is due: fail it, or start its commit (the returned job, to
        run without the lock)."""
        s, completed = self.shared, self.intake.completed
        r = s.round
        if r.state == RoundState.AGGREGATING:
            if self.committer.permanent_failure is not None:
                self.fail_round(f"aggregation: {self.committer.permanent_failure}")
                return None
            return self.committer.begin()  # a retry (or under way, or backing off: None)
        if r.state not in ACCEPTING:
            return None
        if s.secagg is not None:
            return self._advance_secagg()
        if set(r.participants) <= set(completed):
            return self.committer.begin()
        if s.clock() >= (r.deadline_at or math.inf):
            if len(completed) >= s.config.round.min_nodes:
                stragglers = sorted(set(r.participants) - set(completed))
                s.log(f"round {r.number}: deadline passed; excluding straggler(s) "
                      f"{', '.join(stragglers)}")  # fmt: skip
                self.intake.drop_sessions()  # the committer rebuilds the sum without them
                return self.committer.begin()
            self.fail_round(f"quorum not reached: {len(completed)} of "
                            f"{s.config.round.min_nodes} uploads by the deadline")  # fmt: skip
        return None

    def _advance_secagg(self) -> CommitJob | None:
        s = self.shared
        sec, now, job = s.secagg, s.clock(), None
        failure = sec.advance(now)
        if failure is None and sec.stage == Stage.MASKED_INPUT:
            all_in = set(sec.shared) <= set(self.intake.completed)
            if all_in or now >= (s.round.deadline_at or math.inf):
                self.intake.drop_sessions()  # stragglers' partial uploads leave the sum
                failure = sec.close_inputs(self.intake.completed, now)
        if failure is not None:
            self.fail_round(f"secure aggregation: {failure}")
        elif sec.stage == Stage.READY:
            job = self.committer.begin()
        s.changed.notify_all()
        return job

    def fail_round(self, outcome: str) -> None:
        s = self.shared
        r = s.round
        s.store_call(s.store.fail_round, s.federation_id, r.number, outcome,
                     s.downloads.rows(r.number))  # fmt: skip
        s.downloads.forget_through(r.number)
        s.metrics.round_ended("failed", r.started_at, s.clock())
        self.committer.round_ended()
        s.log(f"round {r.number}: failed ({outcome}); the next round starts from version "
              f"{s.model.version}")  # fmt: skip
        self.intake.end_round()
        s.secagg = None
        s.round = s.store.current_round(s.federation_id)
        s.changed.notify_all()
