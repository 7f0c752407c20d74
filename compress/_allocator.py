"""Keep CPU training's resident memory at what it uses when tensor shapes change (glibc's allocator).

CPU tensors come from the C allocator. glibc serves large blocks from its heap arenas once a freed
block has raised its (dynamic) mmap threshold, and keeps freed blocks there for reuse. Structural pruning
changes weight and activation shapes, and pruned layers have widths that differ from layer to layer, so
the kept blocks rarely fit again and resident memory climbs although nothing is leaked. Mapping large blocks
individually returns them to the OS when freed, at the cost of the kernel zeroing fresh mappings
(docs/experiments/pruning-adapter-memory.md has the measurements).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import sys

logger = logging.getLogger(__name__)

#: glibc's mallopt parameter number for the mmap threshold (malloc.h)
_M_MMAP_THRESHOLD = -3
#: blocks from this size on are mapped and unmapped one by one (glibc's default start is 128 KiB)
DEFAULT_MMAP_THRESHOLD = 1 << 20


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None
    return libc


def release_freed_memory() -> bool:
    """Hand the heap memory glibc keeps after frees back to the OS (``malloc_trim``).

    Returns ``False`` where the C library has no such call (not Linux/glibc); nothing happens then.
    """
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


@functools.cache
def map_large_cpu_allocations(threshold: int = DEFAULT_MMAP_THRESHOLD) -> bool:
    """Serve blocks of ``threshold`` bytes or more with their own mapping, returned to the OS when freed.

    Process-wide and idempotent (the first call per threshold acts). A ``MALLOC_MMAP_THRESHOLD_`` set in
    the environment is the user's choice and is left alone. Returns whether the setting is in force. Blocks
    the arenas already hold stay there until :func:`release_freed_memory`.
    """
    if os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return True
    libc = _glibc()
    if libc is None or libc.mallopt(_M_MMAP_THRESHOLD, threshold) != 1:
        return False
    logger.info("CPU training on pruned shapes: blocks of %d KiB or more are now mapped individually "
                "(set MALLOC_MMAP_THRESHOLD_ to choose otherwise)", threshold // 1024)
    return True
