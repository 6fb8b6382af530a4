"""`fedpt export` and `fedpt import`: a model to and from the Hugging Face transformers format
(model/hf.py does the mapping; node/model_source.py says which model a path names)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from model.hf import export_hf, import_hf, import_tokenizer
from model.io import save_tensors_atomic, weights_metadata
from node.local_training import TOKENIZER_NAME, WEIGHTS_NAME, open_model
from node.model_source import ModelSource


def export_checkpoint(checkpoint: str | Path, out: Path,
                      tokenizer_path: str | None = None) -> ModelSource:  # fmt: skip
    """Write the model `checkpoint` names as a transformers Llama folder at `out`."""
    from model.io import model_state

    model, tokenizer, source = open_model(checkpoint, tokenizer_path, torch.device("cpu"))
    export_hf(model_state(model), model.config, tokenizer, out, seq_len=source.seq_len)
    return source


def import_folder(folder: Path, out: Path) -> Path:
    """A transformers Llama folder as out/model.safetensors (with its tokenizer.json beside it
    when it is a BPE): a fedpt weights file for --init-from, --checkpoint, eval and generate."""
    config, state, seq_len = import_hf(folder)
    tokenizer = import_tokenizer(folder, out / ".tokenizers")
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer.spec()["kind"] == "bpe":
        shutil.copyfile(folder / TOKENIZER_NAME, out / TOKENIZER_NAME)
    shutil.rmtree(out / ".tokenizers", ignore_errors=True)
    weights = out / WEIGHTS_NAME
    save_tensors_atomic(state, weights, weights_metadata(config, tokenizer.spec(), seq_len))
    return weights
