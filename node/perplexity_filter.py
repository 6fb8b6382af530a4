"""Perplexity filtering's scorer: a reference model's mean loss per document.

The reference is any model `--checkpoint` names (node/model_source.py): a weights file, a
training run, a node's work dir, an aggregator's state dir (its newest global model: the
federation's current model), a transformers folder. Documents are scored with the reference's
own tokenizer, on their first `max_tokens_per_document` tokens, in windows of the length the
model was trained with. The curation stage (node/curation.py) turns the losses into quantile
cut-offs; what names the configuration is the model's content (`model_sha256`), not its path.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch

from node.curation_config import PerplexityConfig

UNSCORABLE = math.inf  # fewer than two tokens: nothing to predict, counted as least likely


class PerplexityScorer:
    def __init__(self, config: PerplexityConfig, tokenizer=None) -> None:
        """`tokenizer` (the corpus's) is not used: a model scores text in its own tokens."""
        from node.local_training import open_model

        self.config = config
        self.model, self.tokenizer, source = open_model(config.model, None, torch.device("cpu"))
        self.description = source.description
        self.window = min(source.seq_len or source.config.max_seq_len, source.config.max_seq_len)
        self.model_sha256 = _content_sha256(source.weights or source.hf_folder)

    @torch.inference_mode()
    def losses(self, texts: list[str]) -> list[float]:
        """The mean next-token loss of each document (UNSCORABLE below two tokens)."""
        limit = self.config.max_tokens_per_document
        out = []
        for ids in self.tokenizer.encode_batch(texts):
            tokens = torch.tensor(ids[:limit], dtype=torch.long)
            out.append(self._mean_loss(tokens) if len(tokens) >= 2 else UNSCORABLE)
        return out

    def _mean_loss(self, tokens: torch.Tensor) -> float:
        total, count = 0.0, 0
        # Windows of `window` predictions: each starts where the last one's targets ended.
        for start in range(0, len(tokens) - 1, self.window):
            x = tokens[start : start + self.window][None]
            y = tokens[start + 1 : start + 1 + self.window][None]
            x = x[:, : y.shape[1]]
            _, loss = self.model(x, y)
            total += float(loss) * y.shape[1]
            count += y.shape[1]
        return total / count


def reference_sha256(config: PerplexityConfig) -> str:
    """The reference model's content hash (what names it in the curation sha256), without
    building the model."""
    from node.model_source import locate

    source = locate(config.model)
    return _content_sha256(source.weights or source.hf_folder)


def _content_sha256(path: Path) -> str:
    """The sha256 of a weights file, or of a transformers folder's safetensors files."""
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()
