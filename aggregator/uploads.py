"""One node's upload for one round: verify each chunk, spool it, add it to the accumulator.

Every chunk is checked against the manifest's sha256 and for NaN/Inf *before* it touches
anything. A verified chunk is appended to the node's spool file and added to the accumulator
under the accumulator's lock, so spool files and accumulator always agree: when an upload is
abandoned or refused part-way, the accumulator is rebuilt from the remaining spools and the
refusal leaves no trace. A completed upload's spool is fsynced and renamed to `.delta`; it is
what a restarted aggregator rebuilds the round's sum from.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

import numpy as np

from aggregator.accumulator import StreamingAccumulator
from aggregator.errors import DeadlineExceeded, InvalidArgument, Unavailable
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
        *,
        check_finite: bool = True,  # float deltas; masked uint32 updates have no NaN to check
    ) -> None:
        self.check_finite = check_finite
        self.node_id, self.round_number = node_id, round_number
        self.manifest, self.weight, self.train_loss = manifest, weight, train_loss
        self.verifier = ChunkVerifier(manifest)
        self.part_path = spool_dir / f"{node_id}.part"
        self.delta_path = spool_dir / f"{node_id}.delta"
        try:
            spool_dir.mkdir(parents=True, exist_ok=True)
            self._spool = open(self.part_path, "wb")  # noqa: SIM115 (closed in complete/discard)
        except OSError as e:
            raise _storage_failed(e) from e
        self._sha = hashlib.sha256()
        self.streaming = False  # a PushUpdate stream is feeding this session now
        self.cancelled = False
        self.complete = False

    @property
    def chunks_received(self) -> int:
        return self.verifier.next_index

    def add_chunk(self, index: int, data: bytes, accumulator: StreamingAccumulator) -> None:
        try:
            self.verifier.verify(index, data)
        except CodecError as e:
            raise InvalidArgument(f"upload for round {self.round_number}: {e}") from e
        if self.check_finite and not np.isfinite(np.frombuffer(data, dtype="<f4")).all():
            raise InvalidArgument(f"chunk {index} of the upload holds NaN or Inf values")
        start, _ = self.manifest.chunk_span(index)
        with accumulator.lock:
            if self.cancelled:
                raise DeadlineExceeded(
                    f"round {self.round_number} closed while this upload was arriving"
                )
            try:
                self._spool.write(data)
            except OSError as e:  # the caller discards this session: nothing half-written stays
                raise _storage_failed(e) from e
            self._sha.update(data)
            finite = accumulator.add(start, data, self.weight)
        if not finite:
            raise InvalidArgument(f"chunk {index} pushes the weighted sum beyond the float32 range")

    def finish(self, accumulator: StreamingAccumulator) -> None:
        """Make the complete upload durable and count its weight."""
        if self._sha.digest() != self.manifest.sha256:
            raise InvalidArgument("the upload's bytes do not match the manifest's sha256")
        try:
            self._spool.flush()
            os.fsync(self._spool.fileno())
            self._spool.close()
            os.replace(self.part_path, self.delta_path)
        except OSError as e:
            raise _storage_failed(e) from e
        with accumulator.lock:
            accumulator.add_weight(self.weight)
        self.complete = True

    @property
    def sha256_hex(self) -> str:
        return self.manifest.sha256.hex()

    def discard(self) -> None:
        """Forget this upload's bytes (the caller rebuilds the accumulator without them)."""
        self.cancelled = True
        if not self._spool.closed:
            with contextlib.suppress(OSError):  # buffered bytes a full disk cannot take: unneeded
                self._spool.close()
        self.part_path.unlink(missing_ok=True)
        self.delta_path.unlink(missing_ok=True)

    def flush(self) -> None:
        if not self._spool.closed:
            self._spool.flush()


def _storage_failed(error: OSError) -> Unavailable:
    """Disk full or failing: the node should retry later (its upload is not kept)."""
    return Unavailable(
        f"the aggregator could not store this upload ({error.strerror or error}); retry later"
    )
