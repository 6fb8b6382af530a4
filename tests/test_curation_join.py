"""A federation that requires a data curation configuration: Join checks the node's curation
hash (only the hash and counts travel), refuses any other without storing anything, and a node
process refused that way ends with one line."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
import types
from pathlib import Path

import grpc
import pytest

from aggregator.config import AggregatorConfigError, FederationConfig, load_config
from aggregator.membership import MAX_CURATION_NAME_CHARS, MAX_CURATION_REMOVALS
from aggregator.rounds import RecoveryError
from aggregator.server import RunningAggregator, start_aggregator
from model.tokenizer import ByteTokenizer
from node.client import AggregatorClient
from node.curation_config import load_curation_config
from node.participant import NodeConfig, Participant
from node.shards import pack_shards, prepare_data
from protos import federation_pb2 as pb
from protos.curation import NO_CURATION
from tests.conftest import synthetic_documents
from tests.test_aggregator import make_config

REQUIRED = hashlib.sha256(b"the federation's curation").hexdigest()
OTHER = hashlib.sha256(b"another curation").hexdigest()
COUNTS = {"documents_in": 100, "documents_kept": 80,
          "removed": {"exact_dedup": 5, "quality.min_words": 15}}  # fmt: skip
# A quick curation: exact duplicates and PII only (the synthetic corpus keeps every document).
CURATION_TOML = """[curation]
exact_dedup = true
[curation.quality]
enabled = false
[curation.near_dedup]
enabled = false
"""


def requiring(tmp_path: Path, digest: str = REQUIRED):
    config = make_config(tmp_path)
    return dataclasses.replace(
        config, federation=dataclasses.replace(config.federation, require_curation=digest)
    )


def join(agg: RunningAggregator, org: str, curation: pb.DataCuration | None) -> AggregatorClient:
    client = AggregatorClient(agg.address, org, rpc_timeout=10)
    client.join(curation=curation)
    return client


def stored_curation(agg: RunningAggregator, node_id: str) -> dict:
    nodes = {n.id: n for n in agg.store.nodes(agg.coordinator.federation_id)}
    return nodes[node_id].capabilities["curation"]


def test_a_node_curated_as_required_joins_and_its_counts_are_stored(tmp_path: Path, serve) -> None:
    agg = serve(requiring(tmp_path))
    client = join(agg, "acme", pb.DataCuration(sha256=REQUIRED, **COUNTS))
    assert client.spec.required_curation_sha256 == REQUIRED
    assert stored_curation(agg, client.node_id) == {"sha256": REQUIRED, **COUNTS}
    # A re-join (a lost session) sends the same curation again.
    client.join()
    assert stored_curation(agg, client.node_id) == {"sha256": REQUIRED, **COUNTS}


@pytest.mark.parametrize(
    "curation,theirs",
    [
        (pb.DataCuration(sha256=OTHER, **COUNTS), f"configuration {OTHER[:12]}…"),
        (pb.DataCuration(sha256=NO_CURATION), "no curation"),
        (pb.DataCuration(), "no curation"),  # empty hash
        (None, "no curation"),  # no curation field at all (an older node)
    ],
    ids=["other-hash", "none", "empty", "absent"],
)
def test_a_node_curated_otherwise_is_refused_and_nothing_is_stored(
    tmp_path: Path, serve, curation: pb.DataCuration | None, theirs: str
) -> None:
    agg = serve(requiring(tmp_path))
    join(agg, "acme", pb.DataCuration(sha256=REQUIRED))  # a node already in: its row stays
    before = agg.store.snapshot()
    client = AggregatorClient(agg.address, "globex", rpc_timeout=10)
    with pytest.raises(grpc.RpcError) as info:
        client.join(curation=curation)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = info.value.details()
    assert f"requires shards curated with configuration {REQUIRED[:12]}…" in details
    assert f"this node's were prepared with {theirs}" in details
    assert "--curation" in details
    assert agg.store.snapshot() == before
    assert agg.coordinator.membership.known_nodes() == 1


def test_without_a_requirement_any_node_joins(tmp_path: Path, serve) -> None:
    agg = serve(make_config(tmp_path))
    assert agg.coordinator.spec.required_curation_sha256 == ""
    for org, curation, stored in (("acme", pb.DataCuration(sha256=OTHER, **COUNTS), OTHER),
                                  ("globex", pb.DataCuration(sha256=NO_CURATION), NO_CURATION),
                                  ("initech", None, NO_CURATION)):  # fmt: skip
        client = join(agg, org, curation)
        assert stored_curation(agg, client.node_id)["sha256"] == stored


TOO_MANY = {f"quality.reason_{i}": 1 for i in range(MAX_CURATION_REMOVALS + 1)}


@pytest.mark.parametrize(
    "curation,words",
    [
        (pb.DataCuration(sha256=REQUIRED, removed=TOO_MANY), f"at most {MAX_CURATION_REMOVALS}"),
        (pb.DataCuration(sha256=REQUIRED, removed={"x" * (MAX_CURATION_NAME_CHARS + 1): 1}),
         f"1 to {MAX_CURATION_NAME_CHARS} characters"),
        (pb.DataCuration(sha256=REQUIRED, removed={"": 1}), "1 to"),
        (pb.DataCuration(sha256="x" * 100_000), "64 lowercase hex digits"),
        (pb.DataCuration(sha256=REQUIRED.upper()), "64 lowercase hex digits"),
        (pb.DataCuration(sha256=REQUIRED, documents_in=1, documents_kept=2), "documents_kept"),
    ],
    ids=["too-many-names", "long-name", "empty-name", "huge-hash", "upper-case", "kept-over-in"],
)  # fmt: skip
def test_an_unreasonable_curation_report_is_invalid(
    tmp_path: Path, serve, curation: pb.DataCuration, words: str
) -> None:
    agg = serve(requiring(tmp_path))
    before = agg.store.snapshot()
    client = AggregatorClient(agg.address, "acme", rpc_timeout=10)
    with pytest.raises(grpc.RpcError) as info:
        client.join(curation=curation)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in info.value.details()
    assert agg.store.snapshot() == before


def test_the_most_a_node_may_report_fits_with_its_capabilities(tmp_path: Path, serve) -> None:
    agg = serve(requiring(tmp_path))
    removed = {f"{i:02d}".ljust(MAX_CURATION_NAME_CHARS, "q"): 2**64 - 1
               for i in range(MAX_CURATION_REMOVALS)}  # fmt: skip
    client = join(agg, "acme", pb.DataCuration(sha256=REQUIRED, removed=removed))
    assert stored_curation(agg, client.node_id)["removed"] == removed


@pytest.mark.parametrize("value", ["abc", REQUIRED.upper(), REQUIRED + "0", "none"])
def test_require_curation_must_be_a_sha256(value: str) -> None:
    with pytest.raises(AggregatorConfigError, match=r"\[federation\] require_curation"):
        FederationConfig(require_curation=value)


def test_require_curation_from_toml_and_the_serve_flag(tmp_path: Path) -> None:
    from fedpt.cli import aggregator_config_from_args, build_parser

    toml = tmp_path / "aggregator.toml"
    toml.write_text(f'[server]\ninsecure = true\n[federation]\nrequire_curation = "{REQUIRED}"\n')
    assert load_config(toml).federation.require_curation == REQUIRED
    args = build_parser().parse_args(["aggregator", "serve", "--config", str(toml),
                                      "--require-curation", OTHER])  # fmt: skip
    assert aggregator_config_from_args(args).federation.require_curation == OTHER
    toml.write_text('[server]\ninsecure = true\n[federation]\nrequire_curation = "3f2a"\n')
    with pytest.raises(AggregatorConfigError, match="require_curation"):
        load_config(toml)


def test_a_restart_may_not_change_the_required_curation(tmp_path: Path) -> None:
    """Checked only at Join, and certified nodes do not join again after a restart: a changed
    requirement would not reach the nodes already in."""
    config = requiring(tmp_path)
    start_aggregator(config, log=lambda _m: None).stop(grace=0)
    for changed in (requiring(tmp_path, OTHER), requiring(tmp_path, "")):
        with pytest.raises(RecoveryError, match="created with another required_curation_sha256"):
            start_aggregator(changed, log=lambda _m: None)
    start_aggregator(config, log=lambda _m: None).stop(grace=0)  # unchanged: it resumes


# ---- the node ---------------------------------------------------------------------------------
def shard_curation_of(data: Path | str, curation: Path | None = None) -> pb.DataCuration:
    """What Participant._join sends for this data (only its config is needed)."""
    cfg = NodeConfig(data=str(data), insecure=True, curation=str(curation or ""))
    return Participant._shard_curation(types.SimpleNamespace(cfg=cfg))


def test_a_node_reports_its_shards_curation(corpus_dir: Path, tmp_path: Path) -> None:
    toml = tmp_path / "curation.toml"
    toml.write_text(CURATION_TOML)
    digest = load_curation_config(toml).sha256()
    # A raw corpus with --curation: curated before the Join, into the cache training reads.
    raw = shard_curation_of(corpus_dir, toml)
    assert raw.sha256 == digest and raw.documents_in == raw.documents_kept == 60
    # A folder `fedpt data prepare --curation` made: its manifest's hash and counts.
    docs = [*synthetic_documents(20), *synthetic_documents(5)]  # 5 exact duplicates
    folder = tmp_path / "dup-corpus"
    folder.mkdir()
    for i, doc in enumerate(docs):
        (folder / f"{i}.txt").write_text(doc)
    prepared, _ = prepare_data(str(folder), ByteTokenizer(), tmp_path / "cache",
                               curation=load_curation_config(toml))  # fmt: skip
    found = shard_curation_of(prepared)
    assert (found.sha256, found.documents_in, found.documents_kept) == (digest, 25, 20)
    assert dict(found.removed) == {"exact_dedup": 5}
    # Not curated: a raw corpus without --curation, or shards packed without it.
    assert shard_curation_of(corpus_dir) == pb.DataCuration(sha256=NO_CURATION)
    pack_shards(synthetic_documents(10), ByteTokenizer(), tmp_path / "plain", val_fraction=0.1)
    assert shard_curation_of(tmp_path / "plain") == pb.DataCuration(sha256=NO_CURATION)


def run_node(agg: RunningAggregator, data: Path, work: Path, *extra: str):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "fedpt", "node", "join", "--insecure", "--aggregator",
           agg.address, "--data", str(data), "--work-dir", str(work),
           "--reconnect-timeout-seconds", "5", *extra]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


def assert_refused_in_one_line(proc, theirs: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedpt: error: "), proc.stderr
    assert f"requires shards curated with configuration {REQUIRED[:12]}…" in lines[0]
    assert f"were prepared with {theirs}" in lines[0]
    assert "joined" not in proc.stdout


def test_a_node_process_with_uncurated_shards_is_refused_in_one_line(tmp_path: Path, serve) -> None:
    agg = serve(requiring(tmp_path))
    pack_shards(synthetic_documents(20), ByteTokenizer(), tmp_path / "shards", val_fraction=0.1)
    before = agg.store.snapshot()
    proc = run_node(agg, tmp_path / "shards", tmp_path / "work")
    assert_refused_in_one_line(proc, "no curation")
    assert agg.store.snapshot() == before


def test_a_node_process_curating_otherwise_is_refused_in_one_line(
    corpus_dir: Path, tmp_path: Path, serve
) -> None:
    agg = serve(requiring(tmp_path))
    toml = tmp_path / "curation.toml"
    toml.write_text(CURATION_TOML)
    digest = load_curation_config(toml).sha256()
    proc = run_node(agg, corpus_dir, tmp_path / "work", "--curation", str(toml))
    assert_refused_in_one_line(proc, f"configuration {digest[:12]}…")


# ---- fedpt simulate --curation ----------------------------------------------------------------
def test_simulate_requires_its_curation_of_every_node(tmp_path: Path) -> None:
    from fedpt.cli import build_parser
    from fedpt.simulate import SimulationOptions, write_aggregator_config

    toml = tmp_path / "curation.toml"
    toml.write_text(CURATION_TOML)
    args = build_parser().parse_args(["simulate", "--curation", str(toml)])
    assert args.curation == toml
    path = write_aggregator_config(SimulationOptions(), tmp_path, 7450, REQUIRED)
    assert load_config(path).federation.require_curation == REQUIRED
    path = write_aggregator_config(SimulationOptions(), tmp_path, 7450)
    assert load_config(path).federation.require_curation == ""


def test_a_flower_supernode_passes_its_curation_to_the_node() -> None:
    from node.flower import join_command

    command = join_command({"data": "/corpus", "work-dir": "/w", "curation": "/c.toml"}, "a:1")
    assert command[command.index("--curation") + 1] == "/c.toml"


@pytest.mark.slow
def test_a_simulation_with_curation_runs_and_every_node_joins_curated(tmp_path: Path) -> None:
    import json
    import sqlite3

    toml = tmp_path / "curation.toml"
    toml.write_text(CURATION_TOML)
    digest = load_curation_config(toml).sha256()
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "fedpt", "simulate", "--out", str(run), "--nodes", "2",
           "--rounds", "1", "--inner-steps", "2", "--micro-batch-size", "2", "--seq-len", "32",
           "--personalise-steps", "0", "--no-alone", "--curation", str(toml)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f'require_curation = "{digest}"' in (run / "aggregator.toml").read_text()
    with sqlite3.connect(run / "aggregator" / "fedpt.db") as db:
        rows = db.execute("SELECT capabilities_json FROM nodes").fetchall()
    curations = [json.loads(c)["curation"] for (c,) in rows]
    assert len(curations) == 2 and all(c["sha256"] == digest for c in curations)
    assert all(c["documents_kept"] > 0 for c in curations)
