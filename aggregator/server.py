"""Build and run the aggregator's gRPC server: the federation service and grpc.health.v1."""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from aggregator.config import AggregatorConfig
from aggregator.errors import Refused
from aggregator.handlers import SERVICE_NAME, add_federation_service
from aggregator.memory import PeriodicTrim, fix_mmap_threshold, limit_malloc_arenas
from aggregator.metrics import RpcTimer
from aggregator.rounds import Coordinator
from aggregator.servicer import FederationServicer
from aggregator.store import Store
from protos import pki


def print_line(text: str) -> None:
    """One write per line: print() writes the text and its newline separately, so lines from
    the round, upload and secure-aggregation threads could run together."""
    sys.stdout.write(f"{text}\n")
    sys.stdout.flush()


# grpcio cuts a message over its own limit before fedpt sees it, which looks like a dropped
# connection; so its limit sits well above [server] max_message_bytes, which fedpt enforces itself
# with a clear refusal that leaves nothing behind.
TRANSPORT_LIMIT_FACTOR = 4


@dataclass
class RunningAggregator:
    server: grpc.Server
    coordinator: Coordinator
    store: Store
    health: health.HealthServicer
    port: int
    ca_pem: bytes | None = None  # the federation CA (None: --insecure)
    metrics_port: int = 0  # where /metrics is served (0: not served)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, grace: float = 2.0) -> None:
        self.health.enter_graceful_shutdown()
        # Bounded, so the store and coordinator close even if a handler is stuck.
        self.server.stop(grace).wait(timeout=grace + 5)
        self.coordinator.shared.metrics.stop()
        self.coordinator.close()
        self.store.close()


def _metadata_options(limit: int) -> list[tuple[str, int]]:
    if limit <= 0:
        return []
    # The soft limit refuses a call whose metadata exceeds it; the hard one is where grpc
    # stops reading the header block at all.
    return [("grpc.max_metadata_size", limit), ("grpc.absolute_max_metadata_size", 2 * limit)]


def _window_options(window_bytes: int) -> list[tuple[str, int]]:
    if window_bytes <= 0:
        return []
    return [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", window_bytes)]


def start_aggregator(
    config: AggregatorConfig,
    log: Callable[[str], None] = print_line,
    admission_required: bool = False,
) -> RunningAggregator:
    """Open the store, resume or create the federation, and start serving (port 0: any free).
    `admission_required`: every Join needs a scheduler's token from the first call on
    (Coordinator.require_admission)."""
    kit = None if config.server.insecure else pki.load_kit(Path(config.server.kit))
    Path(config.store.state_dir).mkdir(parents=True, exist_ok=True)
    store = Store(config.store.resolved_url())
    try:
        coordinator = Coordinator(config, store, log=log)
    except BaseException:
        store.close()
        raise
    if admission_required:
        coordinator.require_admission()
    limit = config.server.max_message_bytes
    transport_limit = min(TRANSPORT_LIMIT_FACTOR * limit, 2**31 - 1)
    server = grpc.server(
        futures.ThreadPoolExecutor(
            max_workers=config.server.max_workers, thread_name_prefix="grpc"
        ),
        options=[
            ("grpc.max_receive_message_length", transport_limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),
            *_window_options(config.server.stream_window_bytes),
            *_metadata_options(config.server.max_metadata_bytes),
        ],
        interceptors=[RpcTimer(coordinator.shared.metrics)],
    )
    servicer = FederationServicer(coordinator, log, ca_pem=None if kit is None else kit.ca_pem)
    add_federation_service(server, servicer, limit)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"{config.server.host}:{config.server.port}"
    if kit is None:
        log(
            "WARNING: serving plain text without client certificates (--insecure): any caller can "
            "join as any organisation and traffic is readable; use a startup kit outside tests"
        )
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, pki.server_credentials(kit))
    if port == 0:
        coordinator.close()
        store.close()
        raise OSError(f"cannot listen on {config.server.host}:{config.server.port}")
    metrics_port = 0
    if config.server.metrics_port:
        try:
            metrics_port = coordinator.shared.metrics.serve(config.server.metrics_port,
                                                            config.server.host)  # fmt: skip
        except OSError as e:
            coordinator.close()
            store.close()
            raise OSError(f"cannot serve metrics on {config.server.host}:"
                          f"{config.server.metrics_port}: {e.strerror or e}") from e  # fmt: skip
    server.start()
    for service in ("", SERVICE_NAME):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    security = "plain text" if kit is None else f"mutual TLS, CA of kit {kit.directory}"
    log(f"aggregator listening on {config.server.host}:{port} ({security})")
    if metrics_port:
        log(f"Prometheus metrics on http://{config.server.host}:{metrics_port}/metrics")
    ca_pem = None if kit is None else kit.ca_pem
    return RunningAggregator(
        server, coordinator, store, health_servicer, port, ca_pem, metrics_port
    )


def serve_forever(config: AggregatorConfig, log: Callable[[str], None] = print_line) -> None:
    """Serve until SIGINT/SIGTERM or until the federation has finished."""
    limit_malloc_arenas(config.server.malloc_arenas)  # before the server's threads exist
    fix_mmap_threshold(config.server.malloc_mmap_threshold_bytes)
    running = start_aggregator(config, log)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    trim = PeriodicTrim(config.server.malloc_trim_seconds)
    try:
        while not stop.wait(0.5):
            trim.poll()
            if running.coordinator.finished:
                log("federation finished: letting nodes see STOP, then shutting down")
                _linger(running.coordinator, stop)
                break
    finally:
        running.stop()


def _linger(coordinator: Coordinator, stop: threading.Event) -> None:
    """Stay up until every node has seen STOP, or `stop_linger_seconds` (longer than a node's
    reconnect back-off plus a long poll, so a node briefly away still hears that it is over)."""
    give_up = time.monotonic() + coordinator.config.server.stop_linger_seconds
    while time.monotonic() < give_up and not stop.is_set():
        try:
            if coordinator.every_node_saw_stop():
                return
        except Refused:  # the database is briefly unreachable: keep waiting
            pass
        stop.wait(0.5)
