"""The ClientApp of the flower row: takes the model from the message and answers with a random
delta of its shapes, N(0, 1) · 1e-3 (what bench/scale_node.py draws on the fedpt row)."""

import json
import os
import time

import torch
from flwr.app import ArrayRecord, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


def event(name: str, **fields: object) -> None:
    with open(os.environ["FEDPT_BENCH_EVENTS"], "a") as f:
        f.write(json.dumps({"event": name, "t": time.time(), **fields}) + "\n")


@app.train()
def train(message, context):
    event("clientapp", node=context.node_id)
    model = message.content.array_records["model"].to_torch_state_dict()
    g = torch.Generator().manual_seed(int(context.node_id) % (1 << 31))
    delta = {n: torch.randn(t.shape, generator=g).mul_(1e-3) for n, t in model.items()}
    del model
    event("reply", node=context.node_id)
    return Message(RecordDict({"delta": ArrayRecord(delta)}), reply_to=message)
