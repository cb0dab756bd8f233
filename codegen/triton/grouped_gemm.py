"""Fused MoE grouped GEMM (vLLM ``fused_moe_kernel`` style) over block-aligned routing.

    A [T, K] (rows gathered: row = slot // top_k)  or  A [T*k, K] (row = slot)
    B [E, N, K]  (or [E, K, N] with ``b_transposed=True``; any strides)
    bias [E, N] (optional), topk_weights [T, k] (optional, multiplies each output row)
        -> C [T*k, N],  C[i] = (A[row(i)] @ B[e(i)]^T + bias[e(i)]) * w[i]   (fp32 accumulation)

The routing comes from :func:`moe_compiler.codegen.triton.permute.moe_align_block_size`: each
program multiplies one BLOCK_M block of ``sorted_token_ids`` (all rows of one expert) by a
BLOCK_N slice of that expert's weight and scatters the rows to their slot index in C, so C is
already un-permuted (row ``t*k+j``).  Blocks at or past ``num_tokens_post_padded`` exit at once;
padding rows (sentinel ``T*k``) are masked; a block whose expert id is -1 writes zeros.

Per-layer constants (N, K, top_k divisor, bias/weight flags, dot precision, tiles) are
``tl.constexpr``: one compiled variant per layer shape.  The token count is a runtime argument.
fp32 inputs use ``input_precision="ieee"`` unless ``allow_tf32`` (torch's default for matmuls is
no TF32, so "ieee" matches eager fp32 results).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import cdiv, launchable, next_pow2
from .permute import MoEAlignment

__all__ = ["fused_moe_gemm", "grouped_gemm_reference", "choose_config", "fused_moe_gemm_kernel"]


# --------------------------------------------------------------------------------------------
# kernel
# --------------------------------------------------------------------------------------------
@triton.jit
def fused_moe_gemm_kernel(
    # pointers
    a_ptr,  # [T or T*k, K]
    b_ptr,  # [E, N, K] or [E, K, N] (strides say which)
    c_ptr,  # [T*k, N] (out)
    bias_ptr,  # [E, N] (unused unless HAS_BIAS)
    topk_weights_ptr,  # [T*k] contiguous (unused unless MUL_ROUTED_WEIGHT)
    sorted_token_ids_ptr,  # [EM] int32
    expert_ids_ptr,  # [EM // BLOCK_M] int32
    num_tokens_post_padded_ptr,  # [1] int32
    # sizes
    EM,  # len(sorted_token_ids), a multiple of BLOCK_M
    num_valid_tokens,  # T * k (the sentinel)
    # strides
    stride_am, stride_ak,
    stride_be, stride_bn, stride_bk,
    stride_cm, stride_cn,
    stride_bias_e, stride_bias_n,
    # meta-parameters
    N: tl.constexpr,
    K: tl.constexpr,
    A_ROW_DIV: tl.constexpr,  # top_k when A is [T, K] (gather), 1 when A is [T*k, K]
    MUL_ROUTED_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,  # "ieee" | "tf32" (fp32 inputs only)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,  # row blocks per L2 super-group
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0
):
    """Grid: (cdiv(EM, BLOCK_M) * cdiv(N, BLOCK_N),)."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(EM, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    num_post = tl.load(num_tokens_post_padded_ptr)
    if pid_m * BLOCK_M >= num_post:
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_token = tl.load(sorted_token_ids_ptr + offs_m).to(tl.int64)
    token_mask = offs_token < num_valid_tokens
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    c_ptrs = c_ptr + offs_token[:, None] * stride_cm + offs_n[None, :] * stride_cn
    c_mask = token_mask[:, None] & n_mask[None, :]

    off_expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    if off_expert == -1:
        tl.store(c_ptrs, tl.zeros([BLOCK_M, BLOCK_N], dtype=c_ptr.dtype.element_ty), mask=c_mask)
        return

    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (offs_token // A_ROW_DIV)[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = (b_ptr + off_expert * stride_be + offs_k[:, None] * stride_bk
              + offs_n[None, :] * stride_bn)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=token_mask[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=n_mask[None, :], other=0.0)
        else:
            k_mask = offs_k < K - k0
            a = tl.load(a_ptrs, mask=token_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if HAS_BIAS:
        bias = tl.load(bias_ptr + off_expert * stride_bias_e + offs_n * stride_bias_n,
                       mask=n_mask, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    if MUL_ROUTED_WEIGHT:
        w = tl.load(topk_weights_ptr + offs_token, mask=token_mask, other=0.0)
        acc = acc * w.to(tl.float32)[:, None]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


# --------------------------------------------------------------------------------------------
# configuration heuristic
# --------------------------------------------------------------------------------------------
def choose_config(num_tokens: int, N: int, K: int, num_experts: int, top_k: int,
                  dtype: torch.dtype) -> dict:
    """Tile configuration for :func:`fused_moe_gemm` (no autotuning, deterministic).

    BLOCK_M follows the expected rows per expert ``m = num_tokens * top_k / num_experts`` (the
    alignment pads each expert to BLOCK_M, so a large BLOCK_M with few tokens per expert wastes
    work): m <= 16 -> 16, <= 48 -> 32, <= 96 -> 64, else 128.  It depends only on (num_tokens,
    num_experts, top_k), so both GEMMs of a layer share it (and one alignment).
    BLOCK_N / BLOCK_K: 64 x 128 (decode-like, weight-bandwidth bound) up to 128 x 64; fp32 halves
    BLOCK_K (shared memory).  Tiles are capped at next_pow2(N), next_pow2(K), min 16 (tl.dot).
    GROUP_M: 1 when a single row block per expert is expected, else 8 (L2 reuse of B).
    num_stages: 3-4 for 2-byte types, 2-3 for fp32; num_warps 4, 8 for 128 x 128 tiles.
    Shared memory stays under ~100 KB (fits sm_80 and sm_90).
    """
    m = num_tokens * top_k / max(num_experts, 1)
    two_byte = dtype in (torch.float16, torch.bfloat16)
    if m <= 16:
        cfg = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128 if two_byte else 64, GROUP_M=1,
                   num_warps=4, num_stages=4 if two_byte else 3)
    elif m <= 48:
        cfg = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128 if two_byte else 64, GROUP_M=8,
                   num_warps=4, num_stages=4 if two_byte else 3)
    elif m <= 96:
        cfg = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64 if two_byte else 32, GROUP_M=8,
                   num_warps=4, num_stages=3 if two_byte else 2)
    else:
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64 if two_byte else 32, GROUP_M=8,
                   num_warps=8, num_stages=3 if two_byte else 2)
    cfg["BLOCK_N"] = max(16, min(cfg["BLOCK_N"], next_pow2(N)))
    cfg["BLOCK_K"] = max(16, min(cfg["BLOCK_K"], next_pow2(K)))
    return cfg


# --------------------------------------------------------------------------------------------
# launcher
# --------------------------------------------------------------------------------------------
def fused_moe_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    align: MoEAlignment,
    *,
    b_transposed: bool = False,
    bias: Optional[torch.Tensor] = None,
    topk_weights: Optional[torch.Tensor] = None,
    mul_routed_weight: bool = False,
    config: Optional[dict] = None,
    out_dtype: Optional[torch.dtype] = None,
    allow_tf32: bool = False,
) -> torch.Tensor:
    """C [T*k, N] = grouped GEMM of ``a`` rows with the expert weights ``b`` (see module doc).

    a: [T, K] (gathered by slot // top_k) or [T*k, K] (one row per slot); b: [E, N, K], or
    [E, K, N] with ``b_transposed``; bias: [E, N]; topk_weights: [T, k] (fp32 or any float),
    applied when ``mul_routed_weight``.  ``config`` must have BLOCK_M == align.block_m
    (default: :func:`choose_config` with that BLOCK_M).  Output dtype: ``out_dtype`` or a.dtype.
    """
    numel, k = align.num_valid_tokens, align.top_k
    if a.dim() != 2 or b.dim() != 3:
        raise ValueError("a must be 2-D and b 3-D")
    E = b.shape[0]
    if b_transposed:
        K, N = b.shape[1], b.shape[2]
        stride_bk, stride_bn = b.stride(1), b.stride(2)
    else:
        N, K = b.shape[1], b.shape[2]
        stride_bn, stride_bk = b.stride(1), b.stride(2)
    if a.shape[1] != K:
        raise ValueError(f"a has K={a.shape[1]}, b has K={K}")
    T = numel // k if k else 0
    if a.shape[0] == numel:
        a_row_div = 1
    elif a.shape[0] == T:
        a_row_div = k
    else:
        raise ValueError(f"a has {a.shape[0]} rows; expected T={T} or T*k={numel}")
    if a.dtype != b.dtype:
        raise ValueError(f"a ({a.dtype}) and b ({b.dtype}) must have the same dtype")
    if bias is not None and tuple(bias.shape) != (E, N):
        raise ValueError(f"bias must be [{E}, {N}], got {tuple(bias.shape)}")
    if mul_routed_weight and topk_weights is None:
        raise ValueError("mul_routed_weight needs topk_weights")
    dev = a.device
    c = torch.empty((numel, N), dtype=out_dtype or a.dtype, device=dev)
    if numel == 0 or N == 0:
        return c
    if config is None:
        config = choose_config(T, N, K, E, k, a.dtype)
        config["BLOCK_M"] = align.block_m
    if config["BLOCK_M"] != align.block_m:
        raise ValueError(f"config BLOCK_M={config['BLOCK_M']} != alignment block_m={align.block_m}")
    w = None
    if mul_routed_weight:
        w = topk_weights.reshape(-1)
        if w.numel() != numel:
            raise ValueError(f"topk_weights has {w.numel()} entries, expected {numel}")
        w = w.contiguous()
    EM = align.sorted_token_ids.numel()
    bm, bn, bk = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    grid = (cdiv(EM, bm) * cdiv(N, bn),)
    launchable(fused_moe_gemm_kernel, dev)[grid](
        a, b, c, bias if bias is not None else c, w if w is not None else c,
        align.sorted_token_ids, align.expert_ids, align.num_tokens_post_padded,
        EM, numel,
        a.stride(0), a.stride(1),
        b.stride(0), stride_bn, stride_bk,
        c.stride(0), c.stride(1),
        bias.stride(0) if bias is not None else 0, bias.stride(1) if bias is not None else 0,
        N=N, K=K, A_ROW_DIV=a_row_div, MUL_ROUTED_WEIGHT=bool(mul_routed_weight),
        HAS_BIAS=bias is not None, INPUT_PRECISION="tf32" if allow_tf32 else "ieee",
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=config["GROUP_M"], EVEN_K=(K % bk == 0),
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    return c


# --------------------------------------------------------------------------------------------
# reference
# --------------------------------------------------------------------------------------------
def grouped_gemm_reference(
    a: torch.Tensor,
    b: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    b_transposed: bool = False,
    bias: Optional[torch.Tensor] = None,
    topk_weights: Optional[torch.Tensor] = None,
    mul_routed_weight: bool = False,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Plain-torch definition of :func:`fused_moe_gemm` from ``topk_ids`` [T, k] directly
    (loop over experts, fp32 math, one rounding to the output dtype)."""
    T, k = topk_ids.shape
    numel = T * k
    flat = topk_ids.reshape(-1).long()
    rows = torch.arange(numel, device=a.device)
    if a.shape[0] != numel:
        rows = rows // k
    bw = b.transpose(1, 2) if b_transposed else b  # [E, N, K]
    N = bw.shape[1]
    c = torch.zeros((numel, N), dtype=torch.float32, device=a.device)
    w = topk_weights.reshape(-1).float() if mul_routed_weight else None
    for e in range(b.shape[0]):
        sel = (flat == e).nonzero().squeeze(1)
        if sel.numel() == 0:
            continue
        y = a[rows[sel]].float() @ bw[e].float().t()
        if bias is not None:
            y = y + bias[e].float()
        if w is not None:
            y = y * w[sel, None]
        c[sel] = y
    return c.to(out_dtype or a.dtype)


def _ptx_examples():
    """(kernel, name, signature, constexprs) examples for the PTX compile test."""
    out = []
    for name, dt, N, K, div, mul, has_bias, T in [
        ("gate_up_bf16_decode", "bf16", 2 * 1408, 2048, 8, False, False, 16),
        ("down_fp16_prefill_weighted_bias", "fp16", 2880, 2880, 1, True, True, 4096),
        ("gate_up_fp32_ieee_oddK", "fp32", 2 * 17, 33, 2, False, True, 64),
    ]:
        tdt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dt]
        cfg = choose_config(T, N, K, 64, 8, tdt)
        sig = {
            "a_ptr": f"*{dt}", "b_ptr": f"*{dt}", "c_ptr": f"*{dt}", "bias_ptr": f"*{dt}",
            "topk_weights_ptr": "*fp32", "sorted_token_ids_ptr": "*i32", "expert_ids_ptr": "*i32",
            "num_tokens_post_padded_ptr": "*i32", "EM": "i32", "num_valid_tokens": "i32",
        }
        for s in ["stride_am", "stride_ak", "stride_be", "stride_bn", "stride_bk", "stride_cm",
                  "stride_cn", "stride_bias_e", "stride_bias_n"]:
            sig[s] = "i32"
        meta = dict(N=N, K=K, A_ROW_DIV=div, MUL_ROUTED_WEIGHT=mul, HAS_BIAS=has_bias,
                    INPUT_PRECISION="ieee", BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                    BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
                    EVEN_K=K % cfg["BLOCK_K"] == 0)
        sig.update({kk: "constexpr" for kk in meta})
        out.append((fused_moe_gemm_kernel, name, sig, meta,
                    dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])))
    return out
