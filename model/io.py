"""safetensors I/O for model weights, with the model config and tokenizer spec in the header.

A weights file is self-describing: `load_model` rebuilds the right architecture from the
metadata alone. Writes are atomic (temp file, fsync, rename), so a crash leaves either the old
file or the new one, never half of one. No pickle: safetensors holds only raw tensors and strings.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from model.config import ConfigError, ModelConfig
from model.gpt import GPT
from model.writeback import SequentialFile

WEIGHTS_FORMAT = "fedpt-model/1"
TRAIN_SEQ_LEN_KEY = "train_seq_len"


class CheckpointError(ValueError):
    """A weights file is missing, corrupt, or does not fit the model it is loaded into."""


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: str | Path, payload: dict) -> None:
    """`payload` as JSON at `path`, whole or not at all: temp file, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(json.dumps(payload, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint64: "U64", torch.uint32: "U32", torch.uint16: "U16", torch.uint8: "U8",
    torch.bool: "BOOL",
}  # fmt: skip
_WRITE_BYTES = 16 << 20  # a slice of a tensor written and hashed at a time


def save_tensors_atomic(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> str:
    """Write `tensors` as safetensors to `path` via a temp file, fsync and rename; returns the
    sha256 (hex) of the file's bytes.

    The file is written straight from the tensors' memory, a slice at a time: no copy of a
    tensor, the hash taken from the very bytes written (no second read of a model-sized file),
    and the disk started on each written window (model/writeback.py), so the fsync waits
    only for the tail. safetensors' own writer serialises in one call and offers neither. Tensors
    are laid out widest dtype first, each group in the caller's order, which keeps every tensor
    aligned to its element size; `safe_open` reads the file like any other."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    order = sorted(tensors, key=lambda n: -tensors[n].element_size())  # stable within a dtype
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in order:
        t = tensors[name]
        if t.dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"cannot write tensor {name} of dtype {t.dtype} as safetensors")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}  # fmt: skip
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    digest = hashlib.sha256()
    # Through the page cache: O_DIRECT's large synchronous writes queue every other disk
    # access behind them (the database's, for GetTask during a commit: p99 ~15 ms → ~95 ms).
    out = SequentialFile(tmp, direct=False)
    try:

        def write(data: memoryview | bytes) -> None:
            out.write(data)
            digest.update(data)

        write(len(text).to_bytes(8, "little") + text)
        for name in order:
            raw = tensors[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8)
            view = memoryview(raw.numpy())
            for start in range(0, len(view), _WRITE_BYTES):
                write(view[start : start + _WRITE_BYTES])
        out.sync_and_close()
        os.replace(tmp, path)
    except BaseException:
        out.close()
        tmp.unlink(missing_ok=True)  # a full disk must not keep a partial file too
        raise
    fsync_dir(path.parent)
    return digest.hexdigest()


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
    header = _rawweights_header(path)
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


def _rawweights_header(path: Path) -> dict:
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


def weights_metadata(config: ModelConfig, tokenizer_spec: dict | None,
                     seq_len: int | None = None) -> dict[str, str]:  # fmt: skip
    """The header that makes a weights file self-describing; `seq_len`: the window length the
    model was trained with (what `fedpt eval` scores with by default)."""
    return {
        "format": WEIGHTS_FORMAT,
        "model_config": json.dumps(config.to_dict(), sort_keys=True),
        "tokenizer": json.dumps(tokenizer_spec or {}, sort_keys=True),
        **({TRAIN_SEQ_LEN_KEY: str(seq_len)} if seq_len else {}),
    }


def save_model(model: GPT, path: str | Path, *, tokenizer_spec: dict | None = None,
               seq_len: int | None = None) -> None:  # fmt: skip
    save_tensors_atomic(model_state(model), path,
                        weights_metadata(model.config, tokenizer_spec, seq_len))  # fmt: skip


def train_seq_len(path: str | Path) -> int | None:
    """The training window length a weights file (fedpt's or a global checkpoint) records."""
    raw = weights_header(path).get(TRAIN_SEQ_LEN_KEY, "")
    return int(raw) if raw.isdigit() and int(raw) > 0 else None


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
    metadata = weights_header(path)
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


def weights_header(path: str | Path) -> dict[str, str]:
    """A safetensors file's string metadata (its format, model config, ...)."""
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
