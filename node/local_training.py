"""Local (centralized) training, evaluation and generation: what `fedpt train`, `eval` and
`generate` run. Composes tokenizer, data, model and trainer; holds no math of its own.

A run folder (`--out`) holds:
  run.json            model + train config, tokenizer spec, data source and ingest summary
  metrics.jsonl       one JSON line per logged step / evaluation
  checkpoints/        resumable checkpoints (step_XXXXXXXX/) and `latest`
  model.safetensors   the final weights (self-describing: config + tokenizer in the header)
  tokenizer.json      a copy of the BPE tokenizer, when one is used

A run can start from an existing model instead of random weights (`--init-from`, continual
pretraining): its weights, shape and tokenizer come from that model (load_initial_weights),
the optimizer starts fresh and the learning-rate schedule starts at step 0 (a re-warm).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from model.config import ModelConfig
from model.gpt import GPT
from model.io import (
    CheckpointError,
    load_weights_into,
    save_tensors_atomic,
    weights_metadata,
)
from model.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, TokenizerError, load_tokenizer
from model.train_config import TrainConfig
from node.checkpoint import full_model_state, latest_checkpoint
from node.corpus import DataError
from node.curation_config import CurationConfig
from node.evaluation import bits_per_byte, mean_loss, scored_windows
from node.model_source import ModelSource, locate
from node.parallel import DistEnv, barrier, check_same_everywhere, decided_by_main
from node.shards import (
    CURATION_REPORT_NAME,
    TokenShards,
    load_curation_report,
    prepare_data,
    read_manifest,
)
from node.trainer import Trainer, TrainingError

WEIGHTS_NAME = "model.safetensors"
TOKENIZER_NAME = "tokenizer.json"


def cache_dir() -> Path:
    """Where prepared shards are cached: $FEDPT_CACHE_DIR or ~/.cache/fedpt/shards."""
    return Path(os.environ.get("FEDPT_CACHE_DIR", Path.home() / ".cache" / "fedpt" / "shards"))


def open_tokenizer(path: str | Path | None) -> Tokenizer:
    """The BPE tokenizer stored at `path`, or the byte-level default."""
    return BPETokenizer.from_file(path) if path else ByteTokenizer()


def load_splits(
    source: str, tokenizer: Tokenizer, env: DistEnv, log: Callable[[str], None]
) -> tuple[TokenShards, TokenShards]:
    """Train and validation shards for `source`. Each host has its own cache: its first rank
    packs them, the host's other ranks wait and then find them there. Every host must have
    packed the same tokens, which is checked (the log is rank 0's)."""
    if env.is_host_main:
        root, report = prepare_data(source, tokenizer, cache_dir())
        if report is not None:
            log(f"data: {report.summary()}")
            for issue in report.errors[:10]:
                log(f"data: skipped {issue.path}: {issue.reason}")
    barrier(env)
    if not env.is_host_main:
        root, _ = prepare_data(source, tokenizer, cache_dir())
    # The shards' hashes, not their source path: the hosts' copies of a corpus may live anywhere.
    content = {s: {k: v for k, v in read_manifest(root / s).items() if k != "source"}
               for s in ("train", "val")}  # fmt: skip
    check_same_everywhere(f"the data ({source})", content, env)
    train, val = TokenShards(root / "train"), TokenShards(root / "val")
    log(f"data: {train.num_tokens:,} train tokens, {val.num_tokens:,} validation tokens ({root})")
    return train, val


def curated_source(
    source: str,
    curation: CurationConfig | None,
    tokenizer: Tokenizer,
    env: DistEnv,
    log: Callable[[str], None],
) -> str:
    """`source` as load_splits should read it: with `curation`, the folder of its curated
    shards, packed by each host's first rank while the host's other ranks wait (as load_splits
    packs), which load_splits then takes as it is."""
    if curation is None:
        return source
    if env.is_host_main:
        root, report = prepare_data(source, tokenizer, cache_dir(), curation=curation)
        if report is not None:
            log(f"data: {report.summary()}")
        curated = load_curation_report(root)
        if curated is not None:
            log(curated.summary())
            log(f"curation report: {root / CURATION_REPORT_NAME} (stays on this node)")
    barrier(env)
    if not env.is_host_main:
        root, _ = prepare_data(source, tokenizer, cache_dir(), curation=curation)
    return str(root)


def load_initial_weights(path: str | Path) -> ModelSource:
    """The model `fedpt train --init-from PATH` starts from: anything `--checkpoint` names
    (node/model_source.py: a fedpt weights file or run, a node's work dir, an aggregator's
    global checkpoint, a transformers Llama folder). Its weights are read only when asked for
    (a check needs only the header)."""
    found = locate(path)
    found.tokenizer_spec = found.tokenizer_spec or ByteTokenizer().spec()  # as eval reads it
    return found


def initial_tokenizer(
    init: ModelSource, tokenizer_path: str | None
) -> tuple[Tokenizer, str | None]:
    """The tokenizer `init` was trained with, and its JSON file for a BPE (`tokenizer_path`, else
    the one beside the weights or in their run folder); any other tokenizer is refused."""
    spec = init.tokenizer_spec
    if spec.get("kind") == "byte":
        if tokenizer_path:
            raise TokenizerError(
                f"--init-from {init.description} was trained with the byte tokenizer, not "
                f"{tokenizer_path}: leave out --tokenizer"
            )
        return ByteTokenizer(), None
    if tokenizer_path is None and spec.get("kind") == "bpe":
        candidates = [d / TOKENIZER_NAME for d in init.tokenizer_dirs]
        tokenizer_path = next((str(c) for c in candidates if c.is_file()), None)
        if tokenizer_path is None:
            raise TokenizerError(
                f"--init-from {init.description} was trained with a BPE tokenizer (sha256 "
                f"{spec.get('sha256', '?')[:12]}…): pass --tokenizer with its JSON file"
            )
    try:
        tokenizer = load_tokenizer(spec, tokenizer_path)  # refuses a different sha256
    except TokenizerError as e:
        raise TokenizerError(f"--init-from {init.description} needs its own tokenizer: {e}") from e
    if tokenizer.vocab_size > init.config.vocab_size:
        raise TokenizerError(
            f"the tokenizer's vocabulary is larger than {init.description}'s model"
        )
    return tokenizer, tokenizer_path


def run_training(
    *,
    data: str,
    model_config: ModelConfig | None,
    train_config: TrainConfig,
    out_dir: Path,
    tokenizer_path: str | None = None,
    resume: bool = False,
    init_from: str | Path | None = None,
    env: DistEnv | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Train from scratch (or resume, or from the model at `init_from`: then `model_config`
    must be None, as the model's shape is that model's) and leave a run folder; returns the
    summary."""
    env = env or DistEnv()
    log = log if env.is_main else (lambda _msg: None)
    if init_from is not None and (resume or model_config is not None):
        raise TrainingError("--init-from starts a new run: not with --resume or a model config")
    if init_from is None and model_config is None:
        raise TrainingError("a new run needs a model config or a model to start from")
    # Rank 0's --out holds the run (the other hosts' may be empty): it alone decides.
    has_run = decided_by_main(
        lambda: (out_dir / "checkpoints").is_dir() or (out_dir / WEIGHTS_NAME).exists(), env
    )
    if has_run and not resume:
        raise TrainingError(f"{out_dir} already holds a run; pass --resume or choose another --out")
    init = load_initial_weights(init_from) if init_from is not None else None
    if init is not None:
        tokenizer, tokenizer_path = initial_tokenizer(init, tokenizer_path)
        model_config = init.config
    else:
        tokenizer = open_tokenizer(tokenizer_path)
        model_config = model_config.with_vocab(tokenizer.vocab_size)
    # RoPE holds no weights: a longer seq_len only needs longer tables.
    if train_config.seq_len > model_config.max_seq_len:
        model_config = dataclasses.replace(model_config, max_seq_len=train_config.seq_len)
    settings = {"model": model_config.to_dict(), "train": train_config.to_dict(),
                "tokenizer": tokenizer.spec(), "resume": resume}  # fmt: skip
    check_same_everywhere("the model, training and tokenizer settings", settings, env)
    train_data, val_data = load_splits(data, tokenizer, env, log)
    trainer = Trainer(
        model_config,
        train_config,
        train_data,
        env=env,
        val_data=val_data,
        tokenizer_spec=tokenizer.spec(),
        out_dir=out_dir,
        log=log,
    )
    try:
        if env.is_main:
            _write_run_info(
                out_dir, data, model_config, train_config, tokenizer, tokenizer_path, env,
                init_from=(init.weights or init.hf_folder) if init is not None else None,
            )  # fmt: skip
        barrier(env)
        if init is not None:  # every rank reads the file: it must be on every host
            trainer.load_weights(init.state(), f"--init-from {init.description}")
            log(f"initial weights from {init.description}; fresh optimizer, schedule from step 0")
        if resume and (found := trainer.latest_checkpoint()) is not None:
            trainer.load_checkpoint(found)
        elif resume:
            log(f"no checkpoint in {out_dir}; starting from step 0")
        log(
            f"model: {model_config.num_params() / 1e6:.2f}M parameters | "
            f"{train_config.tokens_per_step(env.world_size):,} tokens per step | "
            f"{env.world_size} rank(s) on {env.device.type}"
        )
        trainer.train(train_config.steps - trainer.step)
        val_loss = trainer.evaluate_and_log()
        trainer.save_checkpoint()
        weights = full_model_state(trainer.module, model_config.tie_embeddings)
        summary = {
            "steps": trainer.step,
            "tokens_seen": trainer.tokens_seen,
            "val_loss": val_loss,
            "val_perplexity": math.exp(val_loss) if val_loss is not None else None,
            # None when this call trained no step (--resume of a finished run)
            "tokens_per_second": trainer.last_log.tokens_per_second
            if trainer.last_log is not None
            else None,
        }
        if env.is_main:
            metadata = weights_metadata(model_config, tokenizer.spec(), train_config.seq_len)
            save_tensors_atomic(weights, out_dir / WEIGHTS_NAME, metadata)
            (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            log(f"done: weights in {out_dir / WEIGHTS_NAME}")
            from fedpt.report import report_at_end  # charts; never fails the run

            report_at_end(out_dir, log)
        return summary
    finally:
        trainer.close()


def _write_run_info(
    out_dir: Path,
    data: str,
    model_config: ModelConfig,
    train_config: TrainConfig,
    tokenizer: Tokenizer,
    tokenizer_path: str | None,
    env: DistEnv,
    init_from: Path | None = None,
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer_path:
        shutil.copyfile(tokenizer_path, out_dir / TOKENIZER_NAME)
    info = {
        "data": data,
        "model_config": model_config.to_dict(),
        "train_config": train_config.to_dict(),
        "tokenizer": tokenizer.spec(),
        "world_size": env.world_size,
    }
    if init_from is not None:
        info["init_from"] = str(init_from.resolve())
    (out_dir / "run.json").write_text(json.dumps(info, indent=2, sort_keys=True))


def resolve_weights(checkpoint: str | Path) -> Path:
    """A weights file from a path to the file itself, a checkpoint folder or a run folder."""
    path = Path(checkpoint)
    if path.is_file():
        return path
    if (path / WEIGHTS_NAME).is_file():
        return path / WEIGHTS_NAME
    if (found := latest_checkpoint(path / "checkpoints")) is not None:
        return found / WEIGHTS_NAME
    raise CheckpointError(
        f"no weights found at {path} (expected a .safetensors file or a run folder)"
    )


def load_for_inference(
    checkpoint: str | Path, tokenizer_path: str | None, device: torch.device
) -> tuple[torch.nn.Module, Tokenizer]:
    """The model and its tokenizer (open_model without the description)."""
    model, tokenizer, _ = open_model(checkpoint, tokenizer_path, device)
    return model, tokenizer


def open_model(
    checkpoint: str | Path, tokenizer_path: str | None, device: torch.device
) -> tuple[GPT, Tokenizer, ModelSource]:
    """The model `checkpoint` names (node/model_source.py), its tokenizer and where it came
    from. A BPE tokenizer is looked up beside the weights and in the run folder unless given,
    and always checked against the hash the weights recorded."""
    source = locate(checkpoint)
    spec = source.tokenizer_spec
    if spec.get("kind") == "bpe" and tokenizer_path is None:
        candidates = [d / TOKENIZER_NAME for d in source.tokenizer_dirs]
        tokenizer_path = next((str(c) for c in candidates if c.is_file()), None)
        if tokenizer_path is None:
            raise CheckpointError(
                f"{source.description} needs its BPE tokenizer: pass --tokenizer PATH"
            )
    tokenizer = load_tokenizer(spec or ByteTokenizer().spec(), tokenizer_path)
    if tokenizer.vocab_size > source.config.vocab_size:
        raise CheckpointError("the tokenizer's vocabulary is larger than the model's")
    model = GPT(source.config)
    load_weights_into(model, source.state(), source=source.description)
    return model.to(device).eval(), tokenizer, source


def run_eval(
    checkpoint: str | Path,
    data: str,
    *,
    tokenizer_path: str | None = None,
    seq_len: int | None = None,
    batch_size: int = 8,
    max_batches: int = 1000,
    split: str = "val",
    log: Callable[[str], None] = print,
) -> dict:
    """Perplexity of a checkpoint on a corpus (its validation split by default)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, source = open_model(checkpoint, tokenizer_path, device)
    log(f"scoring {source.description}")
    if seq_len is None and source.seq_len:
        seq_len = min(source.seq_len, model.config.max_seq_len)
        log(f"windows of {seq_len} tokens, the length it was trained with")
    elif seq_len is None:
        seq_len = min(model.config.max_seq_len, 256)
        log(f"windows of {seq_len} tokens (the model records no training length: pass --seq-len)")
    if seq_len > model.config.max_seq_len:
        raise TrainingError(
            f"--seq-len {seq_len} exceeds the model's max_seq_len {model.config.max_seq_len}"
        )
    root, _ = prepare_data(data, tokenizer, cache_dir())
    shards = TokenShards(root / split)
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None
    loss = mean_loss(
        model,
        shards,
        seq_len=seq_len,
        batch_size=batch_size,
        max_batches=max_batches,
        env=DistEnv(device=device),
        amp_dtype=amp_dtype,
    )
    if loss is None:
        raise DataError(f"the {split} split of {data} has fewer than {seq_len + 1} tokens")
    windows = scored_windows(shards, seq_len, batch_size, max_batches)
    bpb = bits_per_byte(loss, shards, seq_len=seq_len, windows=windows,
                        byte_lengths=tokenizer.byte_lengths())  # fmt: skip
    result = {"loss": loss, "perplexity": math.exp(loss), "bits_per_byte": bpb,
              "seq_len": seq_len, "split": split, "model": source.description}  # fmt: skip
    bpb_text = "n/a" if bpb is None else f"{bpb:.4f}"
    log(f"{split} loss {loss:.4f} | perplexity {math.exp(loss):.2f} | bits/byte {bpb_text}")
    return result


def run_generate(
    checkpoint: str | Path,
    prompt: str,
    *,
    tokenizer_path: str | None = None,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float = 1.0,
    stop: str | None = None,
    seed: int = 0,
    use_cache: bool = True,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
) -> str:
    """The prompt and a sampled continuation (model/generation.py), cut before `stop`. Which
    model it is goes to `log` (stderr: stdout holds the text alone)."""
    from model.generation import generate_text

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, source = open_model(checkpoint, tokenizer_path, device)
    log(f"generating with {source.description}")
    generator = torch.Generator(device=device).manual_seed(seed)
    return generate_text(
        model,
        tokenizer,
        prompt,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        stop=stop,
        generator=generator,
        use_cache=use_cache,
    )
