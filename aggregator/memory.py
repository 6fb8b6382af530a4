"""How the aggregator process allocates memory.

Two glibc malloc behaviours kept memory that hostile or bursty traffic made the aggregator
allocate and free (bench.fuzz --continuation-floods: grpc parses an endless header block and
builds a multi-MiB error string listing every header field):
- every thread that contends for the heap gets its own arena (up to 8 per core), and memory
  freed in an arena mostly stays with the process. The aggregator runs hundreds of gRPC threads;
  with two arenas the growth stopped after a few floods (+65 MiB over 10, not +137).
- the mmap threshold is dynamic: once a large block (mmap'ed, so given back when freed) is
  freed, blocks up to its size come from the heap instead, where freeing them keeps them. Fixing
  the threshold at 1 MiB keeps every block of 1 MiB or more mmap'ed: the same 10 floods then
  left +0.3 MiB. (At 4 MiB they left +11 MiB: grpc's strings fall between.)
Large buffers (models, sums) are far above either threshold and always mmap'ed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

# glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
# glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2 (32 MiB on 64-bit)
MAX_MMAP_THRESHOLD_BYTES = 32 << 20


@functools.cache
def _mallopt() -> ctypes._CFuncPtr | None:  # None off glibc
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    return None if name is None else getattr(ctypes.CDLL(name), "mallopt", None)


def _set(parameter: int, value: int) -> bool:
    mallopt = _mallopt()
    return mallopt is not None and mallopt(parameter, value) == 1


def limit_malloc_arenas(arenas: int) -> bool:
    """Cap glibc's malloc arenas for the rest of this process (0: glibc's default). True if
    applied; False where the C library is not glibc. Call before the server starts threads."""
    return arenas > 0 and _set(M_ARENA_MAX, arenas)


def fix_mmap_threshold(threshold_bytes: int) -> bool:
    """Serve every block of at least `threshold_bytes` by mmap, given back to the system when
    freed, and turn off glibc's dynamic threshold (0: leave glibc's default). True if applied."""
    return threshold_bytes > 0 and _set(M_MMAP_THRESHOLD, threshold_bytes)
