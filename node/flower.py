"""A fedpt node as a Flower ClientApp (the `flower` extra: flwr, imported lazily).

Flower starts a ClientApp per message; fedpt's inner state lives in the node's work dir, so
each TRAIN message runs one round in a fresh process, `fedpt node join --once` (torchrun for
several devices, as `node join` does): join the ServerApp's fedpt data plane (the address and a
one-time admission token are in the message), pull the global model and check it is the
version and sha256 the message announced, train H inner steps, push the delta, and exit once
the aggregator has moved past the round. The reply carries that round's metrics only. In a
secure federation the round's key, share and unmask stages come as messages of their own,
answered in the ClientApp's process (node/flower_stages.py); the TRAIN message's process masks
its delta with the secrets they left in the work dir. EVALUATE (sent once the federation has finished) pulls,
scores and personalises the final model the same way, and answers with its validation loss.

Where the organisation's files are comes from the SuperNode, never from the ServerApp:
`flower-supernode --node-config 'data="/corpus" work-dir="/var/fedpt" kit="/kits/acme"'`, with
optional `tokenizer`, `curation` (its [curation] TOML: sent at Join as a hash and counts),
`organisation`, `devices` (ranks on this host), `config` (a node.toml for everything else) and
`insecure` (plain text: tests only). The kit is the node's identity on
the data plane (mutual TLS), whatever Flower's own authentication says.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from node.round_order import ADMISSION_TOKEN_ENV

# node_config keys (Flower's style) -> `fedpt node join` flags
PATH_KEYS = {"data": "--data", "work-dir": "--work-dir", "kit": "--kit",
             "tokenizer": "--tokenizer", "config": "--config", "curation": "--curation"}  # fmt: skip
VALUE_KEYS = {"organisation": "--organisation", "devices": "--nproc-per-node"}
FLAG_KEYS = {"insecure": "--insecure"}
KNOWN_KEYS = {*PATH_KEYS, *VALUE_KEYS, *FLAG_KEYS}
# Keys Flower's simulation engine sets on every virtual SuperNode.
SIMULATION_KEYS = {"partition-id", "num-partitions"}


class FlowerNodeError(RuntimeError):
    """The SuperNode's settings are unusable, or the node's round failed; says which."""


@dataclass(frozen=True)
class Order:
    """A TRAIN or EVALUATE message's fedpt record (aggregator/flower.py writes it)."""

    kind: str  # "train" | "evaluate"
    aggregator: str  # the data plane's address
    round: int
    version: int  # the model to train from, or the final one
    model_sha256: str  # hex: the payload's sha256, checked by the node when it pulls
    token: str  # one-time admission token for the data plane's Join
    # The round's secure-aggregation stages come as messages (node/flower_stages.py).
    secagg_by_messages: bool = False

    @classmethod
    def from_record(cls, kind: str, record: Mapping[str, object]) -> Order:
        return cls(kind, str(record["aggregator"]), int(record["round"]), int(record["version"]),
                   str(record["model-sha256"]), str(record["token"]),
                   record.get("secagg-stages") == "messages")  # fmt: skip


def node_command(settings: Mapping[str, object], order: Order) -> list[str]:
    """`fedpt node join --once` for these node settings, held to the message's `order` (the
    admission token goes in the environment: see take_part)."""
    command = join_command(settings, order.aggregator)
    command += ["--once", "--expect-model", f"{order.version}:{order.model_sha256}"]
    if order.kind == "train":
        command += ["--expect-round", str(order.round)]
        if order.secagg_by_messages:
            command.append("--secagg-by-scheduler")
    return command


def join_command(settings: Mapping[str, object], aggregator: str) -> list[str]:
    """`fedpt node join` for these node settings against the data plane `aggregator`."""
    unknown = sorted(set(settings) - KNOWN_KEYS - SIMULATION_KEYS)
    if unknown:
        raise FlowerNodeError(
            f"unknown node-config keys: {', '.join(unknown)} (known: {', '.join(sorted(KNOWN_KEYS))})"
        )
    for key in ("data", "work-dir"):
        if not settings.get(key):
            raise FlowerNodeError(f"the SuperNode's node-config needs {key}=...")
    command = [sys.executable, "-m", "fedpt", "node", "join", "--aggregator", aggregator]
    for key, flag in {**PATH_KEYS, **VALUE_KEYS}.items():
        if settings.get(key) not in (None, ""):
            command += [flag, str(settings[key])]
    for key, flag in FLAG_KEYS.items():
        if settings.get(key) is True or str(settings.get(key)).lower() == "true":
            command.append(flag)
    return command


def take_part(settings: Mapping[str, object], order: Order) -> dict:
    """Run one `node join --once` and return its metrics (this round's record for TRAIN, the
    final model's report for EVALUATE); FlowerNodeError with the log's tail if it failed."""
    kind, number = order.kind, order.round
    work_dir = Path(str(settings.get("work-dir", "")))
    command = node_command(settings, order)
    work_dir.mkdir(parents=True, exist_ok=True)
    log_path = work_dir / "flower.log"
    rounds_log = work_dir / "rounds.jsonl"
    seen = _lines(rounds_log)
    with open(log_path, "a") as log:
        log.write(f"== {kind} message for round {number}: {' '.join(command)}\n")
        log.flush()
        env = {**os.environ, ADMISSION_TOKEN_ENV: order.token}
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                              check=False).returncode  # fmt: skip
    if code != 0:
        raise FlowerNodeError(f"fedpt node join --once exited with {code}:\n{_tail(log_path)}")
    if kind == "evaluate":
        report = work_dir / "final" / "report.json"
        found = json.loads(report.read_text()) if report.is_file() else {}
        loss = found.get("global_val_loss")
        return {"version": float(found.get("version", -1)),
                **({} if loss is None else {"val-loss": float(loss)})}  # fmt: skip
    records = _lines(rounds_log)[len(seen) :]
    if not records:  # the federation ended before this node took part
        return {"trained": 0.0}
    last = json.loads(records[-1])
    metrics = {"trained": 1.0, "round": last["round"], "version": last["version"],
               "tokens": last["tokens"], "pushed": float(last["pushed"]),
               "pull-seconds": last["pull_seconds"], "train-seconds": last["train_seconds"],
               "push-seconds": last["push_seconds"]}  # fmt: skip
    # Absent or NaN: a round left unpulled, or energy not measured.
    for key in ("train_loss", "base_val_loss", "gpu_energy_joules", "cpu_energy_joules"):
        if last.get(key) is not None and math.isfinite(last[key]):
            metrics[key.replace("_", "-")] = last[key]
    return {k: float(v) for k, v in metrics.items()}


def _lines(path: Path) -> list[str]:
    try:
        return [line for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


def _tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def client_app(simulated: list[dict] | None = None):
    """The ClientApp. `simulated`: node settings by partition id, for Flower's simulation
    engine (`fedpt simulate --engine flower`); otherwise each SuperNode's node_config."""
    from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    from node.flower_stages import STAGE_MESSAGES, StageError, answer_stage

    app = ClientApp()

    def handle(message, context, kind: str):
        try:
            settings = dict(context.node_config)
            if simulated is not None:
                settings = {**settings, **simulated[int(settings["partition-id"])]}
            record = message.content.config_records["fedpt"]
            if kind in STAGE_MESSAGES:
                order = Order.from_record(STAGE_MESSAGES[kind], record)
                answer = answer_stage(order.kind, settings, order.aggregator, order.round,
                                      order.token, bytes(record.get("state", b"")))  # fmt: skip
                return Message(RecordDict({"fedpt": ConfigRecord(answer)}), reply_to=message)
            metrics = take_part(settings, Order.from_record(kind, record))
        except (FlowerNodeError, StageError, KeyError, ValueError, OSError) as e:
            return Message(Error(code=1, reason=f"fedpt node: {e}"), reply_to=message)
        return Message(RecordDict({"fedpt": MetricRecord(metrics)}), reply_to=message)

    for message_type in STAGE_MESSAGES:  # query.secagg_keys, ...: one handler each
        action = message_type.partition(".")[2]
        app.query(action)(
            lambda message, context, kind=message_type: handle(message, context, kind)
        )

    @app.train()
    def train(message, context):
        return handle(message, context, "train")

    @app.evaluate()
    def evaluate(message, context):
        return handle(message, context, "evaluate")

    return app
