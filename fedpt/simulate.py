"""`fedpt simulate`: a whole federation on one machine, made of the real parts.

It writes an aggregator.toml, starts `fedpt aggregator serve` and N `fedpt node join` processes
on 127.0.0.1 (real gRPC, real training), and watches the aggregator's database: each time a
round ends it evaluates the new global model on the held-out validation splits of every node's
data and prints a row. When the federation ends, each node scores the final model on its own
validation split and personalises it (`--personalise-steps`), and one `fedpt train` per
organisation trains that organisation alone for as many steps as its node spent in total (the
rounds plus personalisation: the same tokens). The closing table says, per organisation, whether
the federation paid off. Everything lands in one run folder:

  aggregator.toml, aggregator/ (fedpt.db, checkpoints/, uploads/), nodes/NAME/ (round logs,
  final/: the final and personalised models), alone/NAME/ (each organisation alone),
  logs/*.log (every process's output), rounds.csv, summary.json
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aggregator.checkpoints import CheckpointStore
from aggregator.handlers import SERVICE_NAME
from aggregator.outer import OuterConfig, OuterConfigError
from aggregator.store import Store
from fedpt import payoff
from model.config import ModelConfig
from model.gpt import GPT
from model.io import load_model, load_weights_into
from model.tokenizer import ByteTokenizer
from model.train_config import TrainConfig, TrainConfigError
from node.builtin_corpus import list_organisations
from node.curation import curation_sha256
from node.curation_config import CurationConfig, CurationConfigError, load_curation_config
from node.evaluation import mean_loss
from node.local_training import cache_dir
from node.parallel import DistEnv
from node.personalise import PersonaliseConfig, PersonaliseError
from node.progress import count_bar
from node.shards import TokenShards, prepare_data
from protos import pki

# The built-in organisations in the order simulated nodes take them (most different first).
DEFAULT_ORGS = ("web", "systems", "apps", "core", "docs")
ENGINES = ("native", "flower")
# Flower's engine starts Ray before the ServerApp serves fedpt's aggregator.
FLOWER_START_SECONDS = 180.0
EVAL_SEQ_LEN, EVAL_BATCH, EVAL_BATCHES = 128, 8, 8
# Inner-loop fields a federation decides itself: the schedule spans rounds × H, the seed is the
# federation's.
FEDERATION_SETS = {"steps", "seed"}


class SimulationError(RuntimeError):
    """The simulation could not start or a process failed; the message says which and why."""


@dataclass
class SimulationOptions:
    nodes: int = 4
    rounds: int = 24
    preset: str = "tiny"
    data: list[str] = field(default_factory=list)
    inner_steps: int = 10
    outer: str = "fedavg"
    outer_lr: float | None = None
    outer_momentum: float | None = None  # nesterov μ (default: aggregator/outer.py's)
    reset_inner_optimizer: bool = False  # nodes start each round with fresh AdamW moments
    reset_inner_momentum: bool = False  # ... with AdamW's first moment zeroed, the second kept
    proximal_mu: float = 0.0  # FedProx term of the inner loop ([train] proximal_mu)
    # The nodes' other inner-loop settings (TrainConfig fields: micro_batch_size, seq_len, lr,
    # warmup_steps, ...), sent to them as aggregator.toml's [train]; unset: TrainConfig's.
    train: dict = field(default_factory=dict)
    min_nodes: int | None = None
    round_timeout: float = 600.0
    nproc_per_node: int = 1
    seed: int = 0
    delta_encoding: str = "auto"  # auto = secure aggregation (masked-int16); protos.delta_encoding
    download_encoding: str = "int8"  # int8/bf16: compressed outer updates; fp32: whole models
    personalise_steps: int | None = None  # per node when the federation ends; None: H
    personalise_mode: str = "full"  # full | lora (node/personalise.py)
    compare_alone: bool = True  # train each organisation alone, the same tokens, and compare
    out: Path | None = None
    # native: an aggregator process and a node process per organisation; flower: fedpt's
    # ServerApp and ClientApps on Flower's simulation engine (fedpt/flower_simulation.py)
    engine: str = "native"
    ray_address: str = ""  # flower: an existing Ray cluster ("auto"); "": one on this machine
    # A [curation] TOML every node curates its corpus with; the aggregator requires its sha256.
    curation: Path | None = None

    @property
    def personalisation_steps(self) -> int:
        return self.inner_steps if self.personalise_steps is None else self.personalise_steps


@dataclass
class NodeProcess:
    name: str
    source: str
    process: subprocess.Popen
    log_path: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_sources(nodes: int) -> list[tuple[str, str]]:
    """(node name, data source) per node: one built-in organisation each, reused round-robin."""
    orgs = [o for o in DEFAULT_ORGS if o in list_organisations()]
    out = []
    for i in range(nodes):
        org = orgs[i % len(orgs)]
        out.append((org if i < len(orgs) else f"{org}-{i // len(orgs) + 1}", f"builtin:{org}"))
    return out


def named_sources(sources: list[str]) -> list[tuple[str, str]]:
    names = []
    for i, source in enumerate(sources):
        # Names become certificate identities: letters, digits, '.', '_', '-' only.
        base = pki.organisation_from(Path(source.replace("builtin:", "")).name, f"node{i}")
        names.append((base if base not in [n for n, _ in names] else f"{base}-{i}", source))
    return names


def write_aggregator_config(
    opts: SimulationOptions, run: Path, port: int, require_curation: str = ""
) -> Path:
    min_nodes = opts.min_nodes or opts.nodes
    outer_settings = f"lr = {opts.outer_lr}\n" if opts.outer_lr else ""
    if opts.outer_momentum is not None:
        outer_settings += f"momentum = {opts.outer_momentum}\n"
    text = f"""[server]
host = "127.0.0.1"
port = {port}
long_poll_seconds = 2.0
kit = "{run / "pki" / "aggregator"}"

[federation]
name = "simulation"
rounds = {opts.rounds}
inner_steps = {opts.inner_steps}
seed = {opts.seed}
delta_encoding = "{opts.delta_encoding}"
download_encoding = "{opts.download_encoding}"
require_curation = "{require_curation}"

[model]
preset = "{opts.preset}"

[round]
min_nodes = {min_nodes}
timeout_seconds = {opts.round_timeout}
start_grace_seconds = 2.0

[outer]
name = "{opts.outer}"
{outer_settings}
{payoff.toml_table("train", {**opts.train, "proximal_mu": opts.proximal_mu})}
[store]
state_dir = "{run / "aggregator"}"
# Every version: the watcher scores each one after its round, and short rounds (small H) can
# commit several versions while it scores one (the default keeps 5 and pruned them first).
keep_checkpoints = 0
"""
    path = run / "aggregator.toml"
    path.write_text(text)
    return path


class Simulation:
    def __init__(self, opts: SimulationOptions, log=print) -> None:
        self.opts, self.log = opts, log
        self.run = opts.out or Path("runs") / time.strftime("sim-%Y%m%d-%H%M%S")
        if self.run.exists() and any(self.run.iterdir()):
            raise SimulationError(f"{self.run} is not empty; choose another --out")
        if opts.engine not in ENGINES:
            raise SimulationError(f"--engine must be one of {', '.join(ENGINES)}")
        if opts.ray_address and opts.engine != "flower":
            raise SimulationError("--ray-address is for --engine flower")
        if opts.nodes < 1 or opts.rounds < 1 or opts.inner_steps < 1:
            raise SimulationError("--nodes, --rounds and --inner-steps must be at least 1")
        try:
            TrainConfig(proximal_mu=opts.proximal_mu)
        except TrainConfigError as e:
            raise SimulationError(f"--proximal-mu: {e}") from e
        fixed = sorted(set(opts.train) & FEDERATION_SETS)
        if fixed:
            raise SimulationError(
                f"inner settings: {', '.join(fixed)} follow from --rounds, --inner-steps and "
                "--seed in a federation; leave them out"
            )
        try:
            TrainConfig.from_dict(opts.train)
        except TrainConfigError as e:
            raise SimulationError(f"inner settings: {e}") from e
        try:
            PersonaliseConfig(opts.personalisation_steps, opts.personalise_mode)
        except PersonaliseError as e:
            raise SimulationError(str(e).replace("personalise_", "--personalise-")) from e
        try:  # refused here, before any process starts, as the aggregator would refuse it
            OuterConfig(opts.outer, opts.outer_lr,
                        **({} if opts.outer_momentum is None else {"momentum": opts.outer_momentum}))  # fmt: skip
        except OuterConfigError as e:
            raise SimulationError(str(e).replace("[outer] ", "--outer-")) from e
        self.sources = named_sources(opts.data) if opts.data else default_sources(opts.nodes)
        if len(self.sources) != opts.nodes:
            raise SimulationError(
                f"--data names {len(self.sources)} sources for {opts.nodes} nodes"
            )
        self.curation: CurationConfig | None = None
        if opts.curation is not None:
            try:
                self.curation = load_curation_config(opts.curation)
            except CurationConfigError as e:
                raise SimulationError(f"--curation: {e}") from e
        # Node name -> its shard folder (curated with --curation), found in the cache by the node.
        self.prepared: dict[str, Path] = {}
        (self.run / "logs").mkdir(parents=True, exist_ok=True)
        self.processes: list[subprocess.Popen] = []

    # ---- processes ----------------------------------------------------------------------------
    def _spawn(
        self, args: list[str], log_name: str, module: str = "fedpt"
    ) -> tuple[subprocess.Popen, Path]:
        log_path = self.run / "logs" / f"{log_name}.log"
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            "FEDPT_CACHE_DIR": str(cache_dir()),
        }
        with open(log_path, "w") as log_file:
            proc = subprocess.Popen([sys.executable, "-m", module, *args], stdout=log_file,
                                    stderr=subprocess.STDOUT, env=env, start_new_session=True)  # fmt: skip
        self.processes.append(proc)
        return proc, log_path

    def _make_pki(self) -> None:
        """A throwaway federation CA and a startup kit for the aggregator, every node, and this
        process: an operator's kit, which asks the health service and lets the user watch the
        run with fedpt status --aggregator."""
        pki_dir = self.run / "pki"
        pki.init_ca(pki_dir / "ca", "fedpt simulation CA (throwaway)")
        pki.issue_kit(
            pki_dir / "ca", "aggregator", pki_dir / "aggregator", server_hosts=["127.0.0.1"]
        )
        for name, _ in self.sources:
            pki.issue_kit(pki_dir / "ca", name, pki_dir / name)
        self.monitor_kit = pki.load_kit(
            pki.issue_kit(pki_dir / "ca", "simulator", pki_dir / "simulator", operator=True)
        )

    def _wait_healthy(
        self, address: str, proc: subprocess.Popen, log_path: Path, timeout: float = 30.0
    ) -> None:
        credentials = pki.channel_credentials(self.monitor_kit)
        with grpc.secure_channel(address, credentials) as channel:
            if wait_until_serving(channel, proc, timeout=timeout):
                return
        if proc.poll() is not None:
            raise SimulationError(f"the aggregator exited at start-up:\n{tail(log_path)}")
        raise SimulationError(f"the aggregator did not become healthy within {timeout:.0f} s")

    def stop_all(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.processes:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    # ---- evaluation ---------------------------------------------------------------------------
    def _prepare_validation(self) -> list[TokenShards]:
        """Pack (with --curation: curate and pack) every node's data once (the nodes then find
        it in the cache) and keep the validation splits: the held-out set the global model is
        scored on."""
        tokenizer = ByteTokenizer()
        sets = []
        for name, source in self.sources:
            root, report = prepare_data(source, tokenizer, cache_dir(), curation=self.curation)
            self.prepared[name] = root
            sets.append(TokenShards(root / "val"))
            if report is not None:
                self.log(f"data {name}: {report.summary()}")
        return sets

    def _global_val_loss(
        self, version: int, model_config: ModelConfig, val_sets: list[TokenShards]
    ) -> float:
        return union_val_loss(self._global_model(version, model_config), val_sets)

    # ---- the run ------------------------------------------------------------------------------
    def execute(self) -> dict:
        torch.set_num_threads(1)  # the cores belong to the nodes
        val_sets = self._prepare_validation()
        self._make_pki()
        port = free_port()
        address = f"127.0.0.1:{port}"
        required = ""
        if self.curation is not None:  # perplexity filtering: the hash covers the model's content
            required = curation_sha256(self.curation)
            self.log(f"every node curates its corpus with {self.opts.curation} ({required[:12]}…)")
        config_path = write_aggregator_config(self.opts, self.run, port, required)
        if self.opts.engine == "flower":
            summary = self._run_on_flower(config_path, address, val_sets)
        else:
            summary = self._run_natively(config_path, address, val_sets)
        if self.opts.compare_alone:
            summary.update(self._compare_with_alone(val_sets))
            (self.run / "summary.json").write_text(json.dumps(summary, indent=2))
        from fedpt.report import report_at_end  # charts and report.html; never fails the run

        report_at_end(self.run, self.log)
        return summary

    def _node_toml(self, name: str) -> Path:
        """A node.toml of the per-node settings besides where its data, work dir and kit are
        (one for both engines)."""
        path = self.run / "nodes" / f"{name}.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(payoff.toml_table("node", {
            "reset_inner_optimizer": self.opts.reset_inner_optimizer,
            "reset_inner_momentum": self.opts.reset_inner_momentum,
            "personalise_steps": self.opts.personalisation_steps,
            "personalise_mode": self.opts.personalise_mode}))  # fmt: skip
        return path

    def _run_natively(self, config_path: Path, address: str, val_sets: list[TokenShards]) -> dict:
        aggregator, agg_log = self._spawn(
            ["aggregator", "serve", "--config", str(config_path)], "aggregator"
        )
        self._wait_healthy(address, aggregator, agg_log)
        nodes = []
        for name, source in self.sources:
            args = ["node", "join", "--aggregator", address, "--data", source, "--kit", str(self.run / "pki" / name),
                    "--organisation", name, "--config", str(self._node_toml(name)),
                    "--work-dir", str(self.run / "nodes" / name), "--nproc-per-node", str(self.opts.nproc_per_node)]  # fmt: skip
            if self.opts.curation is not None:
                args += ["--curation", str(self.opts.curation.resolve())]
            proc, log_path = self._spawn(args, f"node-{name}")
            nodes.append(NodeProcess(name, source, proc, log_path))
        self.log(f"simulation: aggregator on {address}, {len(nodes)} nodes, run folder {self.run}; "
                 f"watch it with: fedpt status --aggregator {address} --kit "
                 f"{self.run / 'pki' / 'simulator'} --watch")  # fmt: skip
        return self._watch(aggregator, agg_log, nodes, val_sets)

    def _run_on_flower(self, config_path: Path, address: str, val_sets: list[TokenShards]) -> dict:
        """fedpt's ServerApp and one ClientApp per organisation on Flower's simulation engine,
        in one process: the run is over when it exits (after the final EVALUATE)."""
        settings = []
        for name, source in self.sources:
            settings.append({"data": source, "work-dir": str(self.run / "nodes" / name),
                             "kit": str(self.run / "pki" / name), "organisation": name,
                             "devices": self.opts.nproc_per_node,
                             "config": str(self._node_toml(name))})  # fmt: skip
            if self.opts.curation is not None:
                settings[-1]["curation"] = str(self.opts.curation.resolve())
        nodes_json = self.run / "flower-nodes.json"
        nodes_json.write_text(json.dumps(settings, indent=2))
        args = ["--config", str(config_path), "--nodes", str(nodes_json)]
        args += ["--ray-address", self.opts.ray_address] if self.opts.ray_address else []
        flower, flower_log = self._spawn(args, "flower", module="fedpt.flower_simulation")
        self._wait_healthy(address, flower, flower_log, timeout=FLOWER_START_SECONDS)
        self.log(f"simulation on Flower's engine: fedpt's ServerApp serves {address}, "
                 f"{len(settings)} virtual SuperNodes, run folder {self.run}")  # fmt: skip
        # Every organisation's node lives in that one process (Ray's workers).
        nodes = [NodeProcess(name, source, flower, flower_log) for name, source in self.sources]
        return self._watch(flower, flower_log, nodes, val_sets)

    def _watch(
        self, aggregator, agg_log: Path, nodes: list[NodeProcess], val_sets: list[TokenShards]
    ) -> dict:
        store = Store(f"sqlite:///{(self.run / 'aggregator' / 'fedpt.db').resolve()}")
        try:
            fid, spec_json, _ = store.find_federation("simulation")
            spec = json.loads(spec_json)
            model_config = ModelConfig.from_dict(json.loads(spec["model_config_json"]))
            initial = self._global_val_loss(0, model_config, val_sets)
            names = {n.id: n.organisation for n in store.nodes(fid)}
            header = ["round", "nodes", *[n.name for n in nodes], "val loss", "round s"]
            self.log(f"global validation loss before training: {initial:.4f}")
            self.log("  ".join(f"{h:>8}" for h in header))
            rows, reported = [], set()
            budget = time.monotonic() + self.opts.rounds * self.opts.round_timeout + 120
            # A terminal gets a bar of rounds done (node/progress.py); the rows print above it.
            with count_bar("rounds", self.opts.rounds) as bar:
                while time.monotonic() < budget:
                    for r in store.rounds(fid):
                        if r.state not in ("COMMITTED", "FAILED") or r.number in reported:
                            continue
                        reported.add(r.number)
                        names.update({n.id: n.organisation for n in store.nodes(fid)})
                        rows.append(self._row(store, fid, r, names, nodes, model_config, val_sets))
                        self.log("  ".join(f"{c:>8}" for c in rows[-1]["cells"]))
                        bar.update(len(reported))
                    if aggregator.poll() not in (None, 0):
                        raise SimulationError(
                            f"the aggregator exited with {aggregator.returncode}:\n{tail(agg_log)}"
                        )
                    failed = [n for n in nodes if n.process.poll() not in (None, 0)]
                    if failed:
                        n = failed[0]
                        raise SimulationError(
                            f"node {n.name} exited with {n.process.returncode}:\n{tail(n.log_path)}"
                        )
                    if (
                        all(n.process.poll() == 0 for n in nodes)
                        and len(reported) >= self.opts.rounds
                    ):
                        break
                    time.sleep(0.5)
                else:
                    raise SimulationError(
                        f"the simulation did not finish in time; logs in {self.run / 'logs'}"
                    )
        finally:
            store.close()
        return self._summary(initial, rows)

    # ---- does it pay off for every organisation? ----------------------------------------------
    def _compare_with_alone(self, val_sets: list[TokenShards]) -> dict:
        """Train each organisation alone at its tokens (rounds plus personalisation), then
        print its global, personalised and alone models side by side (fedpt/payoff.py)."""
        store = Store(f"sqlite:///{(self.run / 'aggregator' / 'fedpt.db').resolve()}")
        try:
            fid, spec_json, _ = store.find_federation("simulation")
            organisation_of = {n.id: n.organisation for n in store.nodes(fid)}
            reported = payoff.reported_losses(
                store.metrics(fid), store.rounds(fid), organisation_of
            )
        finally:
            store.close()
        spec = json.loads(spec_json)
        model_config = ModelConfig.from_dict(json.loads(spec["model_config_json"]))
        train_config = TrainConfig.from_dict(json.loads(spec.get("train_config_json") or "{}"))
        orgs = []
        for name, source in self.sources:
            # Alone on the shards its node trained on (curated with --curation): the same tokens.
            alone_source = str(self.prepared[name]) if self.curation is not None else source
            org = payoff.Organisation(name, alone_source, reported.get(name, {}))
            final = payoff.read_final_report(self.run / "nodes" / name)
            org.final_version, org.final_global = final.get("version"), final.get("global_val_loss")
            org.personalised = (final.get("personalised") or {}).get("val_loss")
            orgs.append(org)
        h, p = self.opts.inner_steps, self.opts.personalisation_steps
        rounds_steps = max((o.final_version or 0 for o in orgs), default=0) * h
        total = rounds_steps + p
        # Evaluate every H steps (and at the end): the curve the per-round table compares with.
        alone_config = TrainConfig.from_dict(
            {**train_config.to_dict(), "eval_every": h, "steps": total}
        )
        config_path = payoff.write_train_config(
            self.run / "alone" / "train.toml", model_config, alone_config
        )
        self.log(f"training each organisation alone for {total} steps ({rounds_steps} as in the rounds "
                 f"+ {p} as in personalisation: the tokens its node spent)")  # fmt: skip
        try:
            payoff.train_alone(orgs, config_path, total, self.opts.seed, self.run / "alone",
                               self._spawn, parallel=max(1, min(len(orgs), os.cpu_count() or 1)))  # fmt: skip
        except payoff.AloneTrainingFailed as e:
            raise SimulationError(str(e)) from e
        final_version = max(
            (o.final_version for o in orgs if o.final_version is not None), default=None
        )
        union_global = (
            union_val_loss(self._global_model(final_version, model_config), val_sets)
            if final_version is not None else math.nan
        )  # fmt: skip
        for org in orgs:
            alone_model, _ = load_model(self.run / "alone" / org.name / "model.safetensors")
            org.alone_union = union_val_loss(alone_model, val_sets)
        self._print_payoff(orgs, h, total, union_global)
        return {"alone_steps": total, "union_global_val_loss": union_global,
                "organisations": {o.name: o.as_dict() for o in orgs}}  # fmt: skip

    def _print_payoff(self, orgs: list, h: int, total: int, union_global: float) -> None:
        names = [o.name for o in orgs]
        self.log("")
        self.log("each organisation's validation loss on its own data: global model (as its node "
                 "reported it) / that organisation alone after as many steps; + where the "
                 "federation is better")  # fmt: skip
        self._table(["version", "steps", *names], payoff.per_round_rows(orgs, h))
        self.log("")
        self.log(f"at equal tokens per organisation ({total} steps each): alone, the final global "
                 "model, and the global model personalised on the organisation's own data")  # fmt: skip
        self._table(["organisation", "alone", "global", "personalised", "global better",
                     "personalised better"], payoff.verdict_rows(orgs, total))  # fmt: skip
        beaten = [
            o.name for o in orgs if o.alone_union is not None and union_global < o.alone_union
        ]
        self.log(f"on the union of every organisation's validation data: global {payoff.fmt(union_global)}; "
                 + ", ".join(f"{o.name} alone {payoff.fmt(o.alone_union)}" for o in orgs)
                 + f"; the global model beats {len(beaten)} of {len(orgs)} alone models")  # fmt: skip

    def _table(self, header: list[str], rows: list[list[str]]) -> None:
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        for r in [header, *rows]:
            self.log("  ".join(str(c).rjust(w) for c, w in zip(r, widths, strict=True)))

    def _global_model(self, version: int, model_config: ModelConfig) -> GPT:
        params, _, _ = CheckpointStore(self.run / "aggregator" / "checkpoints").read(version)
        model = GPT(model_config)
        load_weights_into(model, params, source=f"global model v{version}")
        return model

    def _row(self, store, fid, r, names, nodes, model_config, val_sets) -> dict:
        metrics = [m for m in store.metrics(fid) if m.round_number == r.number]
        loss_by_org = {
            names.get(m.node_id, "?"): m.value for m in metrics if m.name == "train_loss"
        }
        seconds = next((m.value for m in metrics if m.name == "round_seconds"), math.nan)
        val = (
            self._global_val_loss(r.result_version, model_config, val_sets)
            if r.state == "COMMITTED"
            else math.nan
        )
        per_node = [f"{loss_by_org[n.name]:.4f}" if n.name in loss_by_org else "-" for n in nodes]
        cells = [str(r.number), str(len(loss_by_org)), *per_node, f"{val:.4f}" if r.state == "COMMITTED" else "FAILED",
                 f"{seconds:.1f}"]  # fmt: skip
        return {"round": r.number, "state": r.state, "nodes": len(loss_by_org), "train_loss": loss_by_org,
                "val_loss": val, "round_seconds": seconds, "cells": cells}  # fmt: skip

    def _summary(self, initial: float, rows: list[dict]) -> dict:
        committed = [r for r in rows if r["state"] == "COMMITTED"]
        final = committed[-1]["val_loss"] if committed else math.nan
        summary = {"initial_val_loss": initial, "final_val_loss": final, "rounds": [
            {k: v for k, v in r.items() if k != "cells"} for r in rows]}  # fmt: skip
        (self.run / "summary.json").write_text(json.dumps(summary, indent=2))
        with open(self.run / "rounds.csv", "w") as f:
            f.write("round,state,nodes,val_loss,round_seconds\n")
            for r in rows:
                f.write(
                    f"{r['round']},{r['state']},{r['nodes']},{r['val_loss']:.6f},{r['round_seconds']:.3f}\n"
                )
        verdict = "fell" if final < initial else "did NOT fall"
        self.log(
            f"global validation loss {initial:.4f} -> {final:.4f} ({verdict}); run folder {self.run}"
        )
        return summary


def union_val_loss(model: torch.nn.Module, val_sets: list[TokenShards]) -> float:
    """`model`'s mean loss over every node's validation split (the splits too small for one
    window left out); NaN when none has one."""
    losses = [mean_loss(model, data, seq_len=EVAL_SEQ_LEN, batch_size=EVAL_BATCH,
                        max_batches=EVAL_BATCHES, env=DistEnv()) for data in val_sets]  # fmt: skip
    losses = [x for x in losses if x is not None]
    return sum(losses) / len(losses) if losses else math.nan


def wait_until_serving(channel: grpc.Channel, proc: subprocess.Popen, timeout: float) -> bool:
    """True once the aggregator's grpc.health.v1 says SERVING; False if `proc` (the aggregator)
    exited first or `timeout` seconds passed."""
    stub = health_pb2_grpc.HealthStub(channel)
    request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up and proc.poll() is None:
        try:
            if stub.Check(request, timeout=1.0).status == health_pb2.HealthCheckResponse.SERVING:
                return True
        except grpc.RpcError:
            pass  # not listening yet
        time.sleep(0.1)
    return False


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


def simulate(opts: SimulationOptions, log=print) -> bool:
    """Run the simulation; True when the global validation loss fell."""
    sim = Simulation(opts, log)
    try:
        summary = sim.execute()
    finally:
        sim.stop_all()
    return summary["final_val_loss"] < summary["initial_val_loss"]
