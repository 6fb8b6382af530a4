"""How the aggregator process allocates memory.

glibc gives each thread that contends for the heap its own malloc arena (up to 8 per core), and
memory freed in an arena mostly stays with the process. The aggregator runs hundreds of gRPC
threads, so short-lived allocations made on many of them (the HTTP/2 CONTINUATION flood of
bench.fuzz: grpc parses and lists every header field of a never-ending header block) left
~14 MiB per flood behind, growing with every flood. With two arenas the same floods plateau.
Large buffers (models, sums, chunks) are mmap'ed by malloc and never come from an arena.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_ARENA_MAX = -8  # glibc's mallopt parameter


def limit_malloc_arenas(arenas: int) -> bool:
    """Cap glibc's malloc arenas for the rest of this process (0: glibc's default). True if
    applied; False where the C library is not glibc. Call before the server starts threads."""
    if arenas <= 0 or not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    mallopt = getattr(libc, "mallopt", None)
    return mallopt is not None and mallopt(M_ARENA_MAX, arenas) == 1
