"""Delta encodings: how a node's Δ travels, written and read one piece at a time.

| encoding       | wire per parameter | what the aggregator learns                        |
|----------------|--------------------|---------------------------------------------------|
| `fp32`         | 4 bytes            | each Δ exactly                                     |
| `bf16`         | 2 bytes            | each Δ, stochastically rounded to bfloat16         |
| `int8`         | 256/252 ≈ 1.016 B  | each Δ, int8 with one fp32 scale per 252 values    |
| `masked-int32` | 4 bytes            | only the sum (secure aggregation, ring Z_2^32)     |
| `masked-int16` | 2 bytes            | only the sum (ring Z_2^16)                         |
| `masked-int8`  | 1 byte             | only the sum (ring Z_2^8)                          |

Every lossy encoding rounds stochastically (unbiased) and feeds its error back: the node adds
the residual it kept from its last update (`x = Δ + r`) and keeps `r' = x − decoded(x)` for the
next one, so quantization error is delayed, never lost (as in 1-bit Adam / EF-SGD). Secure
encodings also clip (at public per-tensor bounds) and the clipped mass goes into `r'` too.

The encoder never flattens the model: it walks the tensors in pieces of `PIECE_ELEMENTS`, gathers
one piece (a copy of one piece), encodes it, writes it to a spool file and hashes it, and writes
the residual back into the delta's own memory, so the delta's buffers become the residual. Node
memory beyond model + delta is a few pieces. Decoding is stateless per chunk (an `int8` block
carries its own scale), so the aggregator folds each verified chunk into its sum on arrival and
can rebuild a sum from spooled bytes.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from protos import secagg
from protos.codec import (
    DTYPES,
    EncodedPayload,
    Manifest,
    ManifestEntry,
    SpooledPayload,
    TensorSpec,
    encode,
    payload_digest,
)

PLAIN_ENCODINGS = ("fp32", "bf16", "int8")
RING_BITS = {"masked-int32": 32, "masked-int16": 16, "masked-int8": 8}
ENCODINGS = PLAIN_ENCODINGS + tuple(RING_BITS)

INT8_BLOCK_VALUES = 252  # values per int8 block: with its 4-byte scale a block is 256 bytes
INT8_BLOCK_BYTES = 4 + INT8_BLOCK_VALUES
INT8_TENSOR = "int8_blocks"
PIECE_ELEMENTS = INT8_BLOCK_VALUES * 1024  # ~258K values (1 MB of fp32) per encoding step
_WIRE_DTYPE = {"fp32": "float32", "bf16": "bfloat16"} | {
    name: f"uint{bits}" for name, bits in RING_BITS.items()
}


class EncodingError(ValueError):
    """An unknown encoding, a chunk size it cannot use, or a delta it cannot encode."""


def check_encoding(encoding: str) -> None:
    if encoding not in ENCODINGS:
        raise EncodingError(
            f"unknown delta encoding {encoding!r}; expected one of {', '.join(ENCODINGS)}"
        )


def is_secure(encoding: str) -> bool:
    return encoding in RING_BITS


def check_chunk_bytes(encoding: str, chunk_bytes: int) -> None:
    """Chunks must hold whole wire elements (whole blocks for int8), so each decodes alone."""
    unit = INT8_BLOCK_BYTES if encoding == "int8" else wire_itemsize(encoding)
    if chunk_bytes % unit:
        raise EncodingError(
            f"chunk_bytes={chunk_bytes} must be a multiple of {unit} for delta encoding {encoding}"
        )


def wire_itemsize(encoding: str) -> int:
    check_encoding(encoding)
    if encoding == "int8":
        return 1
    return DTYPES[_WIRE_DTYPE[encoding]].itemsize


def int8_blocks(num_elements: int) -> int:
    return -(-num_elements // INT8_BLOCK_VALUES)


def wire_specs(encoding: str, model_specs: Sequence[TensorSpec]) -> list[TensorSpec]:
    """The tensors an update in `encoding` consists of, for a model of `model_specs` (fp32)."""
    check_encoding(encoding)
    if encoding == "int8":
        total = sum(math.prod(s.shape) for s in model_specs)
        return [TensorSpec(INT8_TENSOR, (int8_blocks(total) * INT8_BLOCK_BYTES,), "uint8")]
    return [TensorSpec(s.name, s.shape, _WIRE_DTYPE[encoding]) for s in model_specs]


def wire_bytes_per_param(encoding: str, num_elements: int) -> float:
    return (
        sum(s.nbytes for s in wire_specs(encoding, [TensorSpec("x", (num_elements,), "float32")]))
        / num_elements
    )


# ---- the flat layout of a model's tensors --------------------------------------------------------


@dataclass(frozen=True)
class FlatLayout:
    """Tensor names, shapes and element offsets as one flat vector (no copy is ever made)."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]  # first element of each tensor
    total: int

    @classmethod
    def of(cls, specs: Sequence[TensorSpec]) -> FlatLayout:
        offsets, total = [], 0
        for spec in specs:
            offsets.append(total)
            total += math.prod(spec.shape)
        return cls(
            tuple(s.name for s in specs),
            tuple(tuple(s.shape) for s in specs),
            tuple(offsets),
            total,
        )

    def segments(self, start: int, stop: int) -> Iterator[tuple[int, int, int]]:
        """(tensor index, first, end) element ranges, tensor-local, covering [start, stop)."""
        for i, offset in enumerate(self.offsets):
            size = math.prod(self.shapes[i])
            lo, hi = max(start, offset), min(stop, offset + size)
            if lo < hi:
                yield i, lo - offset, hi - offset

    def pieces(self, piece: int = PIECE_ELEMENTS) -> Iterator[tuple[int, int]]:
        for start in range(0, self.total, piece):
            yield start, min(start + piece, self.total)


def _flat_views(tensors: Mapping[str, torch.Tensor], layout: FlatLayout) -> list[np.ndarray]:
    views = []
    for name, shape in zip(layout.names, layout.shapes, strict=True):
        t = tensors[name]
        if t.dtype != torch.float32 or not t.is_contiguous() or tuple(t.shape) != shape:
            raise EncodingError(
                f"tensor {name!r} must be a contiguous float32 tensor of shape {shape}"
            )
        views.append(t.detach().view(-1).numpy())
    return views


def _gather(views: list[np.ndarray], layout: FlatLayout, start: int, stop: int) -> np.ndarray:
    out = np.empty(stop - start, dtype=np.float32)
    at = 0
    for i, lo, hi in layout.segments(start, stop):
        out[at : at + hi - lo] = views[i][lo:hi]
        at += hi - lo
    return out


def _scatter(
    views: list[np.ndarray],
    layout: FlatLayout,
    start: int,
    values: np.ndarray,
    *,
    add: bool = False,
) -> None:
    """Write (or, with `add`, add) flat `values` from element `start` into the tensors."""
    at = 0
    for i, lo, hi in layout.segments(start, start + values.size):
        target, part = views[i][lo:hi], values[at : at + hi - lo]
        if add:
            np.add(target, part, out=target)
        else:
            target[...] = part
        at += hi - lo


# ---- piece codecs: encode one piece (float32) -> (wire bytes, what the receiver decodes) -----------


def _piece_rng(key: bytes, start: int) -> np.random.Generator:
    """Stochastic rounding of the piece at `start`: reproducible (a node re-encoding the same
    update gets the same bytes) and independent of how the work is split into pieces."""
    digest = hashlib.sha256(key + start.to_bytes(8, "little")).digest()
    return np.random.default_rng(np.frombuffer(digest, dtype=np.uint32))


def encode_bf16(x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Stochastic rounding to bfloat16: add uniform noise below the kept 16 bits, truncate."""
    bits = x.view(np.uint32).astype(np.uint64)
    bits += rng.integers(0, 1 << 16, size=x.size, dtype=np.uint64)
    wire = (bits >> 16).astype(np.uint16)
    return wire, decode_bf16(wire)


def decode_bf16(wire: np.ndarray) -> np.ndarray:
    return (wire.astype(np.uint32) << 16).view(np.float32)


def encode_int8(x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Blocks of 252 values as [fp32 scale][252 × int8], scale = max|x| / 127; unbiased
    stochastic rounding, so |q| ≤ 127. A piece's last block is zero-padded."""
    blocks = int8_blocks(x.size)
    padded = np.zeros(blocks * INT8_BLOCK_VALUES, dtype=np.float32)
    padded[: x.size] = x
    values = padded.reshape(blocks, INT8_BLOCK_VALUES)
    scale = np.abs(values).max(axis=1) / np.float32(127)
    safe = np.where(scale > 0, scale, np.float32(1))
    scaled = values / safe[:, None]
    q = np.floor(scaled)
    q += rng.random(scaled.shape, dtype=np.float32) < (scaled - q)
    np.clip(q, -127, 127, out=q)  # float rounding in the division may reach 127 + ε
    wire = np.empty((blocks, INT8_BLOCK_BYTES), dtype=np.uint8)
    wire[:, :4] = scale.astype("<f4").view(np.uint8).reshape(blocks, 4)
    wire[:, 4:] = q.astype(np.int8).view(np.uint8)
    return wire.reshape(-1), decode_int8(wire.reshape(-1))[: x.size]


def decode_int8(wire: np.ndarray) -> np.ndarray:
    blocks = wire.reshape(-1, INT8_BLOCK_BYTES)
    scale = blocks[:, :4].copy().view("<f4")
    q = blocks[:, 4:].view(np.int8).astype(np.float32)
    return (q * scale).reshape(-1)


def decode_chunk(
    encoding: str, byte_offset: int, data: bytes | memoryview
) -> tuple[int, np.ndarray]:
    """A plain encoding's chunk as (first element, float32 values): stateless, so chunks decode
    on arrival and spooled uploads replay. An int8 chunk's zero padding past the model's end
    decodes to zeros (the caller trims to its length)."""
    raw = np.frombuffer(data, dtype=np.uint8)
    if encoding == "fp32":
        return byte_offset // 4, raw.view("<f4")
    if encoding == "bf16":
        return byte_offset // 2, decode_bf16(raw.view("<u2"))
    if encoding == "int8":
        return byte_offset // INT8_BLOCK_BYTES * INT8_BLOCK_VALUES, decode_int8(raw)
    raise EncodingError(f"{encoding} chunks are summed in their ring, not decoded one by one")


# ---- secure pieces ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SecureParams:
    """What one node needs to quantize and mask its update in a secure round."""

    bits: int
    clips: tuple[float, ...]  # per tensor, in the model's order (public)
    scales: tuple[float, ...]  # per tensor, powers of two chosen by the aggregator (public)
    weight: float  # num_tokens / weight_unit: the node sends x · weight
    self_seed: bytes | None
    pair_seeds: Mapping[str, bytes]
    node_id: str


def _encode_secure_piece(
    x: np.ndarray, start: int, layout: FlatLayout, p: SecureParams, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Quantize x·weight per tensor segment, then mask the piece; (wire words, decoded x)."""
    wire = np.empty(x.size, dtype=secagg.RING_DTYPES[p.bits])
    decoded = np.empty(x.size, dtype=np.float32)
    at = 0
    for i, lo, hi in layout.segments(start, start + x.size):
        n = hi - lo
        cfg = secagg.QuantizationConfig(p.clips[i], p.scales[i], p.bits)
        q = secagg.quantize(x[at : at + n].astype(np.float64) * p.weight, cfg, rng)
        wire[at : at + n] = q
        signed = q.view(f"int{p.bits}").astype(np.float64)
        decoded[at : at + n] = signed / (p.scales[i] * p.weight)
        at += n
    secagg.mask_chunk(wire, start, p.self_seed, p.pair_seeds, p.node_id)
    return wire, decoded


def plain_rounding_key(federation: str, organisation: str, version: int) -> bytes:
    """Stochastic rounding of a plain update: reproducible per organisation and model version
    (a restarted node re-encodes identically), and different between organisations."""
    parts = [
        b"fedpt/plain-rounding/v1",
        federation.encode(),
        organisation.encode(),
        str(version).encode(),
    ]
    return hashlib.sha256(b"\0".join(parts)).digest()


# ---- the streaming encoder ----------------------------------------------------------------------


class _ChunkHasher:
    """sha256 of every `chunk_bytes` chunk and their root, fed in arbitrary pieces."""

    def __init__(self, chunk_bytes: int) -> None:
        self.chunk_bytes, self.digests = chunk_bytes, []
        self._chunk, self._filled = hashlib.sha256(), 0

    def update(self, data: memoryview) -> None:
        while len(data):
            take = min(len(data), self.chunk_bytes - self._filled)
            self._chunk.update(data[:take])
            self._filled += take
            data = data[take:]
            if self._filled == self.chunk_bytes:
                self.digests.append(self._chunk.digest())
                self._chunk, self._filled = hashlib.sha256(), 0

    def finish(self) -> tuple[tuple[bytes, ...], bytes]:
        if self._filled:
            self.digests.append(self._chunk.digest())
        return tuple(self.digests), payload_digest(self.digests)


def encode_update(
    delta: Mapping[str, torch.Tensor],
    encoding: str,
    out_path: Path,
    chunk_bytes: int,
    *,
    rounding_key: bytes,
    residual: Mapping[str, torch.Tensor] | None = None,
    secure: SecureParams | None = None,
) -> EncodedPayload | SpooledPayload:
    """The payload to push: fp32 without a residual travels straight from the delta's memory
    (nothing is lost, nothing to write down); every other case is encoded into `out_path` by
    `encode_update_in_place`."""
    if encoding == "fp32" and residual is None and secure is None:
        return encode(delta, chunk_bytes)
    manifest = encode_update_in_place(delta, encoding, out_path, chunk_bytes,
                                      rounding_key=rounding_key, residual=residual, secure=secure)  # fmt: skip
    return SpooledPayload(manifest, out_path)


def encode_update_in_place(
    delta: Mapping[str, torch.Tensor],
    encoding: str,
    out_path: Path,
    chunk_bytes: int,
    *,
    rounding_key: bytes,
    residual: Mapping[str, torch.Tensor] | None = None,
    secure: SecureParams | None = None,
) -> Manifest:
    """Encode Δ (+ the carried residual) into the spool file `out_path`; return its manifest.

    Afterwards `delta`'s tensors hold the new residual (what the encoding lost, to add next
    time); for fp32 that is zero. `rounding_key` seeds stochastic rounding: the same key
    reproduces the same bytes. Needs `secure` exactly for the masked encodings.
    """
    check_encoding(encoding)
    check_chunk_bytes(encoding, chunk_bytes)
    if is_secure(encoding) != (secure is not None):
        raise EncodingError(f"{encoding} needs secure-aggregation parameters exactly when masked")
    if secure is not None and secure.bits != RING_BITS[encoding]:
        raise EncodingError(
            f"{encoding} masks in a {RING_BITS[encoding]}-bit ring, not {secure.bits}"
        )
    names = list(delta)
    specs = [TensorSpec(n, tuple(delta[n].shape), "float32") for n in names]
    layout = FlatLayout.of(specs)
    views = _flat_views(delta, layout)
    carried = _flat_views(residual, layout) if residual is not None else None
    hasher = _ChunkHasher(chunk_bytes)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "wb") as out:
        for start, stop in layout.pieces():
            x = _gather(views, layout, start, stop)
            if carried is not None:
                x += _gather(carried, layout, start, stop)
            if not np.isfinite(x).all():
                raise EncodingError("cannot encode a delta with NaN or infinite values")
            rng = _piece_rng(rounding_key, start)
            if encoding == "fp32":
                wire, decoded = x, x
            elif encoding == "bf16":
                wire, decoded = encode_bf16(x, rng)
            elif encoding == "int8":
                wire, decoded = encode_int8(x, rng)
            else:
                wire, decoded = _encode_secure_piece(x, start, layout, secure, rng)
            data = memoryview(np.ascontiguousarray(wire)).cast("B")
            out.write(data)  # before the residual: fp32's wire is x itself
            hasher.update(data)
            x -= decoded
            _scatter(views, layout, start, x)  # the delta's memory now holds the residual
    chunk_sha256, sha256 = hasher.finish()
    entries, offset = [], 0
    for spec in wire_specs(encoding, specs):
        entries.append(ManifestEntry(spec.name, spec.shape, spec.dtype, offset, spec.nbytes))
        offset += spec.nbytes
    if out_path.stat().st_size != offset:
        raise EncodingError(f"encoded {out_path.stat().st_size} bytes, expected {offset}")
    return Manifest(tuple(entries), chunk_bytes, offset, chunk_sha256, sha256)


# ---- the compressed download: θ_v = θ_{v-1} + decoded(step) ------------------------------------


def add_decoded_chunk(
    encoding: str,
    params: Mapping[str, torch.Tensor],
    layout: FlatLayout,
    byte_offset: int,
    data: bytes,
) -> None:
    """params += the decoded values of one chunk of an outer-update payload, in place.

    The aggregator builds its own next model with this very function from the same bytes, and
    float32 addition is exact IEEE rounding, so every holder of θ_{v-1} gets θ_v bit for bit."""
    start, values = decode_chunk(encoding, byte_offset, data)
    values = values[: max(0, layout.total - start)]
    _scatter(_flat_views(params, layout), layout, start, values, add=True)


def apply_update_file(
    encoding: str, params: Mapping[str, torch.Tensor], path: Path, chunk_bytes: int
) -> None:
    """params += the decoded outer update spooled at `path` (see `add_decoded_chunk`)."""
    layout = FlatLayout.of([TensorSpec(n, tuple(t.shape), "float32") for n, t in params.items()])
    with open(path, "rb") as f:
        offset = 0
        while data := f.read(chunk_bytes):
            add_decoded_chunk(encoding, params, layout, offset, data)
            offset += len(data)
