"""How the aggregator process allocates memory, and gives back what it freed.

Hostile or bursty traffic makes the aggregator allocate and free a lot at once, and glibc
malloc kept what was freed (bench.fuzz --continuation-floods: grpc reads an endless header block
to its end and builds a multi-MiB error string listing every header field):
- every thread that contends for the heap gets its own arena (up to 8 per core), and memory
  freed in an arena mostly stays there. The aggregator runs hundreds of gRPC threads: capped at
  two arenas, 10 floods of tiny header fields left +65 MiB instead of +137 MiB.
- free memory in the middle of a heap is kept for reuse. `malloc_trim` gives its pages back; the
  aggregator calls it every `[server] malloc_trim_seconds`. It gave back nearly all of the rest,
  but only with a fixed mmap threshold: under glibc's dynamic one (a freed mmap'ed block moves
  the threshold up to its size) ~20 MiB stayed. The threshold is therefore fixed at 32 MiB
  (glibc's own upper bound), so transfer chunks (4 MiB) come from the heap as they would under
  the dynamic threshold; a lower one (1 MiB) made every chunk an mmap and munmap, and quadrupled
  the aggregator's CPU time for serving pulls (bench.aggregate --server).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
import time

# glibc's mallopt parameters (malloc.h)
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
    """Serve every block of at least `threshold_bytes` by mmap and turn off glibc's dynamic
    threshold (0: leave glibc's). True if applied."""
    return threshold_bytes > 0 and _mallopt(M_MMAP_THRESHOLD, threshold_bytes)


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
