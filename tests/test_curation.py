"""The curation stage: exact duplicates → PII → quality → near-duplicates, its report, and how
curated shards are cached, named in their manifests and asked for on the command line."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from model.tokenizer import ByteTokenizer
from node import shards
from node.corpus import DataError, IngestReport, iter_documents, resolve_files
from node.curation import CurationReport, curate, perplexity_cutoffs
from node.curation_config import (
    CurationConfig,
    NearDedupConfig,
    PerplexityConfig,
    PIIConfig,
    QualityConfig,
)
from node.local_training import curated_source
from node.parallel import DistEnv
from node.shards import (
    CURATION_REPORT_NAME,
    MANIFEST_NAME,
    TokenShards,
    load_curation_report,
    pack_shards,
    prepare_data,
    read_manifest,
    shard_curation,
)
from tests.test_cli import SMALL_RUN, fedpt

CONSONANTS, VOWELS = "klmnprstvz", "aeiou"
STOP_WORDS = ("the", "of", "and", "to", "with", "that")


def prose(seed: int, sentences: int = 10) -> str:
    """Varied pseudo-English: made-up words ending in vowels (never a hex digit's letter but
    'a'/'e' inside them, never an English word), stop words between them, one sentence a line."""
    rng = random.Random(seed)
    lines = []
    for _ in range(sentences):
        words = []
        for _ in range(rng.randint(10, 14)):
            if rng.random() < 0.25:
                words.append(rng.choice(STOP_WORDS))
            else:
                syllables = rng.randint(2, 3)
                words.append("".join(rng.choice(CONSONANTS) + rng.choice(VOWELS)
                                     for _ in range(syllables)))  # fmt: skip
        lines.append(" ".join(words).capitalize() + ".")
    return "\n".join(lines) + "\n"


def one_word_changed(text: str) -> str:
    words = text.split(" ")
    words[len(words) // 2] = "zozozo"
    return " ".join(words)


A, B, C = prose(1), prose(2), prose(3)
EMAIL, OTHER_EMAIL = "jane.doe@example.org", "bob.smith@example.net"
D = prose(4) + f"Write to {EMAIL} with the minutes of the meeting.\n"
JUNK = "$$$ 999 click !!!"
# In corpus order (files are read sorted by name). What each one meets:
CRAFTED = [
    A,  # kept
    B,  # kept
    C,  # kept
    D,  # kept, its address replaced
    A,  # exact duplicate of the first
    one_word_changed(A),  # near-duplicate of the first
    JUNK,  # quality filter
    JUNK,  # exact duplicate: removed before the quality filter sees it
    D.replace(EMAIL, OTHER_EMAIL),  # not exact, identical once scrubbed: a near-duplicate
]
KEPT = [A, B, C, D.replace(EMAIL, "<EMAIL>")]


def write_crafted(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for i, doc in enumerate(CRAFTED):
        (folder / f"{i:02d}.txt").write_text(doc)
    return folder


def distinctive_words() -> set[str]:
    """Words of the crafted documents no report key or hex digest can contain."""
    words = {w.strip(".") for doc in CRAFTED for w in doc.split() if len(w.strip(".")) >= 6}
    return {w.lower() for w in words} | {EMAIL, OTHER_EMAIL, "click"}


def decoded_documents(prepared: Path) -> list[str]:
    """Every packed document back as text (both splits; byte tokens, EOS between them)."""
    docs = []
    for split in ("train", "val"):
        folder = prepared / split
        files = [folder / s["file"] for s in read_manifest(folder)["shards"]]
        tokens = np.concatenate([np.fromfile(f, dtype="<u2") for f in files]).tolist()
        while tokens:
            end = tokens.index(ByteTokenizer.eos_id)
            docs.append(ByteTokenizer().decode(tokens[:end]))
            tokens = tokens[end + 1 :]
    return docs


# ----------------------------------------------------------------------------- the pipeline


def test_stages_run_in_order_and_count_what_they_remove() -> None:
    report = CurationReport()
    kept = list(curate(iter(CRAFTED), CurationConfig(), report, tokenizer=ByteTokenizer()))
    assert kept == KEPT
    assert report.documents_in == len(CRAFTED) and report.documents_kept == len(KEPT)
    counts = report.counts()
    (quality_key,) = [k for k in counts["removed"] if k.startswith("quality.")]
    assert counts["removed"] == {"exact_dedup": 2, quality_key: 1, "near_dedup": 2}
    assert report.removed_by_stage() == {"exact_dedup": 2, "quality": 1, "near_dedup": 2,
                                         "perplexity": 0}  # fmt: skip
    # PII runs before the near-duplicate index, so the second address was replaced too.
    assert report.pii_replaced == {"emails": 2} and report.pii_documents == 2
    exact = report.removed["exact_dedup"]
    assert exact.characters == len(A) + len(JUNK)
    assert exact.tokens == len(A.encode()) + len(JUNK.encode())
    assert report.sha256 == CurationConfig().sha256()
    summary = report.summary()
    assert summary.startswith(f"curation {report.sha256[:12]}…: 9 documents in, 4 kept")
    assert "exact_dedup 2" in summary and "near_dedup 2" in summary and "2 PII replaced" in summary


def test_each_stage_can_be_switched_off() -> None:
    off = CurationConfig(
        exact_dedup=False,
        pii=PIIConfig(enabled=False),
        quality=QualityConfig(enabled=False),
        near_dedup=NearDedupConfig(enabled=False),
    )
    report = CurationReport()
    assert list(curate(CRAFTED, off, report)) == CRAFTED
    assert report.removed == {} and report.pii_replaced == {}
    assert report.sha256 != CurationConfig().sha256()


def test_the_report_keeps_examples_and_clusters_but_counts_hold_no_text() -> None:
    report = CurationReport()
    list(curate(CRAFTED, CurationConfig(), report))
    raw = report.to_json()
    assert raw["examples"]["exact_dedup"] == [A[:300], JUNK]
    assert raw["examples"]["near_dedup"][0] == one_word_changed(A)[:300]
    clusters = raw["near_duplicate_clusters"]
    assert clusters["total"] == 2
    assert clusters["shown"][0] == {"kept": A[:120], "dropped": [one_word_changed(A)[:120]],
                                    "count": 1}  # fmt: skip
    # The scrubbed text, never the address, even in the local report.
    assert EMAIL not in json.dumps(raw) and OTHER_EMAIL not in json.dumps(raw)
    assert CurationReport.from_json(json.loads(json.dumps(raw))) == report
    leaving = json.dumps(report.counts())
    assert set(report.counts()) == {"sha256", "documents_in", "documents_kept", "removed"}
    assert not [w for w in distinctive_words() if w in leaving]


def test_spool_files_are_removed_when_the_stream_ends_or_fails(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    list(curate(CRAFTED, CurationConfig(), CurationReport(), spool_dir=spool))
    assert list(spool.iterdir()) == []

    def failing():
        yield from CRAFTED[:3]
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(curate(failing(), CurationConfig(), CurationReport(), spool_dir=spool))
    assert list(spool.iterdir()) == []


def test_perplexity_cutoffs_are_quantiles_of_the_scorable_losses() -> None:
    losses = np.array([5.0, 1.0, 4.0, np.inf, 2.0, 3.0])
    config = PerplexityConfig(drop_low_quantile=0.25, drop_high_quantile=0.25)
    low, high = perplexity_cutoffs(losses, config)
    # Over [1, 2, 3, 4, 5], linear: 25 % → 2.0, 75 % → 4.0.
    assert (low, high) == (2.0, 4.0)
    assert perplexity_cutoffs(losses, PerplexityConfig(drop_high_quantile=0.0)) == (None, None)
    assert perplexity_cutoffs(np.array([np.inf]), config) == (None, None)


def reference_model(path: Path, seed: int) -> Path:
    """A randomly initialised tiny model saved as a weights file: a real reference model."""
    import torch

    from model.config import preset
    from model.gpt import GPT
    from model.io import save_model

    torch.manual_seed(seed)
    save_model(GPT(preset("tiny")), path, tokenizer_spec=ByteTokenizer().spec())
    return path


def test_perplexity_filtering_drops_what_the_reference_model_finds_least_likely(
    tmp_path: Path,
) -> None:
    import torch

    from node.local_training import open_model

    weights = reference_model(tmp_path / "ref.safetensors", seed=0)
    docs = [prose(i, sentences=2) for i in range(8)]
    # Recomputed here, not by the scorer: each document fits one window of the model.
    model, tokenizer, _ = open_model(weights, None, torch.device("cpu"))
    losses = []
    with torch.no_grad():
        for ids in tokenizer.encode_batch(docs):
            tokens = torch.tensor(ids)[None]
            losses.append(float(model(tokens[:, :-1], tokens[:, 1:])[1]))
    least_likely = set(np.argsort(losses)[-2:])  # the top quarter of 8
    off = {"exact_dedup": False, "pii": PIIConfig(enabled=False),
           "quality": QualityConfig(enabled=False), "near_dedup": NearDedupConfig(enabled=False)}  # fmt: skip
    config = CurationConfig(**off, perplexity=PerplexityConfig(
        enabled=True, model=str(weights), drop_high_quantile=0.25))  # fmt: skip
    report = CurationReport()
    kept = list(curate(docs, config, report))
    assert kept == [d for i, d in enumerate(docs) if i not in least_likely]  # in corpus order
    assert report.counts()["removed"] == {"perplexity.high": 2}

    # The hash names the model's content, not its path.
    copy = tmp_path / "elsewhere.safetensors"
    copy.write_bytes(weights.read_bytes())
    other = reference_model(tmp_path / "other.safetensors", seed=1)
    hashes = {}
    for name, path in (("same", weights), ("copy", copy), ("other", other)):
        again = CurationConfig(**off, perplexity=PerplexityConfig(
            enabled=True, model=str(path), drop_high_quantile=0.25))  # fmt: skip
        hashes[name] = CurationReport()
        list(curate(docs, again, hashes[name]))
    assert hashes["same"].sha256 == hashes["copy"].sha256 == report.sha256
    assert hashes["other"].sha256 != report.sha256


# ----------------------------------------------------------------------------- shards


def test_curated_shards_are_deterministic(tmp_path: Path) -> None:
    corpus = write_crafted(tmp_path / "corpus")
    first, _ = prepare_data(
        str(corpus), ByteTokenizer(), tmp_path / "cache1", curation=CurationConfig()
    )
    second, _ = prepare_data(
        str(corpus), ByteTokenizer(), tmp_path / "cache2", curation=CurationConfig()
    )
    assert first.name == second.name
    files = sorted(f.relative_to(first) for f in first.rglob("*") if f.is_file())
    assert CURATION_REPORT_NAME in map(str, files) and len(files) > 3
    for f in files:
        assert (first / f).read_bytes() == (second / f).read_bytes(), f
    assert shard_curation(first)["sha256"] == CurationConfig().sha256()


def test_prepare_data_curates_scrubs_and_writes_the_manifest_entry(tmp_path: Path) -> None:
    corpus = write_crafted(tmp_path / "corpus")
    out, ingest = prepare_data(str(corpus), ByteTokenizer(), tmp_path / "cache",
                               curation=CurationConfig())  # fmt: skip
    # Curation owns exact deduplication: the reader let the duplicates through to it.
    assert ingest is not None and ingest.duplicates == 0 and ingest.documents == len(CRAFTED)
    assert sorted(decoded_documents(out)) == sorted(KEPT)
    packed = "".join(decoded_documents(out))
    assert "<EMAIL>" in packed and EMAIL not in packed
    entry = shard_curation(out)
    report = load_curation_report(out)
    assert report is not None and entry == report.counts()
    assert entry["documents_in"] == 9 and entry["documents_kept"] == 4
    assert sum(entry["removed"].values()) == 5
    for split in ("train", "val"):
        manifest_text = (out / split / MANIFEST_NAME).read_text()
        assert json.loads(manifest_text)["curation"] == entry
        assert not [w for w in distinctive_words() if w in manifest_text]
    assert report.examples["exact_dedup"] and report.clusters


def test_the_cache_keeps_curated_and_uncurated_shards_apart(tmp_path: Path, monkeypatch) -> None:
    corpus = write_crafted(tmp_path / "corpus")
    cache = tmp_path / "cache"
    plain, _ = prepare_data(str(corpus), ByteTokenizer(), cache)
    curated, _ = prepare_data(str(corpus), ByteTokenizer(), cache, curation=CurationConfig())
    no_quality = CurationConfig(quality=QualityConfig(enabled=False))
    other, _ = prepare_data(str(corpus), ByteTokenizer(), cache, curation=no_quality)
    assert len({plain, curated, other}) == 3
    assert shard_curation(plain) is None and load_curation_report(plain) is None
    assert json.loads((plain / "train" / MANIFEST_NAME).read_text())["curation"] is None
    assert (
        shard_curation(other)["sha256"] == no_quality.sha256() != shard_curation(curated)["sha256"]
    )

    def must_not_curate(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(shards, "curate", must_not_curate)
    again, report = prepare_data(str(corpus), ByteTokenizer(), cache, curation=CurationConfig())
    assert again == curated and report is not None and report.documents == len(CRAFTED)


def test_a_prepared_folder_must_match_the_curation_asked_for(tmp_path: Path) -> None:
    corpus = write_crafted(tmp_path / "corpus")
    curated, _ = prepare_data(
        str(corpus), ByteTokenizer(), tmp_path / "cache", curation=CurationConfig()
    )
    assert (
        prepare_data(str(curated), ByteTokenizer(), tmp_path / "c", curation=CurationConfig())[0]
        == curated
    )
    assert prepare_data(str(curated), ByteTokenizer(), tmp_path / "c")[0] == curated
    with pytest.raises(DataError, match="curate from the raw text") as info:
        prepare_data(str(curated), ByteTokenizer(), tmp_path / "c",
                     curation=CurationConfig(exact_dedup=False))  # fmt: skip
    assert "\n" not in str(info.value)
    pack_shards(CRAFTED, ByteTokenizer(), tmp_path / "plain")
    with pytest.raises(DataError, match="not curated"):
        prepare_data(
            str(tmp_path / "plain"), ByteTokenizer(), tmp_path / "c", curation=CurationConfig()
        )


def test_manifests_from_before_curation_read_as_not_curated(tmp_path: Path) -> None:
    pack_shards(CRAFTED, ByteTokenizer(), tmp_path / "old")
    path = tmp_path / "old" / "train" / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    del manifest["curation"]
    path.write_text(json.dumps(manifest))
    assert shard_curation(tmp_path / "old") is None
    TokenShards(tmp_path / "old" / "train")  # still readable


def test_curation_that_keeps_nothing_says_so(tmp_path: Path) -> None:
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "junk.txt").write_text(JUNK)
    with pytest.raises(DataError, match="curation kept no documents"):
        prepare_data(str(tmp_path / "corpus"), ByteTokenizer(), tmp_path / "cache",
                     curation=CurationConfig())  # fmt: skip


def test_uncurated_reading_still_drops_exact_duplicates(tmp_path: Path) -> None:
    report = IngestReport()
    files = resolve_files(str(write_crafted(tmp_path / "corpus")), report)
    assert len(list(iter_documents(files, report))) == len(CRAFTED) - 2
    assert report.duplicates == 2


def test_a_node_reads_its_curated_shards(tmp_path: Path) -> None:
    corpus = write_crafted(tmp_path / "corpus")
    lines: list[str] = []
    source = curated_source(str(corpus), CurationConfig(), ByteTokenizer(), DistEnv(), lines.append)
    assert shard_curation(Path(source))["documents_kept"] == 4
    assert any(line.startswith("curation ") for line in lines)
    assert curated_source(str(corpus), None, ByteTokenizer(), DistEnv(), lines.append) == str(
        corpus
    )


# ----------------------------------------------------------------------------- command line


def test_data_prepare_with_curation(tmp_path: Path) -> None:
    corpus = write_crafted(tmp_path / "corpus")
    (tmp_path / "curation.toml").write_text(
        "[curation]\nexact_dedup = true\n[curation.quality]\nmin_words = 50\n"
    )
    proc = fedpt("data", "prepare", "--data", corpus, "--out", tmp_path / "out",
                 "--curation", tmp_path / "curation.toml")  # fmt: skip
    assert "9 documents in, 4 kept" in proc.stdout
    assert f"curation report: {tmp_path / 'out' / CURATION_REPORT_NAME}" in proc.stdout
    assert shard_curation(tmp_path / "out")["documents_kept"] == 4
    assert (tmp_path / "out" / CURATION_REPORT_NAME).is_file()
    plain = fedpt("data", "prepare", "--data", corpus, "--out", tmp_path / "plain")
    assert "curation" not in plain.stdout and shard_curation(tmp_path / "plain") is None


BAD_CURATION = [
    ("[curation]\nbogus = 1\n", "bogus"),
    ("[curation.quality]\nmin_words_x = 3\n", "min_words_x"),
    ("[curation.near_dedup]\nthreshold = 2.0\n", "near_dedup.threshold"),
    ("[curation]\nexact_dedup = 'yes'\n", "exact_dedup"),
    ("[curation\n", "cannot read"),
    (None, "cannot read"),  # no such file
]


def bad_curation(tmp_path: Path, toml: str | None) -> Path:
    path = tmp_path / "curation.toml"
    if toml is not None:
        path.write_text(toml)
    return path


def assert_one_error_line(proc, message: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedpt: error:"), proc.stderr
    assert message in lines[0]


@pytest.mark.parametrize("toml,message", BAD_CURATION)
def test_bad_curation_is_one_line(tmp_path: Path, toml: str | None, message: str) -> None:
    corpus = write_crafted(tmp_path / "corpus")
    proc = fedpt("data", "prepare", "--data", corpus, "--out", tmp_path / "out",
                 "--curation", bad_curation(tmp_path, toml), check=False)  # fmt: skip
    assert_one_error_line(proc, message)
    assert not (tmp_path / "out").exists()


def test_train_and_join_refuse_bad_curation_before_starting(tmp_path: Path) -> None:
    corpus = write_crafted(tmp_path / "corpus")
    path = bad_curation(tmp_path, "[curation.quality]\nmin_words = -1\n")
    proc = fedpt("train", "--data", corpus, "--out", tmp_path / "run", *SMALL_RUN,
                 "--curation", path, check=False)  # fmt: skip
    assert_one_error_line(proc, "quality.min_words")
    assert not (tmp_path / "run").exists()
    # Refused before dialling the aggregator (nothing listens on port 1).
    proc = fedpt("node", "join", "--data", corpus, "--insecure", "--aggregator", "127.0.0.1:1",
                 "--curation", path, check=False)  # fmt: skip
    assert_one_error_line(proc, "quality.min_words")


def test_train_with_curation(tmp_path: Path) -> None:
    corpus = write_crafted(tmp_path / "corpus")
    (tmp_path / "curation.toml").write_text("[curation]\n")
    proc = fedpt("train", "--data", corpus, "--out", tmp_path / "run", "--curation",
                 tmp_path / "curation.toml", *SMALL_RUN, "--steps", "2")  # fmt: skip
    assert "9 documents in, 4 kept" in proc.stdout


def test_without_the_curation_extra_it_is_one_line(tmp_path: Path) -> None:
    corpus = write_crafted(tmp_path / "corpus")
    hidden = tmp_path / "site" / "datatrove"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('no datatrove here')\n")
    (tmp_path / "curation.toml").write_text("[curation]\n")
    proc = fedpt("data", "prepare", "--data", corpus, "--out", tmp_path / "out", "--curation",
                 tmp_path / "curation.toml", check=False,
                 env={"PYTHONPATH": str(tmp_path / "site")})  # fmt: skip
    assert_one_error_line(proc, "fedpt[curation]")
    assert not (tmp_path / "out").exists()
