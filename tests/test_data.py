"""The node's data pipeline: ingest → packed shards → deterministic batches."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from model.tokenizer import ByteTokenizer, train_bpe
from node import builtin_corpus, shards
from node.corpus import DataError, IngestReport, iter_documents, resolve_files
from node.shards import (
    MANIFEST_NAME,
    BatchSampler,
    TokenShards,
    get_batch,
    pack_shards,
    prepare_data,
)

ORGS = builtin_corpus.list_organisations()
DOCS = [f"document number {i}: " + "lorem ipsum dolor sit amet " * (i % 7 + 1) for i in range(40)]


def ingest(source: Path | str) -> tuple[list[str], IngestReport]:
    report = IngestReport()
    docs = list(iter_documents(resolve_files(str(source), report), report))
    return docs, report


def write_jsonl(path: Path, records: list, opener=open) -> None:
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def decode_split(split_dir: Path, tokenizer) -> list[str]:
    """The documents of one split, read back through the memory-mapped shards."""
    data = TokenShards(split_dir)
    tokens = np.concatenate([np.asarray(s) for s in data._shards] or [np.zeros(0, np.int64)])
    ends = np.flatnonzero(tokens == tokenizer.eos_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tokenizer.decode(tokens[s:e].tolist()) for s, e in zip(starts, ends, strict=True)]


# ----------------------------------------------------------------------------- ingest


def test_reads_every_supported_file_type(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("plain text")
    (tmp_path / "b.md").write_text("# markdown")
    (tmp_path / "c.py").write_text("print('code')")
    (tmp_path / "sub").mkdir()
    with gzip.open(tmp_path / "sub" / "d.txt.gz", "wt", encoding="utf-8") as f:
        f.write("gzipped text")
    write_jsonl(tmp_path / "e.jsonl", [{"text": "row one"}, {"text": "row two", "id": 2}])
    write_jsonl(tmp_path / "f.jsonl.gz", [{"text": "gz row"}], opener=gzip.open)
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD.txt").write_text("hidden")

    docs, report = ingest(tmp_path)

    assert docs == [
        "plain text",
        "# markdown",
        "print('code')",
        "row one",
        "row two",
        "gz row",
        "gzipped text",
    ]
    assert (report.files_seen, report.files_read, report.skipped) == (7, 6, 1)
    assert report.documents == 7 and report.errors == []
    assert report.summary() == "7 files, 7 documents, 0 duplicates dropped, 0 errors, 1 skipped"


def test_duplicates_and_blank_documents_are_dropped(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("same words")
    (tmp_path / "b.txt").write_text("same words")
    (tmp_path / "c.txt").write_text("  \n\t")
    write_jsonl(tmp_path / "d.jsonl", [{"text": "same words"}, {"text": ""}, {"text": "new"}])

    docs, report = ingest(tmp_path)

    assert docs == ["same words", "new"]
    assert report.duplicates == 2 and report.documents == 2 and report.errors == []


def test_bad_files_are_reported_and_good_ones_still_read(tmp_path: Path) -> None:
    (tmp_path / "bad_utf8.txt").write_bytes(b"ok \xff\xfe not utf-8")
    (tmp_path / "corrupt.txt.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    full = gzip.compress(b"a long enough text " * 50)
    (tmp_path / "truncated.md.gz").write_bytes(full[: len(full) // 2])
    write_jsonl(
        tmp_path / "rows.jsonl",
        [{"text": "good row"}, "{not json", {"body": "no text"}, {"text": 7}, "[1]"],
    )
    (tmp_path / "x.txt").mkdir()  # a directory with a document's name
    (tmp_path / "dangling.txt").symlink_to(tmp_path / "nowhere.txt")
    (tmp_path / "good.txt").write_text("good file")

    report = IngestReport()
    files = [*resolve_files(str(tmp_path), report), tmp_path / "x.txt"]
    docs = list(iter_documents(files, report))

    assert docs == ["good file", "good row"]
    reasons = {(Path(e.path).name, e.reason.split(" ")[0]) for e in report.errors}
    assert reasons == {
        ("bad_utf8.txt", "not"),
        ("corrupt.txt.gz", "corrupt"),
        ("truncated.md.gz", "corrupt"),
        ("rows.jsonl", "line"),
        ("x.txt", "is"),
        ("dangling.txt", "unreadable"),
    }
    assert sum(Path(e.path).name == "rows.jsonl" for e in report.errors) == 4
    assert len(report.errors) == 9
    assert report.files_read == 2  # good.txt and rows.jsonl (whose bad lines are only issues)


def test_unlistable_folder_is_reported(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / "a.txt").write_text("hidden by permissions")
    (tmp_path / "b.txt").write_text("readable")
    real_scandir = os.scandir

    def scandir(path):  # root ignores chmod, so deny the listing directly
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    docs, report = ingest(tmp_path)
    assert docs == ["readable"]
    assert [(Path(e.path).name, e.reason) for e in report.errors] == [
        ("locked", "unreadable folder (Permission denied)")
    ]


def test_many_bad_jsonl_lines_are_capped(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "rows.jsonl", ["nope"] * 25 + [json.dumps({"text": "kept"})])
    docs, report = ingest(tmp_path / "rows.jsonl")
    assert docs == ["kept"]
    assert len(report.errors) == 11 and "15 more" in report.errors[-1].reason


@pytest.mark.parametrize("make", ["missing", "empty", "only_unsupported", "bad_single_file"])
def test_sources_with_nothing_to_read_raise(tmp_path: Path, make: str) -> None:
    source = tmp_path / "src"
    if make == "empty":
        source.mkdir()
    elif make == "only_unsupported":
        source.mkdir()
        (source / "photo.jpg").write_bytes(b"")
    elif make == "bad_single_file":
        source = tmp_path / "table.csv"
        source.write_text("a,b")
    with pytest.raises(DataError, match=str(source)):
        resolve_files(str(source), IngestReport())


# ----------------------------------------------------------------------------- builtin corpus


def test_builtin_organisations_are_non_empty_and_disjoint() -> None:
    files = {org: set(builtin_corpus.organisation_files(org)) for org in ORGS}
    root = builtin_corpus.stdlib_root()
    for org, paths in files.items():
        assert paths, org
        assert all(p.is_relative_to(root) for p in paths)
        assert not any("__pycache__" in p.parts or "site-packages" in p.parts for p in paths)
    for a in ORGS:
        for b in ORGS:
            if a < b:
                assert not files[a] & files[b], (a, b)
    assert root / "LICENSE.txt" in files["docs"]
    assert not any(p.parent != root for p in files["core"])


def test_builtin_sources_resolve() -> None:
    report = IngestReport()
    web = resolve_files("builtin:web", report)
    assert web == builtin_corpus.organisation_files("web")
    assert report.files_seen == len(web)
    two = resolve_files("builtin:web, apps", IngestReport())
    assert len(two) == len(web) + len(builtin_corpus.organisation_files("apps"))
    every = resolve_files("builtin", IngestReport())
    assert len(every) == sum(len(builtin_corpus.organisation_files(o)) for o in ORGS)


def test_several_folders_and_files_are_one_comma_separated_source(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "one.txt").write_text("first document\n")
    (tmp_path / "b" / "two.md").write_text("second document\n")
    (tmp_path / "three.txt").write_text("third document\n")
    source = f"{tmp_path / 'a'}, {tmp_path / 'b'},{tmp_path / 'three.txt'},{tmp_path / 'a'}"
    files = resolve_files(source, IngestReport())
    assert files == [tmp_path / "a" / "one.txt", tmp_path / "b" / "two.md", tmp_path / "three.txt"]
    docs, _ = ingest(source)
    assert sorted(d.strip() for d in docs) == [
        "first document",
        "second document",
        "third document",
    ]
    with pytest.raises(DataError, match="does not exist"):
        resolve_files(f"{tmp_path / 'a'},{tmp_path / 'missing'}", IngestReport())
    # A folder whose own name has a comma is still one source.
    (tmp_path / "x,y").mkdir()
    (tmp_path / "x,y" / "four.txt").write_text("fourth\n")
    assert resolve_files(str(tmp_path / "x,y"), IngestReport()) == [tmp_path / "x,y" / "four.txt"]


def test_unknown_builtin_organisation_lists_valid_ones() -> None:
    with pytest.raises(DataError, match="valid ones are: apps, core"):
        resolve_files("builtin:nope", IngestReport())


def test_builtin_corpus_root_is_the_stdlib_not_the_venv() -> None:
    assert (builtin_corpus.stdlib_root() / "os.py").is_file()


# ----------------------------------------------------------------------------- packing


def test_pack_then_read_back(tmp_path: Path) -> None:
    tok = ByteTokenizer()
    manifests = pack_shards(DOCS, tok, tmp_path / "out", val_fraction=0.2, shard_tokens=500)

    train, val = decode_split(tmp_path / "out/train", tok), decode_split(tmp_path / "out/val", tok)
    assert sorted(train + val) == sorted(DOCS)
    assert train and val and not set(train) & set(val)
    assert manifests["train"]["documents"] == len(train)
    assert manifests["val"]["documents"] == len(val)
    assert manifests["train"]["dtype"] == "uint16"
    assert manifests["train"]["tokenizer"] == tok.spec()
    assert len(manifests["train"]["shards"]) > 1
    expected_tokens = sum(len(d.encode()) + 1 for d in train)
    data = TokenShards(tmp_path / "out/train", verify=True)
    assert data.num_tokens == manifests["train"]["tokens"] == expected_tokens
    assert data.num_documents == len(train)
    assert data.tokenizer_spec == tok.spec()
    assert not list(tmp_path.glob(".out*")), "temporary folders are cleaned up"


def test_split_is_deterministic(tmp_path: Path) -> None:
    tok = ByteTokenizer()
    first = pack_shards(DOCS, tok, tmp_path / "a", val_fraction=0.3, source="x")
    second = pack_shards(DOCS, tok, tmp_path / "b", val_fraction=0.3, source="x")
    assert first == second
    for split in ("train", "val"):
        assert (tmp_path / "a" / split / MANIFEST_NAME).read_bytes() == (
            tmp_path / "b" / split / MANIFEST_NAME
        ).read_bytes()
    assert decode_split(tmp_path / "a/val", tok) == decode_split(tmp_path / "b/val", tok)


@pytest.mark.parametrize("val_fraction", [0.0, 0.999])
def test_neither_split_is_empty_with_two_documents(tmp_path: Path, val_fraction: float) -> None:
    manifests = pack_shards(["one", "two"], ByteTokenizer(), tmp_path, val_fraction=val_fraction)
    assert manifests["train"]["documents"] == manifests["val"]["documents"] == 1


def test_repacking_replaces_the_old_shards(tmp_path: Path) -> None:
    tok = ByteTokenizer()
    pack_shards(DOCS, tok, tmp_path / "out", shard_tokens=100)
    pack_shards(DOCS[:2], tok, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out/train").iterdir()) == [
        MANIFEST_NAME,
        "shard_00000.bin",
    ]
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_a_failing_document_stream_leaves_nothing_behind(tmp_path: Path) -> None:
    def broken():
        yield "fine"
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        pack_shards(broken(), ByteTokenizer(), tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_no_documents_raises(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no documents"):
        pack_shards([], ByteTokenizer(), tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_truncated_shard_is_an_error(tmp_path: Path) -> None:
    pack_shards(DOCS, ByteTokenizer(), tmp_path)
    shard = tmp_path / "train" / "shard_00000.bin"
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(DataError, match=r"shard_00000\.bin"):
        TokenShards(tmp_path / "train")


def test_corrupt_shard_is_caught_by_verify(tmp_path: Path) -> None:
    pack_shards(DOCS, ByteTokenizer(), tmp_path)
    shard = tmp_path / "train" / "shard_00000.bin"
    raw = bytearray(shard.read_bytes())
    raw[0] ^= 1
    shard.write_bytes(bytes(raw))
    TokenShards(tmp_path / "train")  # same size: only a hash check can tell
    with pytest.raises(DataError, match="sha256"):
        TokenShards(tmp_path / "train", verify=True)


def test_missing_or_foreign_manifest_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no shard manifest"):
        TokenShards(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"format": "other/9"}))
    with pytest.raises(DataError, match=MANIFEST_NAME):
        TokenShards(tmp_path)


def test_bpe_tokenizer_packs_and_decodes(tmp_path: Path) -> None:
    texts = [f"the quick brown fox {i} jumps over the lazy dog ünïcødé" for i in range(30)]
    tok = train_bpe(iter(texts), 300, tmp_path / "bpe.json")
    manifests = pack_shards(texts, tok, tmp_path / "out", val_fraction=0.2)
    assert manifests["train"]["tokenizer"]["kind"] == "bpe"
    assert manifests["train"]["dtype"] == "uint16"
    decoded = decode_split(tmp_path / "out/train", tok) + decode_split(tmp_path / "out/val", tok)
    assert sorted(decoded) == sorted(texts)


# ----------------------------------------------------------------------------- sampling


def make_shards(tmp_path: Path, shard_tokens: int = 1000) -> TokenShards:
    pack_shards(DOCS, ByteTokenizer(), tmp_path, val_fraction=0.1, shard_tokens=shard_tokens)
    return TokenShards(tmp_path / "train")


def test_windows_stay_inside_shards(tmp_path: Path) -> None:
    data = make_shards(tmp_path, shard_tokens=100)
    sizes = [len(s) for s in data._shards]
    assert data.num_windows(9) == sum((n - 1) // 9 for n in sizes)
    first, second = data.window(0, 9), data.window(1, 9)
    assert first.dtype == np.int64 and first.shape == (10,)
    assert first[-1] == second[0]  # stride seq_len: consecutive windows share one token
    assert np.array_equal(data.window(11, 9), np.asarray(data._shards[1][:10]))
    with pytest.raises(IndexError):
        data.window(data.num_windows(9), 9)


def test_sampler_is_deterministic_and_covers_each_epoch() -> None:
    a, b = BatchSampler(37, seed=5), BatchSampler(37, seed=5)
    stream = a.indices(0, 37 * 3)
    assert np.array_equal(stream, b.indices(0, 37 * 3))
    for epoch in range(3):
        assert sorted(stream[epoch * 37 : (epoch + 1) * 37]) == list(range(37))
    assert not np.array_equal(stream[:37], stream[37:74])
    assert not np.array_equal(stream, BatchSampler(37, seed=6).indices(0, 37 * 3))


def test_sampler_calls_compose() -> None:
    sampler = BatchSampler(10, seed=1)
    pieces = [sampler.indices(start, 7) for start in range(3, 3 + 7 * 6, 7)]
    # a fresh sampler asked out of order must agree: positions, not history, decide
    assert np.array_equal(np.concatenate(pieces), BatchSampler(10, seed=1).indices(3, 42))
    assert np.array_equal(pieces[2], BatchSampler(10, seed=1).indices(17, 7))
    assert sampler.indices(5, 0).shape == (0,)


def test_sampler_needs_a_window() -> None:
    with pytest.raises(DataError, match="not enough tokens"):
        BatchSampler(0, seed=0)


def test_get_batch_shapes_and_shift(tmp_path: Path) -> None:
    data = make_shards(tmp_path)
    ids = BatchSampler(data.num_windows(16), seed=0).indices(0, 4)
    x, y = get_batch(data, ids, 16)
    assert x.shape == y.shape == (4, 16)
    assert x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y[0], torch.from_numpy(data.window(int(ids[0]), 16)[1:]))


# ----------------------------------------------------------------------------- prepare_data


def write_corpus(folder: Path) -> Path:
    folder.mkdir()
    for i, doc in enumerate(DOCS):
        (folder / f"doc{i:02d}.txt").write_text(doc)
    return folder


def test_prepare_data_packs_then_reuses_the_cache(tmp_path: Path, monkeypatch) -> None:
    corpus = write_corpus(tmp_path / "corpus")
    cache = tmp_path / "cache"
    out, report = prepare_data(str(corpus), ByteTokenizer(), cache)
    assert report is not None and report.documents == len(DOCS)
    assert TokenShards(out / "train").num_documents + TokenShards(out / "val").num_documents == 40
    mtime = (out / "train").stat().st_mtime_ns

    def must_not_read(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(shards, "iter_documents", must_not_read)
    again, cached_report = prepare_data(str(corpus), ByteTokenizer(), cache)
    assert again == out and (out / "train").stat().st_mtime_ns == mtime
    assert cached_report == report


def test_prepare_data_repacks_when_inputs_change(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus")
    cache = tmp_path / "cache"
    first, _ = prepare_data(str(corpus), ByteTokenizer(), cache)
    (corpus / "new.txt").write_text("a new document")
    second, report = prepare_data(str(corpus), ByteTokenizer(), cache)
    assert second != first and report is not None and report.documents == len(DOCS) + 1
    third, _ = prepare_data(str(corpus), ByteTokenizer(), cache, val_fraction=0.5)
    assert third not in (first, second)


def test_prepare_data_accepts_a_prepared_folder(tmp_path: Path) -> None:
    pack_shards(DOCS, ByteTokenizer(), tmp_path / "prepared")
    out, report = prepare_data(str(tmp_path / "prepared"), ByteTokenizer(), tmp_path / "cache")
    assert out == tmp_path / "prepared" and report is None
    other = train_bpe(iter(DOCS), 300, tmp_path / "bpe.json")
    with pytest.raises(DataError, match="tokenizer"):
        prepare_data(str(tmp_path / "prepared"), other, tmp_path / "cache")


def test_prepare_data_without_documents_raises_with_summary(tmp_path: Path) -> None:
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "blank.txt").write_text("   ")
    (tmp_path / "corpus" / "bad.txt").write_bytes(b"\xff")
    with pytest.raises(DataError, match=r"0 documents.*1 errors"):
        prepare_data(str(tmp_path / "corpus"), ByteTokenizer(), tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or os.listdir(tmp_path / "cache") == []
