"""Prometheus metrics of one aggregator process (`[server] metrics_port`, README "Metrics").

Every metric lives in this object's own `CollectorRegistry`, never the process-wide default, so
several aggregators in one process (tests) keep their counts apart. The round jobs reach it as
`Shared.metrics`; the gRPC interceptor below times every call. A metric must never break the
aggregator: every hook swallows its own errors (a bug here costs a sample, not a round).

Label values come from small fixed sets only: round outcomes, round phases, the RPC methods
grpc has handlers for, and gRPC status code names of refusals.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from protos.metrics_endpoint import MetricsEndpoint

OUTCOMES = ("committed", "failed")
PHASES = ("training", "aggregating")
# The gRPC status code names a refusal carries (aggregator/errors.py); anything else is OTHER.
REFUSAL_REASONS = (
    "FAILED_PRECONDITION", "INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS",
    "PERMISSION_DENIED", "UNAUTHENTICATED", "UNAVAILABLE", "RESOURCE_EXHAUSTED", "CANCELLED",
    "INTERNAL",
)  # fmt: skip
ROUND_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, float("inf"))
RPC_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, float("inf"))
CHUNK_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, float("inf"))


def _never_raises(method: Callable) -> Callable:
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except Exception:  # a metric is never worth a failed call or round
            return None

    return wrapper


class AggregatorMetrics(MetricsEndpoint):
    def __init__(self) -> None:
        super().__init__(CollectorRegistry(auto_describe=True))
        r = self.registry
        ProcessCollector(namespace="fedpt", registry=r)  # memory, CPU, open files of this process
        self.rounds = Counter("fedpt_rounds", "Rounds ended, by outcome", ["outcome"], registry=r)
        for outcome in OUTCOMES:
            self.rounds.labels(outcome=outcome)
        self.round_duration = Histogram(
            "fedpt_round_duration_seconds", "From a round's start to its commit or failure",
            buckets=ROUND_BUCKETS, registry=r,
        )  # fmt: skip
        self.round_phase = Histogram(
            "fedpt_round_phase_seconds",
            "training: from a round's start until it closes for aggregation; aggregating: "
            "from then until its commit",
            ["phase"], buckets=ROUND_BUCKETS, registry=r,
        )  # fmt: skip
        self.received_bytes = Counter(
            "fedpt_received_bytes", "Bytes of update chunks received (PushUpdate)", registry=r
        )
        self.sent_bytes = Counter(
            "fedpt_sent_bytes", "Bytes of model stream messages sent (PullModel)", registry=r
        )
        self.uploads_refused = Counter(
            "fedpt_uploads_refused", "PushUpdate calls refused, by gRPC status code name",
            ["reason"], registry=r,
        )  # fmt: skip
        self.accumulated_bytes = Counter(
            "fedpt_accumulated_bytes",
            "Bytes of update chunks verified, spooled and added to the round's running sum",
            registry=r,
        )
        self.chunk_seconds = Histogram(
            "fedpt_upload_chunk_seconds",
            "Seconds to verify, spool and add one update chunk to the round's sum",
            buckets=CHUNK_BUCKETS, registry=r,
        )  # fmt: skip
        self.rpc_duration = Histogram(
            "fedpt_rpc_duration_seconds",
            "gRPC call handling time by method (streams: until the handler returns)",
            ["method"], buckets=RPC_BUCKETS, registry=r,
        )  # fmt: skip
        self.nodes_connected = Gauge(
            "fedpt_nodes_connected", "Nodes that asked for a task within the long-poll window",
            registry=r,
        )  # fmt: skip
        self.model_version = Gauge(
            "fedpt_federation_model_version", "The global model version served", registry=r
        )
        self.round_number = Gauge("fedpt_round_number", "The current round's number", registry=r)

    # ---- hooks (never raise) ------------------------------------------------------------------
    @_never_raises
    def round_ended(self, outcome: str, started_at: float | None, now: float) -> None:
        self.rounds.labels(outcome=outcome if outcome in OUTCOMES else "failed").inc()
        if started_at is not None and now >= started_at:
            self.round_duration.observe(now - started_at)

    @_never_raises
    def phase(self, phase: str, started_at: float | None, now: float) -> None:
        if phase in PHASES and started_at is not None and now >= started_at:
            self.round_phase.labels(phase=phase).observe(now - started_at)

    @_never_raises
    def received(self, nbytes: int) -> None:
        self.received_bytes.inc(nbytes)

    @_never_raises
    def sent(self, nbytes: int) -> None:
        self.sent_bytes.inc(nbytes)

    @_never_raises
    def accumulated(self, nbytes: int, seconds: float) -> None:
        self.accumulated_bytes.inc(nbytes)
        self.chunk_seconds.observe(seconds)

    @_never_raises
    def upload_refused(self, code: str) -> None:
        self.uploads_refused.labels(reason=code if code in REFUSAL_REASONS else "OTHER").inc()

    @_never_raises
    def rpc(self, method: str, seconds: float) -> None:
        self.rpc_duration.labels(method=method).observe(seconds)

    def watch(
        self,
        nodes_connected: Callable[[], float],
        model_version: Callable[[], float],
        round_number: Callable[[], float],
    ) -> None:
        """Gauges read when scraped; a callback that fails reads as NaN."""
        for gauge, read in ((self.nodes_connected, nodes_connected),
                            (self.model_version, model_version),
                            (self.round_number, round_number)):  # fmt: skip
            gauge.set_function(_or_nan(read))

    # ---- the HTTP endpoint --------------------------------------------------------------------


def _or_nan(read: Callable[[], float]) -> Callable[[], float]:
    def value() -> float:
        try:
            return float(read())
        except Exception:
            return float("nan")

    return value


class RpcTimer(grpc.ServerInterceptor):
    """`fedpt_rpc_duration_seconds{method}`: each call's time in its handler, aborts included;
    a server-streaming call until its last message is taken (or it ends otherwise)."""

    def __init__(self, metrics: AggregatorMetrics) -> None:
        self.metrics = metrics

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.rsplit("/", 1)[-1]
        record = self.metrics.rpc
        if handler.unary_unary is not None:
            kind, behaviour = "unary_unary", _timed(handler.unary_unary, method, record)
        elif handler.unary_stream is not None:
            kind, behaviour = "unary_stream", _timed_stream(handler.unary_stream, method, record)
        elif handler.stream_unary is not None:
            kind, behaviour = "stream_unary", _timed(handler.stream_unary, method, record)
        else:
            kind, behaviour = "stream_stream", _timed_stream(handler.stream_stream, method, record)
        return handler._replace(**{kind: behaviour})


def _timed(behaviour: Callable, method: str, record: Callable[[str, float], None]) -> Callable:
    def timed(request, context):
        start = time.perf_counter()
        try:
            return behaviour(request, context)
        finally:
            record(method, time.perf_counter() - start)

    return timed


def _timed_stream(
    behaviour: Callable, method: str, record: Callable[[str, float], None]
) -> Callable:
    def timed(request, context):
        start = time.perf_counter()
        try:
            yield from behaviour(request, context)
        finally:
            record(method, time.perf_counter() - start)

    return timed
