"""Writing a large file front to back, then making it durable, with as little CPU as the disk
allows: upload spools and checkpoints, a model's size each, on the critical path of a round.

Through the page cache, each 4 MiB written costs ~8 ms of CPU on the machines this was measured
on (allocating and filling cache pages; a sha256 of the same bytes costs 3 ms), and Linux holds
the pages until dirty memory passes a share of RAM or someone calls fsync, so the fsync then
waits for the disk for the whole file. `SequentialFile` therefore writes with O_DIRECT from a
page-aligned staging buffer (the disk reads straight from it: ~1.5 ms of CPU per 4 MiB), and the
unaligned tail at the end through the page cache. Where O_DIRECT is refused (tmpfs, some
network file systems, not Linux) it writes through the page cache and starts writeback of each
window as soon as it is written (`Writeback`: sync_file_range, start it, do not wait), so the
final fsync waits only for the tail. Durability comes from that fsync alone in both cases.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import mmap
import os
import sys
from collections.abc import Callable
from pathlib import Path

WINDOW_BYTES = 32 << 20
STAGING_BYTES = 4 << 20  # a multiple of every logical block size O_DIRECT may require
_SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h
_O_DIRECT = getattr(os, "O_DIRECT", 0)


def _load_sync_file_range() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int
    return function


_sync_file_range = _load_sync_file_range()


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing [offset, offset + nbytes) of `fd` to disk; returns at
    once. Errors are ignored: the caller's fsync reports any that matter."""
    if _sync_file_range is not None and nbytes > 0:
        _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


class Writeback:
    """Follows a file written front to back from `offset` and starts writeback of each full
    `window` of bytes as soon as it has been written (call `wrote` after each write)."""

    def __init__(self, fd: int, offset: int = 0, window: int = WINDOW_BYTES) -> None:
        self.fd, self.window = fd, window
        self._end = self._started = offset

    def wrote(self, nbytes: int) -> None:
        self._end += nbytes
        if self._end - self._started >= self.window:
            start_writeback(self.fd, self._started, self._end - self._started)
            self._started = self._end


class SequentialFile:
    """A new file written front to back (`write`), then `sync_and_close`d; `close` alone
    abandons it. Not thread-safe: one writer, or a caller-held lock."""

    def __init__(self, path: str | Path, *, direct: bool = True) -> None:
        self.path = Path(path)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        self._fd = -1
        self._stage: mmap.mmap | None = None
        if direct and _O_DIRECT:
            try:
                self._fd = os.open(self.path, flags | _O_DIRECT, 0o644)
                self._stage = mmap.mmap(-1, STAGING_BYTES)  # page-aligned, as O_DIRECT needs
            except OSError as e:
                if e.errno != errno.EINVAL:  # EINVAL: this file system refuses O_DIRECT
                    raise
        if self._fd < 0:
            self._fd = os.open(self.path, flags, 0o644)
        self._staged = 0  # bytes waiting in the staging buffer
        self.size = 0  # bytes accepted by `write`
        self._writeback = Writeback(self._fd)

    @property
    def closed(self) -> bool:
        return self._fd < 0

    @property
    def direct(self) -> bool:
        return self._stage is not None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        self.size += len(view)
        while view and self._stage is not None:
            n = min(len(view), STAGING_BYTES - self._staged)
            self._stage[self._staged : self._staged + n] = view[:n]
            self._staged, view = self._staged + n, view[n:]
            if self._staged == STAGING_BYTES:
                self._write_staged()  # may leave O_DIRECT
        if view:
            self._write_all(view)

    def flush(self) -> None:
        """Everything written so far becomes readable through the file system (another reader
        needs it mid-file: rare). The rest of the file then goes through the page cache."""
        self._leave_direct()

    def sync_and_close(self) -> None:
        """Write the tail, fsync, close: the file is durable (the caller fsyncs its folder
        after a rename)."""
        self._leave_direct()
        os.fsync(self._fd)
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._stage = None

    def _write_staged(self) -> None:
        assert self._stage is not None
        try:
            written = os.write(self._fd, self._stage)  # the GIL is released meanwhile
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: an alignment this device refuses
                raise
            written = 0
        if written == STAGING_BYTES:
            self._staged = 0
            return
        # Refused, or short (the file offset moved by what was written): the rest of the
        # staged bytes, and the file from here on, go through the page cache.
        self._leave_direct(already_written=written)

    def _leave_direct(self, already_written: int = 0) -> None:
        """From here on, write through the page cache; staged bytes not yet on disk first."""
        if self._stage is None:
            return
        fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~_O_DIRECT)
        stage, staged = self._stage, self._staged
        self._stage, self._staged = None, 0  # unmapped once the last view of it is gone
        self._write_all(memoryview(stage)[already_written:staged])

    def _write_all(self, view: memoryview) -> None:
        while view:
            n = os.write(self._fd, view)
            self._writeback.wrote(n)
            view = view[n:]
