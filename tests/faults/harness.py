"""A federation of real processes for fault injection: `fedpt aggregator serve` and one
`fedpt node join` per organisation on 127.0.0.1, with a schedule of SIGKILLs.

A fault is (process, crash point, round): the process is started with FEDPT_CRASH_AT so that it
SIGKILLs itself exactly there (protos/crash_points.py); the harness sees it die (-SIGKILL) and
starts it again on the same state (the aggregator on the same database, checkpoint folder and
port; a node on the same work folder), armed with the next fault scheduled for it, if any. The
run ends when the aggregator has served every round and exited; every process is bounded by a
wall-clock limit and killed at the end whatever happens.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from aggregator.checkpoints import OUTER_PREFIX
from aggregator.store import Store
from model.io import load_tensors
from protos import crash_points, pki
from tests.conftest import synthetic_documents, write_corpus

ORGANISATIONS = ("acme", "globex", "initech")
RUN_LIMIT_SECONDS = 240.0


@dataclass(frozen=True)
class Fault:
    process: str  # "aggregator" or an organisation
    point: str  # a crash point of protos/crash_points.py
    round: int

    @property
    def env(self) -> str:
        return f"{self.point}@{self.round}"


@dataclass(frozen=True)
class Settings:
    """Deterministic settings: nodes derive data order and schedule from the model version and
    keep their inner state on disk; the aggregator sums fp32 uploads in node order; secure
    aggregation rounds with per-version rounding. Every node is needed (min_nodes = all), so a
    round a node dropped out of fails and is retried from the same model, not committed without
    it."""

    secure: bool = False
    rounds: int = 3
    inner_steps: int = 4
    round_timeout: float = 60.0
    stage_timeout: float = 60.0
    min_nodes: int = 0  # 0: every organisation
    delta_encoding: str = "auto"  # the lossy ones carry each node's residual across rounds
    download_encoding: str = "int8"  # bf16/int8: nodes add compressed outer updates

    def aggregator_toml(self, root: Path, pki_dir: Path, port: int) -> str:
        security = f'kit = "{pki_dir / "aggregator"}"' if self.secure else "insecure = true"
        return f"""
[server]
host = "127.0.0.1"
port = {port}
long_poll_seconds = 1.0
{security}

[federation]
name = "faults"
rounds = {self.rounds}
inner_steps = {self.inner_steps}
seed = 7
delta_encoding = "{self.delta_encoding}"
download_encoding = "{self.download_encoding}"

[model]
preset = "tiny"
dim = 32
n_layers = 1
n_heads = 2
ffn_dim = 64
max_seq_len = 32

[train]
micro_batch_size = 4
seq_len = 32
warmup_steps = 2
lr = 0.003

[round]
min_nodes = {self.min_nodes or len(ORGANISATIONS)}
timeout_seconds = {self.round_timeout}
start_grace_seconds = 0.2
deterministic = true

[outer]
name = "nesterov"

[secagg]
stage_timeout_seconds = {self.stage_timeout}

[store]
state_dir = "{root / "aggregator"}"
keep_checkpoints = 0
"""


@dataclass
class RunResult:
    final: dict[str, torch.Tensor]  # the last committed global model
    rounds: list[tuple[int, str, int, int | None]]  # (number, state, base, result version)
    deaths: list[Fault]  # the faults that really happened (the process died by SIGKILL)
    logs: dict[str, str] = field(default_factory=dict)


def _free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


class FaultyFederation:
    def __init__(
        self, root: Path, settings: Settings, faults: list[Fault], pki_dir: Path | None = None
    ) -> None:
        self.root, self.settings = root, settings
        self.pending = list(faults)
        self.port = _free_port()
        self.deaths: list[Fault] = []
        self.procs: dict[str, subprocess.Popen] = {}
        self.armed: dict[str, Fault | None] = {}
        self.starts: dict[str, int] = {}
        root.mkdir(parents=True, exist_ok=True)
        self.pki_dir = pki_dir or root / "pki"
        if settings.secure and not (self.pki_dir / "ca").exists():
            ca = pki.init_ca(self.pki_dir / "ca", "fault-test CA")
            pki.issue_kit(ca, "aggregator", self.pki_dir / "aggregator", server_hosts=["127.0.0.1"])
            for org in ORGANISATIONS:
                pki.issue_kit(ca, org, self.pki_dir / org)
        self.config = root / "aggregator.toml"
        self.config.write_text(settings.aggregator_toml(root, self.pki_dir, self.port))
        for i, org in enumerate(ORGANISATIONS):
            write_corpus(root / "data" / org, synthetic_documents(20, seed=100 + i))
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "FEDPT_CACHE_DIR": str(root / "cache")}
        self.env.pop(crash_points.ENV, None)
        self.env[crash_points.SWITCH] = "1"  # crash points are inert without it

    # ---- processes ----------------------------------------------------------------------------
    def _command(self, name: str) -> list[str]:
        base = [sys.executable, "-m", "fedpt"]
        if name == "aggregator":
            return [*base, "aggregator", "serve", "--config", str(self.config)]
        security = ["--kit", str(self.pki_dir / name)] if self.settings.secure else ["--insecure"]
        return [*base, "node", "join", *security, "--aggregator", f"127.0.0.1:{self.port}",
                "--data", str(self.root / "data" / name), "--organisation", name,
                "--work-dir", str(self.root / "nodes" / name), "--poll-seconds", "1"]  # fmt: skip

    def start(self, name: str) -> None:
        fault = next((f for f in self.pending if f.process == name), None)
        env = dict(self.env)
        if fault is not None:
            self.pending.remove(fault)
            env[crash_points.ENV] = fault.env
        self.armed[name] = fault
        self.starts[name] = self.starts.get(name, 0) + 1
        log = open(self.root / f"{name}.{self.starts[name]}.log", "w")  # noqa: SIM115
        self.procs[name] = subprocess.Popen(
            self._command(name), stdout=log, stderr=subprocess.STDOUT, env=env, text=True
        )
        log.close()

    def run(
        self,
        first: tuple[str, ...] = ORGANISATIONS,
        while_running: Callable[[FaultyFederation], None] | None = None,
    ) -> RunResult:
        """Start the aggregator and the `first` nodes, and run until every process has ended;
        `while_running(self)` is called every tenth of a second meanwhile (to start or pause
        processes as the rounds go by)."""
        self.start("aggregator")
        for org in first:
            self.start(org)
        give_up = time.monotonic() + RUN_LIMIT_SECONDS
        try:
            while time.monotonic() < give_up:
                for name, proc in list(self.procs.items()):
                    code = proc.poll()
                    if code is None:
                        continue
                    if code == -signal.SIGKILL and self.armed.get(name) is not None:
                        self.deaths.append(self.armed[name])
                        self.start(name)
                    elif code != 0:
                        raise AssertionError(f"{name} exited with {code}:\n{self._tail(name)}")
                if all(p.poll() == 0 for p in self.procs.values()):
                    break
                if while_running is not None:
                    while_running(self)
                time.sleep(0.1)
            else:
                raise AssertionError(
                    "the federation did not finish in time:\n"
                    + "\n".join(self._tail(n) for n in self.procs)
                )
        finally:
            for proc in self.procs.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(10)
        return self._result()

    def _tail(self, name: str, lines: int = 40) -> str:
        path = self.root / f"{name}.{self.starts[name]}.log"
        text = path.read_text() if path.exists() else ""
        return f"--- {path.name}\n" + "\n".join(text.splitlines()[-lines:])

    def signal(self, name: str, sig: int) -> None:
        self.procs[name].send_signal(sig)

    # ---- what the aggregator's database says ----------------------------------------------------
    @contextlib.contextmanager
    def _database(self) -> Iterator[tuple[Store, str, dict[str, str]] | None]:
        """(store, federation id, node id -> organisation); None before the federation exists."""
        path = self.root / "aggregator" / "fedpt.db"
        if not path.exists():
            yield None
            return
        store = Store(f"sqlite:///{path}")
        try:
            found = store.find_federation("faults")
            if found is None:
                yield None
            else:
                organisation = {n.id: n.organisation for n in store.nodes(found[0])}
                yield store, found[0], organisation
        finally:
            store.close()

    def rounds(self) -> list[tuple[int, str, int, int | None, tuple[str, ...]]]:
        """(number, state, base version, result version, participating organisations) of
        every round so far."""
        with self._database() as db:
            if db is None:
                return []
            store, federation_id, organisation = db
            return [(r.number, r.state, r.base_version, r.result_version,
                     tuple(sorted(organisation[p] for p in r.participants)))
                    for r in store.rounds(federation_id)]  # fmt: skip

    def organisations(self) -> list[str]:
        """The organisations that have joined."""
        with self._database() as db:
            return [] if db is None else sorted(db[2].values())

    def uploaders(self, number: int) -> list[str]:
        """The organisations whose update round `number` received."""
        with self._database() as db:
            assert db is not None, "no federation in the database"
            store, federation_id, organisation = db
            return sorted(organisation[s.node_id] for s in store.submissions(federation_id, number))

    def _result(self) -> RunResult:
        with self._database() as db:
            assert db is not None, "no federation in the database"
            store, federation_id, _ = db
            latest = store.latest_checkpoint(federation_id)
        rounds = [r[:4] for r in self.rounds()]
        final, _ = load_tensors(Path(latest.path))
        logs = {path.name: path.read_text() for path in sorted(self.root.glob("*.log"))}
        return RunResult(final, rounds, list(self.deaths), logs)


def run_federation(
    root: Path, settings: Settings, faults: list[Fault] = (), pki_dir: Path | None = None
) -> RunResult:
    """Run a federation to its end; secure runs to be compared share `pki_dir` (the nodes'
    keys key their stochastic rounding)."""
    return FaultyFederation(root, settings, list(faults), pki_dir).run()


def model_tensors(result: RunResult) -> dict[str, torch.Tensor]:
    """The global weights (the checkpoint also holds the outer optimizer's state)."""
    return {k: v for k, v in result.final.items() if not k.startswith(OUTER_PREFIX)}
