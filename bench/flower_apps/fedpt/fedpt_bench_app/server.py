"""The ServerApp of the fedpt row: fedpt's own (aggregator/flower.py), its log lines timed into
$FEDPT_BENCH_EVENTS as JSON lines."""

import json
import os
import time

from aggregator.flower import server_app


def timed(line: str) -> None:
    print(line, flush=True)
    with open(os.environ["FEDPT_BENCH_EVENTS"], "a") as f:
        f.write(json.dumps({"event": "log", "t": time.time(), "line": line}) + "\n")


app = server_app(log=timed)
