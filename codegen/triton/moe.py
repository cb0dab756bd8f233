"""Composed single-device MoE expert computation and the registry of every Triton kernel.

    hidden [T, H], topk_ids [T, k], topk_weights [T, k]
    w_gate_up [E, 2I, H] (gated) or [E, I, H] (up only)   | transposed: [E, H, 2I] / [E, H, I]
    w_down    [E, H, I]                                     | transposed: [E, I, H]
    b_gate_up [E, 2I] / [E, I], b_down [E, H] (optional)
        -> out [T, H] (hidden.dtype)

Pipeline (5 launches, no host synchronisation; every intermediate has a shape known on the host):

    moe_align_block_size(topk_ids, E, BLOCK_M)                   -> sorted ids, block experts
    fused_moe_gemm(hidden, w_gate_up, gather rows t)            -> h  [T*k, 2I]   (dtype)
    activation(h)                                                -> a  [T*k, I]    (dtype)
    fused_moe_gemm(a, w_down, rows = slots, * topk_weights)     -> y  [T*k, H]    (dtype)
    combine(y)  (sum over the k slots, fp32)                     -> out [T, H]     (dtype)

Roundings to the activation dtype happen exactly at those four arrows;
``moe_forward_reference`` rounds at the same points, so fp32/fp16 results agree to accumulation
order.  The routing weight is applied in fp32 in the down GEMM's epilogue, before rounding
(eager HF multiplies in the model dtype).  Precondition: topk_ids in [0, E) (see permute.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from . import activation as _act
from . import combine as _comb
from . import gating as _gating
from . import grouped_gemm as _gg
from . import permute as _perm
from .combine import combine
from .grouped_gemm import choose_config, fused_moe_gemm
from .permute import moe_align_block_size

__all__ = ["triton_moe_forward", "moe_forward_reference", "KERNELS", "KernelEntry", "PtxExample"]


def _dims(hidden, w_gate_up, w_down, gated, transposed):
    T, H = hidden.shape
    E = w_gate_up.shape[0]
    n1 = w_gate_up.shape[2] if transposed else w_gate_up.shape[1]
    k1 = w_gate_up.shape[1] if transposed else w_gate_up.shape[2]
    I = n1 // 2 if gated else n1
    down_n = w_down.shape[2] if transposed else w_down.shape[1]
    down_k = w_down.shape[1] if transposed else w_down.shape[2]
    if k1 != H or down_n != H or down_k != I or w_down.shape[0] != E or (gated and n1 % 2):
        raise ValueError(
            f"inconsistent MoE shapes: hidden {tuple(hidden.shape)}, w_gate_up "
            f"{tuple(w_gate_up.shape)}, w_down {tuple(w_down.shape)} (gated={gated}, "
            f"transposed={transposed})")
    return T, H, E, I


def triton_moe_forward(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    *,
    b_gate_up: Optional[torch.Tensor] = None,
    b_down: Optional[torch.Tensor] = None,
    activation: str = "silu",
    gated: bool = True,
    interleaved: bool = False,
    transposed: bool = False,
    alpha: float = 1.702,
    limit: float = 7.0,
    config: Optional[dict] = None,
    allow_tf32: bool = False,
    config_experts: Optional[int] = None,
) -> torch.Tensor:
    """Routed experts of one MoE layer with the Triton kernels (see module doc for shapes).

    ``activation``: one of ``activation.ACTIVATIONS``; ``interleaved``: gate/up columns
    interleaved (GPT-OSS); ``transposed``: weights stored [E, K, N] (GPT-OSS);
    ``config``: tile config for both GEMMs (default: ``choose_config``; BLOCK_M is shared);
    ``config_experts``: the expert count ``choose_config`` is asked with (default E). A caller that
    passes a subset of a layer's experts (the offloaded op) gives the layer's count, so the tiles, and
    with them every output bit, are those of the whole layer.
    """
    T, H, E, I = _dims(hidden, w_gate_up, w_down, gated, transposed)
    k = topk_ids.shape[1]
    if tuple(topk_ids.shape) != (T, k) or tuple(topk_weights.shape) != (T, k):
        raise ValueError("topk_ids and topk_weights must be [T, k]")
    dt = hidden.dtype
    if T == 0:
        return torch.empty((0, H), dtype=dt, device=hidden.device)
    n1 = 2 * I if gated else I
    ce = config_experts or E
    cfg1 = dict(config) if config else choose_config(T, n1, H, ce, k, dt)
    cfg2 = dict(config) if config else choose_config(T, H, I, ce, k, dt)
    cfg2["BLOCK_M"] = cfg1["BLOCK_M"]
    align = moe_align_block_size(topk_ids, E, cfg1["BLOCK_M"])
    h = fused_moe_gemm(hidden, w_gate_up, align, b_transposed=transposed, bias=b_gate_up,
                       config=cfg1, allow_tf32=allow_tf32)
    a = _act.activation(h, activation, gated=gated, interleaved=interleaved, alpha=alpha,
                   limit=limit)
    y = fused_moe_gemm(a, w_down, align, b_transposed=transposed, bias=b_down,
                       topk_weights=topk_weights, mul_routed_weight=True, config=cfg2,
                       allow_tf32=allow_tf32)
    return combine(y, None, T, k)


def moe_forward_reference(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    *,
    b_gate_up: Optional[torch.Tensor] = None,
    b_down: Optional[torch.Tensor] = None,
    activation: str = "silu",
    gated: bool = True,
    interleaved: bool = False,
    transposed: bool = False,
    alpha: float = 1.702,
    limit: float = 7.0,
) -> torch.Tensor:
    """Plain torch: sort the slots by expert, dense matmuls per expert (fp32 math), rounding to
    hidden.dtype at the same points as :func:`triton_moe_forward`."""
    T, H, E, I = _dims(hidden, w_gate_up, w_down, gated, transposed)
    k = topk_ids.shape[1]
    dt = hidden.dtype
    flat = topk_ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E).tolist()
    wflat = topk_weights.reshape(-1).float()
    y = torch.zeros((T * k, H), dtype=dt, device=hidden.device)
    start = 0
    for e in range(E):
        slots = order[start:start + counts[e]]
        start += counts[e]
        if slots.numel() == 0:
            continue
        x = hidden[slots // k].float()
        w1 = w_gate_up[e].float()
        h = x @ (w1 if transposed else w1.t())
        if b_gate_up is not None:
            h = h + b_gate_up[e].float()
        a = _act.activation_reference(h.to(dt), activation, gated=gated, interleaved=interleaved,
                                 alpha=alpha, limit=limit)
        w2 = w_down[e].float()
        o = a.float() @ (w2 if transposed else w2.t())
        if b_down is not None:
            o = o + b_down[e].float()
        y[slots] = (o * wflat[slots, None]).to(dt)
    return y.float().view(T, k, H).sum(dim=1).to(dt)


# --------------------------------------------------------------------------------------------
# registry (used by tests/test_triton_ptx.py)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PtxExample:
    name: str
    signature: dict  # argument name -> Triton type string ("*bf16", "i32", "fp32", "constexpr")
    constexprs: dict  # constexpr argument name -> value
    options: dict  # triton.compile options (num_warps, num_stages)


@dataclass(frozen=True)
class KernelEntry:
    name: str
    kernel: Any  # the @triton.jit function
    examples: Callable[[], list]  # () -> list[PtxExample]


def _entries() -> dict:
    by_kernel: dict = {}
    for mod in (_gating, _perm, _gg, _act, _comb):
        for kern, name, sig, consts, opts in mod._ptx_examples():
            by_kernel.setdefault(kern, []).append(PtxExample(name, sig, consts, opts))
    names = {
        _gating.gating_kernel: "gating",
        _perm.align_count_kernel: "align_count",
        _perm.align_scan_kernel: "align_scan",
        _perm.align_scatter_kernel: "align_scatter",
        _gg.fused_moe_gemm_kernel: "fused_moe_gemm",
        _act.activation_kernel: "activation",
        _comb.combine_kernel: "combine",
    }
    missing = set(names) ^ set(by_kernel)
    assert not missing, f"kernels without PTX examples / registry names: {missing}"
    return {names[kern]: KernelEntry(names[kern], kern, (lambda ex=tuple(ex): list(ex)))
            for kern, ex in by_kernel.items()}


KERNELS: dict = _entries()
