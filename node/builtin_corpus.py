"""The embedded default corpus: the Python standard library's own sources and docs.

Why this corpus: every machine that runs fedpt already has it, so a fresh node (or a CI box with
no internet) can train and a federation can be simulated end to end without downloading or
shipping any data. It is a few MB of real, varied text (code, docstrings, licence text, the
`help()` topics), which is enough for a tiny model to learn something measurable.

Why organisations: federated training must cope with non-IID data, so the library is split by
top-level package into "organisations" with genuinely different content: web protocols and
formats, systems plumbing, GUI applications, the core modules, and documentation-heavy packages.
`builtin:web,apps` gives a node two of them.

The files are read from `sysconfig.get_paths()["stdlib"]`, not `sys.prefix`, which in a virtual
environment is the environment rather than the standard library. Entries that a given Python
version lacks (e.g. `distutils` after 3.11) are skipped; an organisation left empty is an error.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

from node.corpus import DataError, is_supported, walk_files

# Entries are glob patterns of top-level names in the stdlib folder.
ORGANISATIONS: dict[str, tuple[str, ...]] = {
    "web": ("email", "http", "urllib", "html", "xml", "xmlrpc", "wsgiref", "json"),
    "systems": (
        "asyncio",
        "concurrent",
        "multiprocessing",
        "ctypes",
        "importlib",
        "logging",
        "sqlite3",
        "dbm",
        "venv",
        "zoneinfo",
        "tomllib",
        "collections",
        "re",
    ),
    "apps": ("idlelib", "tkinter", "turtledemo", "curses"),
    "core": ("*.py",),
    "docs": ("pydoc_data", "unittest", "lib2to3", "distutils", "LICENSE.txt"),
}

# Never corpus material: the test suite, codecs tables, bundled wheels, third-party and build
# artefacts. `_sysconfigdata_*` is build configuration that differs between machines.
EXCLUDED_TOP_LEVEL = (
    "test",
    "encodings",
    "ensurepip",
    "site-packages",
    "lib-dynload",
    "config-*",
    "__pycache__",
    "__phello__",
    "_sysconfigdata_*",
)
EXCLUDED_DIR_NAMES = frozenset({"__pycache__"})


def stdlib_root() -> Path:
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise DataError(f"the Python standard library folder {root} does not exist")
    return root


def list_organisations() -> list[str]:
    return sorted(ORGANISATIONS)


def organisation_files(org: str) -> list[Path]:
    """The sorted supported files of one organisation of the builtin corpus."""
    if org not in ORGANISATIONS:
        valid = ", ".join(list_organisations())
        raise DataError(f"unknown builtin organisation {org!r}; valid ones are: {valid}")
    root = stdlib_root()
    files = {
        path
        for entry in _existing_entries(root, ORGANISATIONS[org])
        for path in _files_of_entry(entry)
        if is_supported(path)
    }
    if not files:
        raise DataError(f"builtin organisation {org!r} has no files under {root}")
    return sorted(files)


def _existing_entries(root: Path, patterns: tuple[str, ...]) -> list[Path]:
    """Top-level entries matching `patterns`, minus the excluded ones; missing ones vanish."""
    return [
        entry
        for pattern in patterns
        for entry in sorted(root.glob(pattern))
        if not any(entry.match(excluded) for excluded in EXCLUDED_TOP_LEVEL)
    ]


def _files_of_entry(entry: Path) -> list[Path]:
    if entry.is_dir():
        return list(walk_files(entry, EXCLUDED_DIR_NAMES))
    return [entry]
