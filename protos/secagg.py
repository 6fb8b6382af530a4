"""Secure-aggregation math (Bonawitz et al. 2017), shared by nodes and the aggregator.

The aggregator must learn only the SUM of the nodes' quantized deltas. Each node u sends

    y_u = q_u + PRG(b_u) + Σ_{v ≠ u} sign(u, v) · PRG(s_uv)        (mod 2^32, element-wise)

where q_u is its quantized delta, b_u a fresh random self seed, s_uv the seed derived from the
X25519 agreement of u's and v's mask keys, and PRG an AES-256-CTR keystream read as uint32 words.

Sign convention (used everywhere below): sign(u, v) = +1 if u < v else -1, comparing node ids
as Python strings (code-point order). So sign(u, v) = -sign(v, u): the pairwise masks of u and v
cancel in the sum. The aggregator removes Σ PRG(b_u) of the survivors, whose self seeds it
rebuilds from Shamir shares, and, for every dropped node d and survivor v, the term
sign(v, d) · PRG(s_vd) that v added but d's masked input never cancelled (s_vd from d's
mask private key, also rebuilt from shares). A node must never reveal, for one node, both
its self-seed share and its mask-key share: together they would unmask that node alone.

Values live in Z_2^32, Z_2^16 or Z_2^8 as numpy uint32, uint16 or uint8 arrays (numpy wraps
unsigned addition modulo the word size); PRG words are read at the ring's width. All mask and
quantization functions work on element ranges [element_offset, element_offset + len) of one
flat vector, and both sides call them one chunk at a time (protos/delta_encoding.py), so
neither holds more than a chunk plus one keystream block of temporaries.

Integrity of shares and keys comes from the channel: keys are signed with long-term Ed25519
identity keys, and shares travel AES-256-GCM-encrypted between nodes through the aggregator.
"""

from __future__ import annotations

import math
import random
import secrets
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

# Keystream words are read from the keystream as little-endian uint32; masks are added to
# native uint32 arrays in place, which only agree on little-endian hosts (as in protos.codec).
if sys.byteorder != "little":
    raise ImportError("protos.secagg supports little-endian hosts only")


class SecAggError(ValueError):
    """Any refusal: a bad signature, key, share or ciphertext, or an overflow-prone config."""


MODULUS_BITS = 32
SEED_BYTES = 32  # self seeds and pairwise seeds are AES-256 keys
KEY_BYTES = 32  # raw X25519 keys and Ed25519 public keys
SHARE_BYTES = 66  # a Shamir share's y, big-endian: PRIME has 521 bits
NONCE_BYTES = 12  # AES-GCM nonce, prepended to each encrypted share bundle
_TAG_BYTES = 16  # AES-GCM tag
_MAX_X = 2**31  # share x coordinates fit a uint32 on the wire
_MAX_ROUND = 2**64 - 1
_BLOCK_BYTES = 1 << 18  # keystream generated in 256 KiB blocks: stays in cache for the add
_BYTES_PER_AES_BLOCK = 16
RING_DTYPES = {32: np.uint32, 16: np.uint16, 8: np.uint8}  # ring width in bits -> word dtype
_MIN_EXPONENT, _MAX_EXPONENT = -1074, 1023  # the powers of two a float64 holds

_PAIR_TAG = b"fedpt/secagg/pair/v1"
_KEYS_TAG = b"fedpt/secagg/keys/v1"
_SHARE_KEY_TAG = b"fedpt/secagg/share-key/v1"
_SHARES_AAD_TAG = b"fedpt/secagg/shares/v1"
_ROUNDING_TAG = b"fedpt/secagg/rounding/v1"
_STAGE_REPLY_TAG = b"fedpt/secagg/stage-reply/v1"


# --- canonical encoding (signed messages, HKDF info, AAD) ---


def _encode(*fields: bytes | str | int) -> bytes:
    """Each field length-prefixed (4 bytes, big-endian): no two field lists encode alike."""
    parts = []
    for field in fields:
        raw = _field_bytes(field)
        parts.append(len(raw).to_bytes(4, "big"))
        parts.append(raw)
    return b"".join(parts)


def _field_bytes(field: bytes | str | int) -> bytes:
    if isinstance(field, bytes):
        return field
    if isinstance(field, str):
        return field.encode("utf-8")
    if isinstance(field, bool) or not 0 <= field <= _MAX_ROUND:
        raise SecAggError(f"integer field {field!r} must be between 0 and 2**64 - 1")
    return field.to_bytes(8, "big")


def _check_len(what: str, value: bytes, expected: int) -> None:
    if not isinstance(value, bytes) or len(value) != expected:
        size = len(value) if isinstance(value, bytes | bytearray) else type(value).__name__
        raise SecAggError(f"{what} must be {expected} bytes, got {size}")


# --- quantization ---


@dataclass(frozen=True)
class QuantizationConfig:
    """Public quantization parameters, the same for every node of a round.

    clip: each element of the (weighted) delta is clipped to [-clip, clip].
    scale: q = stochastic_round(x * scale); a power of two keeps x * scale exact.
    bits: the ring Z_2^bits the masked values live in (32, 16 or 8).
    """

    clip: float
    scale: float
    bits: int = 32

    def __post_init__(self) -> None:
        if self.bits not in RING_DTYPES:
            raise SecAggError(f"ring width {self.bits!r} must be one of {sorted(RING_DTYPES)}")
        for name in ("clip", "scale"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise SecAggError(f"quantization {name}={value!r} must be finite and positive")
        check_no_overflow(self, 1)  # one node's values must fit the signed ring for the cast

    @property
    def max_abs_q(self) -> float:
        """A bound on |q|: stochastic rounding may round clip * scale up by one."""
        return self.clip * self.scale + 1


def check_no_overflow(cfg: QuantizationConfig, max_nodes: int) -> None:
    """Refuse configs whose sum over `max_nodes` nodes could leave the signed ring's range.

    The sum is read back as a signed integer of `bits`, so |Σ q| must stay below 2^(bits-1).
    """
    if isinstance(max_nodes, bool) or max_nodes < 1:
        raise SecAggError(f"max_nodes={max_nodes!r} must be at least 1")
    worst = max_nodes * cfg.max_abs_q
    if worst >= 2 ** (cfg.bits - 1):
        raise SecAggError(
            f"quantized sum could overflow: {max_nodes} nodes * (clip {cfg.clip} * "
            f"scale {cfg.scale} + 1) = {worst:.6g} >= 2**{cfg.bits - 1}; lower scale or clip"
        )


def choose_scale(clip: float, max_nodes: int, bits: int = 32) -> float:
    """The largest power of two `scale` for which `check_no_overflow` passes."""
    if not (math.isfinite(clip) and clip > 0):
        raise SecAggError(f"clip={clip!r} must be finite and positive")
    if isinstance(max_nodes, bool) or max_nodes < 1:
        raise SecAggError(f"max_nodes={max_nodes!r} must be at least 1")
    if bits not in RING_DTYPES:
        raise SecAggError(f"ring width {bits!r} must be one of {sorted(RING_DTYPES)}")
    room = 2 ** (bits - 1) / max_nodes - 1  # the bound on clip * scale
    if room <= 0:
        raise SecAggError(
            f"{max_nodes} nodes leave no room for any scale in a {bits}-bit ring; use a wider one"
        )
    ratio = room / clip
    exponent = _MAX_EXPONENT if ratio >= 2.0**_MAX_EXPONENT else math.floor(math.log2(ratio))
    # log2 is inexact near powers of two: settle the exponent against the real check.
    while exponent > _MIN_EXPONENT and not _scale_fits(clip, 2.0**exponent, max_nodes, bits):
        exponent -= 1
    while exponent < _MAX_EXPONENT and _scale_fits(clip, 2.0 ** (exponent + 1), max_nodes, bits):
        exponent += 1
    scale = 2.0**exponent
    check_no_overflow(QuantizationConfig(clip, scale, bits), max_nodes)
    return scale


def _scale_fits(clip: float, scale: float, max_nodes: int, bits: int) -> bool:
    return scale > 0 and max_nodes * (clip * scale + 1) < 2 ** (bits - 1)


def quantize(x: np.ndarray, cfg: QuantizationConfig, rng: np.random.Generator) -> np.ndarray:
    """Clip, scale and stochastically round to int, as the ring's unsigned words (two's
    complement): uint32, uint16 or uint8 for 32, 16 or 8 bits.

    Unbiased: E[q] = clip(x) * scale, since q = floor(v) + 1 with probability frac(v).
    Works in float64 so that the scaling and the fraction are exact for float32 input; callers
    pass one chunk at a time, so that copy is a chunk, never the model.
    """
    v = np.array(x, dtype=np.float64).reshape(-1)  # a copy: worked on in place
    if not np.isfinite(v).all():
        raise SecAggError("cannot quantize a delta with NaN or infinite values")
    np.clip(v, -cfg.clip, cfg.clip, out=v)
    v *= cfg.scale
    q = np.floor(v)
    v -= q  # the fraction, in [0, 1)
    q += rng.random(v.shape) < v
    # |q| <= clip * scale + 1 < 2^(bits-1) (checked by the config): the signed type holds it.
    unsigned = RING_DTYPES[cfg.bits]
    signed = np.dtype(f"int{cfg.bits}")
    return q.astype(signed).view(unsigned).reshape(np.shape(x))


def rounding_key(node_secret: bytes, federation: str, model_version: int) -> bytes:
    """The key of `rounding_rng`, for encoders that derive one generator per chunk from it."""
    return _hkdf(node_secret, _encode(_ROUNDING_TAG, federation, model_version))


def rounding_rng(node_secret: bytes, federation: str, model_version: int) -> np.random.Generator:
    """The stochastic-rounding generator of one node's update to one model version: secret
    (keyed by the node's own long-term key), yet the same when a restarted node or a retried
    round trains that version again, so that such an update is reproduced exactly. Keyed by the
    federation's name, not its random id, so that a federation run again with the same
    settings and kits rounds identically (what makes runs comparable bit for bit)."""
    seed = rounding_key(node_secret, federation, model_version)
    return np.random.default_rng(np.frombuffer(seed, dtype=np.uint32))


def dequantize_sum(total: np.ndarray, cfg: QuantizationConfig) -> np.ndarray:
    """The unmasked sum back to float32: read as a signed integer of the ring's width, divide
    by scale."""
    unsigned = RING_DTYPES[cfg.bits]
    if total.dtype != unsigned:
        raise SecAggError(
            f"a quantized {cfg.bits}-bit sum is {np.dtype(unsigned)}, got {total.dtype}"
        )
    return (total.view(f"int{cfg.bits}") / cfg.scale).astype(np.float32)


# --- PRG masks: AES-256-CTR keystreams ---


def pair_sign(me: str, other: str) -> int:
    """+1 if me < other else -1: the sign `me` gives the mask it shares with `other`."""
    if me == other:
        raise SecAggError(f"node {me!r} has no pairwise mask with itself")
    return 1 if me < other else -1


def new_self_seed() -> bytes:
    """A fresh self-mask seed b_u for one round (never reuse one across rounds)."""
    return secrets.token_bytes(SEED_BYTES)


def _keystream_encryptor(seed: bytes, byte_offset: int) -> CipherContext:
    """An AES-256-CTR encryptor positioned at keystream byte `byte_offset`.

    Counter block = 128-bit big-endian block index from 0, so seeking is setting the counter;
    the remaining bytes of a partial first block are skipped by encrypting them.
    """
    _check_len("keystream seed", seed, SEED_BYTES)
    if isinstance(byte_offset, bool) or byte_offset < 0:
        raise SecAggError(f"element_offset={byte_offset!r} must be non-negative")
    block, skip = divmod(byte_offset, _BYTES_PER_AES_BLOCK)
    if block >= 2**128:
        raise SecAggError(f"element_offset={byte_offset} is past the keystream's end")
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(block.to_bytes(16, "big"))).encryptor()
    encryptor.update(bytes(skip))
    return encryptor


def keystream_words(seed: bytes, element_offset: int, count: int, dtype=np.uint32) -> np.ndarray:
    """Words [element_offset, element_offset + count) of the keystream keyed by `seed`, read as
    little-endian words of `dtype` (uint8, uint16 or uint32: the ring Z_2^8, Z_2^16, Z_2^32).

    The same words whether generated whole or in pieces at any offsets.
    """
    if isinstance(count, bool) or count < 0:
        raise SecAggError(f"count={count!r} must be non-negative")
    size = np.dtype(dtype).itemsize
    encryptor = _keystream_encryptor(seed, size * element_offset)
    # Extra room: some cryptography versions want a block size - 1 of slack in update_into.
    out = np.empty(size * count + 15, dtype=np.uint8)
    encryptor.update_into(memoryview(np.zeros(size * count, dtype=np.uint8)), out)
    return out[: size * count].view(np.dtype(dtype).newbyteorder("<"))


def keystream_u32(seed: bytes, element_offset: int, count: int) -> np.ndarray:
    """Words [element_offset, element_offset + count) of the keystream as uint32."""
    return keystream_words(seed, element_offset, count, np.uint32)


def _check_values(values: np.ndarray) -> np.ndarray:
    """A flat view of `values`, which must be a ring dtype (uint8/16/32) and contiguous (it is
    updated in place)."""
    if not isinstance(values, np.ndarray) or values.dtype.type not in _RING_TYPES:
        raise SecAggError(
            f"masked values must be a uint8, uint16 or uint32 array, got "
            f"{getattr(values, 'dtype', values)}"
        )
    if not values.flags.c_contiguous or not values.flags.writeable:
        raise SecAggError("masked values must be a writable, C-contiguous array")
    return values.reshape(-1)


_RING_TYPES = tuple(RING_DTYPES.values())


def _add_keystreams(
    values: np.ndarray, element_offset: int, signed_seeds: Sequence[tuple[bytes, int]]
) -> None:
    """values += Σ sign · PRG(seed) over [element_offset, +len), mod 2^bits, in place."""
    flat = _check_values(values)
    for _, direction in signed_seeds:
        if direction not in (1, -1):
            raise SecAggError(f"mask sign must be +1 or -1, got {direction!r}")
    size = flat.dtype.itemsize
    streams = [(_keystream_encryptor(seed, size * element_offset), d) for seed, d in signed_seeds]
    if not streams or flat.size == 0:
        return
    block_words = min(_BLOCK_BYTES // size, flat.size)
    zeros = memoryview(np.zeros(size * block_words, dtype=np.uint8))
    scratch = np.empty(size * block_words + 15, dtype=np.uint8)  # slack, see keystream_words
    words = scratch[: size * block_words].view(flat.dtype.newbyteorder("<"))
    # Block-major, seed-minor: each keystream block is added while still in cache, and every
    # encryptor simply continues its stream into the next block.
    for start in range(0, flat.size, block_words):
        target = flat[start : start + block_words]
        n = target.size
        for encryptor, direction in streams:
            encryptor.update_into(zeros[: size * n], scratch)
            if direction > 0:
                np.add(target, words[:n], out=target)
            else:
                np.subtract(target, words[:n], out=target)


def mask_chunk(
    values: np.ndarray,
    element_offset: int,
    self_seed: bytes | None,
    pair_seeds: Mapping[str, bytes],
    my_id: str,
) -> None:
    """values += PRG(self_seed) + Σ_v pair_sign(my_id, v) · PRG(pair_seeds[v]), in place.

    `values` holds elements [element_offset, element_offset + values.size) of the flat vector.
    """
    signed = [] if self_seed is None else [(self_seed, 1)]
    signed += [(seed, pair_sign(my_id, peer)) for peer, seed in sorted(pair_seeds.items())]
    _add_keystreams(values, element_offset, signed)


def unmask_chunk(
    total: np.ndarray,
    element_offset: int,
    survivor_self_seeds: Iterable[bytes],
    dropped_pair_masks: Iterable[tuple[bytes, int]],
) -> None:
    """Remove the masks that did not cancel from a chunk of the sum of masked inputs, in place.

    total -= Σ PRG(b_u) over the survivors' self seeds, and total -= sign · PRG(seed) for each
    (seed, sign) in `dropped_pair_masks`: for survivor v and dropped node d, the seed s_vd and
    sign = pair_sign(v, d), the term v added that d never cancelled.
    """
    signed = [(seed, -1) for seed in survivor_self_seeds]
    for seed, direction in dropped_pair_masks:
        if direction not in (1, -1):
            raise SecAggError(f"mask sign must be +1 or -1, got {direction!r}")
        signed.append((seed, -direction))
    _add_keystreams(total, element_offset, signed)


# --- key agreement, key derivation, signatures ---


def generate_x25519() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair as (private raw 32 bytes, public raw 32 bytes)."""
    private = X25519PrivateKey.generate()
    private_raw = private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    return private_raw, private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def x25519_public(private_raw: bytes) -> bytes:
    """The public key of a raw X25519 private key (to check a reconstructed mask key)."""
    _check_len("X25519 private key", private_raw, KEY_BYTES)
    public = X25519PrivateKey.from_private_bytes(private_raw).public_key()
    return public.public_bytes(Encoding.Raw, PublicFormat.Raw)


def x25519_shared(private_raw: bytes, peer_public_raw: bytes) -> bytes:
    """The X25519 shared secret; refuses malformed and low-order (all-zero result) keys."""
    _check_len("X25519 private key", private_raw, KEY_BYTES)
    _check_len("X25519 public key", peer_public_raw, KEY_BYTES)
    try:
        private = X25519PrivateKey.from_private_bytes(private_raw)
        return private.exchange(X25519PublicKey.from_public_bytes(peer_public_raw))
    except ValueError as exc:  # cryptography refuses low-order points this way
        raise SecAggError(f"X25519 agreement failed: {exc}") from None


def _hkdf(shared_secret: bytes, info: bytes) -> bytes:
    _check_len("shared secret", shared_secret, KEY_BYTES)
    return HKDF(algorithm=hashes.SHA256(), length=SEED_BYTES, salt=None, info=info).derive(
        shared_secret
    )


def pairwise_seed(
    shared_secret: bytes, federation_id: str, round_number: int, a: str, b: str
) -> bytes:
    """The seed s_ab of the mask a and b share in this round; the same for (a, b) and (b, a)."""
    if a == b:
        raise SecAggError(f"node {a!r} has no pairwise seed with itself")
    low, high = sorted((a, b))
    return _hkdf(shared_secret, _encode(_PAIR_TAG, federation_id, round_number, low, high))


def share_key(
    shared_secret: bytes, federation_id: str, round_number: int, sender: str, recipient: str
) -> bytes:
    """The AES-256-GCM key for shares sent from `sender` to `recipient` (one per direction)."""
    info = _encode(_SHARE_KEY_TAG, federation_id, round_number, sender, recipient)
    return _hkdf(shared_secret, info)


def keys_message(
    federation_id: str, round_number: int, node_id: str, cipher_public: bytes, mask_public: bytes
) -> bytes:
    """The bytes a node signs to vouch for its round keys (canonical, unambiguous)."""
    _check_len("cipher public key", cipher_public, KEY_BYTES)
    _check_len("mask public key", mask_public, KEY_BYTES)
    return _encode(_KEYS_TAG, federation_id, round_number, node_id, cipher_public, mask_public)


def stage_reply_message(
    federation_id: str, round_number: int, stage: str, node_id: str, request: bytes
) -> bytes:
    """The bytes a node signs to vouch for a stage's answer sent through a scheduler that does
    not authenticate it (Flower: aggregator/flower_stages.py): the serialized request, bound to
    the federation, round, stage and node, so it cannot be replayed anywhere else."""
    return _encode(_STAGE_REPLY_TAG, federation_id, round_number, stage, node_id, request)


def sign(identity_private: Ed25519PrivateKey, message: bytes) -> bytes:
    return identity_private.sign(message)


def verify(identity_public: Ed25519PublicKey | bytes, message: bytes, signature: bytes) -> None:
    """Raise SecAggError unless `signature` is the identity key's signature of `message`."""
    if isinstance(identity_public, bytes):
        _check_len("Ed25519 public key", identity_public, KEY_BYTES)
        try:
            identity_public = Ed25519PublicKey.from_public_bytes(identity_public)
        except ValueError as exc:
            raise SecAggError(f"invalid Ed25519 public key: {exc}") from None
    try:
        identity_public.verify(signature, message)
    except InvalidSignature:
        raise SecAggError("signature verification failed") from None


# --- Shamir secret sharing of 32-byte secrets over GF(PRIME) ---

PRIME = 2**521 - 1  # Mersenne prime > 2^256: any 32-byte secret is a field element


def default_threshold(n: int) -> int:
    """ceil(2n/3) shares of n reconstruct (1 for n = 1, otherwise at least 2).

    More than half, so the aggregator plus fewer than t colluding nodes learn nothing, while
    up to n - t (about a third) of the nodes may drop out. This is the honest-but-curious
    bound; Bonawitz's bound for an actively malicious server (t > 2n/3) is not claimed.
    """
    if isinstance(n, bool) or n < 1:
        raise SecAggError(f"need at least one node, got n={n!r}")
    return 1 if n == 1 else max(2, -(-2 * n // 3))


def _check_x(x: int) -> None:
    if isinstance(x, bool) or not isinstance(x, int) or not 1 <= x <= _MAX_X:
        raise SecAggError(f"share x coordinate {x!r} must be an integer in 1..2**31")


def split_secret(
    secret: bytes,
    x_coords: Sequence[int],
    threshold: int,
    rng: random.Random | None = None,
) -> dict[int, bytes]:
    """Shamir shares {x: y} of a 32-byte secret; any `threshold` of them reconstruct it.

    rng defaults to the OS CSPRNG (secrets.SystemRandom); pass a seeded Random only in tests.
    """
    _check_len("secret", secret, SEED_BYTES)
    for x in x_coords:
        _check_x(x)
    if len(set(x_coords)) != len(x_coords):
        raise SecAggError("share x coordinates must be distinct")
    if isinstance(threshold, bool) or not 1 <= threshold <= len(x_coords):
        raise SecAggError(f"threshold={threshold!r} must be between 1 and {len(x_coords)}")
    draw = rng if rng is not None else secrets.SystemRandom()
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [draw.randrange(PRIME) for _ in range(threshold - 1)]
    return {x: _evaluate(coefficients, x).to_bytes(SHARE_BYTES, "big") for x in x_coords}


def _evaluate(coefficients: Sequence[int], x: int) -> int:
    """Σ c_i x^i mod PRIME (Horner)."""
    y = 0
    for c in reversed(coefficients):
        y = (y * x + c) % PRIME
    return y


@lru_cache(maxsize=16)
def _lagrange_weights(xs: tuple[int, ...]) -> tuple[int, ...]:
    """w_i = 1 / Π_{j≠i} (x_i - x_j): O(t^2) once per set of x coordinates, reused per secret."""
    weights = []
    for i, xi in enumerate(xs):
        denominator = 1
        for j, xj in enumerate(xs):
            if j != i:
                denominator = denominator * (xi - xj) % PRIME
        weights.append(pow(denominator, -1, PRIME))
    return tuple(weights)


def _interpolate_at(xs: tuple[int, ...], ys: Sequence[int], z: int) -> int:
    """The polynomial of degree < len(xs) through (xs, ys), evaluated at z, in O(t)."""
    weights = _lagrange_weights(xs)
    # Π_{j≠i} (z - x_j) as prefix * suffix products, without a division.
    factors = [(z - x) % PRIME for x in xs]
    prefix = [1]
    for f in factors[:-1]:
        prefix.append(prefix[-1] * f % PRIME)
    total, suffix = 0, 1
    for i in range(len(xs) - 1, -1, -1):
        total = (total + ys[i] * weights[i] % PRIME * prefix[i] % PRIME * suffix) % PRIME
        suffix = suffix * factors[i] % PRIME
    return total


def is_share_value(y: bytes) -> bool:
    """Whether `y` has a Shamir share's form: SHARE_BYTES big-endian bytes below PRIME."""
    return len(y) == SHARE_BYTES and int.from_bytes(y, "big") < PRIME


def _parse_shares(shares: Mapping[int, bytes]) -> list[tuple[int, int]]:
    points = []
    for x, y in sorted(shares.items()):
        _check_x(x)
        _check_len(f"share y at x={x}", y, SHARE_BYTES)
        value = int.from_bytes(y, "big")
        if value >= PRIME:
            raise SecAggError(f"share y at x={x} is not a field element")
        points.append((x, value))
    return points


def reconstruct_secret(shares: Mapping[int, bytes], threshold: int) -> bytes:
    """The 32-byte secret from at least `threshold` shares {x: y}.

    Interpolates the `threshold` shares with the lowest x at 0, then checks that every extra
    share lies on the same polynomial. Refuses fewer than `threshold` shares, inconsistent
    extras, and a result that is no 32-byte value (what a share with a random y gives, but
    for a 2^-265 chance). Among exactly `threshold` shares, a small or crafted change to one
    share shifts the secret undetected: integrity comes from the signed keys and the
    authenticated share channel, not from this function.
    """
    if isinstance(threshold, bool) or threshold < 1:
        raise SecAggError(f"threshold={threshold!r} must be at least 1")
    if len(shares) < threshold:
        raise SecAggError(f"{len(shares)} shares cannot reconstruct a secret; need {threshold}")
    points = _parse_shares(shares)
    xs = tuple(x for x, _ in points[:threshold])
    ys = [y for _, y in points[:threshold]]
    for x, y in points[threshold:]:
        if _interpolate_at(xs, ys, x) != y:
            raise SecAggError(f"share at x={x} is inconsistent with the others")
    secret = _interpolate_at(xs, ys, 0)
    if secret >= 2 ** (8 * SEED_BYTES):
        raise SecAggError("shares reconstruct no 32-byte secret: wrong or corrupted shares")
    return secret.to_bytes(SEED_BYTES, "big")


# --- share bundles: encrypted from node to node, through the aggregator ---


def pack_share_bundle(self_seed_share: bytes, mask_key_share: bytes) -> bytes:
    """One node's two shares for one recipient: the self-seed share, then the mask-key share."""
    _check_len("self-seed share", self_seed_share, SHARE_BYTES)
    _check_len("mask-key share", mask_key_share, SHARE_BYTES)
    return self_seed_share + mask_key_share


def unpack_share_bundle(bundle: bytes) -> tuple[bytes, bytes]:
    _check_len("share bundle", bundle, 2 * SHARE_BYTES)
    return bundle[:SHARE_BYTES], bundle[SHARE_BYTES:]


def _shares_aad(federation_id: str, round_number: int, sender: str, recipient: str) -> bytes:
    return _encode(_SHARES_AAD_TAG, federation_id, round_number, sender, recipient)


def encrypt_share_bundle(
    key: bytes,
    federation_id: str,
    round_number: int,
    sender: str,
    recipient: str,
    payload: bytes,
) -> bytes:
    """nonce || AES-256-GCM(payload), with the round and both ends bound into the AAD.

    Each key encrypts one bundle (one per direction per round), so a random nonce is unique.
    """
    _check_len("share key", key, SEED_BYTES)
    nonce = secrets.token_bytes(NONCE_BYTES)
    aad = _shares_aad(federation_id, round_number, sender, recipient)
    return nonce + AESGCM(key).encrypt(nonce, payload, aad)


def decrypt_share_bundle(
    key: bytes,
    federation_id: str,
    round_number: int,
    sender: str,
    recipient: str,
    blob: bytes,
) -> bytes:
    """The payload of `encrypt_share_bundle`; SecAggError on any tampering or wrong context."""
    _check_len("share key", key, SEED_BYTES)
    if len(blob) < NONCE_BYTES + _TAG_BYTES:
        raise SecAggError(f"encrypted share bundle of {len(blob)} bytes is too short")
    aad = _shares_aad(federation_id, round_number, sender, recipient)
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
    except InvalidTag:
        raise SecAggError(
            f"share bundle from {sender!r} to {recipient!r} failed authentication"
        ) from None
