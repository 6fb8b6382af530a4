"""The /metrics HTTP endpoint of one Prometheus registry (prometheus_client), for the
aggregator (aggregator/metrics.py) and for nodes (node/prometheus.py): started on a port,
served by a daemon thread, shut down and its socket closed on stop."""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import start_wsgi_server


class MetricsEndpoint:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._server = None

    def serve(self, port: int, host: str) -> int:
        """Serve /metrics on host:port (port 0: any free one); the port bound."""
        self._server, _ = start_wsgi_server(port, addr=host, registry=self.registry)
        return self._server.server_address[1]

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
