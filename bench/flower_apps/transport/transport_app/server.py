"""The ServerApp of the flower row: the model (random fp32 weights of bench.scale's shape for
`params-mib`) goes to every SuperNode as an ArrayRecord; each reply's delta is added into a
running sum as it is pulled and then dropped, the least memory Flower's Grid allows a delta
aggregator. Timings go to $FEDPT_BENCH_EVENTS as JSON lines."""

import json
import os
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import ServerApp

from bench.scale import shape_for_mib
from model.gpt import GPT

app = ServerApp()


def event(name: str, **fields: object) -> None:
    with open(os.environ["FEDPT_BENCH_EVENTS"], "a") as f:
        f.write(json.dumps({"event": name, "t": time.time(), **fields}) + "\n")


@app.main()
def main(grid, context) -> None:
    nodes_wanted = int(context.run_config["nodes"])
    torch.manual_seed(0)
    model = GPT(shape_for_mib(float(context.run_config["params-mib"]))).state_dict()
    for tensor in model.values():  # random, never constant: Flower deduplicates equal chunks
        tensor.normal_()
    nodes: list[int] = []
    give_up = time.monotonic() + 600
    while len(nodes) < nodes_wanted and time.monotonic() < give_up:
        nodes = sorted(grid.get_node_ids())
        time.sleep(0.5)
    event("push", nodes=len(nodes))
    content = RecordDict({"model": ArrayRecord(model), "round": ConfigRecord({"round": 0})})
    pending = set(grid.push_messages([Message(content, node, "train", group_id="0")
                                      for node in nodes]))  # fmt: skip
    del content
    total: dict[str, torch.Tensor] | None = None
    answered = 0
    while pending and time.monotonic() < give_up + 3600:
        for reply in grid.pull_messages(list(pending)):
            pending.discard(reply.metadata.reply_to_message_id)
            if reply.has_error():
                raise RuntimeError(f"node {reply.metadata.src_node_id}: {reply.error.reason}")
            delta = reply.content.array_records["delta"].to_torch_state_dict()
            if total is None:
                total = delta
            else:
                for name, tensor in delta.items():
                    total[name].add_(tensor)
            answered += 1
            del reply, delta
        time.sleep(0.05)
    for name, tensor in model.items():  # the new model: the mean delta added
        tensor.add_(total[name].div_(answered))
    event("done", answered=answered)
