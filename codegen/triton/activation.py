"""Gated (GLU-style) and plain activations between the two MoE GEMMs.

    gated:      x [rows, 2I] -> out [rows, I],  out = act(gate) * up
    not gated:  x [rows, I]  -> out [rows, I],  out = act(x)

Layouts of the gated input: ``interleaved=False`` -> ``[gate | up]`` halves (gate = x[:, :I],
up = x[:, I:], Mixtral/Qwen/DeepSeek fused gate_up_proj); ``interleaved=True`` -> gate at even,
up at odd columns (GPT-OSS).

Activations (math in fp32, one rounding to the output dtype):
  "silu"        x * sigmoid(x)
  "gelu"        0.5 * x * (1 + erf(x / sqrt(2)))
  "gelu_tanh"   0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))
  "relu"        max(x, 0)
  "relu2"       max(x, 0)^2 (squared ReLU, Nemotron-H)
  "swiglu_oai"  GPT-OSS clamp-SwiGLU (gated only): gate = min(gate, limit),
                up = clamp(up, -limit, limit), out = (up + 1) * gate * sigmoid(alpha * gate)
NaN propagates (clamps are written with comparisons, so NaN stays NaN, as torch.clamp).
Note: eager GPT-OSS / HF models compute these in the model dtype (bf16); here the math is fp32,
which is at least as accurate; the reference below defines the fp32 semantics.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import cdiv, launchable, next_pow2

__all__ = ["ACTIVATIONS", "activation", "activation_reference", "activation_kernel"]

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "relu2", "swiglu_oai")


@triton.jit
def activation_kernel(
    # pointers
    x_ptr,  # [rows, 2I] (gated) or [rows, I]
    out_ptr,  # [rows, I] (out)
    # sizes
    n_rows,
    I,  # output columns
    # strides
    stride_xm, stride_xn,
    stride_om, stride_on,
    # scalars
    alpha,  # fp32, swiglu_oai only
    limit,  # fp32, swiglu_oai only
    # meta-parameters
    ACTIVATION: tl.constexpr,  # one of ACTIVATIONS
    GATED: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Grid: (cdiv(n_rows, BLOCK_M), cdiv(I, BLOCK_N))."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < n_rows) & (offs_n[None, :] < I)
    row = x_ptr + offs_m[:, None] * stride_xm
    if GATED:
        if INTERLEAVED:
            gcol = 2 * offs_n
            ucol = 2 * offs_n + 1
        else:
            gcol = offs_n
            ucol = offs_n + I
        g = tl.load(row + gcol[None, :] * stride_xn, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(row + ucol[None, :] * stride_xn, mask=mask, other=0.0).to(tl.float32)
    else:
        g = tl.load(row + offs_n[None, :] * stride_xn, mask=mask, other=0.0).to(tl.float32)
        u = g  # unused

    if ACTIVATION == "silu":
        y = g / (1.0 + tl.exp(-g))
    elif ACTIVATION == "gelu":
        y = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    elif ACTIVATION == "gelu_tanh":
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        th = 1.0 - 2.0 / (tl.exp(2.0 * z) + 1.0)  # tanh(z), saturates correctly at +-inf
        y = 0.5 * g * (1.0 + th)
    elif ACTIVATION == "relu":
        y = tl.where(g < 0.0, 0.0, g)
    elif ACTIVATION == "relu2":
        r = tl.where(g < 0.0, 0.0, g)
        y = r * r
    else:  # "swiglu_oai"
        gc = tl.where(g > limit, limit, g)
        uc = tl.where(u > limit, limit, tl.where(u < -limit, -limit, u))
        y = (uc + 1.0) * (gc / (1.0 + tl.exp(-alpha * gc)))

    if GATED:
        if ACTIVATION != "swiglu_oai":
            y = y * u
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             y.to(out_ptr.dtype.element_ty), mask=mask)


def _check(act: str, gated: bool) -> None:
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; valid: {ACTIVATIONS}")
    if act == "swiglu_oai" and not gated:
        raise ValueError("swiglu_oai is a gated activation")


def _blocks(I: int) -> tuple[int, int]:
    bn = max(16, min(256, next_pow2(I)))
    return max(1, 2048 // bn), bn


def activation(x: torch.Tensor, act: str = "silu", *, gated: bool = True,
               interleaved: bool = False, alpha: float = 1.702, limit: float = 7.0,
               out_dtype: Optional[torch.dtype] = None, num_warps: int = 4) -> torch.Tensor:
    """Apply ``act`` to ``x`` [rows, 2I] (gated) or [rows, I]; returns [rows, I] in
    ``out_dtype`` (default x.dtype)."""
    _check(act, gated)
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D, got {tuple(x.shape)}")
    rows, cols = x.shape
    if gated and cols % 2:
        raise ValueError(f"gated input needs an even number of columns, got {cols}")
    I = cols // 2 if gated else cols
    out = torch.empty((rows, I), dtype=out_dtype or x.dtype, device=x.device)
    if rows == 0 or I == 0:
        return out
    bm, bn = _blocks(I)
    grid = (cdiv(rows, bm), cdiv(I, bn))
    launchable(activation_kernel, x.device)[grid](
        x, out, rows, I, x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        float(alpha), float(limit),
        ACTIVATION=act, GATED=gated, INTERLEAVED=interleaved, BLOCK_M=bm, BLOCK_N=bn,
        num_warps=num_warps,
    )
    return out


def activation_reference(x: torch.Tensor, act: str = "silu", *, gated: bool = True,
                         interleaved: bool = False, alpha: float = 1.702, limit: float = 7.0,
                         out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Plain-torch definition of :func:`activation` (fp32 math, one rounding)."""
    _check(act, gated)
    xf = x.float()
    if gated:
        if interleaved:
            g, u = xf[:, 0::2], xf[:, 1::2]
        else:
            g, u = xf.chunk(2, dim=-1)
    else:
        g, u = xf, None
    if act == "swiglu_oai":
        g = g.clamp(max=limit)
        u = u.clamp(min=-limit, max=limit)
        y = (u + 1) * (g * torch.sigmoid(alpha * g))
    else:
        if act == "silu":
            y = torch.nn.functional.silu(g)
        elif act == "gelu":
            y = torch.nn.functional.gelu(g)
        elif act == "gelu_tanh":
            y = torch.nn.functional.gelu(g, approximate="tanh")
        elif act == "relu2":
            y = torch.square(torch.relu(g))
        else:
            y = torch.relu(g)
        if gated:
            y = y * u
    return y.to(out_dtype or x.dtype)


def _ptx_examples():
    """(kernel, name, signature, constexprs, options) examples for the PTX compile test."""
    sig = {"x_ptr": "*bf16", "out_ptr": "*bf16", "n_rows": "i32", "I": "i32",
           "stride_xm": "i32", "stride_xn": "i32", "stride_om": "i32", "stride_on": "i32",
           "alpha": "fp32", "limit": "fp32"}
    out = []
    for act, gated, inter in [("silu", True, False), ("gelu", True, False),
                              ("gelu_tanh", False, False), ("swiglu_oai", True, True),
                              ("relu", True, True), ("relu2", False, False)]:
        bm, bn = _blocks(1408)
        meta = dict(ACTIVATION=act, GATED=gated, INTERLEAVED=inter, BLOCK_M=bm, BLOCK_N=bn)
        s = dict(sig)
        s.update({kk: "constexpr" for kk in meta})
        out.append((activation_kernel, f"{act}_{'gated' if gated else 'plain'}"
                    f"{'_interleaved' if inter else ''}", s, meta, dict(num_warps=4)))
    return out
