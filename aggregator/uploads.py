"""One node's upload for one round: verify each chunk, spool it, add it to the round's sum.

Every chunk is checked against the manifest's sha256 and for NaN/Inf *before* it touches
anything. A verified chunk is appended to the upload's spool file, then added to the round's
sum (aggregator/round_sum.py), which can always be rebuilt from the spools: when an upload is
abandoned or refused part-way, the sum is rebuilt without it and the refusal leaves no trace.
Spools are written with as little CPU as the disk allows, and reach the disk as they grow
(model/writeback.py), so the fsync that completes an upload waits only for its tail. A completed
upload's spool is fsynced and renamed to `.delta`; it is what a restarted aggregator rebuilds the
round's sum from. Spool names are unique per upload, so a discarded upload's files can be deleted
later, outside any lock, without touching its successor's.

All of this runs in the upload's own thread without the coordinator's lock. The session's file
lock only orders its own writes against a discard from another thread (never both at once on
one file handle).
"""

from __future__ import annotations

import os
import secrets
import threading
from pathlib import Path

import numpy as np

from aggregator.errors import InvalidArgument, RoundClosed, Unavailable
from aggregator.round_sum import RoundSum
from model.writeback import SequentialFile
from protos.codec import ChunkVerifier, CodecError, Manifest


class UploadSession:
    def __init__(
        self,
        node_id: str,
        round_number: int,
        manifest: Manifest,
        weight: float,
        train_loss: float,
        spool_dir: Path,
        round_sum: RoundSum,
        *,
        check_finite: bool = True,  # float deltas; masked ring words have no NaN to check
    ) -> None:
        self.check_finite = check_finite
        self.node_id, self.round_number = node_id, round_number
        self.manifest, self.weight, self.train_loss = manifest, weight, train_loss
        self.base_val_loss: float | None = None  # the node's score of the round's base model
        self.gpu_energy_joules: float | None = None  # the round's energy, as the node measured it
        self.cpu_energy_joules: float | None = None
        self.round_sum = round_sum
        self.verifier = ChunkVerifier(manifest)
        self.spool_dir = spool_dir
        name = f"{node_id}.{secrets.token_hex(4)}"
        self.part_path = spool_dir / f"{name}.part"
        self.delta_path = spool_dir / f"{name}.delta"
        self._spool: SequentialFile | None = None  # opened by the first chunk, in its thread
        self._file_lock = threading.Lock()
        self.added_bytes = 0  # bytes of the spool in the round's sum
        self.streaming = False  # a PushUpdate stream is feeding (or completing) this session
        self.cancelled = False  # adds nothing more
        self.discarded = False  # queued for deletion (aggregator/intake.py)
        self.complete = False  # every byte added and its weight counted

    @property
    def chunks_received(self) -> int:
        return self.verifier.next_index

    def add_chunk(self, index: int, data: bytes) -> None:
        try:
            self.verifier.verify(index, data)
        except CodecError as e:
            raise InvalidArgument(f"upload for round {self.round_number}: {e}") from e
        start, _ = self.manifest.chunk_span(index)
        if self.check_finite:  # decoded: an int8 block's scale can be the NaN
            _, values = self.round_sum.accumulator.decode(start, data)
            if not np.isfinite(values).all():
                raise InvalidArgument(f"chunk {index} of the upload holds NaN or Inf values")
        with self._file_lock:
            self._check_live()
            try:
                if self._spool is None:
                    self.spool_dir.mkdir(parents=True, exist_ok=True)
                    self._spool = SequentialFile(self.part_path)  # closed in finish/discard
                self._spool.write(data)
            except OSError as e:  # the caller discards this session: nothing half-written stays
                raise _storage_failed(e) from e
        if not self.round_sum.add(self, start, data):
            raise InvalidArgument(f"chunk {index} pushes the weighted sum beyond the float32 range")

    def finish(self) -> None:
        """Make the complete upload durable (fsync, rename to `.delta`); the caller then records
        it and counts its weight."""
        if not self.verifier.complete:  # every chunk matched its sha256, and those the root
            raise InvalidArgument("the upload is incomplete")
        with self._file_lock:
            self._check_live()
            try:
                if self._spool is None:
                    raise OSError("no spool file was written")
                self._spool.sync_and_close()
                os.replace(self.part_path, self.delta_path)
            except OSError as e:
                raise _storage_failed(e) from e

    def _check_live(self) -> None:
        if self.cancelled:
            raise RoundClosed(f"round {self.round_number} closed while this upload was arriving")

    @property
    def sha256_hex(self) -> str:
        return self.manifest.sha256.hex()

    def spool_paths(self) -> tuple[Path, ...]:
        return self.part_path, self.delta_path

    def flush(self) -> None:
        with self._file_lock:
            if self._spool is not None and not self._spool.closed:
                self._spool.flush()

    def delete_files(self) -> None:
        """Forget a cancelled upload's bytes (call outside the coordinator's lock; the round's
        sum is rebuilt without them)."""
        with self._file_lock:
            if self._spool is not None:
                self._spool.close()  # abandoned: what it held back is not needed
            self.part_path.unlink(missing_ok=True)
            self.delta_path.unlink(missing_ok=True)


def _storage_failed(error: OSError) -> Unavailable:
    """Disk full or failing: the node should retry later (its upload is not kept)."""
    return Unavailable(
        f"the aggregator could not store this upload ({error.strerror or error}); retry later"
    )
