"""Reading an organisation's raw private text into a stream of documents.

A source is a file, a folder (walked recursively in sorted order, so every run sees the same
documents in the same order), or the embedded `builtin[:ORG,...]` corpus. Bad input never stops
ingestion: every unreadable file or record becomes an `IngestIssue` in the `IngestReport`, and
the good documents are still read. Only problems that leave nothing to read raise `DataError`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

TEXT_SUFFIXES = (".txt", ".md", ".py")
JSONL_SUFFIX = ".jsonl"
GZIP_SUFFIX = ".gz"
_PLAIN_SUFFIXES = (*TEXT_SUFFIXES, JSONL_SUFFIX)
SUPPORTED_SUFFIXES = (*_PLAIN_SUFFIXES, *(s + GZIP_SUFFIX for s in _PLAIN_SUFFIXES))

BUILTIN_SOURCE = "builtin"
# A file full of bad records would otherwise flood the report; the rest are counted in one issue.
MAX_ISSUES_PER_FILE = 10
# What a corrupt gzip stream can raise part-way through (BadGzipFile is an OSError).
_READ_ERRORS = (OSError, EOFError, zlib.error)


class DataError(ValueError):
    """A data problem the user must fix; the message is one line and names the path."""


@dataclass
class IngestIssue:
    path: str
    reason: str


@dataclass
class IngestReport:
    files_seen: int = 0
    files_read: int = 0
    documents: int = 0
    duplicates: int = 0
    skipped: int = 0  # files with unsupported extensions
    errors: list[IngestIssue] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.files_seen} files, {self.documents} documents, "
            f"{self.duplicates} duplicates dropped, {len(self.errors)} errors, "
            f"{self.skipped} skipped"
        )

    def add_error(self, path: Path | str, reason: str) -> None:
        self.errors.append(IngestIssue(str(path), reason))


def is_supported(path: Path) -> bool:
    return path.name.endswith(SUPPORTED_SUFFIXES)


def walk_files(
    root: Path,
    skip_dir_names: frozenset[str] = frozenset(),
    on_error: Callable[[OSError], None] | None = None,
) -> Iterator[Path]:
    """Every non-directory under `root`, in sorted order; hidden and `skip_dir_names` dirs pruned.

    Symlinked folders are not followed (a link loop would never end); `on_error` hears about
    folders that cannot be listed, which os.walk would otherwise skip silently.
    """
    for dirpath, dirnames, filenames in os.walk(root, onerror=on_error):
        # Pruning in place stops os.walk descending; sorting in place fixes the visiting order.
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and d not in skip_dir_names
        )
        for name in sorted(filenames):
            yield Path(dirpath, name)


def resolve_files(source: str, report: IngestReport) -> list[Path]:
    """The supported files a source names, in a deterministic order; counts what it saw.
    Several folders or files are separated by commas (a path that exists with its comma is
    taken as one); builtin:ORG1,ORG2 names built-in organisations."""
    if source == BUILTIN_SOURCE or source.startswith(BUILTIN_SOURCE + ":"):
        return _resolve_builtin(source, report)
    if "," in source and not Path(source).expanduser().exists():
        parts = [p.strip() for p in source.split(",") if p.strip()]
        if not parts:
            raise DataError(f"data source {source!r} names no folder or file")
        files: dict[Path, None] = {}  # in order, each file once (folders may overlap)
        for part in parts:
            files.update(dict.fromkeys(_resolve_path(part, report)))
        return list(files)
    return _resolve_path(source, report)


def _resolve_path(source: str, report: IngestReport) -> list[Path]:
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"data source {path} does not exist")
    if path.is_dir():
        files = _supported_files_under(path, report)
        if not files:
            raise DataError(f"no supported files ({', '.join(_PLAIN_SUFFIXES)}[.gz]) under {path}")
        return files
    report.files_seen += 1
    if not is_supported(path):
        raise DataError(f"unsupported file type {path} (expected one of {SUPPORTED_SUFFIXES})")
    return [path]


def _supported_files_under(root: Path, report: IngestReport) -> list[Path]:
    def record(error: OSError) -> None:
        report.add_error(error.filename, f"unreadable folder ({error.strerror})")

    files = []
    for path in walk_files(root, on_error=record):
        report.files_seen += 1
        if is_supported(path):
            files.append(path)
        else:
            report.skipped += 1
    return files


def _resolve_builtin(source: str, report: IngestReport) -> list[Path]:
    # Imported here because builtin_corpus imports this module (DataError, walk_files).
    from node import builtin_corpus

    _, _, wanted = source.partition(":")
    orgs = [o.strip() for o in wanted.split(",") if o.strip()] if wanted else None
    if orgs is None:
        orgs = builtin_corpus.list_organisations()
    elif not orgs:
        raise DataError(f"data source {source!r} names no organisation")
    files: dict[Path, None] = {}  # an ordered set: an org named twice adds nothing
    for org in orgs:
        files.update(dict.fromkeys(builtin_corpus.organisation_files(org)))
    report.files_seen += len(files)
    return list(files)


def iter_documents(
    files: Iterable[Path], report: IngestReport, *, drop_duplicates: bool = True
) -> Iterator[str]:
    """Stream the unique, non-blank documents of `files`; problems go to `report`, never raise.
    The curation stage (node/curation.py) owns exact deduplication: it reads with
    `drop_duplicates=False`, and reports what it drops itself."""
    seen: set[bytes] = set()
    for path in files:
        for text in _read_file_documents(path, report):
            if not text.strip():
                continue
            if drop_duplicates:
                digest = hashlib.sha256(text.encode("utf-8")).digest()
                if digest in seen:
                    report.duplicates += 1
                    continue
                seen.add(digest)
            report.documents += 1
            yield text


def _read_file_documents(path: Path, report: IngestReport) -> Iterator[str]:
    """The raw documents of one file; a file that fails part-way keeps what it already gave."""
    try:
        if _plain_name(path).endswith(JSONL_SUFFIX):
            yield from _read_jsonl(path, report)
        else:
            yield _read_text(path)
    except UnicodeDecodeError as e:
        report.add_error(path, f"not valid UTF-8 (byte {e.start})")
        return
    except _READ_ERRORS as e:
        report.add_error(path, _describe_read_error(e))
        return
    report.files_read += 1


def _plain_name(path: Path) -> str:
    name = path.name
    return name[: -len(GZIP_SUFFIX)] if name.endswith(GZIP_SUFFIX) else name


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(GZIP_SUFFIX) else open(path, "rb")


def _read_text(path: Path) -> str:
    with _open_binary(path) as f:
        # utf-8-sig is still strict; it only drops a leading byte-order mark.
        return f.read().decode("utf-8-sig")


def _read_jsonl(path: Path, report: IngestReport) -> Iterator[str]:
    bad_lines = 0
    with _open_binary(path) as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            text, reason = _parse_jsonl_record(raw)
            if reason is None:
                yield text
                continue
            bad_lines += 1
            if bad_lines <= MAX_ISSUES_PER_FILE:
                report.add_error(path, f"line {line_no}: {reason}")
    if bad_lines > MAX_ISSUES_PER_FILE:
        report.add_error(path, f"{bad_lines - MAX_ISSUES_PER_FILE} more bad lines not listed")


def _parse_jsonl_record(raw: bytes) -> tuple[str, str | None]:
    """(text, None) for a good record, ("", reason) for a bad one."""
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return "", "not valid UTF-8"
    except json.JSONDecodeError as e:
        return "", f"invalid JSON ({e.msg})"
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        return "", 'no string "text" field'
    return record["text"], None


def _describe_read_error(error: BaseException) -> str:
    if isinstance(error, IsADirectoryError):
        return "is a directory"
    if isinstance(error, gzip.BadGzipFile | EOFError | zlib.error):
        return f"corrupt gzip ({error or type(error).__name__})"
    if isinstance(error, OSError) and error.strerror:
        return f"unreadable ({error.strerror})"
    return f"unreadable ({error})"


def batched(documents: Iterable[str], max_documents: int, max_chars: int) -> Iterator[list[str]]:
    """`documents` in lists of at most `max_documents`, cut early once they hold `max_chars`."""
    batch: list[str] = []
    chars = 0
    for text in documents:
        batch.append(text)
        chars += len(text)
        if len(batch) >= max_documents or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch
