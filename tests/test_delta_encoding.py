"""Delta encodings (protos/delta_encoding.py): what is sent decodes to what the node kept,
error feedback carries what rounding and clipping lost, secure sums are exact in every ring."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from protos import delta_encoding as de
from protos import secagg
from protos.codec import ChunkVerifier, SpooledPayload

SHAPES = {"a": (37, 19), "b": (5,), "c": (300, 7)}  # sizes not multiples of an int8 block
CHUNK = 256 * 16


def make_delta(seed: int, scale: float = 1e-3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: scale * torch.randn(s, generator=g) for n, s in SHAPES.items()}


def flat(tensors: dict[str, torch.Tensor]) -> np.ndarray:
    return torch.cat([t.reshape(-1) for t in tensors.values()]).numpy().astype(np.float64)


def decode_file(encoding: str, path: Path, total: int) -> np.ndarray:
    data = path.read_bytes()
    out = np.zeros(total, dtype=np.float64)
    for offset in range(0, len(data), CHUNK):
        start, values = de.decode_chunk(encoding, offset, data[offset : offset + CHUNK])
        n = min(values.size, total - start)
        out[start : start + n] = values[:n]
    return out


@pytest.mark.parametrize("encoding", de.PLAIN_ENCODINGS)
def test_plain_update_decodes_to_delta_minus_the_kept_residual(
    tmp_path: Path, encoding: str
) -> None:
    delta, old_residual = make_delta(1), make_delta(2, scale=1e-5)
    x = flat(delta) + flat(old_residual)
    manifest = de.encode_update_in_place(delta, encoding, tmp_path / "u", CHUNK, rounding_key=b"k",
                                         residual=old_residual)  # fmt: skip
    decoded = decode_file(encoding, tmp_path / "u", x.size)
    np.testing.assert_allclose(decoded + flat(delta), x, rtol=0, atol=1e-9)  # delta is now r'
    if encoding == "fp32":
        assert not flat(delta).any()  # nothing lost: the residual is zero
    else:
        assert flat(delta).any() and np.abs(flat(delta)).max() < 1e-4
    # The spooled file verifies chunk by chunk against its manifest.
    payload = SpooledPayload(manifest, tmp_path / "u")
    verifier = ChunkVerifier(manifest)
    for index, data in payload.chunks():
        verifier.verify(index, data)
    assert verifier.complete


def test_wire_bytes_per_parameter() -> None:
    n = 350_000_000
    assert de.wire_bytes_per_param("fp32", n) == 4
    assert de.wire_bytes_per_param("bf16", n) == 2
    assert de.wire_bytes_per_param("int8", n) <= 256 / 252 + 1e-6 < 1.05
    assert de.wire_bytes_per_param("masked-int16", n) == 2
    assert de.wire_bytes_per_param("masked-int8", n) == 1


@pytest.mark.parametrize("encoding", ["bf16", "int8"])
def test_stochastic_rounding_is_unbiased(tmp_path: Path, encoding: str) -> None:
    base = make_delta(3)
    total = np.zeros(sum(int(np.prod(s)) for s in SHAPES.values()))
    trials = 200
    for trial in range(trials):
        delta = {n: t.clone() for n, t in base.items()}
        de.encode_update_in_place(
            delta, encoding, tmp_path / "u", CHUNK, rounding_key=bytes([trial])
        )
        total += decode_file(encoding, tmp_path / "u", total.size)
    err = total / trials - flat(base)
    one_step = np.abs(flat(base)).max() / 127 if encoding == "int8" else 2**-8 * np.abs(flat(base))
    assert np.abs(err.mean()) < 0.05 * np.mean(one_step)  # no systematic drift
    assert np.all(np.abs(err) < 0.5 * one_step + 1e-12)


@pytest.mark.parametrize("encoding", ["bf16", "int8", "masked-int8"])
def test_error_feedback_keeps_the_cumulative_error_within_one_step(
    tmp_path: Path, encoding: str
) -> None:
    # Without feedback the error of R rounds grows like sqrt(R) steps; with it, Σ sent stays
    # within the last residual of Σ Δ.
    rounds, residual = 30, None
    sent = np.zeros(sum(int(np.prod(s)) for s in SHAPES.values()))
    wanted = np.zeros_like(sent)
    layout = de.FlatLayout.of(
        de.wire_specs("fp32", [de.TensorSpec(n, s, "float32") for n, s in SHAPES.items()])
    )
    for r in range(rounds):
        delta = make_delta(100 + r)
        wanted += flat(delta)
        secure = None
        if de.is_secure(encoding):
            clips = (3e-3,) * 3
            scales = tuple(secagg.choose_scale(c, 1, 8) for c in clips)
            secure = de.SecureParams(8, clips, scales, 1.0, None, {}, "me")
        de.encode_update_in_place(delta, encoding, tmp_path / "u", CHUNK, rounding_key=bytes([r]),
                                  residual=residual, secure=secure)  # fmt: skip
        if secure is None:
            sent += decode_file(encoding, tmp_path / "u", sent.size)
        else:
            words = np.fromfile(tmp_path / "u", dtype=np.uint8).view(np.int8).astype(np.float64)
            for i, lo, hi in layout.segments(0, layout.total):
                off = layout.offsets[i]
                sent[off + lo : off + hi] += words[off + lo : off + hi] / scales[i]
        residual = delta
    np.testing.assert_allclose(sent + flat(residual), wanted, atol=1e-9)
    assert np.abs(sent - wanted).max() < 0.2 * np.abs(wanted).max()


@pytest.mark.parametrize("bits", [32, 16, 8])
def test_masked_updates_sum_exactly_in_every_ring_with_a_dropout(tmp_path: Path, bits: int) -> None:
    encoding = {32: "masked-int32", 16: "masked-int16", 8: "masked-int8"}[bits]
    ids = ["n0", "n1", "n2", "n3"]
    self_seeds = {u: secagg.new_self_seed() for u in ids}
    pair = {(u, v): secagg.new_self_seed() for u in ids for v in ids if u < v}
    seed_of = lambda u, v: pair[tuple(sorted((u, v)))]  # noqa: E731
    clips = (2e-3, 1e-3, 4e-3)
    scales = tuple(secagg.choose_scale(c, len(ids), bits) for c in clips)
    dtype = secagg.RING_DTYPES[bits]
    total, expected_q = None, 0
    survivors = ids[:3]  # n3 shared its keys but dropped before its masked input
    for k, u in enumerate(survivors):
        delta = make_delta(10 + k)
        p = de.SecureParams(
            bits, clips, scales, 1.5, self_seeds[u], {v: seed_of(u, v) for v in ids if v != u}, u
        )
        de.encode_update_in_place(
            delta, encoding, tmp_path / u, CHUNK, rounding_key=u.encode(), secure=p
        )
        words = np.fromfile(tmp_path / u, dtype=dtype)
        total = words.copy() if total is None else total + words
        # What this node meant to send, unmasked: its own quantized values.
        unmasked = words.copy()
        secagg.unmask_chunk(
            unmasked,
            0,
            [self_seeds[u]],
            [(seed_of(u, v), secagg.pair_sign(u, v)) for v in ids if v != u],
        )
        expected_q = expected_q + unmasked.view(f"int{bits}").astype(np.int64)
    dropped_masks = [(seed_of(v, "n3"), secagg.pair_sign(v, "n3")) for v in survivors]
    secagg.unmask_chunk(total, 0, [self_seeds[u] for u in survivors], dropped_masks)
    np.testing.assert_array_equal(total.view(f"int{bits}").astype(np.int64), expected_q)


def test_same_key_same_bytes_whatever_the_piece_size(tmp_path: Path, monkeypatch) -> None:
    for encoding in ("bf16", "int8"):
        de.encode_update_in_place(
            make_delta(5), encoding, tmp_path / "whole", CHUNK, rounding_key=b"k"
        )
        monkeypatch.setattr(de, "PIECE_ELEMENTS", de.INT8_BLOCK_VALUES * 2)
        de.encode_update_in_place(
            make_delta(5), encoding, tmp_path / "pieces", CHUNK, rounding_key=b"k"
        )
        monkeypatch.undo()
        assert (tmp_path / "whole").read_bytes() == (tmp_path / "pieces").read_bytes()
        de.encode_update_in_place(
            make_delta(5), encoding, tmp_path / "other", CHUNK, rounding_key=b"j"
        )
        assert (tmp_path / "whole").read_bytes() != (tmp_path / "other").read_bytes()


def test_bad_inputs_are_refused(tmp_path: Path) -> None:
    delta = make_delta(6)
    delta["b"][2] = float("nan")
    with pytest.raises(de.EncodingError, match="NaN"):
        de.encode_update_in_place(delta, "int8", tmp_path / "u", CHUNK, rounding_key=b"k")
    with pytest.raises(de.EncodingError, match="unknown delta encoding"):
        de.encode_update_in_place(make_delta(6), "int4", tmp_path / "u", CHUNK, rounding_key=b"k")
    with pytest.raises(de.EncodingError, match="multiple of 256"):
        de.check_chunk_bytes("int8", 4096 + 4)
    with pytest.raises(de.EncodingError, match="secure-aggregation parameters"):
        de.encode_update_in_place(
            make_delta(6), "masked-int16", tmp_path / "u", CHUNK, rounding_key=b"k"
        )
    with pytest.raises(secagg.SecAggError, match="no room"):
        secagg.choose_scale(1.0, 200, 8)
