"""Dropless MoE experts in efficient torch code (the CPU lowering, and the GPU training path).

Forward, for hidden [T, H], expert ids / routing weights [T, k]:

    order  = argsort(ids.flatten(), stable)       # [S = T*k] slots sorted by expert
    counts = bincount(ids, E)                      # [E], read once on the host (free on CPU)
    xs     = hidden[order // k]                    # [S, H] tokens in expert order
    h      = xs @ w1[e]^T   per expert slice       # [S, N1]   (N1 = 2I gated, I otherwise)
    a      = act(h)        (x up when separate)    # [S, I]
    ys     = a @ w2[e]^T    per expert slice       # [S, H]
    out    = index_add(0, order // k, ys * w[order])   # [T, H], accumulated in fp32

Backward reuses xs, h, ys and the permutation (no recomputation of the GEMMs):

    g_s   = grad_out[tok]                  grad_w[order] = (g_s * ys).sum(-1)
    g_ys  = g_s * w[order]                 g_a = g_ys @ w2[e];   grad_w2[e] = g_ys^T a
    g_h   = act'(h) . g_a                  g_xs = g_h @ w1[e];   grad_w1[e] = g_h^T xs
    grad_hidden = index_add(0, tok, g_xs)

Weight layouts follow moe_compiler.ir.ExpertSpec (transposed, concat / interleaved / separate /
ungated, optional biases).
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from moe_compiler import reference
from moe_compiler.ir import ExpertSpec


class PackedWeights:
    """oneDNN-prepacked per-expert weights for CPU inference (weight-stationary small-M GEMMs).

    Skinny per-expert GEMMs ([~16, H] x [H, N]) reach a third of peak with plain mm; oneDNN's
    prepacked linear is ~3x faster there and ~1.5x at 256 rows (bench/moe_layer.py). A weight is
    packed the second time the same tensor (same version) is seen, so per-call temporaries
    (e.g. stacked per-expert weights) are never packed; the cache holds one packed copy per
    expert weight (memory: one extra copy of the expert weights) and drops it with the tensor.
    """

    # id(weight) -> [weakref, version, times seen, packed list or None]; entries die with the weight
    _cache: dict = {}

    @staticmethod
    def available(w: torch.Tensor) -> bool:
        if not (w.device.type == "cpu" and w.dtype in (torch.float32, torch.bfloat16)
                and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
            return False
        # oneDNN's bf16 packing needs AVX512-BW/VL/DQ or AVX-NE-CONVERT; elsewhere it raises
        return w.dtype != torch.bfloat16 or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())

    @staticmethod
    def pack_one(w_e: torch.Tensor, transposed: bool):
        """One expert's weight ([out, in], or [in, out] when transposed) in oneDNN's packed layout."""
        return torch.ops.mkldnn._reorder_linear_weight((w_e.t() if transposed else w_e).contiguous(), 64)

    @classmethod
    def get(cls, w: torch.Tensor, transposed: bool):
        """Packed [out, in] weights of every expert, or None while the weight is not known to be reused."""
        if not cls.available(w):
            return None
        key = id(w)
        entry = cls._cache.get(key)
        if entry is None or entry[0]() is not w or entry[1] != w._version:
            ref = weakref.ref(w, lambda _r, key=key: cls._cache.pop(key, None))
            entry = cls._cache[key] = [ref, w._version, 0, None]
        entry[2] += 1
        if entry[3] is None and entry[2] >= 2:
            try:
                with torch.no_grad():
                    entry[3] = [cls.pack_one(w[e], transposed) for e in range(w.shape[0])]
            except Exception:  # oneDNN refused (build, dtype): stay on plain mm
                entry[2] = -(1 << 30)
        return entry[3]


def _linear(x, w, e, transposed, packed, bias=None, out=None):
    """x [rows, in] through expert e's weight (packed oneDNN weight when available), + bias."""
    if packed is not None:
        y = torch.ops.mkldnn._linear_pointwise(x, packed[e], bias, "none", [], "")
        if out is not None:
            out.copy_(y)
            return out
        return y
    y = _gemm(x, w[e], transposed, out=out)
    if bias is not None:
        y += bias
    return y


class Permutation:
    """Slots sorted by expert: order [S], token of each sorted slot [S], per-expert counts (host ints)."""

    def __init__(self, ids: torch.Tensor, num_experts: int):
        flat = ids.reshape(-1)
        self.top_k = ids.shape[-1] if ids.dim() == 2 else 1
        self.order = torch.argsort(flat, stable=True)
        self.token = torch.div(self.order, self.top_k, rounding_mode="floor")
        self.counts = torch.bincount(flat, minlength=num_experts).tolist()

    def slices(self, order=None):
        """(expert, start, end) of each expert with tokens, in id order or in the given expert order."""
        starts, start = [], 0
        for n in self.counts:
            starts.append(start)
            start += n
        for e in (range(len(self.counts)) if order is None else order):
            if self.counts[e]:
                yield e, starts[e], starts[e] + self.counts[e]


def _gemm(x, w, transposed: bool, out=None):
    """x [rows, in] @ one expert's weight ([out, in], or [in, out] when transposed)."""
    return torch.mm(x, w if transposed else w.t(), out=out)


def _gemm_grad_input(g, w, transposed: bool, out=None):
    """d(x @ W^T)/dx . g  = g @ W  (W stored [out, in]); transposed storage: g @ W^T."""
    return torch.mm(g, w.t() if transposed else w, out=out)


def _gemm_grad_weight(g, x, transposed: bool, out=None):
    """Gradient of the expert weight in its stored layout."""
    return torch.mm(x.t(), g, out=out) if transposed else torch.mm(g.t(), x, out=out)


def _grad_buffer(w, active):
    """Uninitialised gradient of w, zeroed only for experts that received no tokens."""
    g = torch.empty_like(w)
    idle = sorted(set(range(w.shape[0])) - set(active))
    if idle:
        g[idle] = 0
    return g


def activation_forward(h, up, spec: ExpertSpec):
    """[S, N1] (and [S, I] up when separate) -> [S, I]; the reference's definition."""
    return reference.activation(h, spec, up)


def activation_backward(h, up, grad_a, spec: ExpertSpec):
    """Gradient of activation_forward wrt h (and up): returns (grad_h, grad_up or None).

    The common gated SiLU is differentiated in closed form; other activations go through autograd.
    """
    if spec.activation == "silu" and spec.layout in ("concat", "separate"):
        gate, u = (h, up) if spec.layout == "separate" else h.chunk(2, dim=-1)
        sig = torch.sigmoid(gate)
        silu = gate * sig
        d_gate = grad_a * u * (sig * (1 + gate * (1 - sig)))
        d_up = grad_a * silu
        if spec.layout == "separate":
            return d_gate, d_up
        return torch.cat([d_gate, d_up], dim=-1), None
    with torch.enable_grad():
        hh = h.detach().requires_grad_(True)
        uu = up.detach().requires_grad_(True) if up is not None else None
        a = activation_forward(hh, uu, spec)
        grads = torch.autograd.grad(a, [hh] + ([uu] if uu is not None else []), grad_a)
    return grads[0], (grads[1] if uu is not None else None)


def experts_forward(hidden, ids, weights, w1, w3, w2, b1, b3, b2, spec: ExpertSpec, *, keep: bool = False,
                    prepack: bool = True, packed=None, expert_order=None):
    """Returns out [T, H] (hidden's dtype) and, with keep=True, the tensors backward needs.

    Inference (keep=False) allocates only per-expert temporaries, which the CPU allocator reuses,
    and uses oneDNN-prepacked weights when `prepack` (the cost model's cpu_gemm decision);
    training keeps h/up/a for all slots since backward needs them.

    The weights only need ``w[e]``, ``shape`` and ``dtype``, so an expert store's per-expert view
    works too; ``packed`` = (p1, p3, p2) then supplies prepacked weights by expert, and
    ``expert_order`` the order the experts are computed in (each writes its own rows, so the
    result does not depend on it).
    """
    T, H = hidden.shape
    S = ids.numel()
    perm = Permutation(ids, w1.shape[0])
    dt = w1.dtype
    xs = hidden.index_select(0, perm.token).to(dt)
    n1 = w1.shape[-1] if spec.transposed else w1.shape[-2]
    n_up = (w3.shape[-1] if spec.transposed else w3.shape[-2]) if w3 is not None else 0
    n_i = w2.shape[-2] if spec.transposed else w2.shape[-1]
    ys = xs.new_empty((S, H))
    if keep:
        h_all, a_all = xs.new_empty((S, n1)), xs.new_empty((S, n_i))
        up_all = xs.new_empty((S, n_up)) if w3 is not None else None
        p1 = p3 = p2 = None
    elif packed is not None:
        p1, p3, p2 = packed
    elif prepack:
        p1, p2 = PackedWeights.get(w1, spec.transposed), PackedWeights.get(w2, spec.transposed)
        p3 = PackedWeights.get(w3, spec.transposed) if w3 is not None else None
    else:
        p1 = p3 = p2 = None
    for e, s, t in perm.slices(expert_order):
        h = _linear(xs[s:t], w1, e, spec.transposed, p1, None if b1 is None else b1[e],
                    out=h_all[s:t] if keep else None)
        up = None
        if w3 is not None:
            up = _linear(xs[s:t], w3, e, spec.transposed, p3, None if b3 is None else b3[e],
                         out=up_all[s:t] if keep else None)
        a = activation_forward(h, up, spec)
        if keep:
            a_all[s:t] = a
        _linear(a, w2, e, spec.transposed, p2, None if b2 is None else b2[e], out=ys[s:t])
    w_sorted = weights.reshape(-1).index_select(0, perm.order).to(torch.float32)
    acc = torch.zeros((T, H), dtype=torch.float32, device=hidden.device)
    if S:
        weighted = ys * w_sorted.unsqueeze(1) if ys.dtype == torch.float32 else ys.float() * w_sorted.unsqueeze(1)
        acc.index_add_(0, perm.token, weighted)
    out = acc.to(hidden.dtype)
    if not keep:
        return out, None
    return out, dict(perm=perm, xs=xs, h=h_all, up=up_all, a=a_all, ys=ys, w_sorted=w_sorted)


def experts_backward(grad_out, saved, hidden, weights, w1, w3, w2, b1, b3, b2, spec: ExpertSpec):
    """Gradients (hidden, weights, w1, w3, w2, b1, b3, b2) of experts_forward, from its saved tensors."""
    perm, xs, h, up, a_all, ys, w_sorted = (saved[k] for k in ("perm", "xs", "h", "up", "a", "ys", "w_sorted"))
    T, H = hidden.shape
    dt = w1.dtype
    g_s = grad_out.index_select(0, perm.token).float()
    grad_w_sorted = (g_s * ys.float()).sum(-1)
    grad_weights = torch.zeros(weights.numel(), dtype=torch.float32, device=weights.device)
    grad_weights.index_copy_(0, perm.order, grad_w_sorted)
    g_ys = (g_s * w_sorted.unsqueeze(1)).to(dt)
    grad_xs = xs.new_empty(xs.shape)
    active = [e for e, _, _ in perm.slices()]
    gw1, gw2 = _grad_buffer(w1, active), _grad_buffer(w2, active)
    gw3 = _grad_buffer(w3, active) if w3 is not None else None
    gb1 = _grad_buffer(b1, active) if b1 is not None else None
    gb3 = _grad_buffer(b3, active) if b3 is not None else None
    gb2 = _grad_buffer(b2, active) if b2 is not None else None
    for e, s, t in perm.slices():
        g = g_ys[s:t]
        _gemm_grad_weight(g, a_all[s:t], spec.transposed, out=gw2[e])
        if gb2 is not None:
            torch.sum(g, 0, out=gb2[e])
        g_a = _gemm_grad_input(g, w2[e], spec.transposed)
        g_h, g_up = activation_backward(h[s:t], None if up is None else up[s:t], g_a, spec)
        _gemm_grad_weight(g_h, xs[s:t], spec.transposed, out=gw1[e])
        if gb1 is not None:
            torch.sum(g_h, 0, out=gb1[e])
        _gemm_grad_input(g_h, w1[e], spec.transposed, out=grad_xs[s:t])
        if g_up is not None:
            _gemm_grad_weight(g_up, xs[s:t], spec.transposed, out=gw3[e])
            if gb3 is not None:
                torch.sum(g_up, 0, out=gb3[e])
            grad_xs[s:t] += _gemm_grad_input(g_up, w3[e], spec.transposed)
    grad_hidden = torch.zeros((T, H), dtype=torch.float32, device=hidden.device)
    if xs.shape[0]:
        grad_hidden.index_add_(0, perm.token, grad_xs.float())
    return (grad_hidden.to(hidden.dtype), grad_weights.view(weights.shape).to(weights.dtype),
            gw1, gw3, gw2, gb1, gb3, gb2)
