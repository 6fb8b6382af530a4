"""Local (centralized) training, evaluation and generation: what `fedpt train`, `eval` and
`generate` run. Composes tokenizer, data, model and trainer; holds no math of its own.

A run folder (`--out`) holds:
  run.json            model + train config, tokenizer spec, data source and ingest summary
  metrics.jsonl       one JSON line per logged step / evaluation
  checkpoints/        resumable checkpoints (step_XXXXXXXX/) and `latest`
  model.safetensors   the final weights (self-describing: config + tokenizer in the header)
  tokenizer.json      a copy of the BPE tokenizer, when one is used
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from model.config import ModelConfig
from model.io import CheckpointError, load_model, save_tensors_atomic, weights_metadata
from model.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, load_tokenizer
from model.train_config import TrainConfig
from node.checkpoint import full_model_state, latest_checkpoint
from node.corpus import DataError
from node.evaluation import mean_loss
from node.parallel import DistEnv, barrier, check_same_everywhere, decided_by_main
from node.shards import TokenShards, prepare_data, read_manifest
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


def run_training(
    *,
    data: str,
    model_config: ModelConfig,
    train_config: TrainConfig,
    out_dir: Path,
    tokenizer_path: str | None = None,
    resume: bool = False,
    env: DistEnv | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Train from scratch (or resume) and leave a run folder; returns the summary."""
    env = env or DistEnv()
    log = log if env.is_main else (lambda _msg: None)
    # Rank 0's --out holds the run (the other hosts' may be empty): it alone decides.
    has_run = decided_by_main(
        lambda: (out_dir / "checkpoints").is_dir() or (out_dir / WEIGHTS_NAME).exists(), env
    )
    if has_run and not resume:
        raise TrainingError(f"{out_dir} already holds a run; pass --resume or choose another --out")
    tokenizer = open_tokenizer(tokenizer_path)
    model_config = model_config.with_vocab(tokenizer.vocab_size)
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
                out_dir, data, model_config, train_config, tokenizer, tokenizer_path, env
            )
        barrier(env)
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
            metadata = weights_metadata(model_config, tokenizer.spec())
            save_tensors_atomic(weights, out_dir / WEIGHTS_NAME, metadata)
            (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            log(f"done: weights in {out_dir / WEIGHTS_NAME}")
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
    """The model and its tokenizer; a BPE tokenizer is looked up beside the weights and in
    the run folder unless given, and always checked against the hash the weights recorded."""
    weights = resolve_weights(checkpoint)
    model, spec = load_model(weights, device)
    if spec.get("kind") == "bpe" and tokenizer_path is None:
        candidates = [
            weights.parent / TOKENIZER_NAME,
            weights.parent.parent.parent / TOKENIZER_NAME,
        ]
        tokenizer_path = next((str(c) for c in candidates if c.is_file()), None)
        if tokenizer_path is None:
            raise CheckpointError(f"{weights} needs its BPE tokenizer: pass --tokenizer PATH")
    tokenizer = load_tokenizer(spec or ByteTokenizer().spec(), tokenizer_path)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise CheckpointError("the tokenizer's vocabulary is larger than the model's")
    return model, tokenizer


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
    model, tokenizer = load_for_inference(checkpoint, tokenizer_path, device)
    seq_len = seq_len or min(model.config.max_seq_len, 256)
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
    result = {"loss": loss, "perplexity": math.exp(loss), "seq_len": seq_len, "split": split}
    log(f"{split} loss {loss:.4f} | perplexity {math.exp(loss):.2f}")
    return result


def run_generate(
    checkpoint: str | Path,
    prompt: str,
    *,
    tokenizer_path: str | None = None,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = 50,
    seed: int = 0,
) -> str:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_for_inference(checkpoint, tokenizer_path, device)
    ids = tokenizer.encode(prompt) or [tokenizer.eos_id]  # an empty prompt starts a new document
    prompt_tensor = torch.tensor([ids], dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(
        prompt_tensor,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        eos_id=tokenizer.eos_id,
        generator=generator,
    )
    return tokenizer.decode(out[0].tolist())
