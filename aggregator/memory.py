"""How the aggregator process allocates memory, and gives back what it freed.

Hostile or bursty traffic makes the aggregator allocate and free a lot at once, and glibc
malloc kept what was freed (bench.fuzz --continuation-floods: grpc reads an endless header block
to its end and builds a multi-MiB error string listing every header field; 10 floods of tiny
header fields left +137 MiB under glibc's defaults). Three settings give it back:
- one malloc arena. glibc gives every thread that contends for the heap its own (up to 8 per
  core) and keeps what is freed in each; `malloc_trim` does not give back the free top of a
  thread's arena, only the main one's (two arenas: +65 MiB without trimming, +24 MiB with).
- `malloc_trim` every `[server] malloc_trim_seconds`: free pages in the middle of the heap and
  at its top go back to the system.
- a fixed mmap threshold of 32 MiB (glibc's upper bound) and a trim threshold of twice that,
  which is where glibc's dynamic thresholds end up once a transfer chunk was freed; trimming
  only works under fixed ones. Lower ones cost CPU: at 1 MiB every 4 MiB chunk was an mmap and
  munmap (4x the CPU time to serve pulls), and a low trim threshold shrank and regrew the heap
  around every chunk freed at its top (+20%).
Together: +0.3 MiB after those 10 floods, and pulls and uploads as fast as under glibc's
defaults with less peak memory (bench.aggregate --server malloc_arenas=0 ...).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
import time

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
# glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2 (32 MiB on 64-bit)
MAX_MMAP_THRESHOLD_BYTES = 32 << 20


@functools.cache
def _libc() -> ctypes.CDLL | None:  # None off glibc
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    libc = None if name is None else ctypes.CDLL(name)
    return libc if libc is not None and hasattr(libc, "mallopt") else None


def _mallopt(parameter: int, value: int) -> bool:
    libc = _libc()
    return libc is not None and libc.mallopt(parameter, value) == 1


def limit_malloc_arenas(arenas: int) -> bool:
    """Cap glibc's malloc arenas for the rest of this process (0: glibc's default). True if
    applied; False where the C library is not glibc. Call before the server starts threads."""
    return arenas > 0 and _mallopt(M_ARENA_MAX, arenas)


def fix_mmap_threshold(threshold_bytes: int) -> bool:
    """Serve every block of at least `threshold_bytes` by mmap, and give back the heap's free
    top past twice that, turning off glibc's dynamic thresholds (0: leave glibc's). True if
    applied."""
    return (
        threshold_bytes > 0
        and _mallopt(M_MMAP_THRESHOLD, threshold_bytes)
        and _mallopt(M_TRIM_THRESHOLD, 2 * threshold_bytes)
    )


def trim_malloc() -> bool:
    """Give the pages of free heap memory back to the system. True if any were."""
    libc = _libc()
    return libc is not None and libc.malloc_trim(0) == 1


class PeriodicTrim:
    """Calls `trim_malloc` at most every `seconds` (0: never), from a loop that polls it."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._next = time.monotonic() + seconds

    def poll(self) -> None:
        if self.seconds > 0 and time.monotonic() >= self._next:
            trim_malloc()
            self._next = time.monotonic() + self.seconds
