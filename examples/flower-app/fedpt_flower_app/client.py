"""The ClientApp: a fedpt node, configured by its SuperNode's `--node-config`."""

from node.flower import client_app

app = client_app()
