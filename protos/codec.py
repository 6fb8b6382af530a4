"""Chunked tensor codec: a state dict or a delta as a `TensorManifest`, then hashed `Chunk`s.

Payload layout: the tensors' raw little-endian bytes, end to end in manifest order, cut into
chunks of `chunk_bytes` (the last may be shorter). The manifest carries every chunk's sha256
and the payload's sha256 (the root over the chunk sha256s, `payload_digest`), so a receiver
checks each chunk on arrival, before using it, hashing every byte once, and a broken transfer
resumes from a chunk index.

Sender:   payload = encode(state); for msg in model_stream_messages(payload, first_chunk): ...
Receiver: assembler = receive_model(stream, assembler, expected=specs); assembler.tensors()
Streaming receivers (the aggregator's running sum) use `ChunkVerifier` and never buffer.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from protos import federation_pb2 as pb

# The payload is the host's raw tensor memory; a big-endian host would need byte swapping.
if sys.byteorder != "little":
    raise ImportError("protos.codec supports little-endian hosts only")

DEFAULT_CHUNK_BYTES = 4 << 20
MAX_CHUNK_BYTES = 64 << 20  # receivers hold one chunk whole; bigger ones are refused by default
_MAX_CHUNKS = 2**32 - 1  # Chunk.index is a uint32 on the wire
_MAX_BYTES = 2**63 - 1  # sizes and offsets must fit an int64 (torch sizes, proto fields)
_MAX_NDIM = 64
_SHA256_BYTES = 32

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int32": torch.int32,
    # Masked secure-aggregation payloads (rings of 32, 16 and 8 bits) and int8 blocks. torch's
    # uint16/uint32 lack most arithmetic, but the codec only moves bytes (view, reshape, clone).
    "uint32": torch.uint32,
    "uint16": torch.uint16,
    "uint8": torch.uint8,
}
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


class CodecError(ValueError):
    """A manifest, chunk or payload that fails validation; the message is one line."""


def _itemsize(dtype_name: str) -> int:
    return DTYPES[dtype_name].itemsize


def _dtype_name(tensor_name: str, dtype: torch.dtype) -> str:
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        supported = ", ".join(DTYPES)
        raise CodecError(
            f"tensor {tensor_name!r} has unsupported dtype {dtype} (supported: {supported})"
        ) from None


def _num_chunks(total_bytes: int, chunk_bytes: int) -> int:
    return -(-total_bytes // chunk_bytes)  # ceil; an empty payload has no chunks


@dataclass(frozen=True)
class TensorSpec:
    """What a receiver expects of one tensor: its name, shape and dtype name."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.dtype)


def specs_of(tensors: Mapping[str, torch.Tensor]) -> list[TensorSpec]:
    """The specs of a state dict, in its order (what `Manifest.from_proto(expected=...)` takes)."""
    return [
        TensorSpec(name, tuple(tensor.shape), _dtype_name(name, tensor.dtype))
        for name, tensor in tensors.items()
    ]


@dataclass(frozen=True)
class ManifestEntry:
    """One tensor of a payload: where its bytes lie (`offset`, `nbytes`) and how to read them."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int
    nbytes: int

    @property
    def spec(self) -> TensorSpec:
        return TensorSpec(self.name, self.shape, self.dtype)


@dataclass(frozen=True)
class Manifest:
    """A validated description of a payload; build it with `encode` or `Manifest.from_proto`."""

    entries: tuple[ManifestEntry, ...]
    chunk_bytes: int
    total_bytes: int
    chunk_sha256: tuple[bytes, ...]
    sha256: bytes

    @property
    def num_chunks(self) -> int:
        return _num_chunks(self.total_bytes, self.chunk_bytes)

    @property
    def element_itemsize(self) -> int | None:
        """The itemsize all tensors share (chunks then never split an element), else None."""
        sizes = {_itemsize(entry.dtype) for entry in self.entries}
        return sizes.pop() if len(sizes) == 1 else None

    def chunk_span(self, index: int) -> tuple[int, int]:
        """The [start, end) byte range of chunk `index` in the payload."""
        if not 0 <= index < self.num_chunks:
            raise CodecError(
                f"chunk {index} is out of range: the payload has {self.num_chunks} chunks"
            )
        start = index * self.chunk_bytes
        return start, min(start + self.chunk_bytes, self.total_bytes)

    def specs(self) -> list[TensorSpec]:
        return [entry.spec for entry in self.entries]

    def to_proto(self) -> pb.TensorManifest:
        return pb.TensorManifest(
            tensors=[
                pb.TensorEntry(
                    name=e.name, shape=e.shape, dtype=e.dtype, offset=e.offset, nbytes=e.nbytes
                )
                for e in self.entries
            ],
            chunk_bytes=self.chunk_bytes,
            total_bytes=self.total_bytes,
            chunk_sha256=self.chunk_sha256,
            sha256=self.sha256,
        )

    @classmethod
    def from_proto(
        cls,
        msg: pb.TensorManifest,
        *,
        expected: Sequence[TensorSpec] | None = None,
        max_total_bytes: int | None = None,
        max_chunk_bytes: int = MAX_CHUNK_BYTES,
    ) -> Manifest:
        """Parse and validate a received manifest; nothing unchecked gets through."""
        entries = tuple(
            ManifestEntry(e.name, tuple(e.shape), e.dtype, e.offset, e.nbytes) for e in msg.tensors
        )
        manifest = cls(
            entries, msg.chunk_bytes, msg.total_bytes, tuple(msg.chunk_sha256), msg.sha256
        )
        _validate_manifest(manifest, max_total_bytes, max_chunk_bytes)
        if expected is not None:
            _check_expected(manifest.specs(), expected)
        return manifest


# --- manifest validation (shared by the sender and the receiver) ---


def _validate_manifest(
    manifest: Manifest, max_total_bytes: int | None, max_chunk_bytes: int
) -> None:
    # Order matters: later checks rely on the earlier ones (known dtypes, non-zero chunk size).
    _check_chunk_bytes(manifest.chunk_bytes, max_chunk_bytes)
    laid_out = _check_entries(manifest.entries)
    _check_total(manifest.total_bytes, laid_out, max_total_bytes)
    _check_chunk_count(manifest.total_bytes, manifest.chunk_bytes)
    _check_no_split_elements(manifest.entries, manifest.chunk_bytes)
    _check_digests(manifest)


def _check_chunk_bytes(chunk_bytes: int, max_chunk_bytes: int) -> None:
    if not 0 < chunk_bytes <= max_chunk_bytes:
        raise CodecError(f"chunk_bytes={chunk_bytes} must be between 1 and {max_chunk_bytes}")


def _check_entries(entries: Sequence[ManifestEntry]) -> int:
    """Names, dtypes, shapes and the end-to-end layout; returns the bytes the entries span."""
    seen: set[str] = set()
    offset = 0
    for position, entry in enumerate(entries):
        _check_name(position, entry.name, seen)
        if entry.dtype not in DTYPES:
            raise CodecError(f"tensor {entry.name!r} has unknown dtype {entry.dtype!r}")
        needed = _shape_nbytes(entry.name, entry.shape, _itemsize(entry.dtype))
        if entry.nbytes != needed:
            raise CodecError(
                f"tensor {entry.name!r} has nbytes={entry.nbytes}, "
                f"but shape {entry.shape} of {entry.dtype} needs {needed}"
            )
        if entry.offset != offset:
            raise CodecError(
                f"tensor {entry.name!r} starts at byte {entry.offset}, expected {offset} "
                "(tensors lie end to end, in order, from byte 0)"
            )
        offset += entry.nbytes
    return offset


def _check_name(position: int, name: str, seen: set[str]) -> None:
    if not isinstance(name, str) or not name:
        raise CodecError(f"tensor #{position} has an empty or non-string name {name!r}")
    if name in seen:
        raise CodecError(f"tensor {name!r} appears more than once")
    seen.add(name)


def _shape_nbytes(name: str, shape: tuple[int, ...], itemsize: int) -> int:
    if len(shape) > _MAX_NDIM:
        raise CodecError(f"tensor {name!r} has {len(shape)} dimensions (at most {_MAX_NDIM})")
    nbytes = itemsize
    for dim in shape:
        # Checked per dimension: two negative dims would otherwise give a plausible product.
        if dim < 0:
            raise CodecError(f"tensor {name!r} has a negative dimension in shape {shape}")
        nbytes *= dim
        if nbytes > _MAX_BYTES:
            raise CodecError(f"tensor {name!r} of shape {shape} overflows 2**63 bytes")
    return nbytes


def _check_total(total_bytes: int, laid_out: int, max_total_bytes: int | None) -> None:
    if total_bytes != laid_out:
        raise CodecError(f"total_bytes={total_bytes}, but the tensors span {laid_out} bytes")
    if total_bytes > _MAX_BYTES:
        raise CodecError(f"total_bytes={total_bytes} overflows 2**63 bytes")
    if max_total_bytes is not None and total_bytes > max_total_bytes:
        raise CodecError(f"payload of {total_bytes} bytes exceeds the limit of {max_total_bytes}")


def _check_chunk_count(total_bytes: int, chunk_bytes: int) -> None:
    count = _num_chunks(total_bytes, chunk_bytes)
    if count > _MAX_CHUNKS:
        raise CodecError(
            f"payload needs {count} chunks; chunk indices are uint32, so raise chunk_bytes"
        )


def _check_no_split_elements(entries: Sequence[ManifestEntry], chunk_bytes: int) -> None:
    # When every element has one size, receivers read a chunk as a typed array (the aggregator:
    # np.frombuffer(data, "<f4") at element start // 4), so no element may straddle two chunks.
    sizes = {_itemsize(entry.dtype) for entry in entries}
    if len(sizes) == 1 and chunk_bytes % (itemsize := sizes.pop()):
        raise CodecError(
            f"chunk_bytes={chunk_bytes} must be a multiple of {itemsize}, "
            f"the size of every element in this payload"
        )


_ROOT_TAG = b"fedpt/payload-root/v1"


def payload_digest(chunk_sha256: Sequence[bytes]) -> bytes:
    """The payload's identity: sha256 over its chunks' sha256s (a one-level hash tree). It
    commits to every byte as a whole-payload hash would, but costs no second pass over the
    data: whoever checks each chunk and this root has checked the payload."""
    return hashlib.sha256(_ROOT_TAG + b"".join(chunk_sha256)).digest()


def payload_digest_of_file(path: Path, chunk_bytes: int) -> bytes:
    """`payload_digest` of a payload stored in a file, read in chunks of `chunk_bytes`."""
    digests = []
    with open(path, "rb") as f:
        while data := f.read(chunk_bytes):
            digests.append(hashlib.sha256(data).digest())
    return payload_digest(digests)


def _check_digests(manifest: Manifest) -> None:
    expected_count = manifest.num_chunks
    if len(manifest.chunk_sha256) != expected_count:
        raise CodecError(
            f"manifest lists {len(manifest.chunk_sha256)} chunk digests, "
            f"but {manifest.total_bytes} bytes in chunks of {manifest.chunk_bytes} "
            f"make {expected_count}"
        )
    for index, digest in enumerate(manifest.chunk_sha256):
        if len(digest) != _SHA256_BYTES:
            raise CodecError(f"chunk {index}'s sha256 is {len(digest)} bytes, expected 32")
    if len(manifest.sha256) != _SHA256_BYTES:
        raise CodecError(f"payload sha256 is {len(manifest.sha256)} bytes, expected 32")
    if manifest.sha256 != payload_digest(manifest.chunk_sha256):
        raise CodecError("the payload sha256 is not the root of its chunks' sha256s")


def _check_expected(actual: Sequence[TensorSpec], expected: Sequence[TensorSpec]) -> None:
    """Same names in the same order with the same shapes and dtypes; says what differs."""
    actual_names = [spec.name for spec in actual]
    expected_names = [spec.name for spec in expected]
    set_of_actual, set_of_expected = set(actual_names), set(expected_names)
    missing = [name for name in expected_names if name not in set_of_actual]
    if missing:
        raise CodecError(f"manifest lacks expected tensor {missing[0]!r}{_more(missing)}")
    extra = [name for name in actual_names if name not in set_of_expected]
    if extra:
        raise CodecError(f"manifest has unexpected tensor {extra[0]!r}{_more(extra)}")
    for position, (got, want) in enumerate(zip(actual, expected, strict=False)):
        if got.name != want.name:
            raise CodecError(
                f"manifest tensor #{position} is {got.name!r}, expected {want.name!r} "
                "(same tensors, different order)"
            )
        if got.shape != tuple(want.shape):
            raise CodecError(f"tensor {got.name!r} has shape {got.shape}, expected {want.shape}")
        if got.dtype != want.dtype:
            raise CodecError(f"tensor {got.name!r} has dtype {got.dtype}, expected {want.dtype}")
    if len(actual) != len(expected):  # only reachable with duplicate names in `expected`
        raise CodecError(f"manifest has {len(actual)} tensors, expected {len(expected)}")


def _more(names: list[str]) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""


# --- sender side ---


class _FlatBytes:
    """The payload as per-tensor flat uint8 views, read as [start, end) ranges without copying."""

    def __init__(self, views: list[np.ndarray], entries: Sequence[ManifestEntry]) -> None:
        self._views = views
        self._offsets = [entry.offset for entry in entries]
        self._ends = [entry.offset + entry.nbytes for entry in entries]

    def segments(self, start: int, end: int) -> Iterator[np.ndarray]:
        position = bisect.bisect_right(self._ends, start)  # first tensor that ends after start
        while start < end:
            base = self._offsets[position]
            stop = min(end, self._ends[position])
            if stop > start:  # empty tensors contribute nothing
                yield self._views[position][start - base : stop - base]
                start = stop
            position += 1


def _flat_uint8(tensor: torch.Tensor) -> np.ndarray:
    if tensor.numel() == 0:  # empty tensors may carry stride 0, which byte views refuse
        return np.empty(0, dtype=np.uint8)
    cpu = tensor.detach().to("cpu").contiguous()
    # bfloat16 has no numpy dtype: take torch's byte view first. Flatten first: a 0-d tensor
    # cannot be viewed as bytes.
    return cpu.reshape(-1).view(torch.uint8).numpy()


def _lay_out(tensors: Mapping[str, torch.Tensor]) -> tuple[list[ManifestEntry], list[np.ndarray]]:
    entries: list[ManifestEntry] = []
    views: list[np.ndarray] = []
    offset = 0
    for name, tensor in tensors.items():
        dtype = _dtype_name(name, tensor.dtype)
        view = _flat_uint8(tensor)
        entries.append(ManifestEntry(name, tuple(tensor.shape), dtype, offset, view.nbytes))
        views.append(view)
        offset += view.nbytes
    return entries, views


def _hash_chunks(
    flat: _FlatBytes, total_bytes: int, chunk_bytes: int
) -> tuple[tuple[bytes, ...], bytes]:
    """One pass over the tensors' memory: every chunk's sha256, and their root."""
    digests = []
    for start in range(0, total_bytes, chunk_bytes):
        chunk_hash = hashlib.sha256()
        for segment in flat.segments(start, min(start + chunk_bytes, total_bytes)):
            chunk_hash.update(segment)
        digests.append(chunk_hash.digest())
    return tuple(digests), payload_digest(digests)


class EncodedPayload:
    """Built by `encode`; holds the tensors (CPU, contiguous) and yields chunk bytes lazily.

    The tensors are not copied when they already are CPU and contiguous: do not modify them
    while the payload is in use, or chunks will no longer match their hashes.
    """

    def __init__(self, manifest: Manifest, flat: _FlatBytes) -> None:
        self.manifest = manifest
        self._flat = flat

    def chunk(self, index: int) -> bytes:
        start, end = self.manifest.chunk_span(index)
        return b"".join(self._flat.segments(start, end))  # the only copy: one chunk

    def chunks(self, first: int = 0) -> Iterator[tuple[int, bytes]]:
        _check_first_chunk(self.manifest, first)  # here, not on the first next()
        return ((index, self.chunk(index)) for index in range(first, self.manifest.num_chunks))


class SpooledPayload:
    """A payload already written to a file (an encoded update), with its manifest: chunks are
    read from disk on demand, so sending it holds one chunk in memory."""

    def __init__(self, manifest: Manifest, path: Path) -> None:
        if path.stat().st_size != manifest.total_bytes:
            raise CodecError(
                f"{path} holds {path.stat().st_size} bytes, its manifest {manifest.total_bytes}"
            )
        self.manifest, self.path = manifest, path

    def chunk(self, index: int) -> bytes:
        start, end = self.manifest.chunk_span(index)
        with open(self.path, "rb") as f:
            f.seek(start)
            return f.read(end - start)

    def chunks(self, first: int = 0) -> Iterator[tuple[int, bytes]]:
        _check_first_chunk(self.manifest, first)

        def read() -> Iterator[tuple[int, bytes]]:
            with open(self.path, "rb") as f:
                for index in range(first, self.manifest.num_chunks):
                    start, end = self.manifest.chunk_span(index)
                    f.seek(start)
                    yield index, f.read(end - start)

        return read()


def encode(
    tensors: Mapping[str, torch.Tensor], chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> EncodedPayload:
    """Lay out `tensors` (in mapping order) and hash them; chunks are cut later, on demand."""
    _check_chunk_bytes(chunk_bytes, MAX_CHUNK_BYTES)
    entries, views = _lay_out(tensors)
    total_bytes = _check_entries(entries)
    _check_chunk_count(total_bytes, chunk_bytes)
    _check_no_split_elements(entries, chunk_bytes)
    flat = _FlatBytes(views, entries)
    chunk_sha256, sha256 = _hash_chunks(flat, total_bytes, chunk_bytes)
    manifest = Manifest(tuple(entries), chunk_bytes, total_bytes, chunk_sha256, sha256)
    return EncodedPayload(manifest, flat)


def _check_first_chunk(manifest: Manifest, first_chunk: int) -> None:
    if not 0 <= first_chunk <= manifest.num_chunks:
        raise CodecError(
            f"first chunk {first_chunk} is out of range: the payload has "
            f"{manifest.num_chunks} chunks"
        )


# --- receiver side ---


class ChunkVerifier:
    """Receiver side, no buffering: checks chunks against a manifest in order.

    For streaming consumers (the aggregator's running sum), and for resumed uploads via
    `first_chunk`. A rejected chunk changes nothing.
    """

    def __init__(self, manifest: Manifest, first_chunk: int = 0) -> None:
        _check_first_chunk(manifest, first_chunk)
        self.manifest = manifest
        self.next_index = first_chunk

    @property
    def complete(self) -> bool:
        return self.next_index == self.manifest.num_chunks

    def verify(self, index: int, data: bytes) -> None:
        """Raise CodecError unless `data` is the chunk due next, intact; then expect the next."""
        if self.complete:
            raise CodecError(
                f"chunk {index} arrived after all {self.manifest.num_chunks} chunks were received"
            )
        if index != self.next_index:
            raise CodecError(f"chunk {index} arrived, expected chunk {self.next_index}")
        start, end = self.manifest.chunk_span(index)
        if len(data) != end - start:
            raise CodecError(f"chunk {index} is {len(data)} bytes, expected {end - start}")
        if hashlib.sha256(data).digest() != self.manifest.chunk_sha256[index]:
            raise CodecError(f"chunk {index} failed its sha256 check")
        self.next_index += 1


class PayloadAssembler:
    """Receiver side, buffering into one preallocated buffer of total_bytes; tensors at the end.
    Or, with `into`, straight into existing tensors of the manifest's names, shapes and dtypes
    (say, the model version a node is done with): no model-sized allocation, whose first touch
    of fresh pages costs more than the copy itself on virtual machines. Those tensors are
    overwritten as chunks arrive: an incomplete transfer leaves them a mix of two models.

    A rejected chunk changes nothing, so the transfer can resume from `restart_from()`.
    """

    def __init__(self, manifest: Manifest, into: Mapping[str, torch.Tensor] | None = None) -> None:
        self.manifest = manifest
        self._verifier = ChunkVerifier(manifest)
        self._into: dict[str, torch.Tensor] | None = None
        if into is None:
            # A torch allocation is well aligned for every dtype, unlike an arbitrary bytearray.
            self._buffer = torch.empty(manifest.total_bytes, dtype=torch.uint8)
            self._buffer_np = self._buffer.numpy()
            return
        specs = manifest.specs()
        if list(specs_of(into)) != specs or not all(
            t.device.type == "cpu" and t.is_contiguous() for t in into.values()
        ):  # fmt: skip
            raise CodecError("the tensors to receive into do not match the manifest's")
        self._into = dict(into)
        self._flat = _FlatBytes([_flat_uint8(self._into[s.name]) for s in specs],
                                manifest.entries)  # fmt: skip

    @property
    def next_index(self) -> int:
        return self._verifier.next_index

    @property
    def complete(self) -> bool:
        return self._verifier.complete

    def restart_from(self) -> int:
        """The chunk to resume from after a broken stream."""
        return self.next_index

    def add(self, index: int, data: bytes) -> None:
        self._verifier.verify(index, data)
        start, end = self.manifest.chunk_span(index)
        if self._into is None:
            self._buffer_np[start:end] = np.frombuffer(data, dtype=np.uint8)
            return
        source, at = np.frombuffer(data, dtype=np.uint8), 0
        for segment in self._flat.segments(start, end):
            segment[:] = source[at : at + len(segment)]
            at += len(segment)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The decoded tensors, once complete (every chunk matched its sha256, and the
        manifest's root matched the chunk sha256s when it was parsed).

        Tensors are views of this assembler's buffer where alignment allows (copies otherwise),
        so calling this twice returns tensors that share memory.
        """
        if not self.complete:
            raise CodecError(
                f"payload is incomplete: {self.next_index} of "
                f"{self.manifest.num_chunks} chunks received"
            )
        if self._into is not None:
            return self._into
        return {entry.name: self._tensor(entry) for entry in self.manifest.entries}

    def _tensor(self, entry: ManifestEntry) -> torch.Tensor:
        dtype = DTYPES[entry.dtype]
        raw = self._buffer[entry.offset : entry.offset + entry.nbytes]
        if entry.offset % dtype.itemsize:  # after an odd-sized tensor: misaligned, so copy
            raw = raw.clone()
        return raw.view(dtype).reshape(entry.shape)


# --- gRPC stream messages ---


def model_stream_messages(
    payload: EncodedPayload | SpooledPayload,
    first_chunk: int = 0,
    manifest: pb.TensorManifest | None = None,
) -> Iterator[pb.ModelStreamMessage]:
    """A PullModel response stream: the manifest (the payload's, unless one is given, e.g.
    with an update's model_sha256), then chunks first_chunk..end."""
    chunks = payload.chunks(first_chunk)  # validates first_chunk now
    manifest = manifest if manifest is not None else payload.manifest.to_proto()

    def stream() -> Iterator[pb.ModelStreamMessage]:
        yield pb.ModelStreamMessage(manifest=manifest)
        for index, data in chunks:
            yield pb.ModelStreamMessage(chunk=pb.Chunk(index=index, data=data))

    return stream()


def update_messages(
    header: pb.UpdateHeader, payload: EncodedPayload, first_chunk: int = 0
) -> Iterator[pb.UpdateMessage]:
    """A PushUpdate request stream: a copy of `header` with the manifest and first_chunk set,
    then chunks first_chunk..end."""
    chunks = payload.chunks(first_chunk)
    full_header = pb.UpdateHeader()
    full_header.CopyFrom(header)  # the caller's header stays as it was
    full_header.manifest.CopyFrom(payload.manifest.to_proto())
    full_header.first_chunk = first_chunk

    def stream() -> Iterator[pb.UpdateMessage]:
        yield pb.UpdateMessage(header=full_header)
        for index, data in chunks:
            yield pb.UpdateMessage(chunk=pb.Chunk(index=index, data=data))

    return stream()


def receive_model(
    messages: Iterable[pb.ModelStreamMessage],
    assembler_or_none: PayloadAssembler | None = None,
    *,
    expected: Sequence[TensorSpec] | None = None,
    max_total_bytes: int | None = None,
    into: Mapping[str, torch.Tensor] | None = None,
) -> PayloadAssembler:
    """Consume a PullModel stream into an assembler, new (receiving `into` those tensors, if
    given) or resumed; return it, complete or not.

    To resume after a broken connection, wrap the gRPC stream so that a retryable error ends
    the iteration instead of raising; the assembler returned then says `restart_from()`.
    """
    stream = iter(messages)
    manifest = _first_manifest(stream, expected, max_total_bytes)
    assembler = _resumed_or_new(assembler_or_none, manifest, into)
    for message in stream:
        kind = message.WhichOneof("payload")
        if kind != "chunk":
            raise CodecError(f"model stream sent a {kind or 'empty message'} after its manifest")
        assembler.add(message.chunk.index, message.chunk.data)
    return assembler


def _first_manifest(
    stream: Iterator[pb.ModelStreamMessage],
    expected: Sequence[TensorSpec] | None,
    max_total_bytes: int | None,
) -> Manifest:
    first = next(stream, None)
    if first is None:
        raise CodecError("model stream ended before its manifest")
    kind = first.WhichOneof("payload")
    if kind != "manifest":
        raise CodecError(
            f"model stream must start with a manifest, got a {kind or 'empty message'}"
        )
    return Manifest.from_proto(first.manifest, expected=expected, max_total_bytes=max_total_bytes)


def _resumed_or_new(
    assembler: PayloadAssembler | None,
    manifest: Manifest,
    into: Mapping[str, torch.Tensor] | None = None,
) -> PayloadAssembler:
    if assembler is None:
        return PayloadAssembler(manifest, into)
    if assembler.manifest != manifest:
        raise CodecError("resumed model stream has a different manifest than the broken one")
    return assembler
