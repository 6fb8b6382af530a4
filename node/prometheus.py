"""Prometheus metrics of a node (`fedpt node join --metrics-port`, README "Metrics").

Rank 0 only, on 127.0.0.1 unless `--metrics-host` says otherwise: a node's numbers describe
its private training run. The metrics live in this object's own registry (not the process-wide
default) and are updated once per round from its RoundRecord; updating never raises.
"""

from __future__ import annotations

import contextlib
import math

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from protos.metrics_endpoint import MetricsEndpoint

PHASES = ("pull", "train", "push", "wait")
PHASE_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, float("inf"))


class NodeMetrics(MetricsEndpoint):
    def __init__(self) -> None:
        super().__init__(CollectorRegistry(auto_describe=True))
        r = self.registry
        self.rounds = Counter("fedpt_node_rounds", "Rounds this node took part in", registry=r)
        self.inner_steps = Counter(
            "fedpt_node_inner_steps", "Inner optimizer steps trained", registry=r
        )
        self.tokens = Counter("fedpt_node_tokens", "Tokens trained on (all ranks)", registry=r)
        self.train_loss = Gauge(
            "fedpt_node_train_loss", "Mean inner training loss of the last round", registry=r
        )
        self.tokens_per_second = Gauge(
            "fedpt_node_tokens_per_second", "Training throughput of the last round (all ranks)",
            registry=r,
        )  # fmt: skip
        self.mfu: Gauge | None = None  # registered once a step reports MFU (not on CPU)
        self.phase = Histogram(
            "fedpt_node_round_phase_seconds", "Seconds per round phase", ["phase"],
            buckets=PHASE_BUCKETS, registry=r,
        )  # fmt: skip
        for phase in PHASES:
            self.phase.labels(phase=phase)
        self.energy = {
            kind: Counter(f"fedpt_node_{kind}_energy_joules",
                          f"Joules of this host's {what} in the rounds trained, where measured "
                          "(node/energy.py)", registry=r)
            for kind, what in (("gpu", "GPUs (NVML)"), ("cpu", "CPU packages (RAPL)"))
        }  # fmt: skip
        self.model_version = Gauge(
            "fedpt_node_model_version", "The global model version the last round trained from",
            registry=r,
        )  # fmt: skip

    def record_round(self, record, inner_steps: int, mfu: float | None = None) -> None:
        """One round's RoundRecord (node/participant.py); `inner_steps`: the federation's H."""
        with contextlib.suppress(Exception):  # a metric is never worth a failed round
            self._record(record, inner_steps, mfu)

    def _record(self, record, inner_steps: int, mfu: float | None) -> None:
        self.rounds.inc()
        self.model_version.set(record.version)
        for kind, counter in self.energy.items():
            joules = getattr(record, f"{kind}_energy_joules", None)
            if joules is not None and math.isfinite(joules) and joules >= 0:
                counter.inc(joules)
        for phase in PHASES:
            seconds = getattr(record, f"{phase}_seconds")
            if math.isfinite(seconds) and seconds >= 0:
                self.phase.labels(phase=phase).observe(seconds)
        if record.tokens <= 0:  # the round moved on before this node could train it
            return
        self.inner_steps.inc(inner_steps)
        self.tokens.inc(record.tokens)
        if math.isfinite(record.train_loss):
            self.train_loss.set(record.train_loss)
        if record.train_seconds > 0:
            self.tokens_per_second.set(record.tokens / record.train_seconds)
        if mfu is not None and math.isfinite(mfu):
            if self.mfu is None:
                self.mfu = Gauge(
                    "fedpt_node_mfu_ratio",
                    "Model FLOPs utilisation at the last logged step of the last round",
                    registry=self.registry,
                )
            self.mfu.set(mfu)
