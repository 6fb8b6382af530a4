"""The curation stage between reading a node's documents and packing them into token shards.

    documents ─► exact duplicates ─► PII placeholders ─► quality filters ─► near-duplicates
              ─► perplexity (two passes: score and spool, then cut at quantiles) ─► shards

Each stage runs only when its `[curation]` section enables it (node/curation_config.py). The
stream is never held in memory: what grows with the corpus is the exact-duplicate digests (32
bytes a document), the near-duplicate index, and with perplexity filtering one float a
document (the losses the quantiles are taken over) while the survivors wait in a spool file.

The `CurationReport` says what went and why. Its full form, with the first characters of
removed documents, stays on the node; only `counts()` (the configuration's sha256 and integer
counts) may leave it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np

from node.corpus import batched
from node.curation_config import CurationConfig, NearDedupConfig, PerplexityConfig

STAGES = ("exact_dedup", "quality", "near_dedup", "perplexity")  # those that remove documents
MAX_EXAMPLES = 3  # removed documents shown per stage or reason
EXAMPLE_CHARS = 300
MAX_CLUSTERS = 20  # near-duplicate clusters shown
MAX_CLUSTER_DROPPED = 5  # dropped documents shown per cluster
CLUSTER_CHARS = 120
QUANTILE_METHOD = "linear"  # np.quantile's method for the perplexity cut-offs (fixed: reproducible)
# Documents scored per call of the reference model; bounds what waits in memory.
_SCORE_BATCH_DOCS = 64
_SCORE_BATCH_CHARS = 1 << 20


@dataclass
class Removed:
    documents: int = 0
    characters: int = 0
    tokens: int | None = None  # counted only when curate() was given the corpus's tokenizer


@dataclass
class CurationReport:
    sha256: str = ""  # the configuration's (CurationConfig.sha256)
    documents_in: int = 0
    documents_kept: int = 0
    # "exact_dedup", "quality.<reason>", "near_dedup", "perplexity.low" / "perplexity.high"
    removed: dict[str, Removed] = field(default_factory=dict)
    pii_replaced: dict[str, int] = field(default_factory=dict)  # placeholders per kind
    pii_documents: int = 0  # documents with at least one placeholder
    examples: dict[str, list[str]] = field(default_factory=dict)  # first characters, local only
    clusters: list[dict] = field(default_factory=list)  # {"kept", "dropped", "count"}
    cluster_count: int = 0  # all near-duplicate clusters, shown or not
    perplexity: dict | None = None  # model sha256, quantile method, cut-offs, documents scored

    def counts(self) -> dict:
        """What may leave the node (the shard manifests' "curation" entry): no text."""
        return {"sha256": self.sha256, "documents_in": self.documents_in,
                "documents_kept": self.documents_kept,
                "removed": {key: r.documents for key, r in self.removed.items()}}  # fmt: skip

    def removed_by_stage(self) -> dict[str, int]:
        totals = dict.fromkeys(STAGES, 0)
        for key, r in self.removed.items():
            totals[key.partition(".")[0]] += r.documents
        return totals

    def summary(self) -> str:
        """One line, e.g. "curation 3f2a…: 1000 documents in, 870 kept; removed: exact_dedup
        20, quality 80 (word_count 50, stop_words 30), near_dedup 25; 12 PII replaced"."""
        parts = []
        for stage, total in self.removed_by_stage().items():
            if total == 0:
                continue
            reasons = [f"{key.partition('.')[2]} {r.documents}" for key, r in self.removed.items()
                       if key.startswith(stage + ".")]  # fmt: skip
            parts.append(f"{stage} {total}" + (f" ({', '.join(reasons)})" if reasons else ""))
        return (f"curation {self.sha256[:12]}…: {self.documents_in} documents in, "
                f"{self.documents_kept} kept; removed: {', '.join(parts) or 'none'}; "
                f"{sum(self.pii_replaced.values())} PII replaced")  # fmt: skip

    def to_json(self) -> dict:
        return {
            "sha256": self.sha256,
            "documents_in": self.documents_in,
            "documents_kept": self.documents_kept,
            "removed": {key: _removed_json(r) for key, r in self.removed.items()},
            "pii_replaced": self.pii_replaced,
            "pii_documents": self.pii_documents,
            "examples": self.examples,
            "near_duplicate_clusters": {"total": self.cluster_count, "shown": self.clusters},
            "perplexity": self.perplexity,
        }

    @classmethod
    def from_json(cls, raw: dict) -> CurationReport:
        clusters = raw["near_duplicate_clusters"]
        return cls(sha256=raw["sha256"], documents_in=raw["documents_in"],
                   documents_kept=raw["documents_kept"],
                   removed={k: Removed(**v) for k, v in raw["removed"].items()},
                   pii_replaced=raw["pii_replaced"], pii_documents=raw["pii_documents"],
                   examples=raw["examples"], clusters=clusters["shown"],
                   cluster_count=clusters["total"], perplexity=raw["perplexity"])  # fmt: skip


def _removed_json(r: Removed) -> dict:
    out = {"documents": r.documents, "characters": r.characters}
    return out if r.tokens is None else {**out, "tokens": r.tokens}


def open_scorer(config: CurationConfig, tokenizer=None):
    """The reference model's scorer when perplexity filtering is on, else None."""
    if not config.perplexity.enabled:
        return None
    from node.perplexity_filter import PerplexityScorer  # torch and the reference model

    return PerplexityScorer(config.perplexity, tokenizer)


def curation_sha256(config: CurationConfig, scorer=None) -> str:
    """The configuration's sha256; with perplexity filtering it covers the reference model's
    content, read from `scorer` when one is open, else hashed without loading the model."""
    if scorer is not None:
        return config.sha256(scorer.model_sha256)
    if not config.perplexity.enabled:
        return config.sha256()
    from node.perplexity_filter import reference_sha256

    return config.sha256(reference_sha256(config.perplexity))


def curate(
    documents: Iterable[str],
    config: CurationConfig,
    report: CurationReport,
    *,
    tokenizer=None,
    spool_dir: Path | None = None,
) -> Iterator[str]:
    """The documents `config` keeps, rewritten (PII placeholders), in corpus order; `report`
    is filled in as they stream past and complete once the stream is exhausted. `tokenizer`
    counts the tokens of removed documents. Spool files live in a temporary folder inside
    `spool_dir` (default: the system's), removed when the stream ends, fails or is closed."""
    scorer = open_scorer(config, tokenizer)  # None without perplexity filtering
    report.sha256 = curation_sha256(config, scorer)
    removals = _Removals(report, tokenizer)
    with contextlib.ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fedpt-curation-",
                                                                      dir=spool_dir)))  # fmt: skip
        near = None
        if config.near_dedup.enabled:
            near = stack.enter_context(_NearDedup(config.near_dedup, folder, report, removals))
        kept = _filtered(documents, config, report, removals, near)
        if scorer is not None:
            kept = _perplexity_filtered(kept, config.perplexity, scorer, folder, report, removals)
        for text in kept:
            report.documents_kept += 1
            yield text


class _Removals:
    """Counts what a stage removed, and keeps the first few examples of each reason."""

    def __init__(self, report: CurationReport, tokenizer) -> None:
        self.report, self.tokenizer = report, tokenizer
        self.redact = lambda text: text  # for examples removed before the PII stage

    def drop(self, key: str, text: str, *, before_pii: bool = False) -> None:
        removed = self.report.removed.setdefault(key, Removed())
        removed.documents += 1
        removed.characters += len(text)
        if self.tokenizer is not None:
            removed.tokens = (removed.tokens or 0) + len(self.tokenizer.encode(text))
        examples = self.report.examples.setdefault(key, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append((self.redact(text) if before_pii else text)[:EXAMPLE_CHARS])


def _filtered(
    documents: Iterable[str],
    config: CurationConfig,
    report: CurationReport,
    removals: _Removals,
    near: _NearDedup | None,
) -> Iterator[str]:
    """The streaming stages, in order: exact duplicates, PII, quality, near-duplicates."""
    seen: set[bytes] = set()
    scrubber = quality = None
    # Imported only when enabled: the quality filters need the optional `curation` extra.
    if config.pii.enabled:
        from node.pii import PIIScrubber

        scrubber = PIIScrubber(config.pii)
        removals.redact = lambda text: scrubber.scrub(text)[0]
    if config.quality.enabled:
        from node.quality import QualityFilter

        quality = QualityFilter(config.quality)
    for text in documents:
        report.documents_in += 1
        if config.exact_dedup:
            digest = hashlib.sha256(text.encode("utf-8")).digest()
            if digest in seen:
                removals.drop("exact_dedup", text, before_pii=True)
                continue
            seen.add(digest)
        if scrubber is not None:
            text, replaced = scrubber.scrub(text)
            _add_pii(report, replaced)
        if quality is not None and (reason := quality.reason(text)) is not None:
            removals.drop(f"quality.{reason}", text)
            continue
        if near is not None and near.is_duplicate(text):
            continue
        yield text
    if near is not None:
        near.finish()


def _add_pii(report: CurationReport, replaced: dict[str, int]) -> None:
    if any(replaced.values()):
        report.pii_documents += 1
    for kind, n in replaced.items():
        if n:
            report.pii_replaced[kind] = report.pii_replaced.get(kind, 0) + n


class _NearDedup:
    """node/near_dedup.py's index, plus the report's cluster examples. A kept document's first
    characters wait in a file (one offset each in memory) until a later one repeats it."""

    def __init__(
        self, config: NearDedupConfig, folder: Path, report: CurationReport, removals: _Removals
    ) -> None:
        from node.near_dedup import NearDuplicates

        self.index = NearDuplicates(config)
        self.report, self.removals = report, removals
        self.prefixes = _Prefixes(folder / "near_dedup_prefixes.bin")
        self.shown: dict[int, dict] = {}  # kept document id -> its entry in report.clusters

    def __enter__(self) -> _NearDedup:
        return self

    def __exit__(self, *exc) -> None:
        self.prefixes.close()

    def is_duplicate(self, text: str) -> bool:
        doc_id = len(self.prefixes)
        kept = self.index.check(doc_id, text)
        self.prefixes.append(text[:CLUSTER_CHARS] if kept is None else "")
        if kept is None:
            return False
        self.removals.drop("near_dedup", text)
        cluster = self.shown.get(kept)
        if cluster is None and len(self.shown) < MAX_CLUSTERS:
            cluster = {"kept": self.prefixes.read(kept), "dropped": [], "count": 0}
            self.shown[kept] = cluster
            self.report.clusters.append(cluster)
        if cluster is not None:
            cluster["count"] += 1
            if len(cluster["dropped"]) < MAX_CLUSTER_DROPPED:
                cluster["dropped"].append(text[:CLUSTER_CHARS])
        return True

    def finish(self) -> None:
        self.report.cluster_count = sum(1 for dropped in self.index.clusters().values() if dropped)


class _Prefixes:
    """Append-only strings on disk, read back by their index."""

    def __init__(self, path: Path) -> None:
        self.file: IO[bytes] = open(path, "w+b")  # noqa: SIM115 (closed by close())
        self.offsets = array("Q", [0])

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def append(self, text: str) -> None:
        data = text.encode("utf-8")
        self.file.write(data)
        self.offsets.append(self.offsets[-1] + len(data))

    def read(self, index: int) -> str:
        start, stop = self.offsets[index], self.offsets[index + 1]
        self.file.seek(start)
        data = self.file.read(stop - start)
        self.file.seek(0, 2)  # appends continue at the end
        return data.decode("utf-8")

    def close(self) -> None:
        self.file.close()


def _perplexity_filtered(
    documents: Iterable[str],
    config: PerplexityConfig,
    scorer,
    folder: Path,
    report: CurationReport,
    removals: _Removals,
) -> Iterator[str]:
    """Pass 1 scores every survivor and spools it with its loss; pass 2 keeps, in corpus
    order, those inside the quantile cut-offs taken over all of them."""
    spool = folder / "perplexity_spool.jsonl"
    losses = array("d")
    with open(spool, "w", encoding="utf-8") as out:
        for batch in batched(documents, _SCORE_BATCH_DOCS, _SCORE_BATCH_CHARS):
            for text, loss in zip(batch, scorer.losses(batch), strict=True):
                losses.append(loss)
                out.write(json.dumps({"loss": loss, "text": text}) + "\n")
    low, high = perplexity_cutoffs(np.frombuffer(losses, dtype=np.float64), config)
    report.perplexity = {"model_sha256": scorer.model_sha256, "method": QUANTILE_METHOD,
                         "low": low, "high": high, "scored": len(losses)}  # fmt: skip
    with open(spool, encoding="utf-8") as spooled:
        for line in spooled:
            record = json.loads(line)
            loss, text = record["loss"], record["text"]
            if low is not None and loss < low:
                removals.drop("perplexity.low", text)
            elif high is not None and not loss <= high:  # unscorable (inf) is above any cut
                removals.drop("perplexity.high", text)
            else:
                yield text


def perplexity_cutoffs(
    losses: np.ndarray, config: PerplexityConfig
) -> tuple[float | None, float | None]:
    """The losses below which (low) and above which (high) documents are dropped, taken over
    the scorable documents; None where that side drops nothing."""
    finite = losses[np.isfinite(losses)]
    if finite.size == 0:
        return None, None
    low = high = None
    if config.drop_low_quantile > 0:
        low = float(np.quantile(finite, config.drop_low_quantile, method=QUANTILE_METHOD))
    if config.drop_high_quantile > 0:
        high = float(np.quantile(finite, 1.0 - config.drop_high_quantile, method=QUANTILE_METHOD))
    return low, high
