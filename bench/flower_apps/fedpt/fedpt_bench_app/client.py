"""The ClientApp of the fedpt row: each TRAIN message runs bench/scale_node.py against the
ServerApp's data plane (join, pull, a random delta, push, until the aggregator says STOP),
with the organisation's kit from the SuperNode's node-config; EVALUATE is answered at once."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from flwr.app import Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from node.round_order import ADMISSION_TOKEN_ENV

app = ClientApp()


@app.train()
def train(message, context):
    with open(os.environ["FEDPT_BENCH_EVENTS"], "a") as f:
        f.write(
            json.dumps({"event": "clientapp", "t": time.time(), "node": context.node_id}) + "\n"
        )
    settings = context.node_config
    work = Path(str(settings["work-dir"]))
    work.mkdir(parents=True, exist_ok=True)
    order = message.content.config_records["fedpt"]
    command = [sys.executable, "-m", "bench.scale_node", "--address", str(order["aggregator"]),
               "--organisation", str(settings["organisation"]), "--kit", str(settings["kit"]),
               "--records", str(work / "records.jsonl"), "--spool", str(work / "spool"),
               "--timeout", "1800"]  # fmt: skip
    env = {**os.environ, ADMISSION_TOKEN_ENV: str(order["token"])}
    with open(work / "node.log", "a") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        return Message(Error(code=1, reason=f"scale_node exited with {code}"), reply_to=message)
    return Message(RecordDict({"fedpt": MetricRecord({"trained": 1.0})}), reply_to=message)


@app.evaluate()
def evaluate(message, context):
    return Message(RecordDict({"fedpt": MetricRecord({"evaluated": 0.0})}), reply_to=message)
