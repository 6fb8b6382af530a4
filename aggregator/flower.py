"""fedpt's aggregator as a Flower ServerApp (the `flower` extra: flwr, imported lazily).

The ServerApp serves fedpt's own aggregator inside its process: round lifecycle, outer
optimizer, streaming accumulator, SQL store and the resumable gRPC data plane, exactly as
`fedpt aggregator serve` does (aggregator/server.py). Flower carries the control messages only:
each round, every SuperNode gets a TRAIN message naming the data plane's address, the round,
the global model version and its payload's sha256, and a one-time admission token; its
ClientApp (node/flower.py) runs one fedpt node round against it (`fedpt node join --once`:
join with the token, pull and check that model, H inner steps, push, the round's
secure-aggregation stages) and answers with a few metrics. The data plane refuses a Join
without a token from this run (aggregator/admissions.py): only the SuperNodes Flower asked in
take part, each as one organisation for the whole run. Models never ride Flower's transport,
so memory stays O(model) however many nodes answer, and a restarted ServerApp resumes from
fedpt's database like the native aggregator.
When the federation has finished, one EVALUATE message has every node pull, score (and, if its
settings say so, personalise) the final model.

Deployment (`flwr run` against a SuperLink): the run config names the aggregator.toml
(`aggregator-config`) and, when nodes reach the data plane under another address than
[server] host:port, that address (`data-plane-address`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from aggregator.config import AggregatorConfig, load_config

# How long the ServerApp waits for enough SuperNodes to be connected before its first round.
NODES_WAIT_SECONDS = 600.0
# Replies may lag the round by this much: a node process starts, joins and finishes its round.
REPLY_SLACK_SECONDS = 300.0


class FlowerRunError(RuntimeError):
    """The Flower run cannot go on (too few SuperNodes, a bad run config); the message says why."""


def server_app(config: AggregatorConfig | None = None, log: Callable[[str], None] | None = None,
               engine_stopped: threading.Event | None = None):  # fmt: skip
    """A ServerApp serving fedpt's aggregator with `config` (None: read the run config's
    `aggregator-config` path). `engine_stopped`, set by whoever runs Flower's engine in this
    process, ends the rounds at once: no reply can come any more."""
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        from aggregator.server import print_line, start_aggregator

        say = log or print_line
        cfg = config or _config_from_run(context.run_config)
        running = start_aggregator(cfg, say, admission_required=True)
        address = str(
            context.run_config.get("data-plane-address") or f"{cfg.server.host}:{running.port}"
        )
        try:
            FlowerRounds(grid, running.coordinator, address, cfg, say, engine_stopped).run()
        finally:
            running.stop()

    return app


def _config_from_run(run_config: dict) -> AggregatorConfig:
    path = run_config.get("aggregator-config")
    if not path:
        raise FlowerRunError("the run config needs aggregator-config = <path of aggregator.toml>")
    return load_config(Path(str(path)))


class FlowerRounds:
    """The ServerApp's main loop: one TRAIN message per node and round, replies pulled one by
    one as they come; the round itself starts, closes and commits in fedpt's coordinator."""

    def __init__(self, grid, coordinator, address: str, config: AggregatorConfig,
                 log: Callable[[str], None], engine_stopped: threading.Event | None = None,
                 ) -> None:  # fmt: skip
        self.grid, self.coordinator, self.address = grid, coordinator, address
        self.config, self.log = config, log
        self.engine_stopped = engine_stopped or threading.Event()
        self.last_error = ""  # the last node failure reported
        self.organisations: dict[int, str] = {}  # SuperNode -> the organisation it joined as
        # From now on the data plane admits only the nodes this loop's messages ask in.
        self.admissions = coordinator.require_admission()

    def _pause(self, seconds: float) -> None:
        """Sleep between polls, or stop the rounds if Flower's engine has stopped."""
        if self.engine_stopped.wait(seconds):
            raise FlowerRunError("Flower's engine stopped: no SuperNode can answer any more")

    def run(self) -> None:
        nodes = self._wait_for_nodes()
        while not self.coordinator.finished:
            number = self.coordinator.round.number
            replies = self._ask(nodes, "train", number)
            if not replies:  # nobody can take part: the round would wait for ever
                raise FlowerRunError(f"no node took part in round {number}: {self.last_error}")
            self._wait_past(number)
            self.log(f"flower: round {number} over, {len(replies)} of {len(nodes)} nodes answered")
        if not self._ask(nodes, "evaluate", self.coordinator.round.number):
            raise FlowerRunError(f"no node pulled and scored the final model: {self.last_error}")

    def _wait_for_nodes(self) -> list[int]:
        wanted = self.config.round.min_nodes
        give_up = time.monotonic() + NODES_WAIT_SECONDS
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= wanted:
                self.log(f"flower: {len(nodes)} SuperNodes connected")
                return nodes
            if time.monotonic() > give_up:
                raise FlowerRunError(
                    f"{len(nodes)} SuperNodes connected in {NODES_WAIT_SECONDS:.0f} s; "
                    f"[round] min_nodes is {wanted}"
                )
            self._pause(1.0)

    def _ask(self, nodes: Iterable[int], kind: str, number: int) -> dict[int, dict]:
        """Send `kind` to every node, then pull the replies as they arrive (each dropped once
        read); the nodes' metrics by node id. Errors are logged, not raised: the round's
        outcome is the coordinator's (a quorum by the deadline)."""
        from flwr.app import ConfigRecord, Message, RecordDict

        coordinator = self.coordinator
        with coordinator.lock:  # the version and its payload change together, at a commit
            version, sha256 = coordinator.version, coordinator.payload.manifest.sha256.hex()
        purpose = f"round {number}" if kind == "train" else f"the final model v{version}"
        tokens = self.admissions.issue([str(n) for n in nodes], purpose)
        messages = [
            Message(RecordDict({"fedpt": ConfigRecord({
                "aggregator": self.address, "round": number, "version": version,
                "model-sha256": sha256, "token": tokens[str(node)]})}),
                node, kind, group_id=str(number))
            for node in nodes
        ]  # fmt: skip
        pending = {m_id for m_id in self.grid.push_messages(messages) if m_id}
        replies: dict[int, dict] = {}
        give_up = time.monotonic() + self.config.round.timeout_seconds + REPLY_SLACK_SECONDS
        while pending and time.monotonic() < give_up:
            for reply in self.grid.pull_messages(list(pending)):
                pending.discard(reply.metadata.reply_to_message_id)
                node = reply.metadata.src_node_id
                if reply.has_error():
                    self.last_error = f"node {node} failed its {kind} message: {reply.error.reason}"
                    self.log(f"flower: {self.last_error}")
                    continue
                metrics = dict(reply.content.metric_records.get("fedpt", {}))
                replies[node] = metrics
                organisation = self.admissions.organisation_of(str(node))
                if organisation and node not in self.organisations:
                    self.organisations[node] = organisation
                    self.log(f"flower: SuperNode {node} is organisation {organisation!r}")
            if pending:
                self._pause(0.2)
        if pending:
            self.log(f"flower: {len(pending)} node(s) did not answer their {kind} message")
        return replies

    def _wait_past(self, number: int) -> None:
        """Until the coordinator has closed round `number` (committed or failed)."""
        give_up = time.monotonic() + self.config.round.timeout_seconds + REPLY_SLACK_SECONDS
        while self.coordinator.round.number <= number and not self.coordinator.finished:
            if time.monotonic() > give_up:
                raise FlowerRunError(f"round {number} did not close in time")
            self._pause(0.2)
