"""The chunked tensor codec: exact round trips, resume, and every validation rule."""

from __future__ import annotations

import hashlib
import itertools
import tracemalloc
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from protos import federation_pb2 as pb
from protos.codec import (
    DEFAULT_CHUNK_BYTES,
    DTYPES,
    ChunkVerifier,
    CodecError,
    EncodedPayload,
    Manifest,
    PayloadAssembler,
    TensorSpec,
    encode,
    model_stream_messages,
    payload_digest,
    receive_model,
    specs_of,
    update_messages,
)


def raw_bytes(tensor: torch.Tensor) -> bytes:
    """A tensor's memory as bytes (bit-exact, so NaN payloads compare too)."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random bytes reinterpreted as `dtype`: covers every bit pattern, NaNs included."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    data = np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)
    return torch.from_numpy(data).view(dtype).reshape(shape)


def decode(payload_chunks: list[bytes], manifest: Manifest) -> dict[str, torch.Tensor]:
    assembler = PayloadAssembler(manifest)
    for index, data in enumerate(payload_chunks):
        assembler.add(index, data)
    return assembler.tensors()


def round_trip(tensors: dict[str, torch.Tensor], chunk_bytes: int) -> dict[str, torch.Tensor]:
    payload = encode(tensors, chunk_bytes)
    return decode([data for _, data in payload.chunks()], payload.manifest)


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert got[name].shape == tensor.shape, name
        assert raw_bytes(got[name]) == raw_bytes(tensor), name


def mixed_tensors() -> dict[str, torch.Tensor]:
    weight = torch.nn.Parameter(torch.randn(3, 5))  # requires grad, like a real state dict
    return {
        "weight": weight,
        "odd_bf16": random_tensor((7,), torch.bfloat16, 1),  # 14 bytes: misaligns what follows
        "after_odd": torch.randn(2, 3),  # float32 at a non-multiple-of-4 offset
        "scalar": torch.tensor(2.5, dtype=torch.float16),
        "empty": torch.empty(0, 4),
        "empty_stride_0": torch.zeros(0, dtype=torch.bfloat16).as_strided((2, 0), (0, 0)),
        "transposed": torch.arange(12, dtype=torch.int32).reshape(3, 4).t(),  # non-contiguous
        "masked": torch.from_numpy(np.array([0, 1, 2**32 - 1], dtype=np.uint32)),
        "nan_bits": random_tensor((4, 2), torch.float32, 2),
    }


# --- round trips ---


@pytest.mark.parametrize("chunk_bytes", [1, 7, 64, DEFAULT_CHUNK_BYTES])
def test_mixed_dtypes_round_trip_exactly(chunk_bytes: int) -> None:
    tensors = mixed_tensors()
    assert not tensors["transposed"].is_contiguous()
    decoded = round_trip(tensors, chunk_bytes)
    assert_same_tensors(decoded, tensors)
    assert all(tensor.is_contiguous() for tensor in decoded.values())


def test_payload_is_raw_bytes_end_to_end_with_matching_hashes() -> None:
    tensors = mixed_tensors()
    payload = encode(tensors, chunk_bytes=10)
    expected = b"".join(raw_bytes(tensor) for tensor in tensors.values())
    chunks = [data for _, data in payload.chunks()]
    assert b"".join(chunks) == expected
    manifest = payload.manifest
    assert manifest.chunk_sha256 == tuple(hashlib.sha256(c).digest() for c in chunks)
    root = b"fedpt/payload-root/v1" + b"".join(manifest.chunk_sha256)
    assert manifest.sha256 == hashlib.sha256(root).digest()
    assert [manifest.chunk_span(i) for i in range(2)] == [(0, 10), (10, 20)]
    assert manifest.specs() == specs_of(tensors)
    assert [e.offset for e in manifest.entries] == [0, 60, 74, 98, 100, 100, 100, 148, 160]


@pytest.mark.parametrize(
    ("numel", "chunk_bytes", "chunk_sizes"),
    [
        (16, 16, [16, 16, 16, 16]),  # exactly k chunks
        (17, 16, [16, 16, 16, 16, 4]),  # one element over: a short last chunk
        (16, 1024, [64]),  # chunk larger than the payload
        (0, 16, []),  # empty payload: no chunks at all
    ],
)
def test_chunk_size_edges(numel: int, chunk_bytes: int, chunk_sizes: list[int]) -> None:
    tensors = {"x": torch.randn(numel)}
    payload = encode(tensors, chunk_bytes)
    assert payload.manifest.num_chunks == len(chunk_sizes)
    assert [len(data) for _, data in payload.chunks()] == chunk_sizes
    assert_same_tensors(round_trip(tensors, chunk_bytes), tensors)


def test_empty_state_dict_round_trips() -> None:
    payload = encode({})
    assert payload.manifest.num_chunks == 0
    assert payload.manifest.sha256 == hashlib.sha256(b"fedpt/payload-root/v1").digest()
    assembler = receive_model(model_stream_messages(payload))
    assert assembler.complete
    assert assembler.tensors() == {}


def test_float32_chunks_read_as_elements_at_start_over_4() -> None:
    flat = torch.randn(50)
    payload = encode({"a": flat[:20], "b": flat[20:]}, chunk_bytes=12)
    assert payload.manifest.element_itemsize == 4
    for index, data in payload.chunks():
        start, end = payload.manifest.chunk_span(index)
        got = np.frombuffer(data, "<f4")
        assert np.array_equal(got, flat.numpy()[start // 4 : end // 4])


def test_element_itemsize() -> None:
    assert (
        encode(
            {"a": torch.zeros(2), "b": torch.zeros(3, dtype=torch.int32)}
        ).manifest.element_itemsize
        == 4
    )
    assert (
        encode(
            {"a": torch.zeros(2), "b": torch.zeros(3, dtype=torch.bfloat16)}
        ).manifest.element_itemsize
        is None
    )
    assert encode({}).manifest.element_itemsize is None


def test_specs_of_and_nbytes() -> None:
    specs = specs_of(
        {"w": torch.zeros(3, 4, dtype=torch.bfloat16), "s": torch.tensor(1, dtype=torch.int32)}
    )
    assert specs[0] == TensorSpec("w", (3, 4), "bfloat16")
    assert specs[0].nbytes == 24
    assert TensorSpec("s", (), "int32").nbytes == 4


def test_specs_of_rejects_unsupported_dtype() -> None:
    with pytest.raises(CodecError, match=r"'s'.*int64"):
        specs_of({"s": torch.tensor(1)})


def test_manifest_proto_round_trip() -> None:
    manifest = encode(mixed_tensors(), chunk_bytes=9).manifest
    wire = manifest.to_proto().SerializeToString()
    assert Manifest.from_proto(pb.TensorManifest.FromString(wire)) == manifest
    assert Manifest.from_proto(manifest.to_proto(), expected=manifest.specs()) == manifest


# --- streams and resume ---


def test_model_stream_is_manifest_then_chunks() -> None:
    payload = encode({"x": torch.randn(10)}, chunk_bytes=8)
    messages = list(model_stream_messages(payload, first_chunk=2))
    assert messages[0].WhichOneof("payload") == "manifest"
    assert Manifest.from_proto(messages[0].manifest) == payload.manifest
    assert [m.chunk.index for m in messages[1:]] == [2, 3, 4]
    assert messages[1].chunk.data == payload.chunk(2)


def test_update_messages_fill_header_without_mutating_it() -> None:
    payload = encode({"x": torch.randn(10)}, chunk_bytes=8)
    header = pb.UpdateHeader(round=3, base_version=2, num_tokens=1000, train_loss=1.5)
    messages = list(update_messages(header, payload, first_chunk=1))
    sent = messages[0].header
    assert (sent.round, sent.base_version, sent.num_tokens, sent.train_loss) == (3, 2, 1000, 1.5)
    assert sent.first_chunk == 1
    assert Manifest.from_proto(sent.manifest) == payload.manifest
    assert not header.HasField("manifest")
    assert [m.chunk.index for m in messages[1:]] == [1, 2, 3, 4]


@pytest.mark.parametrize("broken_after", [0, 1, 4])
def test_resume_after_broken_stream_gives_identical_tensors(broken_after: int) -> None:
    tensors = mixed_tensors()
    payload = encode(tensors, chunk_bytes=32)
    assert payload.manifest.num_chunks > 4
    broken = itertools.islice(model_stream_messages(payload), 1 + broken_after)
    assembler = receive_model(broken, expected=specs_of(tensors))
    assert not assembler.complete
    assert assembler.restart_from() == broken_after
    resumed = model_stream_messages(payload, first_chunk=assembler.restart_from())
    assert receive_model(resumed, assembler) is assembler
    assert assembler.complete
    assert_same_tensors(assembler.tensors(), tensors)


@pytest.mark.parametrize("chunk_bytes", [7, 32, DEFAULT_CHUNK_BYTES])
def test_receiving_into_existing_tensors_overwrites_them_exactly_and_resumes(
    chunk_bytes: int,
) -> None:
    """A node pulls version v+1 into the memory of version v: no new model-sized buffer."""
    tensors = {k: v.detach().contiguous() for k, v in mixed_tensors().items()}
    old = {k: torch.zeros_like(v) if v.numel() else v.clone() for k, v in tensors.items()}
    addresses = {k: v.data_ptr() for k, v in old.items()}
    payload = encode(tensors, chunk_bytes)
    broken = itertools.islice(model_stream_messages(payload), 1 + payload.manifest.num_chunks // 2)
    assembler = receive_model(broken, expected=specs_of(tensors), into=old)
    assert not assembler.complete
    resumed = model_stream_messages(payload, first_chunk=assembler.restart_from())
    got = receive_model(resumed, assembler).tensors()
    assert_same_tensors(got, tensors)
    assert all(got[k] is old[k] and got[k].data_ptr() == addresses[k] for k in old)


def test_receiving_into_tensors_that_do_not_match_the_manifest_is_refused() -> None:
    tensors = {"a": torch.zeros(4), "b": torch.zeros(2, 3)}
    payload = encode(tensors, chunk_bytes=8)
    for into in ({"a": torch.zeros(4)}, {"b": torch.zeros(2, 3), "a": torch.zeros(4)},
                 {"a": torch.zeros(4, dtype=torch.int32), "b": torch.zeros(2, 3)},
                 {"a": torch.zeros(4), "b": torch.zeros(3, 2).t()}):  # fmt: skip
        with pytest.raises(CodecError, match="do not match"):
            receive_model(model_stream_messages(payload), into=into)


def test_resume_refuses_a_different_manifest() -> None:
    first = encode({"x": torch.zeros(10)}, chunk_bytes=8)
    assembler = receive_model(itertools.islice(model_stream_messages(first), 2))
    changed = encode({"x": torch.ones(10)}, chunk_bytes=8)
    with pytest.raises(CodecError, match="different manifest"):
        receive_model(model_stream_messages(changed, first_chunk=1), assembler)


def test_resume_from_wrong_chunk_is_refused() -> None:
    payload = encode({"x": torch.zeros(10)}, chunk_bytes=8)
    assembler = receive_model(itertools.islice(model_stream_messages(payload), 2))
    with pytest.raises(CodecError, match="chunk 2 arrived, expected chunk 1"):
        receive_model(model_stream_messages(payload, first_chunk=2), assembler)


def chunk_message(index: int, data: bytes = b"") -> pb.ModelStreamMessage:
    return pb.ModelStreamMessage(chunk=pb.Chunk(index=index, data=data))


@pytest.mark.parametrize(
    ("make_stream", "match"),
    [
        (lambda payload: [], "ended before its manifest"),
        (lambda payload: [chunk_message(0, payload.chunk(0))], "must start with a manifest"),
        (lambda payload: [pb.ModelStreamMessage()], "must start with a manifest"),
        (
            lambda payload: [
                *itertools.islice(model_stream_messages(payload), 2),
                pb.ModelStreamMessage(manifest=payload.manifest.to_proto()),
            ],
            "manifest after its manifest",
        ),
    ],
    ids=["empty", "chunk-first", "empty-message-first", "second-manifest"],
)
def test_receive_model_rejects_malformed_streams(
    make_stream: Callable[..., list[pb.ModelStreamMessage]], match: str
) -> None:
    payload = encode({"x": torch.zeros(10)}, chunk_bytes=8)
    with pytest.raises(CodecError, match=match):
        receive_model(make_stream(payload))


def test_receive_model_applies_limits_and_expected_specs() -> None:
    payload = encode({"x": torch.zeros(10)}, chunk_bytes=8)
    with pytest.raises(CodecError, match="exceeds the limit of 39"):
        receive_model(model_stream_messages(payload), max_total_bytes=39)
    with pytest.raises(CodecError, match="shape"):
        receive_model(model_stream_messages(payload), expected=[TensorSpec("x", (11,), "float32")])


# --- corruption ---


def flip_byte(data: bytes, position: int = 0) -> bytes:
    corrupted = bytearray(data)
    corrupted[position] ^= 0x01
    return bytes(corrupted)


@pytest.fixture
def small_payload() -> EncodedPayload:
    return encode({"x": torch.randn(10), "y": torch.randn(3)}, chunk_bytes=8)


@pytest.mark.parametrize("receiver", [PayloadAssembler, ChunkVerifier])
@pytest.mark.parametrize(
    ("bad_chunk", "match"),
    [
        (lambda p: (1, flip_byte(p.chunk(1), 5)), "chunk 1 failed its sha256 check"),
        (lambda p: (1, p.chunk(1)[:-1]), "chunk 1 is 7 bytes, expected 8"),
        (lambda p: (1, p.chunk(1) + b"\0"), "chunk 1 is 9 bytes, expected 8"),
        (lambda p: (2, p.chunk(2)), "chunk 2 arrived, expected chunk 1"),  # out of order
        (lambda p: (0, p.chunk(0)), "chunk 0 arrived, expected chunk 1"),  # repeated
    ],
    ids=["flipped-byte", "truncated", "extended", "out-of-order", "repeated"],
)
def test_bad_chunk_is_rejected_and_changes_nothing(
    small_payload, receiver: type, bad_chunk: Callable, match: str
) -> None:
    target = receiver(small_payload.manifest)
    add = target.add if isinstance(target, PayloadAssembler) else target.verify
    add(0, small_payload.chunk(0))
    with pytest.raises(CodecError, match=match):
        add(*bad_chunk(small_payload))
    assert target.next_index == 1  # the rejected chunk left no trace: resume from 1 works
    for index, data in small_payload.chunks(first=1):
        add(index, data)
    assert target.complete


def test_chunk_after_completion_is_rejected(small_payload) -> None:
    verifier = ChunkVerifier(small_payload.manifest, first_chunk=small_payload.manifest.num_chunks)
    assert verifier.complete
    with pytest.raises(CodecError, match="after all 7 chunks"):
        verifier.verify(7, b"")


def test_chunk_verifier_starts_at_first_chunk(small_payload) -> None:
    verifier = ChunkVerifier(small_payload.manifest, first_chunk=3)
    with pytest.raises(CodecError, match="expected chunk 3"):
        verifier.verify(0, small_payload.chunk(0))
    for index, data in small_payload.chunks(first=3):
        verifier.verify(index, data)
    assert verifier.complete
    with pytest.raises(CodecError, match="out of range"):
        ChunkVerifier(small_payload.manifest, first_chunk=8)


def test_payload_sha_that_is_not_the_root_of_the_chunks_is_refused(small_payload) -> None:
    # Every chunk hash is right, only the payload's digest is wrong: refused at the manifest,
    # before any chunk is taken.
    crafted = small_payload.manifest.to_proto()
    crafted.sha256 = hashlib.sha256(b"something else").digest()
    with pytest.raises(CodecError, match="root of its chunks"):
        Manifest.from_proto(crafted)
    crafted = small_payload.manifest.to_proto()
    crafted.chunk_sha256[0] = hashlib.sha256(b"another chunk").digest()  # root no longer fits
    with pytest.raises(CodecError, match="root of its chunks"):
        Manifest.from_proto(crafted)


def test_tensors_before_complete_is_an_error(small_payload) -> None:
    assembler = PayloadAssembler(small_payload.manifest)
    assembler.add(0, small_payload.chunk(0))
    with pytest.raises(CodecError, match="1 of 7 chunks"):
        assembler.tensors()


def test_out_of_range_chunk_requests(small_payload) -> None:
    with pytest.raises(CodecError, match="out of range"):
        small_payload.chunk(7)
    with pytest.raises(CodecError, match="out of range"):
        small_payload.chunks(first=8)
    with pytest.raises(CodecError, match="out of range"):
        model_stream_messages(small_payload, first_chunk=-1)
    assert list(small_payload.chunks(first=7)) == []


# --- manifest validation: one case per rule ---


def base_manifest() -> pb.TensorManifest:
    """All 4-byte elements (so the no-split rule applies): 96 + 24 + 8 = 128 bytes, 4 chunks."""
    tensors = {
        "w": torch.randn(4, 6),
        "b": torch.randn(6),
        "n": torch.tensor([1, 2], dtype=torch.int32),
    }
    return encode(tensors, chunk_bytes=32).manifest.to_proto()


def swap_first_two(msg: pb.TensorManifest) -> None:
    first, second = pb.TensorEntry(), pb.TensorEntry()
    first.CopyFrom(msg.tensors[0])
    second.CopyFrom(msg.tensors[1])
    msg.tensors[0].CopyFrom(second)
    msg.tensors[1].CopyFrom(first)


def set_shape(index: int, shape: list[int], nbytes: int | None = None):
    def mutate(msg: pb.TensorManifest) -> None:
        del msg.tensors[index].shape[:]
        msg.tensors[index].shape.extend(shape)
        if nbytes is not None:
            msg.tensors[index].nbytes = nbytes

    return mutate


def setter(field: str, value: object, tensor: int | None = None):
    """Set one field of the manifest, or of its entry number `tensor`."""

    def mutate(msg: pb.TensorManifest) -> None:
        setattr(msg if tensor is None else msg.tensors[tensor], field, value)

    return mutate


def shorten_chunk_digest(msg: pb.TensorManifest) -> None:
    msg.chunk_sha256[2] = bytes(31)


def need_2_to_the_34_chunks(msg: pb.TensorManifest) -> None:
    del msg.tensors[1:]
    set_shape(0, [2**34], nbytes=2**36)(msg)
    msg.total_bytes = 2**36
    msg.chunk_bytes = 4  # 2**34 chunks: more than a uint32 index can count


def empty_payload_with_a_chunk(msg: pb.TensorManifest) -> None:
    del msg.tensors[:]
    msg.total_bytes = 0
    del msg.chunk_sha256[1:]


MUTATIONS = {
    "unknown-dtype": (setter("dtype", "float64", tensor=0), {}, "'w' has unknown dtype 'float64'"),
    "negative-dims": (set_shape(0, [-4, -6]), {}, "'w' has a negative dimension"),
    "overflowing-dims": (set_shape(0, [2**40, 2**40]), {}, "'w' of shape .* overflows"),
    "too-many-dims": (set_shape(1, [1] * 65, nbytes=4), {}, "'b' has 65 dimensions"),
    "nbytes-mismatch": (setter("nbytes", 20, tensor=1), {}, "'b' has nbytes=20, but shape"),
    "offset-gap": (setter("offset", 100, tensor=1), {}, "'b' starts at byte 100, expected 96"),
    "offsets-out-of-order": (swap_first_two, {}, "'b' starts at byte 96, expected 0"),
    "duplicate-name": (setter("name", "w", tensor=1), {}, "'w' appears more than once"),
    "empty-name": (setter("name", "", tensor=0), {}, "tensor #0 has an empty"),
    "total-mismatch": (setter("total_bytes", 132), {}, "total_bytes=132, but the tensors span 128"),
    "chunk-bytes-zero": (setter("chunk_bytes", 0), {}, "chunk_bytes=0 must be between 1"),
    "chunk-bytes-over-max": (setter("chunk_bytes", 64), {"max_chunk_bytes": 60}, "chunk_bytes=64"),
    "chunk-splits-elements": (setter("chunk_bytes", 30), {}, "must be a multiple of 4"),
    "too-few-digests": (lambda m: m.chunk_sha256.pop(), {}, "lists 3 chunk digests, .* make 4"),
    "too-many-digests": (lambda m: m.chunk_sha256.append(bytes(32)), {}, "lists 5 chunk digests"),
    "empty-payload-with-chunk": (
        empty_payload_with_a_chunk,
        {},
        "lists 1 chunk digests, .* make 0",
    ),
    "short-chunk-digest": (shorten_chunk_digest, {}, "chunk 2's sha256 is 31 bytes"),
    "short-payload-digest": (setter("sha256", b""), {}, "payload sha256 is 0 bytes"),
    "over-max-total": (lambda m: None, {"max_total_bytes": 127}, "128 bytes exceeds the limit"),
    "too-many-chunks": (need_2_to_the_34_chunks, {}, "chunk indices are uint32"),
}


@pytest.mark.parametrize("case", list(MUTATIONS), ids=list(MUTATIONS))
def test_manifest_validation_rules(case: str) -> None:
    mutate, kwargs, match = MUTATIONS[case]
    msg = base_manifest()
    Manifest.from_proto(msg)  # valid before the mutation
    mutate(msg)
    with pytest.raises(CodecError, match=match):
        Manifest.from_proto(msg, **kwargs)


def test_encode_validates_like_the_receiver() -> None:
    with pytest.raises(CodecError, match=r"'d' has unsupported dtype torch\.float64"):
        encode({"d": torch.zeros(2, dtype=torch.float64)})
    with pytest.raises(CodecError, match="chunk_bytes=0"):
        encode({"x": torch.zeros(2)}, chunk_bytes=0)
    with pytest.raises(CodecError, match="chunk_bytes="):
        encode({"x": torch.zeros(2)}, chunk_bytes=(64 << 20) + 4)
    with pytest.raises(CodecError, match="multiple of 4"):
        encode({"x": torch.zeros(2), "n": torch.zeros(3, dtype=torch.int32)}, chunk_bytes=6)
    with pytest.raises(CodecError, match="multiple of 2"):
        encode({"h": torch.zeros(3, dtype=torch.bfloat16)}, chunk_bytes=3)
    with pytest.raises(CodecError, match="empty"):
        encode({"": torch.zeros(2)})


# --- expected specs ---

EXPECTED = [
    TensorSpec("w", (4, 6), "float32"),
    TensorSpec("b", (6,), "float32"),
    TensorSpec("n", (2,), "int32"),
]

SPEC_MISMATCHES = {
    "wrong-name": (
        [TensorSpec("W", (4, 6), "float32"), *EXPECTED[1:]],
        "lacks expected tensor 'W'",
    ),
    "wrong-shape": (
        [TensorSpec("w", (6, 4), "float32"), *EXPECTED[1:]],
        r"'w' has shape \(4, 6\), expected \(6, 4\)",
    ),
    "wrong-dtype": (
        [*EXPECTED[:2], TensorSpec("n", (2,), "uint32")],
        "'n' has dtype int32, expected uint32",
    ),
    "wrong-order": ([EXPECTED[1], EXPECTED[0], EXPECTED[2]], "#0 is 'w', expected 'b'"),
    "extra-tensor": (EXPECTED[:2], "unexpected tensor 'n'"),
    "missing-tensor": ([*EXPECTED, TensorSpec("z", (1,), "float32")], "lacks expected tensor 'z'"),
}


def test_expected_specs_that_match_pass() -> None:
    assert Manifest.from_proto(base_manifest(), expected=EXPECTED).specs() == EXPECTED


@pytest.mark.parametrize("case", list(SPEC_MISMATCHES), ids=list(SPEC_MISMATCHES))
def test_expected_spec_mismatch_says_what_differs(case: str) -> None:
    expected, match = SPEC_MISMATCHES[case]
    with pytest.raises(CodecError, match=match):
        Manifest.from_proto(base_manifest(), expected=expected)


# --- memory ---


def test_encode_and_chunks_never_hold_the_whole_payload() -> None:
    tensor = torch.ones(16 << 20)  # 64 MiB of float32, allocated before tracing starts
    tracemalloc.start()
    try:
        payload = encode({"big": tensor}, chunk_bytes=1 << 20)
        digests = [hashlib.sha256(data).digest() for _, data in payload.chunks()]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert payload.manifest.num_chunks == 64
    assert payload_digest(digests) == payload.manifest.sha256
    assert peak < 4 << 20, f"peak {peak / 2**20:.1f} MiB: encode copied more than a chunk"


# --- property ---

DTYPE_NAMES = sorted(DTYPES)


@st.composite
def state_dicts(draw: st.DrawFn) -> tuple[dict[str, torch.Tensor], int]:
    count = draw(st.integers(0, 5))
    tensors = {}
    for position in range(count):
        shape = tuple(draw(st.lists(st.integers(0, 6), max_size=3)))
        dtype = DTYPES[draw(st.sampled_from(DTYPE_NAMES))]
        tensors[f"t{position}"] = random_tensor(shape, dtype, draw(st.integers(0, 2**16)))
    chunk_bytes = draw(st.integers(1, 64))
    itemsizes = {tensor.dtype.itemsize for tensor in tensors.values()}
    if len(itemsizes) == 1:  # uniform element size: chunks must not split elements
        chunk_bytes *= itemsizes.pop()
    return tensors, chunk_bytes


@settings(max_examples=50, deadline=None)
@given(state_dicts())
def test_random_state_dicts_round_trip_exactly(case: tuple[dict[str, torch.Tensor], int]) -> None:
    tensors, chunk_bytes = case
    payload = encode(tensors, chunk_bytes)
    wire_manifest = pb.TensorManifest.FromString(payload.manifest.to_proto().SerializeToString())
    manifest = Manifest.from_proto(wire_manifest, expected=specs_of(tensors))
    assert_same_tensors(decode([data for _, data in payload.chunks()], manifest), tensors)
