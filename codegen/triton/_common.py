"""Small helpers shared by the Triton kernel files (no kernels here).

Interpreter vs. compiled kernels (checked on Triton 3.6.0 and 3.7.1)
--------------------------------------------------------------------
``TRITON_INTERPRET`` is read when ``@triton.jit`` *decorates* a function
(``triton.runtime.jit.jit`` checks ``knobs.runtime.interpret``): with ``TRITON_INTERPRET=1`` the
decorator returns an ``InterpretedFunction``, otherwise a ``JITFunction``.  Triton's own
standard library (``tl.max``, ``tl.sum``, ``tl.cumsum``, ...) is decorated at the first
``import triton`` of the process, so the variable must be set before that import.  Set later
(even before importing this package), an interpreted kernel fails with "Cannot call @triton.jit'd
outside of the scope of a kernel".  Conversely, a process that imported triton under
``TRITON_INTERPRET=1`` cannot compile for a GPU: ``triton.compile(ASTSource(...))`` fails inside
the interpreted ``tl.max`` ("'ir.value' object has no attribute 'data'").  Hence interpreter tests
and PTX compile tests each run in a process whose environment was right from the start (the
tests start a subprocess when the current process is the wrong kind).

:func:`launchable` turns the mismatch (CPU tensors in a compiled-mode process) into a clear error.
"""
from __future__ import annotations

import torch
import triton.language as tl

__all__ = ["cdiv", "next_pow2", "launchable", "triton_is_interpreted"]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    """Smallest power of two >= max(n, 1)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def triton_is_interpreted() -> bool:
    """True iff this process imported triton with TRITON_INTERPRET=1 (kernels run on the CPU)."""
    return type(tl.max).__name__ == "InterpretedFunction"


def launchable(kernel, device: torch.device):
    """The object to index with ``[grid]`` for tensors on ``device``; raises a clear error when
    CPU tensors reach a kernel in a process that did not import triton under TRITON_INTERPRET=1."""
    if torch.device(device).type == "cpu" and not triton_is_interpreted():
        raise RuntimeError(
            f"{getattr(kernel, '__name__', kernel)}: Triton kernels run on CPU tensors only "
            "under the Triton interpreter; set TRITON_INTERPRET=1 before the first "
            "`import triton` of the process (use the torch reference functions otherwise)")
    return kernel
