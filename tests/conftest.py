"""Shared fixtures: an isolated shard cache and small corpora built on the fly."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from model.tokenizer import ByteTokenizer
from node.shards import TokenShards, pack_shards


@pytest.fixture(autouse=True)
def isolated_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Every test packs shards into its own cache, never into ~/.cache."""
    cache = tmp_path_factory.mktemp("shard-cache")
    monkeypatch.setenv("FEDPT_CACHE_DIR", str(cache))
    return cache


def synthetic_documents(n: int, seed: int = 0, words: int = 200) -> list[str]:
    """Pseudo-English documents with learnable structure (repeated vocabulary and patterns)."""
    rng = random.Random(seed)
    vocab = ["the", "model", "learns", "from", "data", "federated", "round", "node", "sends",
             "delta", "aggregator", "sum", "and", "of", "a", "to", "in", "loss", "falls"]  # fmt: skip
    docs = []
    for i in range(n):
        body = " ".join(rng.choice(vocab) for _ in range(words))
        docs.append(f"# document {i}\n{body}.\n")
    return docs


def write_corpus(folder: Path, docs: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        (folder / f"doc_{i:04d}.txt").write_text(doc)
    return folder


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "corpus", synthetic_documents(60))


@pytest.fixture
def shards(tmp_path: Path) -> tuple[TokenShards, TokenShards]:
    pack_shards(synthetic_documents(60), ByteTokenizer(), tmp_path / "shards", val_fraction=0.1)
    return TokenShards(tmp_path / "shards" / "train"), TokenShards(tmp_path / "shards" / "val")
