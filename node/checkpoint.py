"""Resumable training checkpoints, pickle-free.

A checkpoint is a folder:
  model.safetensors      the weights (loadable on their own by `fedpt eval` / `generate`)
  optimizer.safetensors  AdamW moments and step counts, one tensor per (parameter, key)
  trainer_state.json     step, tokens seen, configs, optimizer param groups, RNG states

Full (unsharded) state dicts are gathered with torch.distributed.checkpoint's helpers, so one
format serves a single process, DDP and FSDP2. The folder is written under a temporary name and
renamed into place; `latest` (a one-line file) is replaced atomically after it.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from model.io import CheckpointError, fsync_dir, load_tensors, save_tensors_atomic
from node.parallel import DistEnv, broadcast_state, decided_by_main

LATEST = "latest"
STATE_FILE = "trainer_state.json"
OPTIM_SEP = "::"  # parameter FQNs contain dots, never this


def full_model_state(model: nn.Module, tie_embeddings: bool) -> dict[str, torch.Tensor]:
    """The whole model's weights on the CPU (gathered across FSDP shards, on every rank)."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    state = {k: v.detach().cpu() for k, v in state.items()}
    if tie_embeddings:
        state.pop("output.weight", None)
    return state


def _flatten_optimizer(osd: dict) -> tuple[dict[str, torch.Tensor], list[dict]]:
    tensors = {}
    for fqn, per_param in osd["state"].items():
        for key, value in per_param.items():
            tensors[f"{fqn}{OPTIM_SEP}{key}"] = torch.as_tensor(value).detach().cpu()
    groups = [
        {k: list(v) if isinstance(v, tuple) else v for k, v in g.items()}
        for g in osd["param_groups"]
    ]
    return tensors, groups


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list[dict]) -> dict:
    state: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        fqn, key = name.split(OPTIM_SEP)
        state.setdefault(fqn, {})[key] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in groups]
    return {"state": state, "param_groups": groups}


def rng_state() -> dict[str, str]:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return {k: base64.b64encode(v.numpy().tobytes()).decode() for k, v in states.items()}


def restore_rng_state(encoded: dict[str, str]) -> None:
    def decode(s: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)

    torch.set_rng_state(decode(encoded["torch"]))
    if "cuda" in encoded and torch.cuda.is_available():
        torch.cuda.set_rng_state(decode(encoded["cuda"]))


def save_checkpoint(
    directory: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    is_main: bool,
    tie_embeddings: bool,
    weights_metadata: dict[str, str],
    state: dict,
) -> None:
    """Write a checkpoint folder. Every rank must call it (gathering is collective);
    only the main rank writes."""
    model_state = full_model_state(model, tie_embeddings)
    osd = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
    if not is_main:
        return
    optim_tensors, groups = _flatten_optimizer(osd)
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_tensors_atomic(model_state, tmp / "model.safetensors", weights_metadata)
    save_tensors_atomic(optim_tensors, tmp / "optimizer.safetensors")
    full_state = {**state, "optimizer_param_groups": groups, "rng": rng_state()}
    (tmp / STATE_FILE).write_text(json.dumps(full_state, indent=2, sort_keys=True))
    with open(tmp / STATE_FILE, "rb+") as f:
        os.fsync(f.fileno())
    # Re-saving a step (a node's round state is saved under the same step again) must never
    # leave `latest` naming nothing: the old folder steps aside first, and latest_checkpoint
    # falls back to it until the new one is in place.
    previous = _aside(directory)
    if directory.exists():
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(directory, previous)
    os.replace(tmp, directory)
    fsync_dir(directory.parent)
    _write_latest(directory.parent, directory.name)
    shutil.rmtree(previous, ignore_errors=True)


def _aside(directory: Path) -> Path:
    return directory.with_name(f".{directory.name}.previous")


def _write_latest(root: Path, name: str) -> None:
    tmp = root / f".{LATEST}.tmp"
    tmp.write_text(name + "\n")
    os.replace(tmp, root / LATEST)
    fsync_dir(root)


def latest_checkpoint(root: Path) -> Path | None:
    """The folder `root/latest` names, or None when no checkpoint was completed."""
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    directory = root / pointer.read_text().strip()
    if not (directory / STATE_FILE).is_file() and (_aside(directory) / STATE_FILE).is_file():
        return _aside(directory)  # a crash while this step was saved again: the earlier save
    if not (directory / STATE_FILE).is_file():
        raise CheckpointError(f"{pointer} names {directory.name}, which is incomplete or missing")
    return directory


def load_checkpoint(
    directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv | None = None
) -> dict:
    """Load weights, optimizer state and RNG into the (already parallelized) model and
    optimizer; returns the saved trainer state. Every rank calls it; rank 0 alone reads the
    folder (it wrote it) and broadcasts it, so other hosts need not share its disk."""
    env = env or DistEnv()
    files: dict[str, dict[str, torch.Tensor]] = {}

    def read() -> dict:
        files["weights"], _ = load_tensors(directory / "model.safetensors")
        files["optimizer"], _ = load_tensors(directory / "optimizer.safetensors")
        return read_state(directory)

    state = decided_by_main(read, env, (CheckpointError,))
    weights = broadcast_state(files.get("weights"), env)
    optim_tensors = broadcast_state(files.get("optimizer"), env)
    opts = StateDictOptions(full_state_dict=True, strict=False)
    missing, unexpected = set_model_state_dict(model, weights, options=opts)
    missing = [m for m in missing if m != "output.weight"]  # tied to the embedding
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {directory} does not fit the model: missing {missing[:3]}, "
            f"unexpected {list(unexpected)[:3]}"
        )
    osd = _unflatten_optimizer(optim_tensors, state.pop("optimizer_param_groups"))
    set_optimizer_state_dict(model, optimizer, osd, options=StateDictOptions(full_state_dict=True))
    restore_rng_state(state.pop("rng"))
    return state


def read_state(directory: Path) -> dict:
    """The trainer state saved in a checkpoint folder (without loading any tensors)."""
    try:
        return json.loads((directory / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {directory / STATE_FILE}: {e}") from e


def prune_checkpoints(root: Path, keep_latest: int) -> None:
    """Remove all but the newest `keep_latest` checkpoint folders under `root`."""
    folders = sorted(d for d in root.glob("step_*") if d.is_dir())
    for directory in folders[: max(len(folders) - keep_latest, 0)]:
        shutil.rmtree(directory, ignore_errors=True)
