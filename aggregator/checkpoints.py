"""Durable global checkpoints: one safetensors file per committed model version.

A file holds the global model (the model's state-dict names) and the outer optimizer state
(names prefixed `outer/`), so a restarted aggregator resumes the exact optimizer trajectory.
Files are written atomically (temp file hashed as it is written, fsync, rename, fsync dir) and
never overwritten: the round's DB row records the file's sha256 and only then moves to
COMMITTED, so a file newer than the last committed version is debris from a crash
(`remove_newer_than`). One writer: the aggregator process.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from model.io import CheckpointError, fsync_dir, load_tensors, save_tensors_atomic

GLOBAL_FORMAT = "fedpt-global/1"
OUTER_PREFIX = "outer/"
# What makes a global checkpoint self-describing, as a fedpt weights file is (model/io.py):
# `fedpt eval`, `generate` and `export` rebuild the model from the file alone.
DESCRIPTION_KEYS = ("model_config", "tokenizer", "train_seq_len")


def model_description(model_config_json: str, tokenizer_json: str, seq_len: int) -> dict[str, str]:
    """The extra metadata naming a global checkpoint's model, tokenizer and training length."""
    return dict(
        zip(DESCRIPTION_KEYS, (model_config_json, tokenizer_json, str(seq_len)), strict=True)
    )


RESERVED_KEYS = ("format", "version", "round", "outer", "order")
_VERSION_FILE = re.compile(r"global_v(\d{8,})\.safetensors")
_TEMP_FILE = re.compile(r"\.global_v\d{8,}\.safetensors\.tmp-.*")  # save_tensors_atomic's temp
_READ_BYTES = 4 << 20


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_READ_BYTES):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class CheckpointRecord:
    path: Path
    version: int
    round: int  # -1 for the initial model
    sha256: str
    nbytes: int


class CheckpointStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path_for(self, version: int) -> Path:
        return self.root / f"global_v{version:08d}.safetensors"

    def write(
        self,
        version: int,
        round: int,
        params: Mapping[str, torch.Tensor],
        outer_tensors: Mapping[str, torch.Tensor],
        outer_meta: dict,
        extra_metadata: dict[str, str] | None = None,
    ) -> CheckpointRecord:
        """Write version `version` durably; refuses to replace an existing file."""
        if version < 0 or round < -1:
            raise ValueError(f"bad checkpoint version {version} / round {round}")
        extra = dict(extra_metadata or {})
        clash = sorted(set(extra) & set(RESERVED_KEYS))
        if clash or not all(isinstance(v, str) for v in extra.values()):
            raise ValueError(f"extra metadata must be str values without keys {RESERVED_KEYS}")
        if any(name.startswith(OUTER_PREFIX) for name in params):
            raise ValueError(f"model tensor names must not start with {OUTER_PREFIX!r}")
        path = self.path_for(version)
        if path.exists():
            raise CheckpointError(f"{path} already exists; a checkpoint is never overwritten")
        tensors = dict(params) | {OUTER_PREFIX + n: t for n, t in outer_tensors.items()}
        metadata = {
            "format": GLOBAL_FORMAT,
            "version": str(version),
            "round": str(round),
            "outer": json.dumps(outer_meta, sort_keys=True, allow_nan=False),
            # safetensors stores names sorted; keep the caller's order, which the wire layout
            # (manifest, accumulator) follows, so a resumed aggregator lays tensors out the same.
            "order": json.dumps(list(tensors)),
            **extra,
        }
        # The hash of the bytes written, taken as they were written: the DB records it.
        sha256 = save_tensors_atomic(tensors, path, metadata)
        return CheckpointRecord(path, version, round, sha256, path.stat().st_size)

    def read(
        self, version: int, expected_sha256: str | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
        """(model tensors, outer tensors without the prefix, metadata). The metadata has
        `version` and `round` as ints and `outer` parsed; other keys stay strings. Tensors
        come back in the order they were written in.

        Pass the recorded sha256: safetensors has no checksum of its own, so only the hash
        catches a flipped bit in tensor data."""
        path = self.path_for(version)
        if not path.is_file():
            raise CheckpointError(f"no checkpoint for version {version} at {path}")
        if expected_sha256 is not None:
            actual = sha256_file(path)
            if actual != expected_sha256.lower():
                raise CheckpointError(
                    f"{path} is corrupt: sha256 {actual[:16]}… but {expected_sha256[:16]}… "
                    "was recorded"
                )
        tensors, raw = load_tensors(path)
        metadata, order = _parse_metadata(path, raw, version)
        if len(order) != len(tensors) or set(order) != set(tensors):
            raise CheckpointError(f"{path} has a corrupt header: its tensor list does not match")
        params = {n: tensors[n] for n in order if not n.startswith(OUTER_PREFIX)}
        outer = {
            n.removeprefix(OUTER_PREFIX): tensors[n] for n in order if n.startswith(OUTER_PREFIX)
        }
        return params, outer, metadata

    def versions(self) -> list[int]:
        """Versions with a checkpoint file, ascending (temp files from a crash are ignored)."""
        found = []
        for entry in self.root.iterdir():
            match = _VERSION_FILE.fullmatch(entry.name)
            if match and entry.name == self.path_for(int(match[1])).name:
                found.append(int(match[1]))
        return sorted(found)

    def remove_newer_than(self, version: int) -> list[Path]:
        """Crash recovery, before any new write: delete checkpoints newer than the last
        committed `version` (written, never recorded) and leftover temp files."""
        doomed = [self.path_for(v) for v in self.versions() if v > version]
        doomed += sorted(p for p in self.root.iterdir() if _TEMP_FILE.fullmatch(p.name))
        return self._remove(doomed)

    def prune(self, keep_last: int, protect: set[int] | frozenset[int] = frozenset()) -> list[Path]:
        """Delete all but the newest `keep_last` versions and those in `protect` (e.g. the
        version the current round trains from). keep_last 0 keeps everything, as in
        [store] keep_checkpoints."""
        if keep_last < 0:
            raise ValueError(f"keep_last must be ≥ 0, got {keep_last}")
        if keep_last == 0:
            return []
        versions = self.versions()
        keep = set(versions[-keep_last:]) | set(protect)
        return self._remove([self.path_for(v) for v in versions if v not in keep])

    def _remove(self, paths: list[Path]) -> list[Path]:
        for p in paths:
            p.unlink(missing_ok=True)
        if paths:
            fsync_dir(self.root)  # make the removals durable too
        return paths


def _parse_metadata(path: Path, raw: dict[str, str], version: int) -> tuple[dict, list[str]]:
    """(metadata with version/round as ints and outer parsed, the written tensor order)."""
    if raw.get("format") != GLOBAL_FORMAT:
        raise CheckpointError(
            f"{path} is not a fedpt global checkpoint (format {raw.get('format')!r})"
        )
    try:
        stored_version, round_number = int(raw["version"]), int(raw["round"])
        outer, order = json.loads(raw["outer"]), json.loads(raw["order"])
    except (KeyError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{path} has a corrupt header: {e}") from e
    if stored_version != version:
        raise CheckpointError(f"{path} holds version {stored_version}, not {version}")
    if not isinstance(outer, dict) or not isinstance(order, list):
        raise CheckpointError(f"{path} has a corrupt header")
    if not all(isinstance(n, str) for n in order):
        raise CheckpointError(f"{path} has a corrupt header")
    metadata = {k: v for k, v in raw.items() if k != "order"}
    return metadata | {"version": stored_version, "round": round_number, "outer": outer}, order
