"""Global checkpoints: exact round trips, recorded hashes, no overwrite, corruption caught,
crash-recovery cleanup and pruning."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from aggregator.checkpoints import CheckpointStore, sha256_file
from aggregator.outer import OuterConfig, OuterOptimizer
from model.io import CheckpointError, save_tensors_atomic


def params(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "tok_embeddings.weight": torch.randn(16, 8, generator=g),
        "layers.0.attention.wq.weight": torch.randn(8, 8, generator=g),
        "norm.weight": torch.ones(8),
    }


def write(store: CheckpointStore, version: int, **kwargs):
    return store.write(version, version - 1, params(version), {}, {"name": "fedavg"}, **kwargs)


def test_round_trip_is_exact_with_outer_state(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "ckpt")
    theta = params()
    opt = OuterOptimizer(OuterConfig("adam"), theta)
    theta = opt.step(theta, {n: torch.full_like(v, 0.5) for n, v in theta.items()})
    record = store.write(
        3, 2, theta, opt.state_tensors(), opt.state_meta(), extra_metadata={"run": "abc"}
    )
    assert record.path == store.path_for(3) == tmp_path / "ckpt" / "global_v00000003.safetensors"
    assert (record.version, record.round) == (3, 2)

    got_params, got_outer, meta = store.read(3, expected_sha256=record.sha256)
    assert list(got_params) == list(theta)  # written order, not safetensors' sorted order
    assert all(torch.equal(got_params[n], theta[n]) for n in theta)
    state = opt.state_tensors()
    assert list(got_outer) == list(state) and all(
        torch.equal(got_outer[n], state[n]) for n in state
    )
    assert meta == {"format": "fedpt-global/1", "version": 3, "round": 2,
                    "outer": opt.state_meta(), "run": "abc"}  # fmt: skip

    # A restarted aggregator resumes the optimizer exactly.
    resumed = OuterOptimizer(OuterConfig("adam"), got_params)
    resumed.load_state(got_outer, meta["outer"])
    delta = {n: torch.full_like(v, -0.25) for n, v in theta.items()}
    expected, actual = opt.step(theta, delta), resumed.step(got_params, delta)
    assert all(torch.equal(actual[n], expected[n]) for n in expected)


def test_initial_checkpoint_has_round_minus_one(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.write(0, -1, params(), {}, {"name": "nesterov", "step": 0})
    assert store.read(0)[2]["round"] == -1


def test_recorded_sha_and_size_are_the_file_and_no_temp_files_remain(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    record = write(store, 1)
    data = record.path.read_bytes()
    assert record.sha256 == hashlib.sha256(data).hexdigest() == sha256_file(record.path)
    assert record.nbytes == len(data)
    assert [p.name for p in tmp_path.iterdir()] == [record.path.name]


def test_streamed_safetensors_file_reads_back_exactly_with_the_library(tmp_path: Path) -> None:
    """model.io writes safetensors itself (to hash while writing): the library must read every
    dtype back bit for bit, whatever order and sizes (bf16 before fp32, empty, 0-dim, large)."""
    from safetensors import safe_open

    g = torch.Generator().manual_seed(1)
    tensors = {
        "odd_bf16": torch.randn(3, 5, generator=g).bfloat16(),
        "big": torch.randn(3 << 20, generator=g),  # several write slices
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "ids": torch.arange(7, dtype=torch.int64),
        "empty": torch.empty(0, 4),
        "flags": torch.tensor([True, False, True]),
        "bytes": torch.arange(5, dtype=torch.uint8),
        "strided": torch.randn(6, 4, generator=g).t(),  # not contiguous: written as its values
    }
    path = tmp_path / "t.safetensors"
    digest = save_tensors_atomic(tensors, path, {"k": "v"})
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"k": "v"}
        for name, t in tensors.items():
            back = f.get_tensor(name)
            assert back.dtype == t.dtype and torch.equal(back, t), name
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    assert (8 + header_len) % 8 == 0  # the data starts aligned


def test_refuses_to_overwrite_a_version(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    record = write(store, 1)
    with pytest.raises(CheckpointError, match="never overwritten"):
        store.write(1, 5, params(9), {}, {"name": "fedavg"})
    assert sha256_file(record.path) == record.sha256


def test_refuses_bad_arguments(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    with pytest.raises(ValueError, match="extra metadata"):
        write(store, 1, extra_metadata={"round": "7"})
    with pytest.raises(ValueError, match="extra metadata"):
        write(store, 1, extra_metadata={"n": 7})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="outer/"):
        store.write(1, 0, {"outer/x": torch.zeros(1)}, {}, {})
    with pytest.raises(ValueError):
        store.write(-1, 0, params(), {}, {})
    assert store.versions() == []


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_byte_in_tensor_data_is_caught_by_the_recorded_sha(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    record = write(store, 1)
    flip_byte(record.path, record.nbytes - 3)  # inside the last tensor's bytes
    with pytest.raises(CheckpointError, match="sha256"):
        store.read(1, expected_sha256=record.sha256)


def test_flipped_byte_in_header_is_corrupt(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    record = write(store, 1)
    flip_byte(record.path, 8)  # the header's opening '{'
    with pytest.raises(CheckpointError):
        store.read(1)
    with pytest.raises(CheckpointError):
        store.read(1, expected_sha256=record.sha256)


@pytest.mark.parametrize("keep", [0, 7, 100])
def test_truncated_file_is_corrupt(tmp_path: Path, keep: int) -> None:
    store = CheckpointStore(tmp_path)
    record = write(store, 1)
    record.path.write_bytes(record.path.read_bytes()[: record.nbytes - keep if keep else 0])
    with pytest.raises(CheckpointError):
        store.read(1)
    with pytest.raises(CheckpointError):
        store.read(1, expected_sha256=record.sha256)


def test_wrong_expected_sha_is_refused(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    write(store, 1)
    with pytest.raises(CheckpointError, match="corrupt"):
        store.read(1, expected_sha256="0" * 64)


def test_missing_foreign_and_misnamed_files_are_refused(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        store.read(4)
    save_tensors_atomic(params(), store.path_for(4), {"format": "fedpt-model/1"})
    with pytest.raises(CheckpointError, match="not a fedpt global checkpoint"):
        store.read(4)
    store.path_for(4).unlink()
    header = {"format": "fedpt-global/1", "version": "4", "round": "3", "outer": "{}"}
    save_tensors_atomic(params(), store.path_for(4), header)  # no tensor order
    with pytest.raises(CheckpointError, match="corrupt header"):
        store.read(4)
    save_tensors_atomic(params(), store.path_for(5), header | {"version": "5", "order": '["x"]'})
    with pytest.raises(CheckpointError, match="tensor list"):
        store.read(5)
    record = write(store, 1)
    record.path.rename(store.path_for(2))  # a file under another version's name
    with pytest.raises(CheckpointError, match="holds version 1"):
        store.read(2)


def test_versions_ignore_temp_and_foreign_files(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    for v in (2, 0, 11):
        write(store, v)
    (tmp_path / ".global_v00000012.safetensors.tmp-4242").write_bytes(b"partial")
    (tmp_path / "global_v7.safetensors").write_bytes(b"not ours")
    (tmp_path / "notes.txt").write_text("x")
    assert store.versions() == [0, 2, 11]


def test_remove_newer_than_deletes_uncommitted_files_and_temp_debris(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    for v in range(4):
        write(store, v)
    temp = tmp_path / ".global_v00000004.safetensors.tmp-4242"
    temp.write_bytes(b"partial")
    removed = store.remove_newer_than(1)
    assert removed == [store.path_for(2), store.path_for(3), temp]
    assert store.versions() == [0, 1] and not temp.exists()
    assert store.remove_newer_than(1) == []
    store.read(1)  # committed ones untouched


def test_prune_keeps_the_newest_and_protected_versions(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    for v in range(6):
        write(store, v)
    assert store.prune(0) == []  # 0: keep everything, as [store] keep_checkpoints
    assert store.versions() == [0, 1, 2, 3, 4, 5]
    removed = store.prune(2, protect={1})
    assert removed == [store.path_for(0), store.path_for(2), store.path_for(3)]
    assert store.versions() == [1, 4, 5]
    assert store.prune(5) == []
    with pytest.raises(ValueError):
        store.prune(-1)
