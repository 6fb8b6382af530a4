"""Packed, memory-mapped token shards and the deterministic sampler that reads them.

On disk a prepared corpus is two folders, `train/` and `val/`, each holding raw little-endian
token files `shard_00000.bin ...` (uint16 when the vocabulary fits, else uint32) and a
`manifest.json` that names the tokenizer and the sha256 of every shard. Documents are
concatenated, each followed by the tokenizer's EOS token, so the model learns where texts end.
A curated corpus (node/curation.py) also has `curation_report.json` beside the splits, and its
manifests' "curation" entry holds the curation sha256 and counts (null: not curated).

Training samples non-overlapping windows of `seq_len + 1` tokens. `BatchSampler` maps a global
sample position to a window id as a pure function of (seed, number of windows, position), so a
resumed run and every data-parallel rank read exactly the windows they would have read anyway.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from model.tokenizer import Tokenizer
from node.corpus import (
    DataError,
    IngestIssue,
    IngestReport,
    batched,
    iter_documents,
    resolve_files,
)
from node.curation import CurationReport, curate, curation_sha256
from node.curation_config import CurationConfig

MANIFEST_NAME = "manifest.json"
FORMAT = "fedpt-shards/1"
SPLITS = ("train", "val")
INGEST_REPORT_NAME = "ingest.json"
CURATION_REPORT_NAME = "curation_report.json"  # the full report: stays on the node
_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
# Encoding in batches lets fast tokenizers use their threads; the limits bound memory.
_ENCODE_BATCH_DOCS = 512
_ENCODE_BATCH_CHARS = 1 << 20  # token lists of Python ints cost ~36 bytes a token
_HASH_CHUNK_BYTES = 8 << 20


# ----------------------------------------------------------------------------- writing


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 0xFFFF else "uint32"


def split_key(text: str) -> float:
    """A document's position in [0, 1) by its sha256: val iff key < val_fraction."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


class _ShardWriter:
    """Appends token arrays to one split's shard files, rolling over every `shard_tokens`."""

    def __init__(self, split_dir: Path, dtype: np.dtype, shard_tokens: int) -> None:
        split_dir.mkdir(parents=True)
        self.split_dir, self.dtype, self.shard_tokens = split_dir, dtype, shard_tokens
        self.shards: list[dict] = []
        self.documents = 0
        self.tokens = 0
        self._file: BinaryIO | None = None
        self._hash = hashlib.sha256()
        self._in_shard = 0

    def add_document(self, tokens: np.ndarray) -> None:
        self.documents += 1
        self.tokens += len(tokens)
        while len(tokens):
            if self._file is None:
                self._open_next_shard()
            take = min(len(tokens), self.shard_tokens - self._in_shard)
            chunk = tokens[:take].tobytes()
            self._file.write(chunk)
            self._hash.update(chunk)
            self._in_shard += take
            tokens = tokens[take:]
            if self._in_shard == self.shard_tokens:
                self._close_shard()

    def close(self) -> None:
        if self._file is not None:
            self._close_shard()

    def _open_next_shard(self) -> None:
        name = f"shard_{len(self.shards):05d}.bin"
        self._file = open(self.split_dir / name, "wb")  # noqa: SIM115 (closed in _close_shard/abort)
        self.shards.append({"file": name, "tokens": 0, "sha256": ""})
        self._hash, self._in_shard = hashlib.sha256(), 0

    def _close_shard(self) -> None:
        assert self._file is not None
        _fsync_close(self._file)
        self._file = None
        self.shards[-1].update(tokens=self._in_shard, sha256=self._hash.hexdigest())

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


@dataclass
class _HeldDocument:
    key: float
    tokens: np.ndarray


class _SplitRouter:
    """Sends each document to train or val by its hash, so the split is reproducible.

    With two or more documents neither split may end up empty. Because documents stream past
    once, the documents with the smallest and the largest key are held back until the end:
    the smallest is the one most entitled to val, the largest to train, so placing them last
    only changes a decision when a split would otherwise be empty.
    """

    def __init__(self, writers: dict[str, _ShardWriter], val_fraction: float) -> None:
        self.writers, self.val_fraction = writers, val_fraction
        self.lowest: _HeldDocument | None = None
        self.highest: _HeldDocument | None = None

    def add(self, doc: _HeldDocument) -> None:
        if self.lowest is None:
            self.lowest = doc
        elif self.highest is None:
            self.lowest, self.highest = sorted((self.lowest, doc), key=lambda d: d.key)
        elif doc.key < self.lowest.key:
            self._place(self.lowest)
            self.lowest = doc
        elif doc.key > self.highest.key:
            self._place(self.highest)
            self.highest = doc
        else:
            self._place(doc)

    def finish(self) -> None:
        if self.lowest is None:
            return
        if self.highest is None:  # a single document goes where its hash says
            self._place(self.lowest)
            return
        val, train = self.writers["val"], self.writers["train"]
        to_val = self.lowest.key < self.val_fraction or val.documents == 0
        (val if to_val else train).add_document(self.lowest.tokens)
        to_train = self.highest.key >= self.val_fraction or train.documents == 0
        (train if to_train else val).add_document(self.highest.tokens)

    def _place(self, doc: _HeldDocument) -> None:
        split = "val" if doc.key < self.val_fraction else "train"
        self.writers[split].add_document(doc.tokens)


def pack_shards(
    documents: Iterable[str],
    tokenizer: Tokenizer,
    out_dir: Path,
    *,
    val_fraction: float = 0.05,
    shard_tokens: int = 1 << 24,
    source: str = "",
    curation: CurationReport | None = None,
) -> dict:
    """Tokenize `documents` into `out_dir/{train,val}`; returns {"train": manifest, "val": ...}.

    Everything is written into a temporary sibling folder that replaces `out_dir` only once
    complete, so a crash never leaves a half-written shard set behind. Raises DataError when
    there are no documents at all. `curation`: the report of the curate() stream `documents`
    is, complete once they are packed; its counts go into the manifests, itself beside them.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    dtype_name = token_dtype(tokenizer.vocab_size)
    writers = {s: _ShardWriter(tmp_dir / s, _DTYPES[dtype_name], shard_tokens) for s in SPLITS}
    try:
        router = _SplitRouter(writers, val_fraction)
        for doc in _encoded_documents(documents, tokenizer, _DTYPES[dtype_name]):
            router.add(doc)
        router.finish()
        if all(w.documents == 0 for w in writers.values()):
            raise DataError(f"no documents to pack into {out_dir}")
        manifests = {}
        counts = curation.counts() if curation is not None else None
        for split, writer in writers.items():
            writer.close()
            manifests[split] = _manifest(split, writer, dtype_name, tokenizer, source, counts)
            _write_json_durably(tmp_dir / split / MANIFEST_NAME, manifests[split])
        if curation is not None:
            _write_json_durably(tmp_dir / CURATION_REPORT_NAME, curation.to_json())
        _replace_dir(tmp_dir, out_dir)
    except BaseException:
        for writer in writers.values():
            writer.abort()
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return manifests


def _encoded_documents(
    documents: Iterable[str], tokenizer: Tokenizer, dtype: np.dtype
) -> Iterator[_HeldDocument]:
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    for batch in batched(documents, _ENCODE_BATCH_DOCS, _ENCODE_BATCH_CHARS):
        for text, ids in zip(batch, tokenizer.encode_batch(batch), strict=True):
            tokens = np.concatenate([np.asarray(ids, dtype=dtype), eos])
            yield _HeldDocument(split_key(text), tokens)


def _manifest(
    split: str,
    writer: _ShardWriter,
    dtype_name: str,
    tokenizer: Tokenizer,
    source: str,
    curation: dict | None,
) -> dict:
    return {
        "format": FORMAT,
        "split": split,
        "dtype": dtype_name,
        "tokenizer": tokenizer.spec(),
        "documents": writer.documents,
        "tokens": writer.tokens,
        "shards": writer.shards,
        "source": source,
        "curation": curation,  # CurationReport.counts(); null (or, before curation, absent): none
    }


def _fsync_close(f: BinaryIO) -> None:
    f.flush()
    os.fsync(f.fileno())
    f.close()


def _write_json_durably(path: Path, payload: dict) -> None:
    with open(path, "wb") as f:
        f.write(json.dumps(payload, indent=2, sort_keys=True).encode("utf-8") + b"\n")
        f.flush()
        os.fsync(f.fileno())


def _replace_dir(new: Path, target: Path) -> None:
    """Move the complete folder `new` to `target`; an older `target` is removed afterwards."""
    old = None
    if target.exists():
        # os.replace cannot overwrite a non-empty folder, so the old one steps aside first.
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / target.name)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- reading


def read_manifest(split_dir: Path) -> dict:
    path = Path(split_dir) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise DataError(f"no shard manifest at {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read shard manifest {path}: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{path} is not a {FORMAT} manifest")
    if manifest.get("dtype") not in _DTYPES:
        raise DataError(f"{path} has unsupported dtype {manifest.get('dtype')!r}")
    return manifest


class TokenShards:
    """One split of a packed corpus, memory-mapped read-only."""

    def __init__(self, split_dir: Path, *, verify: bool = False) -> None:
        self.split_dir = Path(split_dir)
        manifest = read_manifest(self.split_dir)
        self.tokenizer_spec: dict = manifest["tokenizer"]
        self.num_tokens: int = int(manifest["tokens"])
        self.num_documents: int = int(manifest["documents"])
        dtype = _DTYPES[manifest["dtype"]]
        self._shards = [self._open_shard(entry, dtype, verify) for entry in manifest["shards"]]
        self._shard_tokens = np.array([len(s) for s in self._shards], dtype=np.int64)
        self._window_starts: dict[int, np.ndarray] = {}  # seq_len -> first window id per shard

    def _open_shard(self, entry: dict, dtype: np.dtype, verify: bool) -> np.ndarray:
        name, tokens = entry["file"], int(entry["tokens"])
        if Path(name).name != name:  # a manifest must not point outside its folder
            raise DataError(f"{self.split_dir / MANIFEST_NAME} names an invalid shard {name!r}")
        path = self.split_dir / name
        try:
            size = path.stat().st_size
        except OSError:
            raise DataError(f"shard {path} is missing") from None
        if size != tokens * dtype.itemsize:
            raise DataError(
                f"shard {path} has {size} bytes, expected {tokens * dtype.itemsize}: "
                "truncated or corrupt"
            )
        if verify and _file_sha256(path) != entry["sha256"]:
            raise DataError(f"shard {path} does not match the sha256 in its manifest")
        if tokens == 0:  # mmap cannot map an empty file
            return np.zeros(0, dtype=dtype)
        return np.memmap(path, dtype=dtype, mode="r", shape=(tokens,))

    def num_windows(self, seq_len: int) -> int:
        """Non-overlapping windows of seq_len + 1 tokens at stride seq_len, within each shard."""
        return int(self._windows_per_shard(seq_len).sum())

    def window(self, index: int, seq_len: int) -> np.ndarray:
        """Window `index` as an int64 array of seq_len + 1 tokens."""
        starts = self._first_window_ids(seq_len)
        total = int(starts[-1])
        if not 0 <= index < total:
            raise IndexError(f"window {index} out of range for {total} windows of {seq_len}")
        shard = int(np.searchsorted(starts, index, side="right")) - 1
        offset = (index - int(starts[shard])) * seq_len
        return np.array(self._shards[shard][offset : offset + seq_len + 1], dtype=np.int64)

    def _windows_per_shard(self, seq_len: int) -> np.ndarray:
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        # A window needs seq_len + 1 tokens; the last token of one is the first of the next.
        return np.maximum(self._shard_tokens - 1, 0) // seq_len

    def _first_window_ids(self, seq_len: int) -> np.ndarray:
        """Cumulative window counts: shard i holds window ids starts[i] .. starts[i+1]-1."""
        if seq_len not in self._window_starts:
            counts = self._windows_per_shard(seq_len)
            self._window_starts[seq_len] = np.concatenate([[0], np.cumsum(counts)])
        return self._window_starts[seq_len]


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- sampling


class BatchSampler:
    """An endless stream of window ids: epoch after epoch, each a fresh seeded permutation."""

    def __init__(self, num_windows: int, seed: int) -> None:
        if num_windows <= 0:
            raise DataError(
                "not enough tokens for one sequence of the requested length "
                "(0 windows): add data or shorten seq_len"
            )
        self.num_windows, self.seed = num_windows, seed
        self._cached_epoch = -1
        self._cached_perm = np.empty(0, dtype=np.int64)

    def indices(self, start: int, count: int) -> np.ndarray:
        """Window ids for sample positions start .. start+count-1 (a pure function of them)."""
        if start < 0 or count < 0:
            raise ValueError(f"start and count must be non-negative, got {start}, {count}")
        positions = np.arange(start, start + count, dtype=np.int64)
        out = np.empty(count, dtype=np.int64)
        epochs = positions // self.num_windows
        for epoch in np.unique(epochs):
            in_epoch = epochs == epoch
            out[in_epoch] = self._permutation(int(epoch))[positions[in_epoch] % self.num_windows]
        return out

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._cached_epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            self._cached_perm = rng.permutation(self.num_windows)
            self._cached_epoch = epoch
        return self._cached_perm


def get_batch(
    shards: TokenShards, window_ids: np.ndarray, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs x and next-token targets y, both int64 tensors of shape [B, seq_len]."""
    windows = np.stack([shards.window(int(i), seq_len) for i in window_ids])  # [B, seq_len+1]
    tokens = torch.from_numpy(windows)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


# ----------------------------------------------------------------------------- preparing


def prepare_data(
    source: str,
    tokenizer: Tokenizer,
    cache_dir: Path,
    *,
    val_fraction: float = 0.05,
    curation: CurationConfig | None = None,
) -> tuple[Path, IngestReport | None]:
    """A folder of train/val shards for `source`, packed once and then reused from the cache.

    `source` may already be a prepared shard folder (returned as is, report None; with
    `curation`, it must have been curated by that configuration). Otherwise the cache key
    covers each file's path, size and mtime, the tokenizer, the split and the curation sha256,
    so unchanged inputs are not read again; the returned report is then the one saved when
    they were packed. `curation`: the documents go through curate() before packing (its
    report: load_curation_report).
    """
    # The hash alone (no reference model loaded): a cached entry needs nothing more.
    curation_hash = curation_sha256(curation) if curation is not None else None
    prepared = Path(source).expanduser()
    if (prepared / "train" / MANIFEST_NAME).is_file():
        _check_tokenizer(prepared, tokenizer)
        if curation_hash is not None:
            _check_curation(prepared, curation_hash)
        return prepared, None
    report = IngestReport()
    files = resolve_files(source, report)
    out_dir = Path(cache_dir) / _cache_key(files, tokenizer, val_fraction, curation_hash)
    if all((out_dir / s / MANIFEST_NAME).is_file() for s in SPLITS):
        return out_dir, _load_report(out_dir, report)
    pack_files(files, report, tokenizer, out_dir, val_fraction=val_fraction, source=source,
               curation=curation)  # fmt: skip
    _save_report(out_dir, report)
    return out_dir, report


def pack_files(
    files: list[Path],
    report: IngestReport,
    tokenizer: Tokenizer,
    out_dir: Path,
    *,
    val_fraction: float,
    source: str,
    curation: CurationConfig | None = None,
) -> tuple[dict, CurationReport | None]:
    """Read `files` (counted in `report`), curate them with `curation`, pack them into
    `out_dir`: the manifests and the curation report. A DataError says what was found when
    nothing is left to pack."""
    curated = None
    # With curation, its exact-duplicate stage is the one that drops (and reports) duplicates.
    documents = iter_documents(files, report, drop_duplicates=curation is None)
    if curation is not None:
        curated = CurationReport()
        spool_dir = Path(out_dir).parent  # the spool goes beside the shards
        spool_dir.mkdir(parents=True, exist_ok=True)
        documents = curate(documents, curation, curated, tokenizer=tokenizer, spool_dir=spool_dir)
    try:
        manifests = pack_shards(
            documents,
            tokenizer,
            out_dir,
            val_fraction=val_fraction,
            source=source,
            curation=curated,
        )
    except DataError:
        if report.documents == 0:
            raise DataError(f"no documents found in {source}: {report.summary()}") from None
        if curated is not None and curated.documents_kept == 0:
            kept_none = f"curation kept no documents of {source}: {curated.summary()}"
            raise DataError(kept_none) from None
        raise
    return manifests, curated


def shard_curation(prepared_dir: Path) -> dict | None:
    """The train manifest's "curation" entry: {"sha256", "documents_in", "documents_kept",
    "removed": {stage or stage.reason: documents}}; None for shards that were not curated."""
    return read_manifest(Path(prepared_dir) / "train").get("curation")


def load_curation_report(prepared_dir: Path) -> CurationReport | None:
    """The full curation report saved beside curated shards (None: not curated, or unreadable)."""
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        raw = json.loads((Path(prepared_dir) / CURATION_REPORT_NAME).read_text("utf-8"))
        return CurationReport.from_json(raw)
    return None


def _check_curation(prepared: Path, expected: str) -> None:
    found = shard_curation(prepared)
    found_hash = found.get("sha256") if isinstance(found, dict) else None
    if found_hash != expected:
        made = f"curated by {found_hash[:12]}…" if found_hash else "not curated"
        raise DataError(
            f"shards in {prepared} were {made}, not by this curation ({expected[:12]}…): "
            "curate from the raw text instead"
        )


def _check_tokenizer(prepared: Path, tokenizer: Tokenizer) -> None:
    found = read_manifest(prepared / "train")["tokenizer"]
    if found != tokenizer.spec():
        raise DataError(
            f"shards in {prepared} were made with tokenizer {json.dumps(found)}, "
            f"not {json.dumps(tokenizer.spec())}"
        )


def _cache_key(
    files: list[Path], tokenizer: Tokenizer, val_fraction: float, curation: str | None
) -> str:
    payload = {
        "format": FORMAT,
        "files": [_file_fingerprint(p) for p in files],
        "tokenizer": tokenizer.spec(),
        "val_fraction": val_fraction,
        "curation": curation,  # its sha256; curated and uncurated shards never share an entry
    }
    blob = json.dumps(payload, sort_keys=True).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:20]


def _file_fingerprint(path: Path) -> list:
    absolute = str(path.absolute())
    try:
        stat = path.stat()
    except OSError:  # e.g. a broken symlink: it is recorded as an ingest error when packing
        return [absolute, -1, -1]
    return [absolute, stat.st_size, stat.st_mtime_ns]


def _save_report(out_dir: Path, report: IngestReport) -> None:
    tmp = out_dir / f".{INGEST_REPORT_NAME}.tmp"
    tmp.write_text(json.dumps(_report_to_json(report), indent=2), "utf-8")
    os.replace(tmp, out_dir / INGEST_REPORT_NAME)


def _load_report(out_dir: Path, fallback: IngestReport) -> IngestReport:
    """The report saved when the cache entry was packed; `fallback` if it is unreadable."""
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        raw = json.loads((out_dir / INGEST_REPORT_NAME).read_text("utf-8"))
        errors = [IngestIssue(e["path"], e["reason"]) for e in raw.pop("errors")]
        return IngestReport(**raw, errors=errors)
    return fallback


def _report_to_json(report: IngestReport) -> dict:
    return {
        "files_seen": report.files_seen,
        "files_read": report.files_read,
        "documents": report.documents,
        "duplicates": report.duplicates,
        "skipped": report.skipped,
        "errors": [{"path": e.path, "reason": e.reason} for e in report.errors],
    }
