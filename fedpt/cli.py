"""The `fedpt` command. Parses arguments and calls into node/ (and later aggregator/); every
error a user can cause is reported as one `fedpt: error: ...` line with exit status 2."""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tomllib
import typing
from pathlib import Path

from model.config import ConfigError, ModelConfig, preset
from model.io import CheckpointError
from model.tokenizer import TokenizerError
from protos import crash_points
from protos.delta_encoding import ENCODINGS, PLAIN_ENCODINGS

if typing.TYPE_CHECKING:
    from node.parallel import Launch
    from node.participant import NodeConfig

USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, CheckpointError, TokenizerError)


class UsageError(ValueError):
    """A bad command line or config file."""


class OneLineParser(argparse.ArgumentParser):
    """argparse prints its usage block on errors; a single line is easier to act on."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def _user_errors() -> tuple[type[Exception], ...]:
    from aggregator.config import AggregatorConfigError
    from aggregator.rounds import RecoveryError
    from aggregator.store import StoreError
    from fedpt.simulate import SimulationError
    from fedpt.status import StatusError
    from model.hf import HFFormatError
    from model.train_config import TrainConfigError
    from node.corpus import DataError
    from node.curation_config import CurationConfigError
    from node.parallel import LaunchError
    from node.participant import AggregatorUnreachable, FederationMismatch, NodeConfigError
    from node.personalise import PersonaliseError
    from node.quality import CurationUnavailable
    from node.round_order import ModelMismatch
    from node.trainer import TrainingError
    from protos.pki import PKIError

    return (*USER_ERRORS, UsageError, DataError, TrainConfigError, TrainingError,
            AggregatorConfigError, RecoveryError, StoreError, OSError, NodeConfigError,
            FederationMismatch, SimulationError, PKIError, LaunchError, PersonaliseError,
            AggregatorUnreachable, ModelMismatch, HFFormatError, StatusError,
            crash_points.CrashPointError, CurationConfigError, CurationUnavailable)  # fmt: skip


# ---- ranks and hosts (torchrun) ---------------------------------------------------------------
def add_launch_flags(p: argparse.ArgumentParser) -> None:
    """One flag per node.parallel.Launch field (torchrun's names); unset flags stay None."""
    from node.parallel import Launch

    hints = typing.get_type_hints(Launch)
    for f in dataclasses.fields(Launch):
        kind = next(
            t for t in typing.get_args(hints[f.name]) or (hints[f.name],) if t is not type(None)
        )
        p.add_argument(
            f"--{f.name.replace('_', '-')}", type=kind, default=None, help=f.metadata["help"]
        )


def launch_flags(args: argparse.Namespace) -> dict:
    from node.parallel import Launch

    return {f.name: getattr(args, f.name) for f in dataclasses.fields(Launch)
            if getattr(args, f.name) is not None}  # fmt: skip


def rerun_with_ranks(launch: Launch) -> int:
    """This same command again, as the launch's ranks on this host under torchrun (which sets
    LOCAL_RANK, so the ranks do not relaunch themselves)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", *launch.torchrun_args(), "-m", "fedpt",
           *sys.argv[1:]]  # fmt: skip
    return subprocess.call(cmd)


# ---- train ------------------------------------------------------------------------------------
# CLI flag -> TrainConfig field; only flags given on the command line override the config file.
TRAIN_FLAGS: dict[str, tuple[type, str]] = {
    "steps": (int, "optimizer steps (default 200)"),
    "micro_batch_size": (int, "sequences per rank per forward pass (default 8)"),
    "grad_accum": (int, "micro-batches per optimizer step (default 1)"),
    "seq_len": (int, "tokens per training sequence (default 128)"),
    "lr": (float, "peak AdamW learning rate (default 3e-3)"),
    "warmup_steps": (
        int,
        "linear warm-up steps from 0 to --lr, also the re-warm after --init-from (default 20)",
    ),
    "schedule": (
        str,
        "learning rate after the warm-up: cosine (decay to lr*min_lr_ratio), wsd "
        "(hold, then decay over the last --decay-fraction) or constant (default cosine)",
    ),
    "decay_fraction": (float, "wsd: the share of --steps spent decaying (default 0.2)"),
    "min_lr_ratio": (float, "cosine and wsd decay to lr times this (default 0.1)"),
    "weight_decay": (float, "AdamW weight decay on matrices (default 0.1)"),
    "grad_clip": (float, "clip the gradient norm to this; 0: off (default 1.0)"),
    "seed": (int, "initial weights and data order (default 0)"),
    "eval_every": (int, "steps between validation passes; 0: only at the end"),
    "eval_batches": (int, "validation batches per pass (default 16)"),
    "checkpoint_every": (int, "steps between resumable checkpoints; 0: only at the end"),
    "log_every": (int, "steps between log lines (default 10)"),
}


CURATION_HELP = ("TOML with a [curation] table: deduplicate, scrub PII and filter the documents "
                 "before packing (see node/curation_config.py)")  # fmt: skip


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model on one corpus (the centralized baseline)")
    p.add_argument(
        "--data",
        required=True,
        help="folder/file of text, a prepared shard folder, or builtin[:ORG,...]",
    )
    p.add_argument(
        "--out", required=True, type=Path, help="run folder for checkpoints, logs and weights"
    )
    p.add_argument(
        "--preset",
        default=None,
        help="model preset: tiny, small, 125m, 350m, 1b, 7b (default tiny)",
    )
    p.add_argument(
        "--config", type=Path, help="TOML with [model] and [train] tables; flags override it"
    )
    p.add_argument(
        "--tokenizer", help="BPE tokenizer JSON from `fedpt tokenizer train` (default: bytes)"
    )
    p.add_argument("--curation", type=Path, default=None, help=CURATION_HELP)
    for name, (kind, text) in TRAIN_FLAGS.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None, help=text)
    p.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default=None,
        help="auto: bf16 autocast on CUDA, fp32 on CPU (default auto)",
    )
    p.add_argument("--parallel", choices=("ddp", "fsdp"), default=None, help="multi-rank mode")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile each block")
    p.add_argument(
        "--activation-checkpointing",
        action="store_true",
        default=None,
        help="recompute each block's activations in the backward pass (less memory)",
    )
    add_launch_flags(p)  # more than one rank: relaunches itself under torchrun
    p.add_argument(
        "--resume", action="store_true", help="continue from the run folder's latest checkpoint"
    )
    p.add_argument(
        "--init-from",
        default=None,
        help="start from this model's weights (anything --checkpoint of eval takes: a weights "
        "file or run, an aggregator's global checkpoint, a transformers Llama folder; its shape "
        "and tokenizer) with a fresh optimizer and the schedule from step 0: continual pretraining",
    )
    p.set_defaults(func=cmd_train)


def read_config_tables(path: Path | None, what: str) -> tuple[dict, dict]:
    """The [model] and [train] tables of a `--config`-style TOML file (empty without one)."""
    if path is None:
        return {}, {}
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise UsageError(f"cannot read {what} {path}: {e}") from e
    unknown = sorted(set(raw) - {"model", "train"})
    if unknown:
        raise UsageError(f"{path}: unknown tables {', '.join(unknown)} (expected [model], [train])")
    return dict(raw.get("model", {})), dict(raw.get("train", {}))


def load_train_configs(args: argparse.Namespace) -> tuple[ModelConfig, object]:
    from model.train_config import TrainConfig

    model_table, train_table = read_config_tables(args.config, "config")
    preset_name = args.preset or model_table.pop("preset", "tiny")
    model_table.pop("preset", None)
    base = preset(preset_name)
    model_config = ModelConfig.from_dict({**base.to_dict(), **model_table})
    flags = {
        name: getattr(args, name)
        for name in (*TRAIN_FLAGS, "precision", "parallel", "compile", "activation_checkpointing")
    }
    overrides = {k: v for k, v in flags.items() if v is not None}
    train_config = TrainConfig.from_dict({**TrainConfig().to_dict(), **train_table, **overrides})
    return model_config, train_config


def check_init_from(args: argparse.Namespace) -> None:
    """`--init-from`: the model's shape and tokenizer are that model's; refuse --resume, shape
    settings (--preset, the --config's [model] table) and a --tokenizer that disagree with it."""
    from node.local_training import initial_tokenizer, load_initial_weights

    if args.resume:
        raise UsageError("--init-from and --resume are mutually exclusive: --init-from starts a "
                         "new run from a model, --resume continues this run's own checkpoint")  # fmt: skip
    init = load_initial_weights(args.init_from)
    model_table, _ = read_config_tables(args.config, "config")
    preset_name = args.preset or model_table.pop("preset", None)
    model_table.pop("preset", None)
    # vocab_size follows the tokenizer (checked below); a preset's max_seq_len is raised to
    # --seq-len anyway (RoPE holds no weights). Every other setting asked for must agree.
    asked = {k: (f"--preset {preset_name}", v) for k, v in
             (preset(preset_name).to_dict() if preset_name else {}).items()
             if k not in ("vocab_size", "max_seq_len")}  # fmt: skip
    asked.update({k: (f"[model] {k}", v) for k, v in model_table.items() if k != "vocab_size"})
    found = init.config.to_dict()  # load_train_configs has refused unknown keys already
    differ = [f"{k}={v!r} ({where})" for k, (where, v) in asked.items() if found[k] != v]
    if differ:
        have = ", ".join(f"{k}={found[k]!r}" for k, (_, v) in asked.items() if found[k] != v)
        raise UsageError(
            f"--init-from {init.description} is a model with {have}; asked for {', '.join(differ)}: "
            "leave the shape out, --init-from sets it"
        )
    initial_tokenizer(init, args.tokenizer)


def cmd_train(args: argparse.Namespace) -> int:
    from node.curation_config import load_curation_config
    from node.parallel import Launch

    launch = Launch(**launch_flags(args))
    model_config, train_config = load_train_configs(args)
    curation = load_curation_config(args.curation) if args.curation else None
    if args.init_from is not None:
        check_init_from(args)
        model_config = None  # the shape is the --init-from model's
    if launch.ranks > 1 and "LOCAL_RANK" not in os.environ:
        return relaunch_under_torchrun(args, launch, curation)
    from node.local_training import run_training
    from node.parallel import init_distributed, shutdown_distributed

    env = init_distributed()
    try:
        data = args.data
        if curation is not None:  # training then reads the curated shard folder as it is
            from node.local_training import curated_source

            data = curated_source(args.data, curation, train_tokenizer(args), env, print)
        run_training(
            data=data,
            model_config=model_config,
            train_config=train_config,
            out_dir=args.out,
            tokenizer_path=args.tokenizer,
            resume=args.resume,
            init_from=args.init_from,
            env=env,
        )
    finally:
        shutdown_distributed()
    return 0


def train_tokenizer(args: argparse.Namespace):
    """The tokenizer `fedpt train` packs its data with: --init-from's, else --tokenizer."""
    from node.local_training import initial_tokenizer, load_initial_weights, open_tokenizer

    if args.init_from is not None:
        return initial_tokenizer(load_initial_weights(args.init_from), args.tokenizer)[0]
    return open_tokenizer(args.tokenizer)


def relaunch_under_torchrun(args: argparse.Namespace, launch: Launch, curation=None) -> int:
    """Pack the data once on this host, then start its ranks of this same command."""
    from node.local_training import cache_dir
    from node.shards import prepare_data

    _, report = prepare_data(args.data, train_tokenizer(args), cache_dir(), curation=curation)
    if report is not None:
        print(f"data: {report.summary()}")
    return rerun_with_ranks(launch)


# ---- eval / generate --------------------------------------------------------------------------
def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity of a checkpoint on a corpus")
    p.add_argument(
        "--checkpoint", required=True, help="weights file, checkpoint folder or run folder"
    )
    p.add_argument("--data", required=True, help="corpus to score (as for train --data)")
    p.add_argument("--tokenizer", help="BPE tokenizer JSON (default: found beside the checkpoint)")
    p.add_argument(
        "--split",
        choices=("val", "train"),
        default="val",
        help="which split of the corpus (default val)",
    )
    p.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="tokens per window (default: the run's training seq_len)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="windows per batch (default 8)")
    p.add_argument(
        "--max-batches",
        type=int,
        default=1000,
        help="score at most this many batches (default 1000)",
    )
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from node.local_training import run_eval

    if (
        args.batch_size < 1
        or args.max_batches < 1
        or (args.seq_len is not None and args.seq_len < 1)
    ):
        raise UsageError("--batch-size, --max-batches and --seq-len must be positive")
    run_eval(
        args.checkpoint,
        args.data,
        tokenizer_path=args.tokenizer,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        max_batches=args.max_batches,
        split=args.split,
    )
    return 0


def add_energy_price_flags(p: argparse.ArgumentParser) -> None:
    """What a kWh costs and emits: turns measured energy into an estimated cost and CO2e."""
    p.add_argument("--price-per-kwh", type=float, default=None, metavar="PRICE",
                   help="electricity price per kWh, for the estimated cost (default: not shown)")  # fmt: skip
    p.add_argument("--currency", default="EUR", help="the price's currency (default EUR)")
    p.add_argument("--grid-gco2-per-kwh", type=float, default=None, metavar="GRAMS",
                   help="grid carbon intensity in g CO2e per kWh, for the estimated emissions")  # fmt: skip


def energy_prices(args: argparse.Namespace):
    from fedpt.energy_cost import EnergyPrices

    try:
        return EnergyPrices(args.price_per_kwh, args.currency, args.grid_gco2_per_kwh)
    except ValueError as e:
        raise UsageError(f"--{str(e).replace('_', '-')}") from e


def add_status_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="a federation at a glance: live from its aggregator, or "
                       "from its records")  # fmt: skip
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--aggregator", metavar="HOST:PORT",
                       help="ask the running aggregator (needs --kit, an operator kit)")  # fmt: skip
    where.add_argument("--state-dir", type=Path,
                       help="the aggregator's state folder (read only: safe beside a running one)")  # fmt: skip
    p.add_argument("--kit", type=Path, default=None,
                   help="with --aggregator: an operator kit (fedpt ca issue --operator)")  # fmt: skip
    p.add_argument("--database-url", default=None,
                   help="the aggregator's PostgreSQL URL, when its records are not in the state dir")  # fmt: skip
    p.add_argument("--watch", type=float, nargs="?", const=2.0, default=None, metavar="SECONDS",
                   help="refresh in place every SECONDS (default 2) until Ctrl-C")  # fmt: skip
    add_energy_price_flags(p)
    p.set_defaults(func=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    from fedpt.status import Source, show

    if args.watch is not None and not args.watch > 0:
        raise UsageError("--watch must be a positive number of seconds")
    prices = energy_prices(args)
    if args.aggregator is not None:
        if args.kit is None:
            raise UsageError(
                "--aggregator needs --kit: an operator kit (fedpt ca issue --operator)"
            )
        if args.database_url is not None:
            raise UsageError("--database-url goes with --state-dir, not --aggregator")
        source = Source(aggregator=args.aggregator, kit=args.kit)
    else:
        if not args.state_dir.is_dir():
            raise UsageError(f"--state-dir {args.state_dir} is not a folder")
        if args.kit is not None:
            raise UsageError("--kit goes with --aggregator, not --state-dir")
        source = Source(state_dir=args.state_dir, database_url=args.database_url)
    show(source, args.watch, prices)
    return 0


def add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a model in another format (Hugging Face transformers)")
    p.add_argument("--checkpoint", required=True, help="weights file, run folder, node work "
                   "dir or aggregator state dir (as for eval)")  # fmt: skip
    p.add_argument("--format", choices=("hf",), default="hf",
                   help="hf: a transformers Llama folder (default; needs the hf extra)")  # fmt: skip
    p.add_argument("--out", type=Path, required=True, help="the folder to write (new or empty)")
    p.add_argument("--tokenizer", help="BPE tokenizer JSON (default: found beside the checkpoint)")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from node.model_export import export_checkpoint

    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise UsageError(f"--out {args.out} exists and is not an empty folder")
    source = export_checkpoint(args.checkpoint, args.out, args.tokenizer)
    print(f"exported {source.description} to {args.out} (transformers LlamaForCausalLM)")
    return 0


def add_import_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import", help="a Hugging Face Llama model as a fedpt weights file")
    p.add_argument("--from", dest="source", type=Path, required=True,
                   help="a transformers folder (config.json, safetensors weights, tokenizer.json)")  # fmt: skip
    p.add_argument("--out", type=Path, required=True,
                   help="the folder to write: model.safetensors (and tokenizer.json for a BPE)")  # fmt: skip
    p.set_defaults(func=cmd_import)


def cmd_import(args: argparse.Namespace) -> int:
    from node.model_export import import_folder

    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise UsageError(f"--out {args.out} exists and is not an empty folder")
    weights = import_folder(args.source, args.out)
    print(f"imported {args.source} as {weights}: use it with --init-from or --checkpoint")
    return 0


def add_generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="sample text from a checkpoint")
    p.add_argument(
        "--checkpoint", required=True, help="weights file, checkpoint folder or run folder"
    )
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--tokenizer", help="BPE tokenizer JSON (default: found beside the checkpoint)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to sample (default 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default 0.8)")
    p.add_argument(
        "--top-k", type=int, default=50, help="sample among the k likeliest tokens (default 50)"
    )
    p.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        help="sample among the likeliest tokens holding this much probability, in (0, 1] "
        "(nucleus sampling; default 1.0: off)",
    )
    p.add_argument("--stop", help="stop once the new text contains this string; it is cut off")
    p.add_argument(
        "--no-kv-cache",
        action="store_true",
        help="re-run the whole context for every token instead of caching keys and values "
        "(slower; for comparison)",
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    from node.local_training import run_generate

    if args.max_new_tokens < 0 or args.top_k < 1 or args.temperature < 0:
        raise UsageError("--max-new-tokens must be ≥0, --top-k ≥1 and --temperature ≥0")
    if not 0 < args.top_p <= 1:  # also refuses nan
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.stop == "":
        raise UsageError("--stop must not be empty")
    text = run_generate(
        args.checkpoint,
        args.prompt,
        tokenizer_path=args.tokenizer,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        stop=args.stop,
        seed=args.seed,
        use_cache=not args.no_kv_cache,
    )
    print(text)
    return 0


# ---- tokenizer / data -------------------------------------------------------------------------
def add_tokenizer_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="train a BPE tokenizer")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True, parser_class=OneLineParser)
    t = tsub.add_parser("train", help="train a byte-level BPE on a corpus")
    t.add_argument("--data", required=True, help="folder(s) or file(s) of text, comma-separated")
    t.add_argument(
        "--vocab-size", type=int, default=8192, help="tokens in the vocabulary (default 8192)"
    )
    t.add_argument("--out", required=True, type=Path, help="tokenizer JSON to write")
    t.set_defaults(func=cmd_tokenizer_train)


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from model.tokenizer import train_bpe
    from node.corpus import DataError, IngestReport, iter_documents, resolve_files

    report = IngestReport()
    files = resolve_files(args.data, report)
    tok = train_bpe(iter_documents(files, report), args.vocab_size, args.out)
    if report.documents == 0:
        raise DataError(f"no documents found in {args.data}: {report.summary()}")
    print(f"data: {report.summary()}")
    print(f"tokenizer: {args.out} | vocab {tok.vocab_size} | sha256 {tok.sha256}")
    return 0


def add_data_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="prepare token shards; list the built-in organisations")
    dsub = p.add_subparsers(dest="data_command", required=True, parser_class=OneLineParser)
    prep = dsub.add_parser("prepare", help="pack a corpus into train/val token shards")
    prep.add_argument(
        "--data",
        required=True,
        help="folder(s) or file(s) of text, comma-separated, or builtin[:ORG,...]",
    )
    prep.add_argument("--out", required=True, type=Path, help="shard folder to create")
    prep.add_argument("--tokenizer", help="BPE tokenizer JSON (default: bytes)")
    prep.add_argument(
        "--val-fraction",
        type=float,
        default=0.05,
        help="share of documents held out for validation (default 0.05)",
    )
    prep.add_argument("--curation", type=Path, default=None, help=CURATION_HELP)
    prep.set_defaults(func=cmd_data_prepare)
    orgs = dsub.add_parser("orgs", help="list the organisations of the built-in corpus")
    orgs.set_defaults(func=cmd_data_orgs)


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from node.corpus import IngestReport, resolve_files
    from node.curation_config import load_curation_config
    from node.local_training import open_tokenizer
    from node.shards import CURATION_REPORT_NAME, pack_files

    if not 0 <= args.val_fraction < 1:
        raise UsageError("--val-fraction must be in [0, 1)")
    if (args.out / "train").exists():
        raise UsageError(f"{args.out} already holds shards; choose another --out")
    curation = load_curation_config(args.curation) if args.curation else None
    report = IngestReport()
    files = resolve_files(args.data, report)
    manifests, curated = pack_files(files, report, open_tokenizer(args.tokenizer), args.out,
                                    val_fraction=args.val_fraction, source=args.data,
                                    curation=curation)  # fmt: skip
    print(f"data: {report.summary()}")
    if curated is not None:
        print(curated.summary())
        print(f"curation report: {args.out / CURATION_REPORT_NAME} (stays here: the manifests "
              "hold only its counts)")  # fmt: skip
        print(f"curation sha256: {curated.sha256} (a federation requires it with [federation] "
              "require_curation)")  # fmt: skip
    for issue in report.errors:
        print(f"data: skipped {issue.path}: {issue.reason}")
    for split, manifest in manifests.items():
        print(f"{split}: {manifest['documents']} documents, {manifest['tokens']:,} tokens")
    return 0


def cmd_data_orgs(args: argparse.Namespace) -> int:
    from node.builtin_corpus import list_organisations, organisation_files

    for org in list_organisations():
        files = organisation_files(org)
        size = sum(f.stat().st_size for f in files)
        print(f"builtin:{org:<10} {len(files):>5} files {size / 1e6:>7.2f} MB")
    return 0


# ---- aggregator ------------------------------------------------------------------------------
# flag -> (config section, key, type, help)
# fmt: off
AGGREGATOR_FLAGS = {
    "host": ("server", "host", str, "address to listen on ([server] host)"),
    "port": ("server", "port", int, "TCP port; 0: any free ([server] port)"),
    "state_dir": ("store", "state_dir", str, "checkpoints, spools and the SQLite database"),
    "database_url": ("store", "database_url", str,
                     "SQLAlchemy URL, e.g. postgresql://... (default: SQLite in the state dir)"),
    "name": ("federation", "name", str, "the federation's name ([federation] name)"),
    "rounds": ("federation", "rounds", int, "rounds to run; 0: until stopped"),
    "inner_steps": ("federation", "inner_steps", int, "H: inner steps per node per round"),
    "min_nodes": ("round", "min_nodes", int, "quorum: uploads a round needs to commit"),
    "max_nodes": ("round", "max_nodes", int, "at most this many nodes per round"),
    "round_timeout": ("round", "timeout_seconds", float,
                      "seconds a round waits for uploads ([round] timeout_seconds)"),
    "outer": ("outer", "name", str, "outer optimizer: fedavg, nesterov or adam"),
    "outer_lr": ("outer", "lr", float, "outer learning rate ([outer] lr)"),
    "kit": ("server", "kit", str, "the aggregator's startup kit folder: mutual TLS"),
    "metrics_port": ("server", "metrics_port", int,
                     "serve Prometheus metrics on this port at [server] host; 0: off "
                     "([server] metrics_port)"),
    "init_from": ("federation", "init_from", str,
                  "start a new federation from this model (fedpt weights or run, global "
                  "checkpoint, or transformers Llama folder) instead of a random one"),
    "require_curation": ("federation", "require_curation", str,
                         "refuse nodes whose shards were not curated with the configuration of "
                         "this sha256 ([federation] require_curation)"),
}
# fmt: on


def add_aggregator_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("aggregator", help="run the federation's aggregator service")
    asub = p.add_subparsers(dest="aggregator_command", required=True, parser_class=OneLineParser)
    serve = asub.add_parser("serve", help="serve a federation over gRPC until it finishes")
    serve.add_argument(
        "--config", type=Path, help="aggregator.toml (see README); flags override it"
    )
    serve.add_argument("--preset", help="model preset (overrides [model] preset)")
    serve.add_argument(
        "--insecure", action="store_true", help="plain text, no client certificates (tests only)"
    )
    for flag, (_, _, kind, text) in AGGREGATOR_FLAGS.items():
        serve.add_argument(f"--{flag.replace('_', '-')}", type=kind, default=None, help=text)
    serve.set_defaults(func=cmd_aggregator_serve)


def aggregator_config_from_args(args: argparse.Namespace):
    from aggregator.config import load_config

    overrides: dict[str, dict] = {}
    for flag, (section, key, _, _) in AGGREGATOR_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            overrides.setdefault(section, {})[key] = value
    if args.preset:
        overrides.setdefault("model", {})["preset"] = args.preset
    if args.insecure:
        overrides.setdefault("server", {})["insecure"] = True
    return load_config(args.config, overrides)


def cmd_aggregator_serve(args: argparse.Namespace) -> int:
    from aggregator.server import serve_forever

    serve_forever(aggregator_config_from_args(args))
    return 0


# ---- node -------------------------------------------------------------------------------------
NODE_FLAGS: dict[str, tuple[type, str]] = {
    "aggregator": (str, "HOST:PORT of the aggregator (default 127.0.0.1:7450)"),
    "data": (str, "this organisation's private corpus: folder(s) or file(s) of text, comma-"
                  "separated, a prepared shard folder, or builtin[:ORG]"),
    "organisation": (str, "name in the logs; with --kit it must be the kit's organisation "
                          "(default: the kit's, else the data's name)"),
    "tokenizer": (str, "the federation's BPE JSON when it uses one (checked by sha256)"),
    "curation": (str, "TOML with a [curation] table: the node curates its corpus with it "
                      "before packing (only the curation's sha256 and counts leave the node)"),
    "work_dir": (str, "round log, inner state, final and personalised models (default fedpt-node)"),
    "kit": (str, "this organisation's startup kit folder (`fedpt ca issue`): mutual TLS"),
    "poll_seconds": (float, "how long one task request may wait at the aggregator (default 10)"),
    "reconnect_timeout_seconds": (float, "give up after the aggregator is away this long (default 300)"),
    "personalise_steps": (int, "when the federation ends, adapt the final model on this node's "
                               "data for this many steps; 0: none (default 0)"),
    "personalise_lr": (float, "peak lr of personalisation (default: where the inner schedule ended)"),
    "lora_rank": (int, "rank of the LoRA adapters with --personalise-mode lora (default 8)"),
    "metrics_port": (int, "serve Prometheus metrics of rank 0 on this port; 0: off (default 0)"),
    "metrics_host": (str, "address the metrics port binds (default 127.0.0.1: this host only)"),
}  # fmt: skip


def add_node_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("node", help="take part in a federation as one organisation's node")
    nsub = p.add_subparsers(dest="node_command", required=True, parser_class=OneLineParser)
    join = nsub.add_parser(
        "join", help="join an aggregator and train rounds until the federation ends"
    )
    for flag, (kind, text) in NODE_FLAGS.items():
        join.add_argument(f"--{flag.replace('_', '-')}", type=kind, default=None, help=text)
    join.add_argument(
        "--config", type=Path, help="node.toml with a [node] table; flags override it"
    )
    add_launch_flags(join)  # more than one rank: relaunches itself under torchrun
    join.add_argument("--reset-inner-momentum", action="store_true", default=None,
                      help="zero AdamW's first moment at every round, keep its second")  # fmt: skip
    join.add_argument("--reset-inner-optimizer", action="store_true", default=None,
                      help="forget AdamW moments at every round (default: keep them)")  # fmt: skip
    join.add_argument(
        "--save-deltas", action="store_true", default=None, help="keep every pushed delta"
    )
    join.add_argument("--no-round-state", dest="save_round_state", action="store_false",
                      default=None, help="do not keep the inner state after each round on disk "
                      "(a restarted node then starts its optimizer afresh)")  # fmt: skip
    join.add_argument("--insecure", action="store_true", default=None,
                      help="plain text, no certificates (trusted networks and tests only)")  # fmt: skip
    join.add_argument("--personalise-mode", choices=("full", "lora"), default=None,
                      help="how --personalise-steps adapt the final model (default: full)")  # fmt: skip
    join.add_argument("--once", action="store_true",
                      help="take part in one round (or, once the federation has finished, pull "
                      "the final model) and exit: for a scheduler that starts the node per round, "
                      "e.g. fedpt's Flower ClientApp; the inner state stays in --work-dir")  # fmt: skip
    join.add_argument("--expect-round", type=int, default=None, metavar="ROUND",
                      help="with --once: the round this process is started for (another is "
                      "left alone)")  # fmt: skip
    join.add_argument("--expect-model", default=None, metavar="VERSION:SHA256",
                      help="with --once: the model version to train from (or pull, after the "
                      "last round) and its payload's sha256, as the scheduler announced them; "
                      "the node refuses any other. The scheduler's admission token, if any, "
                      "comes in $FEDPT_ADMISSION_TOKEN")  # fmt: skip
    join.add_argument("--secagg-by-scheduler", action="store_true",
                      help="with --expect-round: secure aggregation's key, share and unmask "
                      "stages are answered through the scheduler's messages (fedpt's Flower "
                      "ClientApp), from the secrets they keep in --work-dir; this process only "
                      "trains and pushes the masked update")  # fmt: skip
    join.add_argument("--no-score-global", dest="score_global", action="store_false",
                      default=None, help="do not score each global model on the validation "
                      "split (nor report it to the aggregator)")  # fmt: skip
    join.set_defaults(func=cmd_node_join)

    own = nsub.add_parser("personalise", help="adapt a global model on this node's private data "
                          "(on demand; `join --personalise-steps` does it when a federation ends)")  # fmt: skip
    own.add_argument("--work-dir", type=Path, required=True,
                     help="the node's work dir: its inner settings and, by default, the final model")  # fmt: skip
    own.add_argument("--data", required=True, help="the node's private corpus (as for join)")
    own.add_argument("--tokenizer", default=None, help="the federation's BPE JSON, if it uses one")
    own.add_argument("--model", type=Path, default=None,
                     help="weights to adapt (default: WORK_DIR/final/global.safetensors)")  # fmt: skip
    own.add_argument("--steps", type=int, default=40, help="adaptation steps (default 40)")
    own.add_argument(
        "--mode",
        choices=("full", "lora"),
        default="full",
        help="all weights, or low-rank adapters merged at the end (default full)",
    )
    own.add_argument(
        "--lr",
        type=float,
        default=None,
        help="peak lr (default: where the inner schedule ended; LoRA 3x)",
    )
    own.add_argument(
        "--lora-rank", type=int, default=8, help="rank of the LoRA adapters (default 8)"
    )
    own.add_argument("--out", type=Path, default=None,
                     help="default: WORK_DIR/final/personalised.safetensors")  # fmt: skip
    own.set_defaults(func=cmd_node_personalise)


# ---- certificate authority --------------------------------------------------------------------
def add_ca_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ca", help="the federation's certificate authority and startup kits")
    csub = p.add_subparsers(dest="ca_command", required=True, parser_class=OneLineParser)
    init = csub.add_parser("init", help="create a federation CA (keep ca.key offline)")
    init.add_argument("--out", required=True, type=Path, help="folder for ca.crt and ca.key")
    init.add_argument("--name", default="fedpt federation CA", help="the CA certificate's name")
    init.add_argument("--days", type=int, default=3650, help="validity in days (default 3650)")
    init.set_defaults(func=cmd_ca_init)
    issue = csub.add_parser("issue", help="a startup kit for one organisation, the aggregator "
                            "or an operator")  # fmt: skip
    issue.add_argument(
        "--ca", type=Path, default=Path("ca"), help="the CA folder from `fedpt ca init`"
    )
    issue.add_argument(
        "--org", required=True, help="organisation name (the certificate's identity)"
    )
    issue.add_argument("--out", type=Path, help="kit folder (default: kits/ORG)")
    issue.add_argument("--server-host", action="append", default=[],
                       help="for the aggregator's kit: a DNS name or IP it is reached at (repeatable)")  # fmt: skip
    issue.add_argument("--operator", action="store_true",
                       help="an operator's kit: may read the federation's status (fedpt status "
                       "--aggregator), cannot join as a node")  # fmt: skip
    issue.add_argument(
        "--days", type=int, default=825, help="certificate validity in days (default 825)"
    )
    issue.set_defaults(func=cmd_ca_issue)


def cmd_ca_init(args: argparse.Namespace) -> int:
    from protos import pki

    out = pki.init_ca(args.out, args.name, args.days)
    print(
        f"CA created in {out}: give {out / pki.CA_CERT} to everyone, keep {out / pki.CA_KEY} offline"
    )
    return 0


def cmd_ca_issue(args: argparse.Namespace) -> int:
    from protos import pki

    pki.check_organisation(args.org)
    out = pki.issue_kit(args.ca, args.org, args.out or Path("kits") / args.org, server_hosts=args.server_host,
                        days=args.days, operator=args.operator)  # fmt: skip
    kind = "server" if args.server_host else "operator" if args.operator else "node"
    print(f"{kind} startup kit for {args.org!r} in {out}: send it to that organisation only")
    return 0


def cmd_node_join(args: argparse.Namespace) -> int:
    from node.participant import load_node_config
    from node.round_order import RoundOrder, RoundOrderError

    flags = (*NODE_FLAGS, "reset_inner_optimizer", "reset_inner_momentum", "save_deltas", "save_round_state", "insecure",
             "personalise_mode", "score_global")  # fmt: skip
    overrides = {k: getattr(args, k) for k in flags if getattr(args, k) is not None}
    cfg = load_node_config(args.config, {**overrides, **launch_flags(args)})
    try:
        order = RoundOrder.from_flags(args.expect_round, args.expect_model,
                                      args.secagg_by_scheduler)  # fmt: skip
    except RoundOrderError as e:
        raise UsageError(str(e)) from e
    if order is not None and not args.once:
        raise UsageError("--expect-round and --expect-model go with --once")
    if cfg.launch.ranks > 1 and "LOCAL_RANK" not in os.environ:
        return relaunch_node_under_torchrun(cfg)
    import grpc

    from node.parallel import check_same_everywhere, init_distributed, shutdown_distributed
    from node.participant import Participant

    # Ranks wait in collectives while rank 0 long-polls for rounds: allow a day.
    env = init_distributed(timeout_minutes=24 * 60)
    try:
        # What decides which collectives the ranks run, on every host alike.
        same = {"reset_inner_optimizer": cfg.reset_inner_optimizer,
                "reset_inner_momentum": cfg.reset_inner_momentum,
                "save_round_state": cfg.save_round_state}  # fmt: skip
        check_same_everywhere("the node settings", same, env)
        Participant(cfg, env, order=order).run(once=args.once)
    except grpc.RpcError as e:  # a refusal no retry can change (transient ones were retried)
        raise UsageError(
            f"the aggregator at {cfg.aggregator} refused this node: {e.code().name}: {e.details()}"
        ) from e
    finally:
        shutdown_distributed()
    return 0


def cmd_node_personalise(args: argparse.Namespace) -> int:
    from model.io import load_model, save_model, write_json_atomic
    from model.tokenizer import load_tokenizer
    from model.train_config import TrainConfig
    from node.checkpoint import latest_checkpoint, read_state
    from node.local_training import load_splits
    from node.parallel import DistEnv
    from node.personalise import PersonaliseConfig, PersonaliseError, loss_text, personalise

    try:
        pcfg = PersonaliseConfig(args.steps, args.mode, args.lr, args.lora_rank)
    except PersonaliseError as e:
        raise UsageError(str(e)) from e
    if pcfg.steps < 1:
        raise UsageError("--steps must be at least 1")
    found = latest_checkpoint(args.work_dir / "checkpoints")
    if found is None:
        raise UsageError(f"{args.work_dir} holds no round state: is it a node's --work-dir?")
    state = read_state(found)
    inner = TrainConfig.from_dict(state["train_config"])
    model_path = args.model or args.work_dir / "final" / "global.safetensors"
    model, tokenizer_spec = load_model(model_path)  # CheckpointError: one line
    if model.config.to_dict() != state["model_config"] or tokenizer_spec != state["tokenizer"]:
        raise UsageError(
            f"{model_path} is not this federation's model (config or tokenizer differ)"
        )
    tokenizer = load_tokenizer(tokenizer_spec, args.tokenizer)
    train, val = load_splits(args.data, tokenizer, DistEnv(), print)
    result = personalise(
        model, train, val, inner, pcfg, start_step=state["step"], inner_state=found
    )
    out = args.out or args.work_dir / "final" / "personalised.safetensors"
    save_model(result.model, out, tokenizer_spec=tokenizer_spec)
    write_json_atomic(out.with_suffix(".json"), {"model": str(model_path), **result.report()})
    print(f"{model_path}: val loss {loss_text(result.global_val_loss)}; personalised ({pcfg.mode}, "
          f"{pcfg.steps} steps, lr {result.lr:g}, {result.trainable_params:,} trainable weights, "
          f"{result.seconds:.1f}s): val loss {loss_text(result.val_loss)}; written to {out}")  # fmt: skip
    return 0


def relaunch_node_under_torchrun(cfg: NodeConfig) -> int:
    from node.local_training import cache_dir, open_tokenizer
    from node.shards import prepare_data

    prepare_data(cfg.data, open_tokenizer(cfg.tokenizer or None), cache_dir(),
                 curation=cfg.curation_config)  # once, not per rank  # fmt: skip
    return rerun_with_ranks(cfg.launch)


# ---- simulate ---------------------------------------------------------------------------------
# The inner-loop settings a user of `fedpt simulate` tunes (the rest: --train-config).
SIMULATE_TRAIN_FLAGS = ("micro_batch_size", "grad_accum", "seq_len", "lr", "warmup_steps",
                        "weight_decay", "grad_clip")  # fmt: skip


def add_simulate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "simulate", help="a whole federation on this machine: 1 aggregator + N node processes"
    )
    p.add_argument(
        "--nodes", type=int, default=4, help="node processes, one organisation each (default 4)"
    )
    p.add_argument("--rounds", type=int, default=24, help="R: federation rounds (default 24)")
    p.add_argument(
        "--preset", default="tiny", help="model preset: tiny, small, 125m, ... (default tiny)"
    )
    p.add_argument(
        "--data", help="comma-separated sources, one per node (default: built-in organisations)"
    )
    p.add_argument(
        "--inner-steps", type=int, default=10, help="H: inner steps per round (default 10)"
    )
    p.add_argument(
        "--outer",
        choices=("fedavg", "nesterov", "adam"),
        default="fedavg",
        help="outer optimizer the aggregator applies to the mean update (default fedavg)",
    )
    p.add_argument(
        "--outer-lr",
        type=float,
        default=None,
        help="outer learning rate (default: fedavg 1, nesterov 0.7, adam 1e-3)",
    )
    p.add_argument(
        "--train-config",
        type=Path,
        default=None,
        help="TOML with a [train] table of the nodes' inner-loop settings (as for "
        "`fedpt train --config`); the flags below override it",
    )
    for name in SIMULATE_TRAIN_FLAGS:
        kind, text = TRAIN_FLAGS[name]
        p.add_argument(
            f"--{name.replace('_', '-')}",
            type=kind,
            default=None,
            help=f"nodes' inner loop: {text}",
        )
    p.add_argument("--outer-momentum", type=float, default=None,
                   help="nesterov's momentum μ (default 0.9)")  # fmt: skip
    p.add_argument("--reset-inner-momentum", action="store_true",
                   help="nodes zero AdamW's first moment every round and keep its second")  # fmt: skip
    p.add_argument("--reset-inner-optimizer", action="store_true",
                   help="nodes start every round with fresh inner AdamW moments (default: kept)")  # fmt: skip
    p.add_argument("--proximal-mu", type=float, default=0.0,
                   help="FedProx: each inner step is pulled towards the round's global model "
                        "with strength μ (default 0: off)")  # fmt: skip
    p.add_argument("--min-nodes", type=int, default=None, help="quorum (default: all nodes)")
    p.add_argument(
        "--round-timeout",
        type=float,
        default=600.0,
        help="seconds a round waits for uploads before it closes (default 600)",
    )
    p.add_argument(
        "--nproc-per-node",
        type=int,
        default=1,
        help="ranks (processes) per node, data-parallel inside the node (default 1)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="the initial global model and every node's data order (default 0)",
    )
    p.add_argument("--delta-encoding", choices=("auto", *ENCODINGS), default="auto",
                   help="how updates travel: auto = secure aggregation (masked-int16); plain fp32, "
                        "bf16, int8; secure masked-int32, masked-int16, masked-int8")  # fmt: skip
    p.add_argument("--download-encoding", choices=PLAIN_ENCODINGS, default="int8",
                   help="fp32: nodes pull the whole model; bf16/int8: the compressed outer update")  # fmt: skip
    p.add_argument("--personalise-steps", type=int, default=None,
                   help="each node adapts the final model on its own data for this many steps "
                        "(default: H; 0: none)")  # fmt: skip
    p.add_argument(
        "--personalise-mode",
        choices=("full", "lora"),
        default="full",
        help="all weights, or low-rank adapters merged at the end (default full)",
    )
    p.add_argument("--no-alone", dest="compare_alone", action="store_false",
                   help="skip training each organisation alone for the closing comparison")  # fmt: skip
    p.add_argument("--out", type=Path, help="run folder (default: runs/sim-TIMESTAMP)")
    p.add_argument("--engine", choices=("native", "flower"), default="native",
                   help="native: an aggregator and a node process per organisation; flower: "
                        "fedpt's ServerApp and ClientApps on Flower's simulation engine (Ray; "
                        "the flower extra) (default native)")  # fmt: skip
    p.add_argument("--ray-address", default="",
                   help="with --engine flower: an existing Ray cluster to run on (e.g. auto)")  # fmt: skip
    p.add_argument("--curation", type=Path, default=None,
                   help=CURATION_HELP + "; every node curates its corpus with it and the "
                        "aggregator requires its sha256 at Join")  # fmt: skip
    p.set_defaults(func=cmd_simulate)


def simulate_train_settings(args: argparse.Namespace) -> dict:
    """The nodes' inner-loop settings: --train-config's [train] table, then the flags (its
    [model] table, if any, is not simulate's: --preset picks the model)."""
    _, table = read_config_tables(args.train_config, "--train-config")
    flags = {n: getattr(args, n) for n in SIMULATE_TRAIN_FLAGS if getattr(args, n) is not None}
    return {**table, **flags}


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedpt.simulate import SimulationOptions, simulate

    options = SimulationOptions(train=simulate_train_settings(args),
        nodes=args.nodes, rounds=args.rounds, preset=args.preset,
        data=[d for d in (args.data or "").split(",") if d], inner_steps=args.inner_steps,
        outer=args.outer, outer_lr=args.outer_lr, outer_momentum=args.outer_momentum,
        reset_inner_optimizer=args.reset_inner_optimizer,
        reset_inner_momentum=args.reset_inner_momentum, proximal_mu=args.proximal_mu, min_nodes=args.min_nodes, round_timeout=args.round_timeout,
        nproc_per_node=args.nproc_per_node, seed=args.seed, delta_encoding=args.delta_encoding,
        download_encoding=args.download_encoding, personalise_steps=args.personalise_steps,
        personalise_mode=args.personalise_mode, compare_alone=args.compare_alone, out=args.out,
        engine=args.engine, ray_address=args.ray_address, curation=args.curation,
    )  # fmt: skip
    return 0 if simulate(options) else 1


def add_report_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="charts and a self-contained report.html of a run "
                       "(needs the report extra)")  # fmt: skip
    p.add_argument("--run", "--state-dir", dest="run", type=Path, required=True,
                   help="a fedpt simulate run folder, a fedpt train run folder or an aggregator "
                   "--state-dir (read, never changed)")  # fmt: skip
    p.add_argument("--out", type=Path, help="the HTML file to write, its PNGs beside it "
                   "(default: RUN/report/report.html)")  # fmt: skip
    add_energy_price_flags(p)
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from fedpt.report import ReportError, ReportUnavailable, write_report

    if args.out is not None and args.out.is_dir():
        raise UsageError(f"--out {args.out} is a folder: name the HTML file to write")
    prices = energy_prices(args)
    try:
        path = write_report(args.run, args.out, prices)
    except (ReportError, ReportUnavailable) as e:
        raise UsageError(str(e)) from e
    print(path)
    return 0


# ---- entry point ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="fedpt", description="Federated generative pretraining.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for add in (
        add_train_parser,
        add_eval_parser,
        add_generate_parser,
        add_export_parser,
        add_import_parser,
        add_status_parser,
        add_tokenizer_parser,
        add_data_parser,
        add_aggregator_parser,
        add_node_parser,
        add_simulate_parser,
        add_ca_parser,
        add_report_parser,
    ):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        crash_points.check()
        return args.func(args)
    except UsageError as e:
        print(f"fedpt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedpt: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if isinstance(e, _user_errors()):
            print(f"fedpt: error: {e}", file=sys.stderr)
            return 2
        raise
