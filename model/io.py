"""safetensors I/O for model weights, with the model config and tokenizer spec in the header.

A weights file is self-describing: `load_model` rebuilds the right architecture from the
metadata alone. Writes are atomic (temp file, fsync, rename), so a crash leaves either the old
file or the new one, never half of one. No pickle: safetensors holds only raw tensors and strings.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from model.config import ConfigError, ModelConfig
from model.gpt import GPT

WEIGHTS_FORMAT = "fedpt-model/1"


class CheckpointError(ValueError):
    """A weights file is missing, corrupt, or does not fit the model it is loaded into."""


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_tensors_atomic(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """Write `tensors` as safetensors to `path` via a temp file, fsync and rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    try:
        save_file(contiguous, str(tmp), metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not keep a partial file too
        raise
    fsync_dir(path.parent)


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read every tensor and the string metadata of a safetensors file onto the CPU."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no weights file at {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read weights file {path}: {e}") from e
    return tensors, metadata


def map_float32_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The float32 tensors of a safetensors file as copy-on-write memory maps: pages are read
    when touched, so walking a model-sized file piece by piece never holds it all in memory."""
    import numpy as np

    path = Path(path)
    header = _raw_header(path)
    start = 8 + int.from_bytes(path.open("rb").read(8), "little")
    mapped = np.memmap(path, dtype=np.uint8, mode="c")
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] != "F32":
            raise CheckpointError(f"{path}: tensor {name} is {entry['dtype']}, not F32")
        first, end = entry["data_offsets"]
        out[name] = torch.from_numpy(mapped[start + first : start + end].view(np.float32)).view(
            entry["shape"]
        )
    return out


def _raw_header(path: Path) -> dict:
    try:
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            return json.loads(f.read(size))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read weights file {path}: {e}") from e


def model_state(model: GPT) -> dict[str, torch.Tensor]:
    """The model's state dict without the tied output weight (it is the embedding)."""
    state = model.state_dict()
    if model.config.tie_embeddings:
        state.pop("output.weight", None)
    return state


def weights_metadata(config: ModelConfig, tokenizer_spec: dict | None) -> dict[str, str]:
    """The header that makes a weights file self-describing."""
    return {
        "format": WEIGHTS_FORMAT,
        "model_config": json.dumps(config.to_dict(), sort_keys=True),
        "tokenizer": json.dumps(tokenizer_spec or {}, sort_keys=True),
    }


def save_model(model: GPT, path: str | Path, *, tokenizer_spec: dict | None = None) -> None:
    save_tensors_atomic(model_state(model), path, weights_metadata(model.config, tokenizer_spec))


def load_weights_into(
    model: GPT, tensors: dict[str, torch.Tensor], source: str = "weights"
) -> None:
    """Copy `tensors` into `model`, refusing any missing, extra or wrongly shaped tensor."""
    expected = model_state(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for name, t in tensors.items():
        if t.shape != expected[name].shape:
            raise CheckpointError(
                f"{source}: {name} has shape {tuple(t.shape)}, model expects "
                f"{tuple(expected[name].shape)}"
            )
    model.load_state_dict(tensors, strict=not model.config.tie_embeddings)


def read_metadata(path: str | Path) -> tuple[ModelConfig, dict]:
    """The model config and tokenizer spec stored in a weights file's header."""
    if not Path(path).is_file():
        raise CheckpointError(f"no weights file at {path}")
    metadata = _header(path)
    if metadata.get("format") != WEIGHTS_FORMAT:
        raise CheckpointError(
            f"{path} is not a fedpt weights file (format {metadata.get('format')!r})"
        )
    try:
        config = ModelConfig.from_dict(json.loads(metadata["model_config"]))
        tokenizer_spec = json.loads(metadata.get("tokenizer", "{}"))
    except (KeyError, json.JSONDecodeError, ConfigError, TypeError) as e:
        raise CheckpointError(f"{path} has a corrupt model config header: {e}") from e
    return config, tokenizer_spec


def _header(path: str | Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read weights file {path}: {e}") from e


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, dict]:
    """Rebuild the model a weights file describes; returns it (eval mode) and its tokenizer spec."""
    config, tokenizer_spec = read_metadata(path)
    tensors, _ = load_tensors(path)
    model = GPT(config)
    load_weights_into(model, tensors, source=str(path))
    return model.to(device).eval(), tokenizer_spec
