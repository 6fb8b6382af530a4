"""Secure-aggregation math: quantization, masks, key agreement, Shamir, share encryption,
and a full in-memory run of the protocol with dropouts that must give the exact sum."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from protos import secagg
from protos.secagg import (
    PRIME,
    SHARE_BYTES,
    QuantizationConfig,
    SecAggError,
    check_no_overflow,
    choose_scale,
    decrypt_share_bundle,
    default_threshold,
    dequantize_sum,
    encrypt_share_bundle,
    generate_x25519,
    keys_message,
    keystream_u32,
    mask_chunk,
    pack_share_bundle,
    pair_sign,
    pairwise_seed,
    quantize,
    reconstruct_secret,
    share_key,
    sign,
    split_secret,
    unmask_chunk,
    unpack_share_bundle,
    verify,
    x25519_public,
    x25519_shared,
)

FED = "fed-test"
ROUND = 7


def seed_of(i: int) -> bytes:
    return bytes([i]) * 32


def cuts_to_spans(cuts: Sequence[int], length: int) -> list[tuple[int, int]]:
    bounds = [0, *sorted(set(cuts) - {0, length}), length]
    return list(itertools.pairwise(bounds))


# --- quantization ---


def test_quantize_is_unbiased() -> None:
    rng = np.random.default_rng(0)
    cfg = QuantizationConfig(clip=4.0, scale=4.0)
    x = rng.uniform(-3, 3, size=500).astype(np.float32)
    repeats = 2000
    q = quantize(np.tile(x, repeats), cfg, rng)
    means = (q.view(np.int32).reshape(repeats, x.size) / cfg.scale).mean(axis=0)
    # One rounding has std <= 0.5 / scale; the mean of 2000 is 45x tighter. 5 sigma:
    np.testing.assert_allclose(means, x, atol=5 * 0.5 / cfg.scale / math.sqrt(repeats))


def test_quantize_error_is_below_one_step_and_clips() -> None:
    rng = np.random.default_rng(1)
    cfg = QuantizationConfig(clip=1.0, scale=16.0)
    x = rng.normal(scale=1.5, size=10_000).astype(np.float32)  # many beyond the clip
    q = quantize(x, cfg, rng)
    assert q.dtype == np.uint32 and q.shape == x.shape
    back = dequantize_sum(q, cfg)
    clipped = np.clip(x, -1.0, 1.0)
    assert np.abs(back - clipped).max() < 1 / cfg.scale
    assert np.abs(back).max() <= cfg.clip  # clip * scale is an integer: no rounding past it
    assert (np.abs(x) > 1).sum() > 1000  # the clip really was exercised


def test_negative_values_round_trip_through_twos_complement() -> None:
    cfg = QuantizationConfig(clip=2.0, scale=4.0)
    x = np.array([-1.5, -0.25, -2.0, -7.0, 0.0, 1.75], dtype=np.float32)  # x * scale exact
    q = quantize(x, cfg, np.random.default_rng(2))
    assert q.tolist() == [2**32 - 6, 2**32 - 1, 2**32 - 8, 2**32 - 8, 0, 7]
    np.testing.assert_array_equal(dequantize_sum(q, cfg), [-1.5, -0.25, -2, -2, 0, 1.75])


def test_quantize_keeps_shape_and_refuses_non_finite() -> None:
    cfg = QuantizationConfig(clip=1.0, scale=8.0)
    assert quantize(np.zeros((3, 4), np.float32), cfg, np.random.default_rng(0)).shape == (3, 4)
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(SecAggError, match="NaN or infinite"):
            quantize(np.array([0.0, bad], np.float32), cfg, np.random.default_rng(0))


def test_sum_of_quantized_vectors_matches_plain_sum() -> None:
    rng = np.random.default_rng(3)
    n, clip = 7, 0.5
    cfg = QuantizationConfig(clip=clip, scale=64.0)
    xs = [rng.normal(scale=0.4, size=5000).astype(np.float32) - 0.2 for _ in range(n)]
    total = np.zeros(5000, np.uint32)
    for x in xs:
        total += quantize(x, cfg, rng)  # wraps mod 2^32: negative values carry through
    plain = np.sum([np.clip(x, -clip, clip).astype(np.float64) for x in xs], axis=0)
    assert np.abs(dequantize_sum(total, cfg) - plain).max() < n / cfg.scale
    assert (plain < 0).sum() > 1000


@pytest.mark.parametrize(
    ("clip", "scale"), [(0.0, 1.0), (-1.0, 1.0), (1.0, 0.0), (math.nan, 1.0), (1.0, math.inf)]
)
def test_quantization_config_refuses_bad_numbers(clip: float, scale: float) -> None:
    with pytest.raises(SecAggError, match="finite and positive"):
        QuantizationConfig(clip=clip, scale=scale)


def test_quantization_config_refuses_single_node_overflow() -> None:
    with pytest.raises(SecAggError, match="overflow"):
        QuantizationConfig(clip=1.0, scale=2.0**31)


def test_check_no_overflow_boundary() -> None:
    n = 8  # 2^31 / 8 = 2^28, so clip * scale + 1 must stay below 2^28
    at_limit = QuantizationConfig(clip=1.0, scale=2.0**28 - 1)
    with pytest.raises(SecAggError, match=r"8 nodes .* >= 2\*\*31"):
        check_no_overflow(at_limit, n)
    just_below = QuantizationConfig(clip=1.0, scale=2.0**28 - 1 - 2.0**-20)
    check_no_overflow(just_below, n)
    check_no_overflow(at_limit, n - 1)
    with pytest.raises(SecAggError, match="at least 1"):
        check_no_overflow(just_below, 0)


@pytest.mark.parametrize(
    ("clip", "max_nodes"),
    [(1.0, 1), (1.0, 6), (0.1, 100), (3.7, 1000), (1e-3, 2**20), (1e6, 3), (1.0, 2**30 - 1)],
)
def test_choose_scale_passes_and_is_maximal(clip: float, max_nodes: int) -> None:
    scale = choose_scale(clip, max_nodes)
    assert math.frexp(scale)[0] == 0.5  # a power of two
    check_no_overflow(QuantizationConfig(clip, scale), max_nodes)
    with pytest.raises(SecAggError, match="overflow"):
        check_no_overflow(QuantizationConfig(clip, 2 * scale), max_nodes)


def test_choose_scale_refuses_hopeless_inputs() -> None:
    with pytest.raises(SecAggError, match="no room"):
        choose_scale(1.0, 2**31)
    with pytest.raises(SecAggError, match="clip"):
        choose_scale(0.0, 4)


# --- keystreams ---


def test_keystream_known_answer_aes256_zero_key() -> None:
    # FIPS-197-style vector: AES-256 with the all-zero key encrypts the zero block (counter 0)
    # to dc95c078...; the keystream's first words are those bytes, read little-endian.
    expected = bytes.fromhex("dc95c078a2408989ad48a21492842087")
    assert keystream_u32(bytes(32), 0, 4).tobytes() == expected


def test_keystream_matches_independent_aes_ctr_and_ecb() -> None:
    seed = bytes(range(32))
    count = 1000
    ctr = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    whole = np.frombuffer(ctr.update(bytes(4 * count)), dtype="<u4")
    np.testing.assert_array_equal(keystream_u32(seed, 0, count), whole)
    # Counter block = 128-bit big-endian block index, including a carry past 64 bits.
    ecb = Cipher(algorithms.AES(seed), modes.ECB()).encryptor()
    for block in (0, 1, 249, 2**32, 2**64 - 1, 2**64):
        want = np.frombuffer(ecb.update(block.to_bytes(16, "big")), dtype="<u4")
        np.testing.assert_array_equal(keystream_u32(seed, 4 * block, 4), want)
    across = keystream_u32(seed, 4 * (2**64 - 1) + 2, 4)
    np.testing.assert_array_equal(across[:2], keystream_u32(seed, 4 * (2**64 - 1) + 2, 2))
    np.testing.assert_array_equal(across[2:], keystream_u32(seed, 4 * 2**64, 2))


def test_keystream_pieces_equal_whole() -> None:
    seed = seed_of(5)
    whole = keystream_u32(seed, 0, 4099)
    for start, end in cuts_to_spans([1, 2, 3, 5, 8, 13, 100, 1027, 4097], 4099):
        np.testing.assert_array_equal(keystream_u32(seed, start, end - start), whole[start:end])
    assert keystream_u32(seed, 17, 0).size == 0


def test_keystreams_of_different_seeds_differ() -> None:
    streams = [keystream_u32(seed_of(i), 0, 64) for i in range(8)]
    for a, b in itertools.combinations(streams, 2):
        assert (a != b).mean() > 0.9


@pytest.mark.parametrize(
    ("seed", "offset", "count", "match"),
    [
        (bytes(31), 0, 1, "32 bytes"),
        (bytes(32), -1, 1, "non-negative"),
        (bytes(32), 0, -1, "count"),
    ],
)
def test_keystream_refuses_bad_arguments(seed: bytes, offset: int, count: int, match: str) -> None:
    with pytest.raises(SecAggError, match=match):
        keystream_u32(seed, offset, count)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.binary(min_size=32, max_size=32),
    base=st.integers(0, 2**40),
    length=st.integers(0, 300),
    cuts=st.lists(st.integers(0, 300), max_size=6),
)
def test_keystream_any_chunking_equals_whole(
    seed: bytes, base: int, length: int, cuts: list[int]
) -> None:
    whole = keystream_u32(seed, base, length)
    pieces = [
        keystream_u32(seed, base + start, end - start)
        for start, end in cuts_to_spans([c for c in cuts if c <= length], length)
    ]
    np.testing.assert_array_equal(np.concatenate([whole[:0], *pieces]), whole)


@settings(max_examples=30, deadline=None)
@given(
    data_seed=st.integers(0, 2**32 - 1),
    base=st.integers(0, 2**20),
    length=st.integers(0, 300),
    cuts=st.lists(st.integers(0, 300), max_size=6),
    block_words=st.sampled_from([1, 3, 4, 64, 1 << 16]),
    bits=st.sampled_from([8, 16, 32]),
)
def test_mask_any_chunking_equals_whole(
    data_seed: int, base: int, length: int, cuts: list[int], block_words: int, bits: int
) -> None:
    dtype = secagg.RING_DTYPES[bits]
    values = np.random.default_rng(data_seed).integers(0, 2**bits, length, dtype=dtype)
    pair_seeds = {"a": seed_of(1), "m": seed_of(2), "z": seed_of(3)}
    whole = values.copy()
    mask_chunk(whole, base, seed_of(9), pair_seeds, "k")
    pieces = values.copy()
    with pytest.MonkeyPatch.context() as patch:  # internal block size must not matter either
        patch.setattr(secagg, "_BLOCK_BYTES", 4 * block_words)
        for start, end in cuts_to_spans([c for c in cuts if c <= length], length):
            mask_chunk(pieces[start:end], base + start, seed_of(9), pair_seeds, "k")
    np.testing.assert_array_equal(pieces, whole)


def test_mask_chunk_is_the_signed_sum_of_keystreams() -> None:
    values = np.arange(50, dtype=np.uint32)
    masked = values.copy()
    mask_chunk(masked, 10, seed_of(9), {"a": seed_of(1), "z": seed_of(2)}, "k")
    # "k" > "a": subtract PRG(s_ka); "k" < "z": add PRG(s_kz).
    want = values + keystream_u32(seed_of(9), 10, 50)
    want -= keystream_u32(seed_of(1), 10, 50)
    want += keystream_u32(seed_of(2), 10, 50)
    np.testing.assert_array_equal(masked, want)
    unmask_chunk(masked, 10, [seed_of(9)], [(seed_of(1), -1), (seed_of(2), 1)])
    np.testing.assert_array_equal(masked, values)


def test_mask_chunk_refuses_bad_values_and_self_pairs() -> None:
    with pytest.raises(SecAggError, match="uint32"):
        mask_chunk(np.zeros(4, np.int32), 0, seed_of(1), {}, "a")
    with pytest.raises(SecAggError, match="C-contiguous"):
        mask_chunk(np.zeros(8, np.uint32)[::2], 0, seed_of(1), {}, "a")
    with pytest.raises(SecAggError, match="itself"):
        mask_chunk(np.zeros(4, np.uint32), 0, None, {"a": seed_of(1)}, "a")
    with pytest.raises(SecAggError, match=r"\+1 or -1"):
        unmask_chunk(np.zeros(4, np.uint32), 0, [], [(seed_of(1), 0)])


def test_pair_sign_is_antisymmetric() -> None:
    assert pair_sign("a", "b") == 1 and pair_sign("b", "a") == -1
    assert pair_sign("node-10", "node-9") == 1  # string order, not numeric


# --- key agreement and seeds ---


def test_x25519_agreement_is_symmetric_and_refuses_low_order_keys() -> None:
    a_private, a_public = generate_x25519()
    b_private, b_public = generate_x25519()
    assert x25519_shared(a_private, b_public) == x25519_shared(b_private, a_public)
    assert x25519_public(a_private) == a_public
    for low_order in (bytes(32), b"\x01" + bytes(31)):
        with pytest.raises(SecAggError, match="agreement failed"):
            x25519_shared(a_private, low_order)
    with pytest.raises(SecAggError, match="32 bytes"):
        x25519_shared(a_private, b_public[:31])


def test_pairwise_seed_is_symmetric_and_bound_to_its_context() -> None:
    secret = seed_of(4)
    base = pairwise_seed(secret, FED, ROUND, "a", "b")
    assert pairwise_seed(secret, FED, ROUND, "b", "a") == base
    others = {
        pairwise_seed(seed_of(5), FED, ROUND, "a", "b"),
        pairwise_seed(secret, "other", ROUND, "a", "b"),
        pairwise_seed(secret, FED, ROUND + 1, "a", "b"),
        pairwise_seed(secret, FED, ROUND, "a", "c"),
        pairwise_seed(secret, FED, ROUND, "ab", "c"),
        pairwise_seed(secret, FED, ROUND, "a", "bc"),
        share_key(secret, FED, ROUND, "a", "b"),
        share_key(secret, FED, ROUND, "b", "a"),
    }
    assert base not in others and len(others) == 8
    with pytest.raises(SecAggError, match="itself"):
        pairwise_seed(secret, FED, ROUND, "a", "a")
    with pytest.raises(SecAggError, match="2\\*\\*64"):
        pairwise_seed(secret, FED, -1, "a", "b")


def test_masks_cancel_in_the_sum_of_five_nodes() -> None:
    rng = np.random.default_rng(4)
    ids = [f"node-{i}" for i in range(5)]
    keys = {node: generate_x25519() for node in ids}
    self_seeds = {node: seed_of(50 + i) for i, node in enumerate(ids)}
    plain = {node: rng.integers(0, 2**32, 777, dtype=np.uint32) for node in ids}
    total = np.zeros(777, np.uint32)
    for me in ids:
        pair_seeds = {
            peer: pairwise_seed(x25519_shared(keys[me][0], keys[peer][1]), FED, ROUND, me, peer)
            for peer in ids
            if peer != me
        }
        masked = plain[me].copy()
        mask_chunk(masked, 0, self_seeds[me], pair_seeds, me)
        assert (masked != plain[me]).mean() > 0.99
        total += masked
    unmask_chunk(total, 0, self_seeds.values(), [])
    np.testing.assert_array_equal(total, np.sum(list(plain.values()), axis=0, dtype=np.uint32))


# --- signatures ---


def public_raw(private: Ed25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def flip_bit(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 1]) + data[index + 1 :]


def test_signatures_verify_and_reject_any_change() -> None:
    identity = Ed25519PrivateKey.generate()
    message = keys_message(FED, ROUND, "node-1", seed_of(1), seed_of(2))
    signature = sign(identity, message)
    verify(identity.public_key(), message, signature)
    verify(public_raw(identity), message, signature)
    for index in (0, len(message) // 2, len(message) - 1):
        with pytest.raises(SecAggError, match="verification failed"):
            verify(identity.public_key(), flip_bit(message, index), signature)
    for index in (0, 40, 63):
        with pytest.raises(SecAggError, match="verification failed"):
            verify(identity.public_key(), message, flip_bit(signature, index))
    with pytest.raises(SecAggError, match="verification failed"):
        verify(Ed25519PrivateKey.generate().public_key(), message, signature)
    with pytest.raises(SecAggError, match="32 bytes"):
        verify(public_raw(identity)[:31], message, signature)


def test_keys_message_is_unambiguous() -> None:
    c, m = seed_of(1), seed_of(2)
    variants = [
        keys_message(FED, ROUND, "node", c, m),
        keys_message("fed-other", ROUND, "node", c, m),
        keys_message(FED, ROUND + 1, "node", c, m),
        keys_message(FED, ROUND, "node2", c, m),
        keys_message(FED, ROUND, "node", seed_of(3), m),
        keys_message(FED, ROUND, "node", c, seed_of(3)),
        keys_message(FED, ROUND, "node", m, c),  # the two keys swapped
        # Plain concatenation would make these collide:
        keys_message("fa", ROUND, "b", c, m),
        keys_message("f", ROUND, "ab", c, m),
        keys_message("", ROUND, "fab", c, m),
    ]
    assert len(set(variants)) == len(variants)
    with pytest.raises(SecAggError, match="32 bytes"):
        keys_message(FED, ROUND, "node", c[:31], m)


# --- Shamir ---


def test_any_threshold_shares_reconstruct() -> None:
    secret = bytes(range(32))
    xs = [1, 2, 3, 4, 5, 6]
    shares = split_secret(secret, xs, 4, rng=random.Random(0))
    assert all(len(y) == SHARE_BYTES for y in shares.values())
    for size in (4, 5, 6):
        for subset in itertools.combinations(xs, size):
            assert reconstruct_secret({x: shares[x] for x in subset}, 4) == secret


def test_fewer_than_threshold_shares_reveal_nothing() -> None:
    secret, other = seed_of(7), seed_of(8)
    shares = split_secret(secret, [3, 10, 2**31], 3, rng=random.Random(1))
    known = {3: shares[3], 10: shares[10]}
    with pytest.raises(SecAggError, match="need 3"):
        reconstruct_secret(known, 3)
    # The two known shares fit a polynomial for ANY secret: through them and (0, other),
    # a third share follows that makes them reconstruct `other` instead.
    xs = (0, 3, 10)
    ys = [int.from_bytes(other, "big"), *(int.from_bytes(known[x], "big") for x in (3, 10))]
    forged = secagg._interpolate_at(xs, ys, 2**31).to_bytes(SHARE_BYTES, "big")
    assert reconstruct_secret({**known, 2**31: forged}, 3) == other
    assert reconstruct_secret(shares, 3) == secret
    # Reading the two shares as if the threshold were 2 gives nothing useful either.
    with pytest.raises(SecAggError, match="no 32-byte secret"):
        reconstruct_secret(known, 2)


def test_corrupted_share_is_refused_or_gives_a_wrong_secret() -> None:
    secret = seed_of(9)
    shares = split_secret(secret, [1, 2, 3, 4, 5], 3, rng=random.Random(2))
    low_flip = dict(shares)
    low_flip[2] = flip_bit(shares[2], SHARE_BYTES - 1)  # y ± 1
    # With extra shares, the corruption is caught:
    with pytest.raises(SecAggError, match="inconsistent"):
        reconstruct_secret(low_flip, 3)
    # With exactly t shares it is not: y ± 1 moves the secret by ∓L_2(0) = ∓(-3), a wrong
    # secret. Integrity comes from the signed keys and the authenticated share channel.
    wrong = reconstruct_secret({x: low_flip[x] for x in (1, 2, 3)}, 3)
    assert abs(int.from_bytes(wrong, "big") - int.from_bytes(secret, "big")) == 3
    # A large (e.g. random) change leaves the 256-bit range and is refused.
    high_flip = {**shares, 2: flip_bit(shares[2], 1)}
    with pytest.raises(SecAggError, match="no 32-byte secret"):
        reconstruct_secret({x: high_flip[x] for x in (1, 2, 3)}, 3)


@pytest.mark.parametrize(
    ("xs", "threshold", "match"),
    [
        ([1, 2, 2], 2, "distinct"),
        ([0, 1, 2], 2, "1..2\\*\\*31"),
        ([1, 2, 2**31 + 1], 2, "1..2\\*\\*31"),
        ([1, 2, 3], 4, "between 1 and 3"),
        ([1, 2, 3], 0, "between 1 and 3"),
    ],
)
def test_split_secret_refuses_bad_arguments(xs: list[int], threshold: int, match: str) -> None:
    with pytest.raises(SecAggError, match=match):
        split_secret(seed_of(1), xs, threshold, rng=random.Random(0))


def test_reconstruct_refuses_malformed_shares() -> None:
    shares = split_secret(seed_of(1), [1, 2, 3], 2, rng=random.Random(0))
    with pytest.raises(SecAggError, match="66 bytes"):
        reconstruct_secret({1: shares[1], 2: shares[2][1:]}, 2)
    with pytest.raises(SecAggError, match="not a field element"):
        reconstruct_secret({1: shares[1], 2: PRIME.to_bytes(SHARE_BYTES, "big")}, 2)
    with pytest.raises(SecAggError, match="at least 1"):
        reconstruct_secret(shares, 0)


def test_default_threshold() -> None:
    assert [default_threshold(n) for n in range(1, 11)] == [1, 2, 2, 3, 4, 4, 5, 6, 6, 7]
    with pytest.raises(SecAggError):
        default_threshold(0)


# --- share encryption ---


def test_share_bundle_encryption_round_trip_and_tampering() -> None:
    key = share_key(seed_of(3), FED, ROUND, "alice", "bob")
    payload = pack_share_bundle(b"\x01" * SHARE_BYTES, b"\x02" * SHARE_BYTES)
    blob = encrypt_share_bundle(key, FED, ROUND, "alice", "bob", payload)
    assert decrypt_share_bundle(key, FED, ROUND, "alice", "bob", blob) == payload
    assert unpack_share_bundle(payload) == (b"\x01" * SHARE_BYTES, b"\x02" * SHARE_BYTES)
    assert encrypt_share_bundle(key, FED, ROUND, "alice", "bob", payload) != blob  # fresh nonce
    wrong_contexts = [
        (FED, ROUND, "bob", "alice"),
        (FED, ROUND, "alice", "carol"),
        (FED, ROUND, "mallory", "bob"),
        (FED, ROUND + 1, "alice", "bob"),
        ("other", ROUND, "alice", "bob"),
    ]
    for federation, round_number, sender, recipient in wrong_contexts:
        with pytest.raises(SecAggError, match="failed authentication"):
            decrypt_share_bundle(key, federation, round_number, sender, recipient, blob)
    for index in (0, 11, 12, len(blob) // 2, len(blob) - 1):  # nonce, body and tag
        with pytest.raises(SecAggError, match="failed authentication"):
            decrypt_share_bundle(key, FED, ROUND, "alice", "bob", flip_bit(blob, index))
    other_key = share_key(seed_of(4), FED, ROUND, "alice", "bob")
    with pytest.raises(SecAggError, match="failed authentication"):
        decrypt_share_bundle(other_key, FED, ROUND, "alice", "bob", blob)
    with pytest.raises(SecAggError, match="too short"):
        decrypt_share_bundle(key, FED, ROUND, "alice", "bob", blob[:27])


def test_share_bundle_packing_is_length_checked() -> None:
    with pytest.raises(SecAggError, match="66 bytes"):
        pack_share_bundle(bytes(SHARE_BYTES), bytes(SHARE_BYTES - 1))
    with pytest.raises(SecAggError, match="132 bytes"):
        unpack_share_bundle(bytes(2 * SHARE_BYTES + 1))


# --- the whole protocol, in memory, with dropouts ---

N_NODES = 6
LENGTH = 1003
CHUNKS = cuts_to_spans([1, 130, 517], LENGTH)  # offsets that are not multiples of 4
CLIP = 1.0


@dataclass
class SimNode:
    node_id: str
    x: int  # this node's Shamir x coordinate
    identity: Ed25519PrivateKey
    cipher_keys: tuple[bytes, bytes]
    mask_keys: tuple[bytes, bytes]
    self_seed: bytes
    q: np.ndarray  # quantized delta
    inbox: dict[str, bytes] = field(default_factory=dict)  # sender -> encrypted bundle
    own_bundle: bytes = b""


@dataclass
class Directory:
    """What the aggregator relays: identity keys (from certificates) and signed round keys."""

    identities: dict[str, bytes]
    cipher_public: dict[str, bytes]
    mask_public: dict[str, bytes]


def make_nodes(cfg: QuantizationConfig, seed: int) -> list[SimNode]:
    rng = np.random.default_rng(seed)
    nodes = []
    for i in range(N_NODES):
        delta = rng.normal(scale=0.6, size=LENGTH).astype(np.float32)
        nodes.append(
            SimNode(
                node_id=f"node-{i}",
                x=i + 1,
                identity=Ed25519PrivateKey.generate(),
                cipher_keys=generate_x25519(),
                mask_keys=generate_x25519(),
                self_seed=secagg.new_self_seed(),
                q=quantize(delta, cfg, rng),
            )
        )
    return nodes


def advertise_keys(nodes: list[SimNode]) -> Directory:
    """Stage 0: each node signs its round keys; every node checks everyone else's."""
    signed = {}
    for node in nodes:
        message = keys_message(FED, ROUND, node.node_id, node.cipher_keys[1], node.mask_keys[1])
        signed[node.node_id] = (
            node.cipher_keys[1],
            node.mask_keys[1],
            sign(node.identity, message),
        )
    directory = Directory(
        identities={node.node_id: public_raw(node.identity) for node in nodes},
        cipher_public={node_id: c for node_id, (c, _, _) in signed.items()},
        mask_public={node_id: m for node_id, (_, m, _) in signed.items()},
    )
    for node_id, (c, m, signature) in signed.items():
        verify(directory.identities[node_id], keys_message(FED, ROUND, node_id, c, m), signature)
    return directory


def share_keys(nodes: list[SimNode], directory: Directory, threshold: int) -> None:
    """Stage 1: each node Shamir-shares b_u and its mask private key, one bundle per peer."""
    xs = [node.x for node in nodes]
    for sender in nodes:
        seed_shares = split_secret(sender.self_seed, xs, threshold)
        mask_shares = split_secret(sender.mask_keys[0], xs, threshold)
        for recipient in nodes:
            bundle = pack_share_bundle(seed_shares[recipient.x], mask_shares[recipient.x])
            if recipient is sender:
                sender.own_bundle = bundle
                continue
            shared = x25519_shared(
                sender.cipher_keys[0], directory.cipher_public[recipient.node_id]
            )
            key = share_key(shared, FED, ROUND, sender.node_id, recipient.node_id)
            recipient.inbox[sender.node_id] = encrypt_share_bundle(
                key, FED, ROUND, sender.node_id, recipient.node_id, bundle
            )


def masked_input(node: SimNode, peers: list[str], directory: Directory) -> np.ndarray:
    """Stage 2: the node's quantized delta, masked chunk by chunk."""
    pair_seeds = {
        peer: pairwise_seed(
            x25519_shared(node.mask_keys[0], directory.mask_public[peer]),
            FED,
            ROUND,
            node.node_id,
            peer,
        )
        for peer in peers
        if peer != node.node_id
    }
    masked = node.q.copy()
    for start, end in CHUNKS:
        mask_chunk(masked[start:end], start, node.self_seed, pair_seeds, node.node_id)
    return masked


def unmasking_response(
    node: SimNode, survivors: set[str], dropped: set[str], directory: Directory
) -> dict[str, bytes]:
    """Stage 3: a survivor reveals b_u shares of survivors and mask-key shares of the dropped."""
    assert not survivors & dropped  # never both shares of one node
    response = {}
    for sender in survivors | dropped:
        if sender == node.node_id:
            bundle = node.own_bundle
        else:
            shared = x25519_shared(node.cipher_keys[0], directory.cipher_public[sender])
            key = share_key(shared, FED, ROUND, sender, node.node_id)
            bundle = decrypt_share_bundle(key, FED, ROUND, sender, node.node_id, node.inbox[sender])
        seed_share, mask_share = unpack_share_bundle(bundle)
        response[sender] = seed_share if sender in survivors else mask_share
    return response


def unmask(
    total: np.ndarray,
    survivors: set[str],
    dropped: set[str],
    responses: dict[int, dict[str, bytes]],  # responder's x -> its response
    directory: Directory,
    threshold: int,
) -> None:
    """The aggregator: rebuild the seeds and keys it needs, then strip the masks in place."""
    self_seeds = [
        reconstruct_secret({x: r[u] for x, r in responses.items()}, threshold)
        for u in sorted(survivors)
    ]
    pair_masks = []
    for d in sorted(dropped):
        mask_private = reconstruct_secret({x: r[d] for x, r in responses.items()}, threshold)
        assert x25519_public(mask_private) == directory.mask_public[d]
        for v in sorted(survivors):
            shared = x25519_shared(mask_private, directory.mask_public[v])
            pair_masks.append((pairwise_seed(shared, FED, ROUND, d, v), pair_sign(v, d)))
    for start, end in CHUNKS:
        unmask_chunk(total[start:end], start, self_seeds, pair_masks)


def run_round(drop_before_input: set[str], silent_in_unmasking: set[str]) -> None:
    threshold = default_threshold(N_NODES)
    cfg = QuantizationConfig(CLIP, choose_scale(CLIP, N_NODES))
    nodes = make_nodes(cfg, seed=11)
    by_id = {node.node_id: node for node in nodes}
    directory = advertise_keys(nodes)
    share_keys(nodes, directory, threshold)
    everyone = [node.node_id for node in nodes]  # all shared keys: U1
    survivors = set(everyone) - drop_before_input
    total = np.zeros(LENGTH, np.uint32)
    for node_id in sorted(survivors):
        total += masked_input(by_id[node_id], everyone, directory)
    expected = np.sum([by_id[u].q for u in survivors], axis=0, dtype=np.uint32)
    assert (total != expected).mean() > 0.99  # masked, the sum is noise
    responses = {
        by_id[v].x: unmasking_response(by_id[v], survivors, drop_before_input, directory)
        for v in sorted(survivors - silent_in_unmasking)
    }
    unmask(total, survivors, drop_before_input, responses, directory, threshold)
    np.testing.assert_array_equal(total, expected)
    plain = np.sum([dequantize_sum(by_id[u].q, cfg) for u in survivors], axis=0)
    assert np.abs(dequantize_sum(total, cfg) - plain).max() < 1e-5


@pytest.mark.parametrize(
    ("drop_before_input", "silent_in_unmasking"),
    [
        (set(), set()),  # (a) no dropouts
        ({"node-1", "node-4"}, set()),  # (b) two drop after sharing keys: 4 = t answer
        (set(), {"node-2"}),  # (c) one survivor is silent while unmasking
        ({"node-5"}, {"node-0"}),  # (b) + (c): exactly t answer
    ],
)
def test_protocol_gives_the_exact_sum_of_survivors(
    drop_before_input: set[str], silent_in_unmasking: set[str]
) -> None:
    run_round(drop_before_input, silent_in_unmasking)


@pytest.mark.parametrize(
    ("drop_before_input", "silent_in_unmasking"),
    [({"node-0", "node-3", "node-5"}, set()), ({"node-1", "node-2"}, {"node-3"})],
)
def test_protocol_refuses_with_fewer_than_threshold_answers(
    drop_before_input: set[str], silent_in_unmasking: set[str]
) -> None:
    with pytest.raises(SecAggError, match="need 4"):
        run_round(drop_before_input, silent_in_unmasking)


def test_rounding_is_reproducible_per_node_and_version_only() -> None:
    """A restarted node (or a retried round) re-quantizes one version's update identically;
    another node, version or federation gets independent rounding."""
    x = np.linspace(-0.9, 0.9, 4096, dtype=np.float32)
    cfg = secagg.QuantizationConfig(clip=1.0, scale=1000.5)
    node_a, node_b = b"a" * 32, b"b" * 32

    def q(secret: bytes, federation: str, version: int) -> np.ndarray:
        return secagg.quantize(x, cfg, secagg.rounding_rng(secret, federation, version))

    assert np.array_equal(q(node_a, "fed", 3), q(node_a, "fed", 3))
    base = q(node_a, "fed", 3)
    for other in (q(node_b, "fed", 3), q(node_a, "fed", 4), q(node_a, "other", 3)):
        assert not np.array_equal(base, other)
        assert np.abs(base.view(np.int32) - other.view(np.int32)).max() == 1  # rounding only
