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
from contextlib import contextmanager

import torch


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to call
        return None


def can_return_freed_memory() -> bool:
    """Whether the C library has malloc_trim (glibc)."""
    return _malloc_trim() is not None


def return_freed_memory() -> bool:
    """malloc_trim(0) where the C library has it; returns whether it ran."""
    if not can_return_freed_memory():
        return False
    _malloc_trim()(0)
    return True


def process_status_bytes(field: str) -> int:
    """A size field of /proc/self/status in bytes, e.g. "VmRSS" (resident set) or "VmHWM" (its peak); Linux."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # the kernel reports kB
    raise RuntimeError(f"/proc/self/status has no {field}")


@contextmanager
def refilled(tensors, fill):
    """For the block, give each tensor of ``tensors`` (whose storage was freed with resize_(0)) its
    storage back with the values ``fill(t)`` writes; free them again after, returning the memory."""
    back = []
    try:
        with torch.no_grad():
            for t in tensors:
                t.untyped_storage().resize_(t.numel() * t.element_size())
                back.append(t)
                fill(t)
        yield
    finally:
        with torch.no_grad():
            for t in back:
                t.untyped_storage().resize_(0)
        if back:
            return_freed_memory()
