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

import torch
import torch.nn.functional as F

from moe_compiler.ir import ExpertSpec


class Permutation:
    """Slots sorted by expert: order [S], token of each sorted slot [S], per-expert counts (host ints)."""

    def __init__(self, ids: torch.Tensor, num_experts: int):
        flat = ids.reshape(-1)
        self.top_k = ids.shape[-1] if ids.dim() == 2 else 1
        self.order = torch.argsort(flat, stable=True)
        self.token = torch.div(self.order, self.top_k, rounding_mode="floor")
        self.counts = torch.bincount(flat, minlength=num_experts).tolist()

    def slices(self):
        start = 0
        for e, n in enumerate(self.counts):
            if n:
                yield e, start, start + n
            start += n


def _gemm(x, w, transposed: bool, out=None):
    """x [rows, in] @ one expert's weight ([out, in], or [in, out] when transposed)."""
    return torch.mm(x, w if transposed else w.t(), out=out)


def _gemm_grad_input(g, w, transposed: bool, out=None):
    """d(x @ W^T)/dx . g  = g @ W  (W stored [out, in]); transposed storage: g @ W^T."""
    return torch.mm(g, w.t() if transposed else w, out=out)


def _gemm_grad_weight(g, x, transposed: bool):
    """Gradient of the expert weight in its stored layout."""
    return x.t() @ g if transposed else g.t() @ x


def _split(h, spec: ExpertSpec):
    if spec.layout == "interleaved":
        return h[:, ::2], h[:, 1::2]
    return h.chunk(2, dim=-1)


def _act(x, name):
    if name == "silu":
        return F.silu(x)
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    return F.relu(x)


def activation_forward(h, up, spec: ExpertSpec):
    """[S, N1] (and [S, I] up when separate) -> [S, I]."""
    if spec.layout == "ungated":
        return _act(h, spec.activation)
    gate, u = (h, up) if spec.layout == "separate" else _split(h, spec)
    if spec.activation == "swiglu_oai":
        g = gate.clamp(max=spec.swiglu_limit)
        u = u.clamp(min=-spec.swiglu_limit, max=spec.swiglu_limit)
        return (u + 1) * (g * torch.sigmoid(g * spec.swiglu_alpha))
    return _act(gate, spec.activation) * u


def activation_backward(h, up, grad_a, spec: ExpertSpec):
    """Gradient of activation_forward wrt h (and up): returns (grad_h, grad_up or None)."""
    with torch.enable_grad():
        hh = h.detach().requires_grad_(True)
        uu = up.detach().requires_grad_(True) if up is not None else None
        a = activation_forward(hh, uu, spec)
        grads = torch.autograd.grad(a, [hh] + ([uu] if uu is not None else []), grad_a)
    return grads[0], (grads[1] if uu is not None else None)


def experts_forward(hidden, ids, weights, w1, w3, w2, b1, b3, b2, spec: ExpertSpec, *, keep: bool = False):
    """Returns out [T, H] (hidden's dtype) and, with keep=True, the tensors backward needs."""
    T, H = hidden.shape
    S = ids.numel()
    perm = Permutation(ids, w1.shape[0])
    dt = w1.dtype
    xs = hidden.index_select(0, perm.token).to(dt)
    n1 = w1.shape[-1] if spec.transposed else w1.shape[-2]
    h = xs.new_empty((S, n1))
    up = xs.new_empty((S, w3.shape[-1] if spec.transposed else w3.shape[-2])) if w3 is not None else None
    ys = xs.new_empty((S, H))
    a_all = None
    if keep:
        a_all = xs.new_empty((S, w2.shape[-2] if spec.transposed else w2.shape[-1]))
    for e, s, t in perm.slices():
        _gemm(xs[s:t], w1[e], spec.transposed, out=h[s:t])
        if b1 is not None:
            h[s:t] += b1[e]
        if up is not None:
            _gemm(xs[s:t], w3[e], spec.transposed, out=up[s:t])
            if b3 is not None:
                up[s:t] += b3[e]
        a = activation_forward(h[s:t], None if up is None else up[s:t], spec)
        if keep:
            a_all[s:t] = a
        _gemm(a, w2[e], spec.transposed, out=ys[s:t])
        if b2 is not None:
            ys[s:t] += b2[e]
    w_sorted = weights.reshape(-1).index_select(0, perm.order).to(torch.float32)
    acc = torch.zeros((T, H), dtype=torch.float32, device=hidden.device)
    if S:
        acc.index_add_(0, perm.token, ys.float() * w_sorted.unsqueeze(1) if ys.dtype != torch.float32
                       else ys * w_sorted.unsqueeze(1))
    out = acc.to(hidden.dtype)
    if not keep:
        return out, None
    return out, dict(perm=perm, xs=xs, h=h, up=up, a=a_all, ys=ys, w_sorted=w_sorted)


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
    grad_xs = xs.new_zeros(xs.shape)
    gw1, gw2 = torch.zeros_like(w1), torch.zeros_like(w2)
    gw3 = torch.zeros_like(w3) if w3 is not None else None
    gb1 = torch.zeros_like(b1) if b1 is not None else None
    gb3 = torch.zeros_like(b3) if b3 is not None else None
    gb2 = torch.zeros_like(b2) if b2 is not None else None
    for e, s, t in perm.slices():
        g = g_ys[s:t]
        gw2[e] = _gemm_grad_weight(g, a_all[s:t], spec.transposed)
        if gb2 is not None:
            gb2[e] = g.sum(0)
        g_a = _gemm_grad_input(g, w2[e], spec.transposed)
        g_h, g_up = activation_backward(h[s:t], None if up is None else up[s:t], g_a, spec)
        gw1[e] = _gemm_grad_weight(g_h, xs[s:t], spec.transposed)
        if gb1 is not None:
            gb1[e] = g_h.sum(0)
        _gemm_grad_input(g_h, w1[e], spec.transposed, out=grad_xs[s:t])
        if g_up is not None:
            gw3[e] = _gemm_grad_weight(g_up, xs[s:t], spec.transposed)
            if gb3 is not None:
                gb3[e] = g_up.sum(0)
            grad_xs[s:t] += _gemm_grad_input(g_up, w3[e], spec.transposed)
    grad_hidden = torch.zeros((T, H), dtype=torch.float32, device=hidden.device)
    if xs.shape[0]:
        grad_hidden.index_add_(0, perm.token, grad_xs.float())
    return (grad_hidden.to(hidden.dtype), grad_weights.view(weights.shape).to(weights.dtype),
            gw1, gw3, gw2, gb1, gb3, gb2)
