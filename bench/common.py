"""Helpers shared by the benchmarks: medians, synthetic token shards, table printing, and
running `fedpt` commands as subprocesses and reading what they leave behind."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from node.shards import TokenShards, pack_shards


class RandomTokens:
    """A stand-in tokenizer that turns every document into `length` uniform random ids, so a
    benchmark can feed a real shard set with any vocabulary size (FLOPs depend on it)."""

    def __init__(self, vocab_size: int, length: int, seed: int = 0) -> None:
        self.vocab_size, self.length = vocab_size, length
        self.bos_id, self.eos_id, self.pad_id = vocab_size - 3, vocab_size - 2, vocab_size - 1
        self._rng = np.random.default_rng(seed)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self._rng.integers(0, self.vocab_size - 3, self.length).tolist() for _ in texts]

    def spec(self) -> dict:
        return {"kind": "random", "vocab_size": self.vocab_size}


def random_shards(
    folder: Path, vocab_size: int, tokens: int, doc_tokens: int = 4096
) -> TokenShards:
    docs = [f"document {i}" for i in range(max(1, tokens // doc_tokens))]
    pack_shards(docs, RandomTokens(vocab_size, doc_tokens), folder, val_fraction=0.0)
    return TokenShards(folder / "train")


def empty_run_folder(root: Path) -> Path:
    """`root`, created; a folder that already holds something is refused (--out)."""
    if root.exists() and any(root.iterdir()):
        raise SystemExit(f"{root} is not empty; choose another --out")
    root.mkdir(parents=True, exist_ok=True)
    return root


def median(values: list[float]) -> float:
    return statistics.median(values)


def print_table(header: list[str], rows: list[list[object]]) -> None:
    cells = [header, *[[_cell(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for i, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3f}"
    return str(value)


# ---- driving the `fedpt` command (convergence, utilization) -----------------------------------
class FedptRunError(RuntimeError):
    """A `fedpt` subprocess failed or ran past its time limit; the message holds its log's tail."""


def run_fedpt(
    args: list[str],
    log_path: Path,
    *,
    cache: Path,
    timeout: float,
    ok_codes: tuple[int, ...] = (0,),
    threads: int | None = None,
) -> float:
    """Run `python -m fedpt ARGS` to completion with FEDPT_CACHE_DIR=`cache` and its output in
    `log_path`; returns its wall seconds. Past `timeout` it gets SIGINT (so `fedpt simulate`
    stops its aggregator and nodes), then SIGKILL for its process group."""
    env = {**os.environ, "FEDPT_CACHE_DIR": str(cache), "PYTHONUNBUFFERED": "1"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "fedpt", *args], stdout=log_file,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)  # fmt: skip
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            raise FedptRunError(
                f"fedpt {' '.join(args)} ran past {timeout:.0f} s:\n{log_tail(log_path)}"
            ) from None
    if code not in ok_codes:
        raise FedptRunError(f"fedpt {' '.join(args)} exited with {code}:\n{log_tail(log_path)}")
    return time.perf_counter() - start


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def node_round_records(run: Path) -> dict[str, list[dict]]:
    """Each node's per-round records (node.participant.RoundRecord) from a `fedpt simulate`
    run folder: {node name: [record, ...]} in round order."""
    return {
        folder.name: sorted(read_jsonl(folder / "rounds.jsonl"), key=lambda r: r["round"])
        for folder in sorted((run / "nodes").iterdir())
        if (folder / "rounds.jsonl").is_file()
    }


def federation_spec(run: Path, name: str = "simulation") -> dict:
    """The federation spec (FederationSpec as a dict, proto field names) that `fedpt simulate`
    stored in its aggregator's database, plus `federation_id`."""
    from aggregator.store import Store

    store = Store(f"sqlite:///{(run / 'aggregator' / 'fedpt.db').resolve()}")
    try:
        found = store.find_federation(name)
        if found is None:
            raise FedptRunError(f"no federation {name!r} in {run / 'aggregator' / 'fedpt.db'}")
        federation_id, spec_json, _ = found
    finally:
        store.close()
    return {**json.loads(spec_json), "federation_id": federation_id}


# ---- /proc readings of a process (bench.scale and its node processes) --------------------------
def proc_status_bytes(pid: int | str, key: str) -> int:
    """A `kB` field of /proc/PID/status (VmRSS, VmHWM) in bytes; `pid` may be "self"."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"/proc/{pid}/status has no {key}")


def reset_peak_rss(pid: int | str) -> None:
    """Set VmHWM to the current VmRSS (Linux ≥ 4.0), so the next reading is this phase's peak."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def meminfo_bytes(key: str) -> int:
    """A field of /proc/meminfo (MemTotal, MemAvailable) in bytes."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"/proc/meminfo has no {key}")
