"""fedpt's aggregator as a Flower ServerApp (the `flower` extra: flwr, imported lazily).

The ServerApp serves fedpt's own aggregator inside its process: round lifecycle, outer
optimizer, streaming accumulator, SQL store and the resumable gRPC data plane, exactly as
`fedpt aggregator serve` does (aggregator/server.py). Flower carries the control messages only:
each round, every SuperNode gets a TRAIN message naming the data plane's address, the round,
the global model version and its payload's sha256, and a one-time admission token; its
ClientApp (node/flower.py) runs one fedpt node round against it (`fedpt node join --once`:
join with the token, pull and check that model, H inner steps, push) and answers with a few
metrics. In a secure federation the round's key, share and unmask stages are messages of their
own around TRAIN; every answer proves its organisation in-band (aggregator/flower_stages.py),
and the round starts with the SuperNodes whose keys verified. The data plane refuses a Join
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
from aggregator.errors import Refused
from aggregator.flower_stages import StageMember, StageReplies
from protos import federation_pb2 as pb

# How long the ServerApp waits for enough SuperNodes to be connected before its first round.
NODES_WAIT_SECONDS = 600.0
# Secure aggregation's stages as Flower message types (answered by node/flower_stages.py).
STAGE_MESSAGES = {"ADVERTISE": "query.secagg_keys", "SHARE": "query.secagg_shares",
                  "UNMASK": "query.secagg_unmask"}  # fmt: skip
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
            FlowerRounds(grid, running.coordinator, address, cfg, say, engine_stopped,
                         running.ca_pem).run()  # fmt: skip
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
                 ca_pem: bytes | None = None) -> None:  # fmt: skip
        self.grid, self.coordinator, self.address = grid, coordinator, address
        self.ca_pem = ca_pem  # the federation CA: stage answers' certificates are checked
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
        stages = None
        if self.coordinator.secure:
            if self.ca_pem is None:
                raise FlowerRunError("secure aggregation needs the aggregator's kit ([server] kit)")
            # Rounds start with the SuperNodes whose keys answer verified (_secure_round).
            self.coordinator.schedule_rounds()
            stages = StageReplies(self.coordinator, self.admissions, self.ca_pem)
        while not self.coordinator.finished:
            number = self.coordinator.round.number
            if stages is None:
                replies = self._ask(nodes, "train", number)
            else:
                replies = self._secure_round(nodes, number, stages)
            if not replies:  # nobody can take part: the round would wait for ever
                raise FlowerRunError(f"no node took part in round {number}: {self.last_error}")
            self._wait_past(number)
            self.log(f"flower: round {number} over, {len(replies)} of {len(nodes)} nodes answered")
        if not self._ask(nodes, "evaluate", self.coordinator.round.number):
            raise FlowerRunError(f"no node pulled and scored the final model: {self.last_error}")

    def _secure_round(self, nodes: list[int], number: int, stages: StageReplies) -> dict[int, dict]:
        """One secure round, each stage a message: keys (the SuperNodes join the data plane
        and sign fresh round keys; the round starts with those that verify), shares, TRAIN
        (pull, train, push the masked update over the data plane), unmask. The replies to
        TRAIN by node; none if the round ended before training."""
        members = self._keys_stage(nodes, number, stages)
        coordinator = self.coordinator
        self._stage(number, "SHARE", pb.ShareKeysRequest, coordinator.share_keys, members, stages)
        training = self._masked_input_stage(number, members)
        self._stage(number, "UNMASK", pb.UnmaskRequest, coordinator.unmask, members, stages)
        # A node's reply follows its push by the time its process takes to exit: the unmask
        # stage does not wait for it, but the round's report does.
        return training.collect(REPLY_SLACK_SECONDS) if training else {}

    def _keys_stage(self, nodes: list[int], number: int,
                    stages: StageReplies) -> dict[str, StageMember]:  # fmt: skip
        """Ask every SuperNode for its round keys; start the round with those that verify."""
        answers: dict[str, tuple[StageMember, pb.AdvertiseKeysRequest]] = {}

        def keys(node: int, answer: dict) -> None:
            member, request = stages.keys(node, number, answer)
            answers[member.node_id] = (member, request)

        self._exchange(STAGE_MESSAGES["ADVERTISE"], self._orders(nodes, "keys", number), number,
                       self.config.secagg.stage_timeout_seconds, on_reply=keys)  # fmt: skip
        needed = max(self.config.round.min_nodes, 2)
        if len(answers) < needed:
            raise FlowerRunError(f"round {number}: {len(answers)} SuperNode(s) answered the keys "
                                 f"message, {needed} needed: {self.last_error}")  # fmt: skip
        self.log(f"flower: round {number}: keys from {len(answers)} of {len(nodes)} SuperNodes "
                 "verified")  # fmt: skip
        self.coordinator.start_round(sorted(answers))
        for member, request in answers.values():
            self._hand_over(lambda m=member, r=request: self.coordinator.advertise_keys(
                m.node_id, r, m.certificate_pem, m.identity))  # fmt: skip
        return {node_id: member for node_id, (member, _) in answers.items()}

    def _stage(self, number: int, stage: str, kind: type, submit: Callable[[str, object], None],
               members: dict[str, StageMember], stages: StageReplies) -> None:  # fmt: skip
        """Shares or unmask: send each node the stage's state for it, and submit each verified
        answer as it arrives, until the stage ends."""
        if self._stage_after(number, stage) is None:
            return
        coordinator = self.coordinator
        asked = {members[n].supernode: members[n]
                 for n in coordinator.secagg_members(number, stage) if n in members}  # fmt: skip
        order = self._order(number)
        orders = {node: {**order,
                         "state": coordinator.secagg_state(m.node_id, number).SerializeToString()}
                  for node, m in asked.items()}  # fmt: skip
        name = STAGE_MESSAGES[stage].removeprefix("query.secagg_")

        taken: list[str] = []

        def answer(node: int, reply: dict) -> None:
            member = asked[node]
            submit(member.node_id, stages.request(member, number, name, reply, kind))
            taken.append(member.node_id)

        self._exchange(STAGE_MESSAGES[stage], orders, number,
                       self.config.secagg.stage_timeout_seconds, on_reply=answer,
                       until=lambda: coordinator.secagg_stage(number) != stage)  # fmt: skip
        self.log(f"flower: round {number}: {name} from {len(taken)} of {len(asked)} SuperNodes "
                 "verified")  # fmt: skip

    def _masked_input_stage(self, number: int,
                            members: dict[str, StageMember]) -> Exchange | None:  # fmt: skip
        """TRAIN the nodes that shared: each pulls, trains and pushes its update masked with the
        secrets the key and share messages left in its work dir. Returns once the stage is
        over, with the TRAIN messages (their replies may still come)."""
        if self._stage_after(number, "MASKED_INPUT") is None:
            return None
        coordinator = self.coordinator
        asked = [members[n].supernode
                 for n in coordinator.secagg_members(number, "MASKED_INPUT") if n in members]  # fmt: skip
        orders = self._orders(asked, "train", number)
        for order in orders.values():
            order["secagg-stages"] = "messages"
        training = self._send("train", orders, number)
        training.collect(
            self.config.round.timeout_seconds + REPLY_SLACK_SECONDS,
            until=lambda: coordinator.secagg_stage(number) != "MASKED_INPUT",
        )
        return training

    def _stage_after(self, number: int, stage: str) -> str | None:
        """Wait until round `number`'s secure aggregation reaches `stage` (or ends: None)."""
        give_up = time.monotonic() + self.config.secagg.stage_timeout_seconds + REPLY_SLACK_SECONDS
        while (now := self.coordinator.secagg_stage(number)) not in (stage, None):
            if time.monotonic() > give_up:
                raise FlowerRunError(f"round {number} stayed in stage {now}")
            self._pause(0.1)
        return now

    def _hand_over(self, submit: Callable[[], None]) -> None:
        """Submit a verified answer; a refusal is logged: that node misses the stage."""
        try:
            submit()
        except Refused as e:
            self.last_error = f"{type(e).__name__}: {e}"
            self.log(f"flower: refused a stage answer: {self.last_error}")

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
        """Send `kind` (TRAIN or EVALUATE) to every node; the nodes' metrics by node id. The
        round's outcome is the coordinator's (a quorum by the deadline)."""
        seconds = self.config.round.timeout_seconds + REPLY_SLACK_SECONDS
        return self._exchange(kind, self._orders(nodes, kind, number), number, seconds)

    def _orders(self, nodes: Iterable[int], kind: str, number: int) -> dict[int, dict]:
        """Each node's fedpt record: the data plane, round, model and a fresh admission token
        (a new batch: the tokens of earlier messages stop admitting)."""
        nodes = list(nodes)
        purpose = f"round {number} ({kind})" if kind != "evaluate" else "the final model"
        tokens = self.admissions.issue([str(n) for n in nodes], purpose)
        order = self._order(number)
        return {node: {**order, "token": tokens[str(node)]} for node in nodes}

    def _order(self, number: int) -> dict:
        """What every node's record of one batch shares: the data plane, round and model."""
        coordinator = self.coordinator
        with coordinator.lock:  # the version and its payload change together, at a commit
            version, sha256 = coordinator.version, coordinator.payload.manifest.sha256.hex()
        return {"aggregator": self.address, "round": number, "version": version,
                "model-sha256": sha256, "token": ""}  # fmt: skip

    def _exchange(self, message_type: str, orders: dict[int, dict], number: int, seconds: float, *,
                  on_reply: Callable[[int, dict], None] | None = None,
                  until: Callable[[], bool] | None = None) -> dict[int, dict]:  # fmt: skip
        """Send each node its order and collect the replies (Exchange.collect)."""
        return self._send(message_type, orders, number).collect(seconds, on_reply, until)

    def _send(self, message_type: str, orders: dict[int, dict], number: int) -> Exchange:
        from flwr.app import ConfigRecord, Message, RecordDict

        messages = [Message(RecordDict({"fedpt": ConfigRecord(order)}), node, message_type,
                            group_id=str(number)) for node, order in orders.items()]  # fmt: skip
        return Exchange(
            self, message_type, {m_id for m_id in self.grid.push_messages(messages) if m_id}
        )

    def _noted(self, node: int) -> None:
        organisation = self.admissions.organisation_of(str(node))
        if organisation and node not in self.organisations:
            self.organisations[node] = organisation
            self.log(f"flower: SuperNode {node} is organisation {organisation!r}")

    def _wait_past(self, number: int) -> None:
        """Until the coordinator has closed round `number` (committed or failed)."""
        give_up = time.monotonic() + self.config.round.timeout_seconds + REPLY_SLACK_SECONDS
        while self.coordinator.round.number <= number and not self.coordinator.finished:
            if time.monotonic() > give_up:
                raise FlowerRunError(f"round {number} did not close in time")
            self._pause(0.2)


class Exchange:
    """Messages sent to nodes, and the replies pulled so far (each dropped once read)."""

    def __init__(self, rounds: FlowerRounds, message_type: str, pending: set[str]) -> None:
        self.rounds, self.message_type, self.pending = rounds, message_type, pending
        self.replies: dict[int, dict] = {}  # node -> its reply's fedpt record

    def collect(self, seconds: float, on_reply: Callable[[int, dict], None] | None = None,
                until: Callable[[], bool] | None = None) -> dict[int, dict]:  # fmt: skip
        """Pull replies as they arrive, handing each to `on_reply` (whose refusal is logged),
        until all answered, `until()` holds or `seconds` passed; the replies so far, by node.
        Failures are logged, not raised."""
        rounds, give_up = self.rounds, time.monotonic() + seconds
        while self.pending and time.monotonic() < give_up and not (until and until()):
            for reply in rounds.grid.pull_messages(list(self.pending)):
                self.pending.discard(reply.metadata.reply_to_message_id)
                node = reply.metadata.src_node_id
                if reply.has_error():
                    rounds.last_error = (f"node {node} failed its {self.message_type} message: "
                                         f"{reply.error.reason}")  # fmt: skip
                    rounds.log(f"flower: {rounds.last_error}")
                    continue
                content = reply.content
                record = content.config_records.get("fedpt") or content.metric_records.get("fedpt")
                self.replies[node] = dict(record or {})
                if on_reply is not None:
                    rounds._hand_over(lambda n=node: on_reply(n, self.replies[n]))
                rounds._noted(node)
            if self.pending:
                rounds._pause(0.2)
        if self.pending and not (until and until()):
            rounds.log(f"flower: {len(self.pending)} node(s) did not answer their "
                       f"{self.message_type} message")  # fmt: skip
        return self.replies
