"""What a node's curation stage does to its corpus, as a TOML `[curation]` table, and the hash
that names it.

    [curation]
    exact_dedup = true
    [curation.pii]          # placeholders for e-mail addresses, phones, IPs, cards, keys
    enabled = true
    [curation.quality]      # heuristic filters of large web corpora (Gopher, C4, FineWeb)
    enabled = true
    min_words = 50
    [curation.near_dedup]   # MinHash LSH over word shingles, across the whole corpus
    enabled = true
    [curation.perplexity]   # a reference model's least/most likely documents, by quantile
    enabled = false

Every key has a default; unknown tables and keys, and values of the wrong type or range, are a
`CurationConfigError` that names them. Two nodes that ran the same configuration with the same
curation code have the same `curation_sha256`: the federation can require it at Join without
seeing any data (only the hash and counts leave a node).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from model.config import dataclass_from_dict

# Bump when the curation code changes what it keeps or how it rewrites text: the same
# configuration then names different shards, and so gets a different hash.
CURATION_CODE_VERSION = "fedpt-curation/1"


class CurationConfigError(ValueError):
    """A curation setting is unknown or out of range; the message names it."""


@dataclass(frozen=True)
class PIIConfig:
    """Personal data replaced by placeholders (<EMAIL>, <PHONE>, <IP_ADDRESS>, <CREDIT_CARD>,
    <API_KEY>, <PRIVATE_KEY>) before anything else looks at the text."""

    enabled: bool = True
    emails: bool = True
    phone_numbers: bool = True
    ip_addresses: bool = True
    credit_cards: bool = True  # 13-19 digit numbers that pass the Luhn check
    api_keys: bool = True  # well-known token formats (cloud, code hosting, chat, payment)
    private_keys: bool = True  # PEM "-----BEGIN ... PRIVATE KEY-----" blocks


@dataclass(frozen=True)
class QualityConfig:
    """Heuristic document filters; thresholds as in Gopher (Rae et al. 2021), C4 and FineWeb."""

    enabled: bool = True
    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_symbol_word_ratio: float = 0.1  # '#' and '...' per word
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    min_alpha_words_ratio: float = 0.8  # words with at least one letter
    min_stop_words: int = 2  # of the, be, to, of, and, that, have, with
    max_digit_ratio: float = 0.25  # digits among all characters
    max_duplicate_line_fraction: float = 0.3  # lines that repeat an earlier line
    max_duplicate_line_char_fraction: float = 0.2
    max_top_2gram_fraction: float = 0.2  # characters in the most frequent word 2-gram
    max_top_3gram_fraction: float = 0.18
    max_top_4gram_fraction: float = 0.16
    max_duplicate_5gram_fraction: float = 0.15  # characters in word 5-grams seen before
    max_duplicate_10gram_fraction: float = 0.1
    min_lines_ending_punctuation: float = 0.12  # share of lines that end a sentence


@dataclass(frozen=True)
class NearDedupConfig:
    """MinHash LSH: `bands` × `rows_per_band` hashes per document over word `shingle_words`-grams;
    a document whose estimated Jaccard similarity to an earlier kept one reaches `threshold` in
    a shared band is dropped (the first of each cluster is kept)."""

    enabled: bool = True
    shingle_words: int = 5
    bands: int = 14
    rows_per_band: int = 8
    threshold: float = 0.8
    seed: int = 1


@dataclass(frozen=True)
class PerplexityConfig:
    """Score every surviving document with a reference model (`model`: any weights a
    `--checkpoint` names, e.g. the federation's current global model) and drop the fraction
    `drop_low_quantile` it finds most likely (lowest loss: boilerplate) and
    `drop_high_quantile` it finds least likely (highest loss: noise)."""

    enabled: bool = False
    model: str = ""
    drop_low_quantile: float = 0.0
    drop_high_quantile: float = 0.1
    max_tokens_per_document: int = 1024  # scored: the document's first this many tokens


@dataclass(frozen=True)
class CurationConfig:
    exact_dedup: bool = True
    pii: PIIConfig = field(default_factory=PIIConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    near_dedup: NearDedupConfig = field(default_factory=NearDedupConfig)
    perplexity: PerplexityConfig = field(default_factory=PerplexityConfig)

    def __post_init__(self) -> None:
        check_curation_config(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def sha256(self, perplexity_model_sha256: str = "") -> str:
        """The name of what this configuration does: its settings, the curation code version,
        the datatrove release whose filters and hashing it runs (nodes with another release may
        keep other documents, so they get another hash) and, with perplexity filtering, the
        reference model's content (not its path)."""
        payload = {"code": CURATION_CODE_VERSION, "datatrove": _datatrove_version(),
                   "config": self.to_dict()}  # fmt: skip
        if self.perplexity.enabled:
            payload["config"]["perplexity"]["model"] = perplexity_model_sha256
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode("utf-8")
        return hashlib.sha256(blob).hexdigest()


SECTIONS = {"pii": PIIConfig, "quality": QualityConfig, "near_dedup": NearDedupConfig,
            "perplexity": PerplexityConfig}  # fmt: skip


def curation_from_dict(table: dict, where: str = "[curation]") -> CurationConfig:
    """A CurationConfig from a `[curation]` table (its sub-tables are the sections)."""
    if not isinstance(table, dict):
        raise CurationConfigError(f"{where} must be a table")
    top = {k: v for k, v in table.items() if k not in SECTIONS}
    sections = {}
    for name, cls in SECTIONS.items():
        value = table.get(name, {})
        if not isinstance(value, dict):
            raise CurationConfigError(f"{where}.{name} must be a table")
        sections[name] = dataclass_from_dict(cls, value, f"{where}.{name}", CurationConfigError)
    flat = dataclass_from_dict(_TopLevel, top, where, CurationConfigError)
    return CurationConfig(exact_dedup=flat.exact_dedup, **sections)


@dataclass(frozen=True)
class _TopLevel:
    exact_dedup: bool = True


def load_curation_config(path: Path) -> CurationConfig:
    """The `[curation]` table of a TOML file (the only table it may hold)."""
    try:
        raw = tomllib.loads(Path(path).read_text("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise CurationConfigError(f"cannot read {path}: {e}") from e
    unknown = sorted(set(raw) - {"curation"})
    if unknown:
        raise CurationConfigError(
            f"{path}: unknown tables {', '.join(unknown)} (expected [curation])"
        )
    return curation_from_dict(raw.get("curation", {}), f"{path} [curation]")


def check_curation_config(c: CurationConfig) -> None:
    q, n, p = c.quality, c.near_dedup, c.perplexity
    _in_range("quality.min_words", q.min_words, 0, q.max_words)
    _in_range("quality.min_mean_word_length", q.min_mean_word_length, 0, q.max_mean_word_length)
    for name in ("max_symbol_word_ratio", "max_bullet_lines_ratio", "max_ellipsis_lines_ratio",
                 "min_alpha_words_ratio", "max_digit_ratio", "max_duplicate_line_fraction",
                 "max_duplicate_line_char_fraction", "max_top_2gram_fraction",
                 "max_top_3gram_fraction", "max_top_4gram_fraction",
                 "max_duplicate_5gram_fraction", "max_duplicate_10gram_fraction",
                 "min_lines_ending_punctuation"):  # fmt: skip
        _in_range(f"quality.{name}", getattr(q, name), 0.0, 1.0)
    _in_range("quality.min_stop_words", q.min_stop_words, 0, 10**6)
    _in_range("near_dedup.shingle_words", n.shingle_words, 1, 64)
    _in_range("near_dedup.bands", n.bands, 1, 1024)
    _in_range("near_dedup.rows_per_band", n.rows_per_band, 1, 1024)
    _in_range("near_dedup.threshold", n.threshold, 0.0, 1.0)
    _in_range("perplexity.drop_low_quantile", p.drop_low_quantile, 0.0, 1.0)
    _in_range("perplexity.drop_high_quantile", p.drop_high_quantile, 0.0, 1.0)
    _in_range("perplexity.max_tokens_per_document", p.max_tokens_per_document, 2, 1 << 20)
    if p.drop_low_quantile + p.drop_high_quantile >= 1.0:
        raise CurationConfigError("perplexity.drop_low_quantile + drop_high_quantile must be "
                                  "below 1 (they would drop every document)")  # fmt: skip
    if p.enabled and not p.model:
        raise CurationConfigError("perplexity.enabled needs perplexity.model: the reference "
                                  "model (a weights file, a run folder, an aggregator state dir)")  # fmt: skip


def _datatrove_version() -> str:
    try:
        return importlib.metadata.version("datatrove")
    except importlib.metadata.PackageNotFoundError:  # curating then fails with CurationUnavailable
        return "absent"


def _in_range(name: str, value: float, low: float, high: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and low <= value <= high):
        raise CurationConfigError(f"[curation] {name} must be in [{low}, {high}], got {value!r}")
