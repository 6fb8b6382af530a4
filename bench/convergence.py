"""Federated vs centralized vs each organisation alone: held-out perplexity for the same tokens.

Three ways to spend the same training budget on N built-in organisations (web, systems, apps,
core by default; one federation node each), every run a real `fedpt` command in a subprocess:

  federated     `fedpt simulate --nodes N --rounds R --inner-steps H --outer O`: an aggregator
                and N node processes on 127.0.0.1 (mutual TLS; secure aggregation unless
                --delta-encoding fp32); each node trains R×H inner steps on its own
                organisation's text. Tokens = N × R × H × tokens per step (read back from the
                nodes' rounds.jsonl). Scored: the last committed global checkpoint.
  centralized   `fedpt train --data builtin:ORG1,ORG2,... --steps N×R×H`: one model on the union
                of the organisations' text, the same total tokens.
  alone:ORG     `fedpt train --data builtin:ORG --steps R×H`: one organisation on its own, the
                tokens it contributed to the federation.
  central-Nxbatch  `fedpt train --data builtin:ORG1,... --steps R×H --grad-accum N`: the union
                again, the same tokens in a node's number of optimizer steps (N times the batch),
                i.e. what synchronous data-parallel training over the N sites would do. Centralized
                proper gets N times as many sequential updates as any node; this one gets the
                same number, which separates "fewer updates" from "federated averaging".
                (--no-bigbatch leaves it out.)

The train runs get the federation's own model and inner-loop settings (micro batch, sequence
length, lr, warmup, decay, clipping, read from the spec in the aggregator's database) through a
--config TOML, so only the data, the step count and the seed differ. Each node's lr schedule
spans its R×H steps, the same as alone:ORG; centralized's spans N×R×H steps.

Held-out evaluation is one fixed set for every model: the validation split of each organisation
(per-document hash split, never trained on), the first --eval-batches × --eval-batch-size
windows of 128 tokens of each (node.evaluation.mean_loss). Perplexity per organisation is
exp(mean loss); the mean column is exp(mean over organisations of the mean loss). The untrained
initial model (federation seed) is scored too, for scale.

Packing the corpus into token shards is done once, before the clock starts, into
--cache-dir (default $FEDPT_CACHE_DIR or fedpt's default cache), which every run then reads.

    python -m bench.convergence [--nodes 4] [--rounds 6] [--inner-steps 50] [--outer fedavg]
                                [--outer-lr LR] [--delta-encoding fp32] [--seed 0] [--out DIR]
                                [--no-bigbatch]

--sweep "outer=fedavg,nesterov lr=0.5,1 mu=0.5,0.9 h=20,40 inner=kept,reset,momentum nodes=2,4 prox=0,0.01"
runs one federation per combination instead (H at a fixed R x H per node; prox: the FedProx μ)
and, per node count, the references once; one table: each setting's mean perplexity, its ratio to synchronous
data-parallel (central-Nxbatch) and to pooled-sequential (centralized), and for how many
organisations the federated model beats that organisation's alone model on its own held-out
data and on the others'.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from aggregator.checkpoints import CheckpointStore
from aggregator.store import Store
from bench.common import (
    empty_run_folder,
    federation_spec,
    median,
    node_round_records,
    print_table,
    run_fedpt,
)
from fedpt.payoff import write_train_config
from model.config import ModelConfig
from model.gpt import GPT
from model.io import load_model, load_weights_into
from model.tokenizer import ByteTokenizer
from model.train_config import TrainConfig
from node.builtin_corpus import list_organisations
from node.evaluation import bits_per_byte, mean_loss, scored_windows
from node.local_training import cache_dir
from node.parallel import DistEnv
from node.shards import TokenShards, prepare_data
from protos.delta_encoding import ENCODINGS, PLAIN_ENCODINGS

EVAL_SEQ_LEN = 128


@dataclass
class Contender:
    name: str
    trained_on: str
    tokens: int
    seconds: float
    model: torch.nn.Module
    losses: dict[str, float] = field(default_factory=dict)  # organisation -> held-out loss
    bpb: dict[str, float] = field(default_factory=dict)  # organisation -> held-out bits per byte

    def mean_loss(self, orgs: list[str]) -> float:
        return sum(self.losses[o] for o in orgs) / len(orgs)

    def mean_bpb(self, orgs: list[str]) -> str:
        """Mean bits per byte over `orgs`, as table text (comparable across tokenizers)."""
        return f"{sum(self.bpb[o] for o in orgs) / len(orgs):.4f}"


def federation_orgs(nodes: int) -> list[str]:
    """The built-in organisations `fedpt simulate --nodes N` gives its nodes, in node order."""
    from fedpt.simulate import DEFAULT_ORGS

    orgs = [o for o in DEFAULT_ORGS if o in list_organisations()]
    if not 1 <= nodes <= len(orgs):
        raise SystemExit(f"--nodes must be 1..{len(orgs)}: one built-in organisation per node")
    return orgs[:nodes]


def federated_model(run: Path) -> tuple[GPT, ModelConfig, TrainConfig, int, int]:
    """(the last committed global model, model config, inner TrainConfig, its version, rounds
    committed) of a finished `fedpt simulate` run."""
    spec = federation_spec(run)
    model_config = ModelConfig.from_dict(json.loads(spec["model_config_json"]))
    train_config = TrainConfig.from_dict(json.loads(spec.get("train_config_json") or "{}"))
    store = Store(f"sqlite:///{(run / 'aggregator' / 'fedpt.db').resolve()}")
    try:
        latest = store.latest_checkpoint(spec["federation_id"])
        committed = sum(r.state == "COMMITTED" for r in store.rounds(spec["federation_id"]))
    finally:
        store.close()
    params, _, _ = CheckpointStore(run / "aggregator" / "checkpoints").read(
        latest.version, latest.sha256
    )
    model = GPT(model_config)
    load_weights_into(model, params, source=f"global model v{latest.version}")
    return model.eval(), model_config, train_config, latest.version, committed


def held_out_sets(orgs: list[str], cache: Path) -> dict[str, TokenShards]:
    return {
        o: TokenShards(prepare_data(f"builtin:{o}", ByteTokenizer(), cache)[0] / "val")
        for o in orgs
    }


def score(contender: Contender, val: dict[str, TokenShards], batches: int, batch_size: int) -> None:
    """The contender's held-out loss and bits per byte on every organisation."""
    lengths = ByteTokenizer().byte_lengths()
    for org, data in val.items():
        loss = mean_loss(contender.model, data, seq_len=EVAL_SEQ_LEN, batch_size=batch_size,
                         max_batches=batches, env=DistEnv())  # fmt: skip
        if loss is None:
            raise SystemExit(f"the validation split of {org} has no {EVAL_SEQ_LEN}-token window")
        contender.losses[org] = loss
        windows = scored_windows(data, EVAL_SEQ_LEN, batch_size, batches)
        contender.bpb[org] = bits_per_byte(loss, data, seq_len=EVAL_SEQ_LEN, windows=windows,
                                           byte_lengths=lengths)  # fmt: skip


@dataclass(frozen=True)
class Setting:
    """One federation's knobs (None: fedpt simulate's default)."""

    nodes: int
    rounds: int
    inner_steps: int
    outer: str
    outer_lr: float | None = None
    momentum: float | None = None
    inner: str = "kept"  # the inner AdamW state across rounds: kept | reset | momentum (reset)
    delta_encoding: str | None = None
    proximal_mu: float = 0.0

    def label(self) -> str:
        lr = "default" if self.outer_lr is None else f"{self.outer_lr:g}"
        mu = "" if self.momentum is None else f" mu={self.momentum:g}"
        inner = {"kept": "kept", "reset": "reset", "momentum": "momentum reset"}[self.inner]
        prox = f" prox={self.proximal_mu:g}" if self.proximal_mu else ""
        return f"{self.outer} lr={lr}{mu} H={self.inner_steps}xR={self.rounds} inner {inner}{prox}"


@dataclass
class FederatedRun:
    contender: Contender
    model_config: ModelConfig
    train_config: TrainConfig
    encoding: str


def run_federated(
    args: argparse.Namespace, root: Path, name: str, cache: Path, setting: Setting
) -> FederatedRun:
    """`fedpt simulate` with `setting`; its last committed global model as a contender."""
    run = root / name
    sim_args = ["simulate", "--nodes", str(setting.nodes), "--rounds", str(setting.rounds),
                "--inner-steps", str(setting.inner_steps), "--outer", setting.outer,
                "--preset", args.preset, "--seed", str(args.seed), "--out", str(run)]  # fmt: skip
    if setting.outer_lr is not None:
        sim_args += ["--outer-lr", str(setting.outer_lr)]
    if setting.momentum is not None:
        sim_args += ["--outer-momentum", str(setting.momentum)]
    if setting.inner != "kept":
        sim_args += [
            {"reset": "--reset-inner-optimizer", "momentum": "--reset-inner-momentum"}[
                setting.inner
            ]
        ]
    if setting.delta_encoding is not None:
        sim_args += ["--delta-encoding", setting.delta_encoding]
    if setting.proximal_mu:
        sim_args += ["--proximal-mu", str(setting.proximal_mu)]
    # The references are trained here, once per sweep: not by every simulation.
    sim_args += ["--no-alone", "--personalise-steps", "0"]
    print(f"running fedpt {' '.join(sim_args)}", flush=True)
    # exit status 1: the run finished but the global validation loss did not fall
    seconds = run_fedpt(sim_args, root / "logs" / f"{name}.log", cache=cache,
                        timeout=args.timeout, ok_codes=(0, 1))  # fmt: skip
    model, model_config, train_config, version, committed = federated_model(run)
    records = node_round_records(run)
    tokens = sum(r["tokens"] for rs in records.values() for r in rs if r["pushed"])
    print(f"  {seconds:.1f} s; {committed} of {setting.rounds} rounds committed, scoring global "
          f"model v{version}; {tokens:,} tokens pushed by {len(records)} nodes")  # fmt: skip
    encoding = federation_spec(run).get("delta_encoding", "?")
    return FederatedRun(Contender(name, setting.label(), tokens, seconds, model), model_config,
                        train_config, encoding)  # fmt: skip


def untrained(model_config: ModelConfig, seed: int) -> Contender:
    """The initial global model: the aggregator builds it from the federation seed."""
    rng_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = GPT(model_config).eval()
    torch.random.set_rng_state(rng_state)
    return Contender("untrained", "-", 0, 0.0, model)


def reference_runs(
    args: argparse.Namespace, root: Path, cache: Path, orgs: list[str], fed: FederatedRun,
    steps_alone: int, *, bigbatch: bool,
) -> list[Contender]:  # fmt: skip
    """The same tokens without a federation, with the federation's model and inner settings:
    centralized (pooled data, N x the sequential steps), central-Nxbatch (pooled, the same
    steps at N x the batch: synchronous data-parallel), alone:ORG (its own data, its steps)."""
    nodes = len(orgs)
    root.mkdir(parents=True, exist_ok=True)
    config_path = write_train_config(root / "train.toml", fed.model_config, fed.train_config)
    earlier = getattr(args, "references", None)
    if earlier is not None:
        earlier = earlier / root.name
        if (earlier / "train.toml").read_text() != config_path.read_text():
            raise SystemExit(f"--references: {earlier} was trained with other settings")
    union = "builtin:" + ",".join(orgs)
    accum = ["--grad-accum", str(nodes * fed.train_config.grad_accum)]
    jobs: list[tuple[str, str, int, list[str]]] = [("centralized", union, nodes * steps_alone, [])]
    if bigbatch:
        jobs.append((f"central-{nodes}xbatch", union, steps_alone, accum))
    jobs += [(f"alone:{o}", f"builtin:{o}", steps_alone, []) for o in orgs]
    out_list = []
    for name, data, steps, extra in jobs:
        out = root / name.replace(":", "-")
        train_args = ["train", "--config", str(config_path), "--data", data, "--steps", str(steps),
                      *extra, "--seed", str(args.seed), "--out", str(out)]  # fmt: skip
        if earlier is not None:  # the same command ran before: its result, not a second run
            out, seconds = earlier / out.name, math.nan
            if json.loads((out / "summary.json").read_text())["steps"] != steps:
                raise SystemExit(f"--references: {out} did not train {steps} steps")
        else:
            print(f"running fedpt {' '.join(train_args)}", flush=True)
            seconds = run_fedpt(train_args, root / "logs" / f"{out.name}.log", cache=cache,
                                timeout=args.timeout)  # fmt: skip
        summary = json.loads((out / "summary.json").read_text())
        model, _ = load_model(out / "model.safetensors")
        print(f"  {seconds:.1f} s; {summary['tokens_seen']:,} tokens")
        how = f"{data.removeprefix('builtin:')}, {steps} steps" + (
            f" x batch {nodes}" if extra else ""
        )
        out_list.append(Contender(name, how, summary["tokens_seen"], seconds, model))
    return out_list


def compare_encodings(args: argparse.Namespace) -> None:
    """One federation per encoding (same settings, seed and data); held-out perplexity of each
    final global model, and its ratio to the first (the reference, normally fp32)."""
    orgs = federation_orgs(args.nodes)
    cache = (args.cache_dir or cache_dir()).resolve()
    entries = [e.strip() for e in args.encodings.split(",") if e.strip()]
    for entry in entries:
        delta, _, download = entry.partition(":")
        if delta not in ENCODINGS or (download and download not in PLAIN_ENCODINGS):
            raise SystemExit(
                f"--encodings: {entry!r} is not DELTA[:DOWNLOAD] of {', '.join(ENCODINGS)}"
            )
    with tempfile.TemporaryDirectory(prefix="fedpt-convergence-") as tmp:
        root = empty_run_folder(args.out or Path(tmp))
        for source in [f"builtin:{o}" for o in orgs]:
            prepare_data(source, ByteTokenizer(), cache)
        val = held_out_sets(orgs, cache)
        rows, losses = [], {}
        for entry in entries:
            delta, _, download = entry.partition(":")
            run = root / entry.replace(":", "-down-")
            sim_args = ["simulate", "--nodes", str(args.nodes), "--rounds", str(args.rounds),
                        "--inner-steps", str(args.inner_steps), "--outer", args.outer, "--preset", args.preset,
                        "--seed", str(args.seed), "--delta-encoding", delta,
                        "--download-encoding", download or "fp32", "--out", str(run)]  # fmt: skip
            if args.outer_lr is not None:
                sim_args += ["--outer-lr", str(args.outer_lr)]
            print(f"running fedpt {' '.join(sim_args)}", flush=True)
            seconds = run_fedpt(sim_args, root / "logs" / f"{run.name}.log", cache=cache,
                                timeout=args.timeout, ok_codes=(0, 1))  # fmt: skip
            model, _, _, _, committed = federated_model(run)
            contender = Contender(entry, "", 0, seconds, model)
            score(contender, val, args.eval_batches, args.eval_batch_size)
            losses[entry] = contender.mean_loss(orgs)
            rows.append((entry, delta, download or "fp32", committed, seconds, contender))
    reference = entries[0]
    print()
    print(f"{args.nodes} nodes x {args.rounds} rounds x H={args.inner_steps}, {args.outer}, preset "
          f"{args.preset}, seed {args.seed}; held-out perplexity of the final global model")  # fmt: skip
    table = []
    for entry, delta, download, committed, seconds, c in rows:
        ratio = math.exp(losses[entry] - losses[reference])
        table.append([delta, download, str(committed), f"{seconds:.1f}",
                      *[f"{math.exp(c.losses[o]):.3f}" for o in orgs], f"{math.exp(losses[entry]):.4f}",
                      c.mean_bpb(orgs), f"{ratio:.4f}", f"{100 * (ratio - 1):+.2f}%"])  # fmt: skip
    print_table(["upload", "download", "rounds", "wall s", *[f"ppl {o}" for o in orgs], "mean ppl",
                 "mean bits/byte", f"/ {reference}", "diff"], table)  # fmt: skip


SWEEP_KEYS = ("nodes", "outer", "lr", "mu", "h", "inner", "encoding", "prox")


def parse_sweep(spec: str, args: argparse.Namespace) -> list[Setting]:
    """`outer=fedavg,nesterov lr=0.7,1 h=20,40 inner=kept,reset nodes=4` → every combination;
    grids joined by `|` add up (`outer=fedavg h=10 | outer=nesterov mu=0.5`), duplicates once.
    H varies at a fixed number of inner steps per node (--rounds x --inner-steps), so R = T / H.
    Keys left out take the command line's value."""
    settings: list[Setting] = []
    for grid_spec in spec.split("|"):
        for setting in _grid(grid_spec, args):
            if setting not in settings:
                settings.append(setting)
    if not settings:
        raise SystemExit("--sweep: no setting given")
    return settings


def _grid(spec: str, args: argparse.Namespace) -> list[Setting]:
    values: dict[str, list[str]] = {}
    for part in spec.replace(";", " ").split():
        key, eq, vals = part.partition("=")
        if not eq or key not in SWEEP_KEYS or not vals:
            raise SystemExit(
                f"--sweep: {part!r} is not KEY=V1,V2,... with KEY in {', '.join(SWEEP_KEYS)}"
            )
        values[key] = [v for v in vals.split(",") if v]
    total = args.rounds * args.inner_steps
    defaults = {"nodes": [str(args.nodes)], "outer": [args.outer],
                "lr": ["default" if args.outer_lr is None else str(args.outer_lr)], "mu": ["default"],
                "h": [str(args.inner_steps)], "inner": ["kept"],
                "encoding": [args.delta_encoding or "default"], "prox": ["0"]}  # fmt: skip
    grid = [values.get(k, defaults[k]) for k in SWEEP_KEYS]
    settings = []
    try:
        for nodes, outer, lr, mu, h, inner, encoding, prox in itertools.product(*grid):
            if outer not in ("fedavg", "nesterov", "adam") or inner not in (
                "kept",
                "reset",
                "momentum",
            ):
                raise ValueError(f"outer {outer!r} / inner {inner!r}")
            if total % int(h):
                raise ValueError(f"H={h} does not divide the {total} inner steps per node")
            settings.append(Setting(int(nodes), total // int(h), int(h), outer,
                                    None if lr == "default" else float(lr),
                                    None if mu == "default" else float(mu), inner,
                                    None if encoding == "default" else encoding, float(prox)))  # fmt: skip
    except ValueError as e:
        raise SystemExit(f"--sweep: {e}") from e
    return settings


def sweep(args: argparse.Namespace) -> None:
    """One federation per setting; per node count, the references (pooled data with N x the
    steps, synchronous data-parallel, each organisation alone) once, with the same tokens."""
    settings = parse_sweep(args.sweep, args)
    cache = (args.cache_dir or cache_dir()).resolve()
    steps_alone = args.rounds * args.inner_steps
    report: list[list[str]] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedpt-convergence-") as tmp:
        root = empty_run_folder(args.out or Path(tmp))
        for nodes in sorted({st.nodes for st in settings}):
            orgs = federation_orgs(nodes)
            for source in (*[f"builtin:{o}" for o in orgs], "builtin:" + ",".join(orgs)):
                prepare_data(source, ByteTokenizer(), cache)
            val = held_out_sets(orgs, cache)
            feds = []
            for i, st in enumerate(s for s in settings if s.nodes == nodes):
                fed = run_federated(args, root, f"n{nodes}-{i}", cache, st)
                score(fed.contender, val, args.eval_batches, args.eval_batch_size)
                feds.append(fed)
            refs = {c.name: c for c in reference_runs(args, root / f"n{nodes}-refs", cache, orgs,
                                                       feds[0], steps_alone, bigbatch=True)}  # fmt: skip
            for c in refs.values():
                score(c, val, args.eval_batches, args.eval_batch_size)
            dp, pooled = refs[f"central-{nodes}xbatch"], refs["centralized"]
            for fed in feds:
                c = fed.contender
                own = sum(c.losses[o] < refs[f"alone:{o}"].losses[o] for o in orgs)
                others = sum(
                    c.mean_loss([x for x in orgs if x != o]) < refs[f"alone:{o}"].mean_loss([x for x in orgs if x != o])
                    for o in orgs
                ) if nodes > 1 else 0  # fmt: skip
                report.append([str(nodes), c.trained_on, f"{math.exp(c.mean_loss(orgs)):.3f}",
                               c.mean_bpb(orgs), f"{math.exp(c.mean_loss(orgs) - dp.mean_loss(orgs)):.3f}",
                               f"{math.exp(c.mean_loss(orgs) - pooled.mean_loss(orgs)):.3f}",
                               f"{own}/{nodes}", f"{others}/{nodes}", f"{c.seconds:.0f}"])  # fmt: skip
            for name in ("centralized", f"central-{nodes}xbatch", *[f"alone:{o}" for o in orgs]):
                r = refs[name]
                report.append([str(nodes), f"({name}: {r.trained_on})",
                               f"{math.exp(r.mean_loss(orgs)):.3f}", r.mean_bpb(orgs), "", "", "", "",
                               f"{r.seconds:.0f}"])  # fmt: skip
    print()
    print(f"preset {args.preset}, {steps_alone} inner steps per node (R x H), seed {args.seed}; "
          "held-out perplexity on every organisation's validation split (mean = exp(mean loss))")  # fmt: skip
    print("fed/DP: / synchronous data-parallel on the pooled data (same tokens, same sequential "
          "steps); fed/pooled: / one model on the pooled data with N x the steps; own (others): "
          "organisations whose own (the other organisations') held-out data the federation "
          "models better than that organisation's model trained alone")  # fmt: skip
    print_table(["nodes", "setting", "mean ppl", "mean bits/byte", "fed/DP", "fed/pooled",
                 "own wins", "others wins", "wall s"], report)  # fmt: skip
    print(f"bench total {time.perf_counter() - started:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, default=4, help="N: one built-in organisation each")
    parser.add_argument("--rounds", type=int, default=6, help="R: federation rounds")
    parser.add_argument("--inner-steps", type=int, default=50, help="H: inner steps per round")
    parser.add_argument("--outer", choices=("fedavg", "nesterov", "adam"), default="fedavg")
    parser.add_argument("--outer-lr", type=float, default=None, help="default: the optimizer's")
    parser.add_argument("--delta-encoding", choices=("auto", *ENCODINGS), default=None,
                        help="passed to fedpt simulate (its default: auto = secure aggregation)")  # fmt: skip
    parser.add_argument("--encodings", default=None,
                        help="compare encodings instead: comma list of DELTA or DELTA:DOWNLOAD "
                             "(e.g. fp32,int8,int8:int8,masked-int16); the first is the reference; "
                             "only federated runs, same settings and seed")  # fmt: skip
    parser.add_argument("--sweep", default=None,
                        help="a sweep instead: KEY=V1,V2 ... for KEY in nodes, outer, lr, mu, h "
                             "(at fixed R x H), inner (kept, reset, momentum: only AdamW's first moment reset), encoding, prox (FedProx mu); every combination "
                             "is one federation, scored against the same references")  # fmt: skip
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seed", type=int, default=0, help="initial model (all runs), data order (train runs)")  # fmt: skip
    parser.add_argument("--eval-batches", type=int, default=32, help="held-out batches per organisation")  # fmt: skip
    parser.add_argument("--eval-batch-size", type=int, default=8)
    parser.add_argument("--no-bigbatch", action="store_true", help="skip the central-Nxbatch run")
    parser.add_argument("--references", type=Path, default=None,
                        help="--sweep: reuse the reference models of an earlier sweep's --out "
                             "(same preset, seed, steps and inner settings: checked)")  # fmt: skip
    parser.add_argument("--out", type=Path, help="keep the run folders here (default: a temp dir)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="token shard cache (default: $FEDPT_CACHE_DIR or ~/.cache/fedpt/shards)")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per fedpt command")
    args = parser.parse_args()
    if min(args.rounds, args.inner_steps, args.eval_batches, args.eval_batch_size) < 1:
        raise SystemExit("--rounds, --inner-steps and the eval sizes must be at least 1")

    if args.encodings:
        compare_encodings(args)
        return
    if args.sweep:
        sweep(args)
        return
    orgs = federation_orgs(args.nodes)
    cache = (args.cache_dir or cache_dir()).resolve()
    steps_alone = args.rounds * args.inner_steps
    steps_union = args.nodes * steps_alone
    union = "builtin:" + ",".join(orgs)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedpt-convergence-") as tmp:
        root = empty_run_folder(args.out or Path(tmp))

        t0 = time.perf_counter()
        for source in (*[f"builtin:{o}" for o in orgs], union):
            prepare_data(source, ByteTokenizer(), cache)
        val = held_out_sets(orgs, cache)
        print(f"data: {len(orgs)} organisations and their union packed/found in {cache} "
              f"({time.perf_counter() - t0:.1f} s, not counted below)")  # fmt: skip

        # ---- federated ----------------------------------------------------------------------
        setting = Setting(args.nodes, args.rounds, args.inner_steps, args.outer, args.outer_lr,
                          None, "kept", args.delta_encoding)  # fmt: skip
        fed_run = run_federated(args, root, "federated", cache, setting)
        fed_model, fed_seconds = fed_run.contender.model, fed_run.contender.seconds
        model_config, train_config = fed_run.model_config, fed_run.train_config
        encoding, fed_tokens = fed_run.encoding, fed_run.contender.tokens
        tokens_per_step = train_config.tokens_per_step(1)
        if fed_tokens != steps_union * tokens_per_step:
            print(
                f"  note: expected N x R x H x tokens/step = {steps_union * tokens_per_step:,} tokens"
            )

        # ---- centralized and alone: the federation's settings, other data and step counts ---
        contenders = [untrained(model_config, args.seed)]
        how = f"{args.nodes} nodes x {args.rounds} rounds x H={args.inner_steps}, {args.outer}, {encoding}"
        contenders.append(Contender("federated", how, fed_tokens, fed_seconds, fed_model))
        big = f"central-{args.nodes}xbatch"
        contenders += reference_runs(args, root, cache, orgs, fed_run, steps_alone,
                                     bigbatch=not args.no_bigbatch)  # fmt: skip

        t0 = time.perf_counter()
        for c in contenders:
            score(c, val, args.eval_batches, args.eval_batch_size)
        eval_seconds = time.perf_counter() - t0
        windows = {o: min(v.num_windows(EVAL_SEQ_LEN), args.eval_batches * args.eval_batch_size)
                   for o, v in val.items()}  # fmt: skip
        if args.out is not None:
            print(f"run folders kept in {root}")

    # ---- report ---------------------------------------------------------------------------------
    print()
    print(f"preset {args.preset} ({model_config.num_params() / 1e6:.2f}M params), "
          f"{tokens_per_step:,} tokens/step (micro batch {train_config.micro_batch_size} x grad accum "
          f"{train_config.grad_accum} x seq {train_config.seq_len}), inner lr {train_config.lr:g}, "
          f"warmup {train_config.warmup_steps}, cosine to {train_config.min_lr_ratio:g}x")  # fmt: skip
    print(f"budget: N x R x H x tokens/step = {args.nodes} x {args.rounds} x {args.inner_steps} x "
          f"{tokens_per_step:,} = {steps_union * tokens_per_step:,} tokens")  # fmt: skip
    print("held-out: validation split of each organisation, "
          + ", ".join(f"{o} {n} windows" for o, n in windows.items())
          + f" of {EVAL_SEQ_LEN} tokens; ppl = exp(mean loss); mean = exp(mean of the per-org losses)")  # fmt: skip
    print()
    header = ["model", "trained on", "tokens", "wall s", *[f"ppl {o}" for o in orgs], "mean ppl",
              "mean bits/byte"]  # fmt: skip
    rows = []
    for c in contenders:
        rows.append([c.name, c.trained_on, f"{c.tokens:,}", f"{c.seconds:.1f}",
                     *[f"{math.exp(c.losses[o]):.3f}" for o in orgs], f"{math.exp(c.mean_loss(orgs)):.3f}",
                     c.mean_bpb(orgs)])  # fmt: skip
    print_table(header, rows)

    by_name = {c.name: c for c in contenders}
    fed, central = by_name["federated"], by_name["centralized"]
    ratio = math.exp(fed.mean_loss(orgs)) / math.exp(central.mean_loss(orgs))
    print()
    print(f"federated / centralized mean perplexity: {ratio:.3f} "
          f"(lower is better; 1.0 = parity; mean loss {fed.mean_loss(orgs):.4f} vs {central.mean_loss(orgs):.4f})")  # fmt: skip
    per_org = [math.exp(fed.losses[o] - central.losses[o]) for o in orgs]
    print("per organisation federated/centralized: "
          + ", ".join(f"{o} {r:.3f}" for o, r in zip(orgs, per_org, strict=True))
          + f" (median {median(per_org):.3f})")  # fmt: skip
    if big in by_name:
        b = by_name[big]
        print(f"federated / {big} mean perplexity: {math.exp(fed.mean_loss(orgs) - b.mean_loss(orgs)):.3f} "
              f"(same tokens and the same {steps_alone} sequential optimizer steps as a node)")  # fmt: skip
    best = min((by_name[f"alone:{o}"] for o in orgs), key=lambda c: c.mean_loss(orgs))
    print(f"federated / best organisation alone ({best.name}) mean perplexity: "
          f"{math.exp(fed.mean_loss(orgs) - best.mean_loss(orgs)):.3f}")  # fmt: skip

    print()
    print("does the federation beat training alone? (perplexity; 'others' = mean over the other organisations)")  # fmt: skip
    rows, wins = [], 0
    for o in orgs:
        alone = by_name[f"alone:{o}"]
        others = [x for x in orgs if x != o]
        own_a, own_f = math.exp(alone.losses[o]), math.exp(fed.losses[o])
        oth_a = math.exp(alone.mean_loss(others)) if others else math.nan
        oth_f = math.exp(fed.mean_loss(others)) if others else math.nan
        better = oth_f < oth_a
        wins += better
        rows.append([o, f"{own_a:.3f}", f"{own_f:.3f}", f"{oth_a:.3f}", f"{oth_f:.3f}",
                     "yes" if better else "no", "yes" if own_f < own_a else "no"])  # fmt: skip
    print_table(
        ["org", "alone own", "fed own", "alone others", "fed others", "fed better on others", "fed better on own"],
        rows,
    )  # fmt: skip
    print(
        f"federation beat training alone on the other organisations' data for {wins} of {len(orgs)}"
    )

    total = time.perf_counter() - started
    print()
    big_s = f", {big} {by_name[big].seconds:.1f} s" if big in by_name else ""
    print(f"wall time: federated {fed_seconds:.1f} s, centralized {central.seconds:.1f} s{big_s}, alone "
          f"{sum(by_name[f'alone:{o}'].seconds for o in orgs):.1f} s in all, held-out scoring {eval_seconds:.1f} s; "
          f"bench total {total:.1f} s")  # fmt: skip
    print("notes: every node process runs 1 thread and the N nodes share this machine's cores; "
          "fedpt train uses all cores. Centralized takes N x R x H optimizer steps, a node R x H: "
          "same tokens, N times the sequential updates.")  # fmt: skip


if __name__ == "__main__":
    main()
