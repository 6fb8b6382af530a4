"""The ServerApp: fedpt's aggregator, configured by the run config's `aggregator-config`."""

from aggregator.flower import server_app

app = server_app()
