"""What `--checkpoint` names, for `fedpt eval`, `generate` and `export`: one model, said aloud.

Accepted, in this order of checks:
    a weights file       fedpt's (`fedpt train`, a node's final/), or an aggregator's global
                         checkpoint (state/checkpoints/global_vN.safetensors)
    a transformers folder  config.json and safetensors weights (Llama architecture: model/hf.py)
    a node's work dir    the federation's final global model it pulled (final/global.safetensors);
                         without one, the node's own local model after its last round, and the
                         description says so: it is not the federation's model
    an aggregator        its state dir (checkpoints/), or a `fedpt simulate` run (aggregator/):
                         the newest global checkpoint
    a training run       its model.safetensors, or its newest checkpoint

Every source carries the length the model was trained with when its file records it, so that
`fedpt eval` scores with the windows the model saw.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from model.config import ConfigError, ModelConfig
from model.io import (
    WEIGHTS_FORMAT,
    CheckpointError,
    load_tensors,
    read_metadata,
    train_seq_len,
    weights_header,
)

GLOBAL_FILE = re.compile(r"global_v(\d{8,})\.safetensors")


@dataclass
class ModelSource:
    description: str  # which model this is, for the user
    config: ModelConfig
    tokenizer_spec: dict
    seq_len: int | None  # the training window length, if recorded
    weights: Path | None = None  # a fedpt or global weights file
    hf_folder: Path | None = None  # or a transformers folder
    tokenizer_dirs: list[Path] = field(default_factory=list)  # where a BPE's JSON may be

    def state(self) -> dict[str, torch.Tensor]:
        """The model's fp32 weights under fedpt's names."""
        if self.hf_folder is not None:
            from model.hf import import_hf

            return import_hf(self.hf_folder)[1]
        tensors, _ = load_tensors(self.weights)
        return {n: t for n, t in tensors.items() if not n.startswith("outer/")}


def locate(checkpoint: str | Path) -> ModelSource:
    path = Path(checkpoint)
    if path.is_file():
        return _file(path, f"weights file {path}")
    if not path.is_dir():
        raise CheckpointError(f"no model at {path}: no such file or folder")
    if (path / "config.json").is_file():
        return _hf(path)
    final = path / "final" / "global.safetensors"
    if final.is_file():
        return _file(
            final, f"the federation's final global model, as node work dir {path} pulled it"
        )
    for state_dir in (path, path / "aggregator"):
        newest = _newest_global(state_dir / "checkpoints")
        if newest is not None:
            return _file(newest, "")
    if (path / "rounds.jsonl").is_file():  # a node's work dir without the final model
        from node.local_training import resolve_weights

        source = _file(resolve_weights(path), "")
        source.description = (
            f"node work dir {path}'s OWN local model after its last round ({source.weights.parent.name}), "
            "not the federation's global model (this node holds no final/global.safetensors; "
            "pass the aggregator's state dir for the global one)"
        )
        return source
    from node.local_training import resolve_weights

    weights = resolve_weights(path)
    is_run = (path / "run.json").is_file()
    source = _file(weights, f"training run {path}: {weights.relative_to(path)}" if is_run else "")
    if source.seq_len is None and (path / "run.json").is_file():
        try:
            run = json.loads((path / "run.json").read_text())
            source.seq_len = int(run["train_config"]["seq_len"])
        except (KeyError, TypeError, ValueError):
            pass
    source.tokenizer_dirs.append(path)
    return source


def _newest_global(folder: Path) -> Path | None:
    if not folder.is_dir():
        return None
    found = sorted(
        (int(m.group(1)), p) for p in folder.iterdir() if (m := GLOBAL_FILE.fullmatch(p.name))
    )
    return found[-1][1] if found else None


def _file(path: Path, description: str) -> ModelSource:
    header = weights_header(path)
    dirs = [path.parent, path.parent.parent.parent]
    if header.get("format") == WEIGHTS_FORMAT:
        config, spec = read_metadata(path)
        return ModelSource(description or f"weights file {path}", config, spec,
                           train_seq_len(path), weights=path, tokenizer_dirs=dirs)  # fmt: skip
    if header.get("format") == "fedpt-global/1":
        if "model_config" not in header:
            raise CheckpointError(
                f"{path} is a global checkpoint from before fedpt recorded the model in it; "
                "pass a node's final/global.safetensors instead"
            )
        try:
            config = ModelConfig.from_dict(json.loads(header["model_config"]))
            spec = json.loads(header.get("tokenizer", "{}"))
        except (json.JSONDecodeError, ConfigError, TypeError) as e:
            raise CheckpointError(f"{path} has a corrupt model header: {e}") from e
        version = int(header.get("version", -1))
        description = description or f"global model v{version} (aggregator checkpoint {path})"
        return ModelSource(description, config, spec, train_seq_len(path), weights=path,
                           tokenizer_dirs=dirs)  # fmt: skip
    raise CheckpointError(f"{path} is not a fedpt model (format {header.get('format')!r})")


def _hf(folder: Path) -> ModelSource:
    from model.hf import HFFormatError, import_tokenizer, read_hf_config
    from node.local_training import cache_dir

    try:
        config, seq_len = read_hf_config(folder)
        tokenizer = import_tokenizer(folder, cache_dir() / "tokenizers")
    except HFFormatError as e:
        raise CheckpointError(str(e)) from e
    dirs = [cache_dir() / "tokenizers" / f"{tokenizer.spec().get('sha256', 'byte')}"]
    return ModelSource(f"transformers folder {folder}", config, tokenizer.spec(), seq_len,
                       hf_folder=folder, tokenizer_dirs=dirs)  # fmt: skip
