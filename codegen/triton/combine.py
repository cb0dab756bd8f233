"""Weighted combine (un-permute + reduce) of the per-slot expert outputs.

    y [T*k, H] (row t*k+j = output of token t's j-th expert), w [T, k] (optional)
        -> out [T, H],  out[t] = sum_j w[t, j] * y[t*k + j]     (fp32 accumulation, j ascending)

Without ``w`` the rows are summed (the routing weights were already applied, e.g. in the down
GEMM's epilogue).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import cdiv, launchable, next_pow2

__all__ = ["combine", "combine_reference", "combine_kernel"]


@triton.jit
def combine_kernel(
    # pointers
    y_ptr,  # [T*k, H]
    w_ptr,  # [T, k] (unused unless HAS_WEIGHTS)
    out_ptr,  # [T, H] (out)
    # sizes
    T,
    H,
    # strides
    stride_ym, stride_yh,
    stride_wt, stride_wk,
    stride_ot, stride_oh,
    # meta-parameters
    TOP_K: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Grid: (cdiv(T, BLOCK_T), cdiv(H, BLOCK_H))."""
    pid_t = tl.program_id(0)
    pid_h = tl.program_id(1)
    offs_t = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    t_mask = offs_t < T
    mask = t_mask[:, None] & (offs_h[None, :] < H)
    acc = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
    for j in range(TOP_K):
        rows = offs_t * TOP_K + j
        y = tl.load(y_ptr + rows[:, None] * stride_ym + offs_h[None, :] * stride_yh, mask=mask,
                    other=0.0).to(tl.float32)
        if HAS_WEIGHTS:
            w = tl.load(w_ptr + offs_t * stride_wt + j * stride_wk, mask=t_mask,
                        other=0.0).to(tl.float32)
            acc += w[:, None] * y
        else:
            acc += y
    tl.store(out_ptr + offs_t[:, None] * stride_ot + offs_h[None, :] * stride_oh,
             acc.to(out_ptr.dtype.element_ty), mask=mask)


def _blocks(H: int) -> tuple[int, int]:
    bh = max(16, min(1024, next_pow2(H)))
    return max(1, 4096 // bh), bh


def combine(y: torch.Tensor, topk_weights: Optional[torch.Tensor], num_tokens: int, top_k: int,
            *, out_dtype: Optional[torch.dtype] = None, num_warps: int = 4) -> torch.Tensor:
    """out [T, H] = sum_j w[t, j] * y[t*k + j] (see module doc); ``out_dtype`` default y.dtype."""
    T, k = int(num_tokens), int(top_k)
    if y.dim() != 2 or y.shape[0] != T * k:
        raise ValueError(f"y must be [T*k={T * k}, H], got {tuple(y.shape)}")
    if topk_weights is not None and tuple(topk_weights.shape) != (T, k):
        raise ValueError(f"topk_weights must be [{T}, {k}], got {tuple(topk_weights.shape)}")
    H = y.shape[1]
    out = torch.empty((T, H), dtype=out_dtype or y.dtype, device=y.device)
    if T == 0 or H == 0:
        return out
    bt, bh = _blocks(H)
    w = topk_weights
    launchable(combine_kernel, y.device)[(cdiv(T, bt), cdiv(H, bh))](
        y, w if w is not None else y, out, T, H,
        y.stride(0), y.stride(1),
        w.stride(0) if w is not None else 0, w.stride(1) if w is not None else 0,
        out.stride(0), out.stride(1),
        TOP_K=k, HAS_WEIGHTS=w is not None, BLOCK_T=bt, BLOCK_H=bh, num_warps=num_warps,
    )
    return out


def combine_reference(y: torch.Tensor, topk_weights: Optional[torch.Tensor], num_tokens: int,
                      top_k: int, *, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Plain-torch definition of :func:`combine`."""
    T, k = int(num_tokens), int(top_k)
    yf = y.float().view(T, k, y.shape[1])
    acc = torch.zeros((T, y.shape[1]), dtype=torch.float32, device=y.device)
    for j in range(k):
        acc += yf[:, j] if topk_weights is None else topk_weights[:, j, None].float() * yf[:, j]
    return acc.to(out_dtype or y.dtype)


def _ptx_examples():
    """(kernel, name, signature, constexprs, options) examples for the PTX compile test."""
    bt, bh = _blocks(4096)
    sig = {"y_ptr": "*bf16", "w_ptr": "*fp32", "out_ptr": "*bf16", "T": "i32", "H": "i32",
           "stride_ym": "i32", "stride_yh": "i32", "stride_wt": "i32", "stride_wk": "i32",
           "stride_ot": "i32", "stride_oh": "i32"}
    out = []
    for has_w in (True, False):
        meta = dict(TOP_K=8, HAS_WEIGHTS=has_w, BLOCK_T=bt, BLOCK_H=bh)
        s = dict(sig)
        s.update({kk: "constexpr" for kk in meta})
        out.append((combine_kernel, f"k8_{'weighted' if has_w else 'sum'}_bf16", s, meta,
                    dict(num_warps=4)))
    return out
