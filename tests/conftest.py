"""Shared fixtures: an isolated shard cache and small corpora built on the fly."""

from __future__ import annotations

import os
import random
import uuid
from collections.abc import Iterable, Iterator
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


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database: a SQLite file, or a new PostgreSQL database on the server named
    by FEDPT_TEST_POSTGRES_URL (.ci/run starts one). Without that variable the PostgreSQL
    cases skip locally and fail under CI, so CI can never pass without really testing it."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fedpt.db'}"
        return
    admin_url = os.environ.get("FEDPT_TEST_POSTGRES_URL")
    if not admin_url:
        if os.environ.get("CI"):
            pytest.fail("FEDPT_TEST_POSTGRES_URL is not set under CI")
        pytest.skip("FEDPT_TEST_POSTGRES_URL not set (bash scripts/start_postgres.sh prints one)")
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"fedpt_t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def issue_kits(root: Path, orgs: Iterable[str], foreign: str | None = None) -> dict:
    """A federation CA with startup kits: "aggregator" (a server for 127.0.0.1) and one per
    organisation; with `foreign`, a kit for that organisation from another CA, as "foreign"."""
    from protos import pki

    pki.init_ca(root / "ca")
    out = {"aggregator": pki.load_kit(pki.issue_kit(root / "ca", "aggregator", root / "aggregator",
                                                    server_hosts=["127.0.0.1"]))}  # fmt: skip
    for org in orgs:
        out[org] = pki.load_kit(pki.issue_kit(root / "ca", org, root / org))
    if foreign is not None:
        pki.init_ca(root / "other-ca")
        out["foreign"] = pki.load_kit(pki.issue_kit(root / "other-ca", foreign, root / "foreign"))
    return out


@pytest.fixture
def serve() -> Iterator:
    """start(config) -> a real aggregator on 127.0.0.1, stopped after the test."""
    from aggregator.server import start_aggregator

    servers = []

    def start(config):
        running = start_aggregator(config, log=lambda _m: None)
        servers.append(running)
        return running

    yield start
    for running in servers:
        running.stop(grace=0)
