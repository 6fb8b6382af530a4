"""Helpers shared by the benchmarks: medians, synthetic token shards, table printing."""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np

from node.shards import TokenShards, pack_shards


class RandomTokens:
    """A stand-in tokenizer that turns every document into `length` uniform random ids, so a
    benchmark can feed a real shard set with any vocabulary size (FLOPs depend on it)."""

    def __init__(self, vocab_size: int, length: int, seed: int = 0) -> None:
        self.vocab_size, self.length = vocab_size, length
        self.bos_id, self.eos_id, self.pad_id = vocab_size - 3, vocab_size - 2, vocab_size - 1
        self._rng = np.random.default_rng(seed)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self._rng.integers(0, self.vocab_size - 3, self.length).tolist() for _ in texts]

    def spec(self) -> dict:
        return {"kind": "random", "vocab_size": self.vocab_size}


def random_shards(
    folder: Path, vocab_size: int, tokens: int, doc_tokens: int = 4096
) -> TokenShards:
    docs = [f"document {i}" for i in range(max(1, tokens // doc_tokens))]
    pack_shards(docs, RandomTokens(vocab_size, doc_tokens), folder, val_fraction=0.0)
    return TokenShards(folder / "train")


def median(values: list[float]) -> float:
    return statistics.median(values)


def print_table(header: list[str], rows: list[list[object]]) -> None:
    cells = [header, *[[_cell(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for i, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3f}"
    return str(value)
