"""Give freed heap memory back to the operating system.

Expert tensors of a few MiB to a few tens of MiB fall under glibc's dynamic mmap threshold once a
block of that size has been freed, so they come from the heap, and freeing them leaves the process's
resident set where it was. The offload runtime frees such blocks on purpose (weights restored for a
recompilation, a cleared fast tier) and calls ``return_freed_memory()`` afterwards, so that RSS
follows the budget. Measured with bench/offload_memory.py: without it each recompilation of an
offloaded model kept ~100 MiB more (dim 256, ffn 512).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to call
        return None


def return_freed_memory() -> bool:
    """malloc_trim(0) where the C library has it; returns whether it ran."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
