"""Fused router gating: scores, (group-limited) top-k, weights — one Triton kernel.

    logits [T, E] (fp32 | fp16 | bf16), bias [E] fp32 (optional, selection only)
        -> topk_ids [T, k] int64, topk_weights [T, k] fp32

Semantics (``gating_reference`` is the definition; the kernel reproduces it bit-for-bit in the ids
and to fp32 rounding in the weights):

1. ``x = logits.float()``.
2. ``topk_before_score=False`` (Mixtral, Qwen-MoE, DeepSeek-V3): ``s = softmax(x)`` or
   ``sigmoid(x)`` over all E experts; ``choice = s + bias``.
   ``topk_before_score=True`` (GPT-OSS): ``choice = x + bias``; scores come later.
3. ``n_group > 1`` (DeepSeek-V3 group-limited routing): the E experts form ``n_group`` contiguous
   groups; a group's score is the sum of its two largest ``choice`` values; the ``topk_group``
   best groups are kept and every expert of another group gets ``choice = -inf``.
4. ``ids`` = the ``k`` largest ``choice`` values, in descending order, ties broken by the
   *lower expert index first* (a stable descending sort), NaN ranks above +inf, -0.0 == +0.0.
5. ``w = s[ids]`` (the *unbiased* scores); with ``topk_before_score`` ``w = softmax(x[ids])`` (or
   ``sigmoid``) over the k selected logits.
6. ``renormalize``: ``w = w / (w.sum(-1) + renorm_eps)``; then ``w = w * scaling_factor``.

torch.topk ties (checked on torch 2.13 CPU): torch.topk does NOT break ties by index.  Its CPU
kernel uses ``std::partial_sort`` when ``k * 64 <= n`` and ``std::nth_element`` (+ ``std::sort``)
otherwise, so the ids chosen among equal values are an artefact of libstdc++: all-equal rows give
``k=1 -> [6]`` for E=8, ``[10]`` for E=16, ``[23]`` for E=33, ``[0]`` for E=64/256;
``k=2, E=64 -> [42, 43]``; ``k=8, E=64 -> [44, 41, 42, 43, 46, 47, 40, 45]``; the order also
changes with ``sorted=``.  Both implementations agree on NaN (ranked largest).  No kernel can
reproduce those ids in general, so the semantic definition here is the stable order above; it
equals torch.topk whenever the k+1 largest choice values of a row are distinct (true for almost
all real inputs; exact ties happen for all-equal rows and for low-precision logits).

NaN / inf: a row with a NaN logit, a +inf logit, or only -inf logits has an all-NaN softmax (as
torch.softmax); the ids then are ``0..k-1`` (all NaN, ties by index) and the weights NaN.  Sigmoid
maps +-inf to 1/0 and NaN to NaN, which then ranks first.  The kernel matches the reference in all
of these cases (tested).
"""
from __future__ import annotations

from dataclasses import KW_ONLY, dataclass
from typing import Literal, Optional

import torch
import triton
import triton.language as tl

from ._common import cdiv, launchable, next_pow2

__all__ = ["GatingParams", "gating", "gating_reference", "gating_kernel"]


@dataclass(frozen=True)
class GatingParams:
    """Router configuration of one MoE layer (hashable).  Fields after ``top_k`` are
    keyword-only: ``GatingParams("softmax", 2, renormalize=True)``."""

    score_func: Literal["softmax", "sigmoid"]  # softmax: Mixtral/Qwen/GPT-OSS; sigmoid: DeepSeek-V3
    top_k: int  # experts per token
    _: KW_ONLY
    renormalize: bool  # divide the k weights by their sum (+ renorm_eps)
    topk_before_score: bool = False  # GPT-OSS: top-k on raw logits, then score over the k values
    n_group: int = 1  # DeepSeek-V3: number of expert groups (1 = no group limit)
    topk_group: int = 1  # DeepSeek-V3: groups kept per token
    renorm_eps: float = 0.0  # w /= (w.sum(-1) + renorm_eps); DeepSeek-V3 uses 1e-20
    scaling_factor: float = 1.0  # routed_scaling_factor, applied last

    def __post_init__(self):
        if self.score_func not in ("softmax", "sigmoid"):
            raise ValueError(f"score_func must be 'softmax' or 'sigmoid', got {self.score_func!r}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.n_group < 1 or not (1 <= self.topk_group <= self.n_group):
            raise ValueError(
                f"need 1 <= topk_group <= n_group, got {self.topk_group}, {self.n_group}")
        if self.topk_before_score and self.n_group > 1:
            raise ValueError("topk_before_score with n_group > 1 is not a supported routing")

    def check(self, num_experts: int) -> None:
        """Raise ValueError if this routing is not defined for ``num_experts`` experts."""
        E = num_experts
        if E < 1 or E > 4096:
            raise ValueError(f"num_experts must be in [1, 4096], got {E}")
        if self.top_k > E:
            raise ValueError(f"top_k={self.top_k} > num_experts={E}")
        if self.n_group > 1:
            if E % self.n_group:
                raise ValueError(f"num_experts={E} is not divisible by n_group={self.n_group}")
            gs = E // self.n_group
            if gs < 2:
                raise ValueError("group-limited routing needs >= 2 experts per group (top-2 sum)")
            if self.top_k > self.topk_group * gs:
                raise ValueError(f"top_k={self.top_k} > experts in the kept groups "
                                 f"({self.topk_group} x {gs})")


# --------------------------------------------------------------------------------------------
# kernel
# --------------------------------------------------------------------------------------------
@triton.jit
def gating_kernel(
    # pointers
    logits_ptr,  # [T, E] fp32/fp16/bf16
    bias_ptr,  # [E] fp32 (unused unless HAS_BIAS)
    topk_ids_ptr,  # [T, TOP_K] int64 (out)
    topk_weights_ptr,  # [T, TOP_K] fp32 (out)
    # sizes
    T,  # number of tokens (runtime)
    # strides
    stride_lt, stride_le,  # logits
    stride_it,  # topk_ids (row; column stride 1)
    stride_wt,  # topk_weights (row; column stride 1)
    # scalars
    renorm_eps,  # fp32
    scaling_factor,  # fp32
    # meta-parameters
    E: tl.constexpr,  # number of experts
    N_GROUP: tl.constexpr,  # expert groups (1: no group limit)
    GROUP_SIZE: tl.constexpr,  # E // N_GROUP
    TOPK_GROUP: tl.constexpr,  # groups kept per token
    TOP_K: tl.constexpr,
    SCORE_FUNC: tl.constexpr,  # "softmax" | "sigmoid"
    TOPK_BEFORE_SCORE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,  # tokens per program
    BLOCK_G: tl.constexpr,  # next_pow2(N_GROUP)
    BLOCK_GS: tl.constexpr,  # next_pow2(GROUP_SIZE)
    BLOCK_K: tl.constexpr,  # next_pow2(TOP_K)
):
    """One program routes BLOCK_T tokens; experts live in a [BLOCK_G, BLOCK_GS] tile
    (expert e = g * GROUP_SIZE + j).  Grid: (cdiv(T, BLOCK_T),).

    Selection works on int32 sort keys: ``key = bits ^ ((bits >> 31) & 0x7FFFFFFF)`` is monotone in
    the float value; NaN -> INT32_MAX, -0.0 -> key of +0.0, padded / already chosen -> -2**31+1
    (below the key of -inf).  Each of the TOP_K steps takes the maximum key and, among equal keys,
    the lowest expert index.
    """
    pid = tl.program_id(0)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_g = tl.arange(0, BLOCK_G)
    offs_j = tl.arange(0, BLOCK_GS)
    offs_k = tl.arange(0, BLOCK_K)
    t3 = offs_t[:, None, None]
    g3 = offs_g[None, :, None]
    j3 = offs_j[None, None, :]
    e3 = g3 * GROUP_SIZE + j3  # [1, BG, BGS]
    e_valid = (g3 < N_GROUP) & (j3 < GROUP_SIZE)
    row_valid = offs_t < T
    mask = (t3 < T) & e_valid

    x = tl.load(logits_ptr + t3.to(tl.int64) * stride_lt + e3 * stride_le, mask=mask,
                other=0.0).to(tl.float32)

    # ---- scores over all experts ------------------------------------------------------------
    if TOPK_BEFORE_SCORE:
        s = x
    else:
        if SCORE_FUNC == "softmax":
            xm = tl.where(e_valid, x, float("-inf"))
            m = tl.max(tl.max(xm, axis=2), axis=1)
            p = tl.exp(xm - m[:, None, None])
            p = tl.where(e_valid, p, 0.0)
            denom = tl.sum(tl.sum(p, axis=2), axis=1)
            s = p / denom[:, None, None]
        else:
            s = 1.0 / (1.0 + tl.exp(-x))
    if HAS_BIAS:
        b = tl.load(bias_ptr + e3, mask=e_valid, other=0.0).to(tl.float32)
        c = s + b
    else:
        c = s

    # ---- float -> sortable int32 key --------------------------------------------------------
    bits = c.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    key = tl.where(c != c, 2147483647, key)
    key = tl.where(c == 0.0, 0, key)
    key = tl.where(e_valid, key, -2147483647)

    # ---- group-limited routing (DeepSeek-V3) --------------------------------------------------
    if N_GROUP > 1:
        m1 = tl.max(key, axis=2)  # [BT, BG]
        p1 = tl.min(tl.where(key == m1[:, :, None], j3, BLOCK_GS), axis=2)
        m2 = tl.max(tl.where(j3 == p1[:, :, None], -2147483647, key), axis=2)
        b1 = m1 ^ ((m1 >> 31) & 0x7FFFFFFF)
        b2 = m2 ^ ((m2 >> 31) & 0x7FFFFFFF)
        gsum = b1.to(tl.float32, bitcast=True) + b2.to(tl.float32, bitcast=True)
        gbits = gsum.to(tl.int32, bitcast=True)
        gkey = gbits ^ ((gbits >> 31) & 0x7FFFFFFF)
        gkey = tl.where(gsum != gsum, 2147483647, gkey)
        gkey = tl.where(gsum == 0.0, 0, gkey)
        g2 = offs_g[None, :]
        gkey = tl.where(g2 < N_GROUP, gkey, -2147483647)
        keep = tl.zeros([BLOCK_T, BLOCK_G], dtype=tl.int32)
        for _ in range(TOPK_GROUP):
            gm = tl.max(gkey, axis=1)
            gi = tl.min(tl.where(gkey == gm[:, None], g2, BLOCK_G), axis=1)
            hit = g2 == gi[:, None]
            keep = tl.where(hit, 1, keep)
            gkey = tl.where(hit, -2147483647, gkey)
        # experts of dropped groups get choice = -inf (key of -inf = -2139095041)
        key = tl.where((keep[:, :, None] == 0) & e_valid, -2139095041, key)

    # ---- top-k ----------------------------------------------------------------------------
    ids = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int32)
    vals = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    for i in range(TOP_K):
        km = tl.max(tl.max(key, axis=2), axis=1)
        sel = tl.min(tl.min(tl.where(key == km[:, None, None], e3, E), axis=2), axis=1)
        hit = e3 == sel[:, None, None]
        w = tl.sum(tl.sum(tl.where(hit, s, 0.0), axis=2), axis=1)
        key = tl.where(hit, -2147483647, key)
        ids = tl.where(offs_k[None, :] == i, sel[:, None], ids)
        vals = tl.where(offs_k[None, :] == i, w[:, None], vals)

    k_valid = offs_k[None, :] < TOP_K
    if TOPK_BEFORE_SCORE:
        if SCORE_FUNC == "softmax":
            vm = tl.where(k_valid, vals, float("-inf"))
            mk = tl.max(vm, axis=1)
            pk = tl.where(k_valid, tl.exp(vm - mk[:, None]), 0.0)
            vals = pk / tl.sum(pk, axis=1)[:, None]
        else:
            vals = 1.0 / (1.0 + tl.exp(-vals))
    if RENORMALIZE:
        tot = tl.sum(tl.where(k_valid, vals, 0.0), axis=1) + renorm_eps
        vals = vals / tot[:, None]
    vals = vals * scaling_factor

    out_mask = row_valid[:, None] & k_valid
    rows = offs_t.to(tl.int64)[:, None]
    tl.store(topk_ids_ptr + rows * stride_it + offs_k[None, :], ids.to(tl.int64), mask=out_mask)
    tl.store(topk_weights_ptr + rows * stride_wt + offs_k[None, :], vals, mask=out_mask)


# --------------------------------------------------------------------------------------------
# launcher
# --------------------------------------------------------------------------------------------
def _meta(T: int, E: int, params: GatingParams, has_bias: bool) -> dict:
    gs = E // params.n_group
    block_g, block_gs = next_pow2(params.n_group), next_pow2(gs)
    block_e = block_g * block_gs
    return dict(
        E=E, N_GROUP=params.n_group, GROUP_SIZE=gs, TOPK_GROUP=params.topk_group,
        TOP_K=params.top_k, SCORE_FUNC=params.score_func,
        TOPK_BEFORE_SCORE=params.topk_before_score, HAS_BIAS=has_bias,
        RENORMALIZE=params.renormalize,
        BLOCK_T=max(1, min(32, 2048 // block_e, next_pow2(T))),
        BLOCK_G=block_g, BLOCK_GS=block_gs, BLOCK_K=next_pow2(params.top_k),
    )


def gating(logits: torch.Tensor, bias: Optional[torch.Tensor], params: GatingParams,
           *, num_warps: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Route ``logits`` [T, E]; returns (topk_ids [T, k] int64, topk_weights [T, k] fp32).

    ``bias``: [E] score-correction bias (any float dtype, used as fp32) or None.
    Runs compiled on a GPU, in the Triton interpreter on the CPU.  No host synchronisation.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [T, E], got {tuple(logits.shape)}")
    T, E = logits.shape
    params.check(E)
    k = params.top_k
    dev = logits.device
    ids = torch.empty((T, k), dtype=torch.int64, device=dev)
    w = torch.empty((T, k), dtype=torch.float32, device=dev)
    if T == 0:
        return ids, w
    if bias is not None:
        if bias.shape != (E,):
            raise ValueError(f"bias must be [{E}], got {tuple(bias.shape)}")
        bias = bias.to(device=dev, dtype=torch.float32).contiguous()
    meta = _meta(T, E, params, bias is not None)
    grid = (cdiv(T, meta["BLOCK_T"]),)
    launchable(gating_kernel, dev)[grid](
        logits, bias if bias is not None else w, ids, w,
        T,
        logits.stride(0), logits.stride(1), ids.stride(0), w.stride(0),
        float(params.renorm_eps), float(params.scaling_factor),
        **meta, num_warps=num_warps,
    )
    return ids, w


# --------------------------------------------------------------------------------------------
# reference
# --------------------------------------------------------------------------------------------
def _stable_topk_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest values along -1, descending, ties -> lower index first,
    NaN largest (torch.sort's order, stable)."""
    return torch.sort(x, dim=-1, descending=True, stable=True).indices[..., :k]


def _score(x: torch.Tensor, score_func: str) -> torch.Tensor:
    return torch.softmax(x, dim=-1) if score_func == "softmax" else torch.sigmoid(x)


def gating_reference(logits: torch.Tensor, bias: Optional[torch.Tensor],
                     params: GatingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch semantic definition of :func:`gating` (see the module docstring)."""
    T, E = logits.shape
    params.check(E)
    x = logits.float()
    b = None if bias is None else bias.to(device=x.device, dtype=torch.float32)
    if params.topk_before_score:
        src = x
        choice = x if b is None else x + b
    else:
        src = _score(x, params.score_func)
        choice = src if b is None else src + b
    if params.n_group > 1:
        G, gs = params.n_group, E // params.n_group
        gscore = choice.view(T, G, gs).topk(2, dim=-1).values.sum(dim=-1)  # values: no tie issue
        gidx = _stable_topk_indices(gscore, params.topk_group)
        gmask = torch.zeros(T, G, dtype=torch.bool, device=x.device).scatter_(1, gidx, True)
        choice = choice.masked_fill(~gmask.repeat_interleave(gs, dim=1), float("-inf"))
    ids = _stable_topk_indices(choice, params.top_k)
    w = src.gather(1, ids)
    if params.topk_before_score:
        w = _score(w, params.score_func)
    if params.renormalize:
        w = w / (w.sum(dim=-1, keepdim=True) + params.renorm_eps)
    w = w * params.scaling_factor
    return ids, w


def _ptx_examples():
    """(kernel, name, signature, constexprs, options) examples for the PTX compile test."""
    def sig(dtype):
        return {
            "logits_ptr": f"*{dtype}", "bias_ptr": "*fp32", "topk_ids_ptr": "*i64",
            "topk_weights_ptr": "*fp32", "T": "i32", "stride_lt": "i32", "stride_le": "i32",
            "stride_it": "i32", "stride_wt": "i32", "renorm_eps": "fp32", "scaling_factor": "fp32",
        }
    out = []
    for name, dtype, E, p, has_bias in [
        ("mixtral_softmax_bf16", "bf16", 8, GatingParams("softmax", 2, renormalize=True), False),
        ("deepseek_v3_grouped_sigmoid", "fp32", 256,
         GatingParams("sigmoid", 8, renormalize=True, n_group=8, topk_group=4, renorm_eps=1e-20,
                      scaling_factor=2.5), True),
        ("gpt_oss_topk_then_softmax_fp16", "fp16", 32,
         GatingParams("softmax", 4, renormalize=False, topk_before_score=True), False),
    ]:
        meta = _meta(64, E, p, has_bias)
        s = sig(dtype)
        s.update({kk: "constexpr" for kk in meta})
        out.append((gating_kernel, name, s, meta, dict(num_warps=4)))
    return out
