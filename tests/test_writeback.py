"""model/writeback.py: large files written front to back with O_DIRECT where the file system
allows it, through the page cache where it does not, byte for byte the same either way."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from model import writeback
from model.writeback import STAGING_BYTES, SequentialFile

# Sizes that cross the staging buffer's edges, are unaligned, and end mid-block.
PIECES = (1, 4095, 4097, STAGING_BYTES - 3, STAGING_BYTES, 3 * STAGING_BYTES + 17, 5)


def pieces(seed: int) -> list[bytes]:
    return [os.urandom(n) if i % 2 else bytes([seed + i]) * n for i, n in enumerate(PIECES)]


@pytest.mark.parametrize("direct", [True, False], ids=["o_direct", "page_cache"])
def test_sequential_file_holds_exactly_what_was_written(tmp_path: Path, direct: bool) -> None:
    data = pieces(1)
    f = SequentialFile(tmp_path / "f", direct=direct)
    if direct and not f.direct:
        pytest.skip("this file system refuses O_DIRECT")
    for piece in data:
        f.write(piece)
    assert f.size == sum(PIECES)
    f.sync_and_close()
    assert f.closed
    assert (tmp_path / "f").read_bytes() == b"".join(data)


def test_flush_makes_every_byte_so_far_readable_and_writing_goes_on(tmp_path: Path) -> None:
    """A rebuild of the round's sum reads an upload's spool mid-transfer."""
    data = pieces(2)
    f = SequentialFile(tmp_path / "f")
    f.write(data[0] + data[1] + data[2])  # 8193 bytes: all still staged under O_DIRECT
    f.flush()
    assert (tmp_path / "f").read_bytes() == data[0] + data[1] + data[2]
    for piece in data[3:]:
        f.write(piece)
    f.sync_and_close()
    assert (tmp_path / "f").read_bytes() == b"".join(data)


def test_falls_back_to_the_page_cache_where_o_direct_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open

    def tmpfs_open(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", tmpfs_open)
    data = pieces(3)
    f = SequentialFile(tmp_path / "f")
    assert not f.direct
    for piece in data:
        f.write(piece)
    f.sync_and_close()
    assert (tmp_path / "f").read_bytes() == b"".join(data)


def test_a_direct_write_the_device_refuses_goes_on_through_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    f = SequentialFile(tmp_path / "f")
    if not f.direct:
        pytest.skip("this file system refuses O_DIRECT")
    real_write = os.write
    refused = []

    def picky_write(fd: int, data) -> int:
        if fd == f._fd and len(data) == STAGING_BYTES and not refused:
            refused.append(True)
            raise OSError(errno.EINVAL, "Invalid argument")  # e.g. a larger logical block
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", picky_write)
    data = pieces(4)
    for piece in data:
        f.write(piece)
    assert refused and not f.direct
    f.sync_and_close()
    assert (tmp_path / "f").read_bytes() == b"".join(data)


def test_writeback_starts_each_full_window_once_as_the_file_grows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    started: list[tuple[int, int, int]] = []
    monkeypatch.setattr(writeback, "start_writeback", lambda *a: started.append(a))
    w = writeback.Writeback(fd=7, offset=100, window=10)
    for n in (4, 4, 4, 25, 3):
        w.wrote(n)
    # 100..112 reaches a window after the third write; 112..137 after the fourth; 3 bytes wait
    assert started == [(7, 100, 12), (7, 112, 25)]
