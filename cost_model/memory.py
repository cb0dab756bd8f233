"""Memory footprint per rank (bytes) and overlap (seconds a transfer hides behind compute).

Footprint of one MoE layer on one rank, with E experts over G ranks (E/G owned), ``extra`` replica
or gathered experts, T tokens of k slots:

    weights      (E/G + extra) * expert_bytes
    training     + (E/G) * expert_bytes * (1 grad) + (E/G) * expert_params * 8 (fp32 Adam m, v)
                 + saved activations S * (H + N1 + 2I + H) * bytes   (xs, h, a, ys; S = T * k)
    buffers      dispatch + combine receive buffers 2 * S * H * bytes

Overlap: a transfer of t seconds issued ahead of ``window`` seconds of independent compute (the
attention block before the layer, Hecate's T_nonMoE) exposes Max(0, t - window); the overlap degree
is how many experts' transfers fit in the window: floor(window * bandwidth / expert_bytes).
"""
from __future__ import annotations

import sympy

from moe_compiler.cost_model.compute import LayerShape
from moe_compiler.cost_model.symbols import T, as_expr


def footprint_per_rank(layer: LayerShape, ranks: int, tokens=T, *, extra_experts=0, training: bool = False) -> dict:
    """Named byte counts of one MoE layer on one rank and their sum ("total")."""
    t = as_expr(tokens)
    owned = sympy.Rational(layer.num_experts, ranks)
    s = t * layer.top_k
    out = {"weights": (owned + as_expr(extra_experts)) * layer.expert_bytes,
           "buffers": 2 * s * layer.hidden * layer.bytes}
    if training:
        params = layer.expert_bytes // layer.bytes
        out["grads_and_optimizer"] = owned * (layer.expert_bytes + params * 8)
        out["activations"] = s * (2 * layer.hidden + layer.n1 + 2 * layer.ffn) * layer.bytes
    out["total"] = sum(out.values())
    return out


def exposed(transfer, window):
    """Seconds of a transfer not hidden behind ``window`` seconds of independent compute."""
    return sympy.Max(0, as_expr(transfer) - as_expr(window))


def hidden_time(transfer, window):
    """Seconds of a transfer hidden behind the window."""
    return sympy.Min(as_expr(transfer), as_expr(window))


def overlap_degree(window_s: float, bandwidth: float, expert_bytes: float) -> int:
    """Hecate's t: experts whose transfer fits behind ``window_s`` seconds of compute."""
    return int(max(0.0, float(window_s)) * bandwidth // max(1.0, float(expert_bytes)))
