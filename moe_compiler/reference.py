"""Plain-torch reference semantics of the MoE op: routing, then dropless experts.

This file is the definition every lowering is checked against. It is written for clarity and
exactness (sorted tokens, one GEMM per expert with tokens, fp32 combine), not for speed.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from moe_compiler.ir import ExpertSpec, MoESpec, RouterSpec


def route(router_logits: torch.Tensor, score_bias: torch.Tensor | None, spec: RouterSpec):
    """Router logits [T, E] -> (expert ids [T, k] int64, weights [T, k] fp32).

    Scores are computed in fp32. The weights are the unbiased scores at the chosen experts;
    the optional score bias only influences which experts are chosen (DeepSeek-V3), or, with
    ``spec.weight_scale``, multiplies the final weights per chosen expert (Gemma 4).
    """
    if spec.weight_scale:
        ids, weights = route(router_logits, None, dataclasses.replace(spec, weight_scale=False))
        if score_bias is None:
            raise ValueError("RouterSpec.weight_scale needs the [E] per-expert scale (the score_bias operand)")
        return ids, weights * score_bias[ids]
    logits = router_logits.float()
    k = spec.top_k
    if spec.topk_before_score:
        values, ids = torch.topk(logits, k, dim=-1)
        weights = score(values, spec.score_func)
    else:
        scores = score(logits, spec.score_func)
        choice = scores + score_bias.float() if score_bias is not None else scores
        if spec.n_group > 1:
            choice = _group_limit(choice, spec)
        ids = torch.topk(choice, k, dim=-1).indices
        weights = scores.gather(-1, ids)
    if spec.renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + spec.renorm_eps)
    if spec.scaling_factor != 1.0:
        weights = weights * spec.scaling_factor
    return ids, weights


def score(logits: torch.Tensor, score_func: str) -> torch.Tensor:
    """Router scores of fp32 logits [..., E]: softmax over the last dim, or an elementwise sigmoid /
    sqrt(softplus) (transformers' "sqrtsoftplus", DeepSeek-V4)."""
    if score_func == "softmax":
        return torch.softmax(logits, dim=-1)
    if score_func == "sigmoid":
        return torch.sigmoid(logits)
    if score_func == "sqrtsoftplus":
        return torch.sqrt(F.softplus(logits))
    raise ValueError(f"unknown score function {score_func!r}")


def _group_limit(choice: torch.Tensor, spec: RouterSpec) -> torch.Tensor:
    """Mask experts outside the best topk_group groups to -inf (DeepSeek group-limited routing)."""
    t, e = choice.shape
    grouped = choice.view(t, spec.n_group, e // spec.n_group)
    if spec.group_score == "top2_sum":
        group_scores = grouped.topk(min(2, e // spec.n_group), dim=-1).values.sum(dim=-1)
    else:
        group_scores = grouped.amax(dim=-1)
    group_idx = torch.topk(group_scores, spec.topk_group, dim=-1).indices
    keep = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0).bool()
    keep = keep.unsqueeze(-1).expand(t, spec.n_group, e // spec.n_group).reshape(t, e)
    return choice.masked_fill(~keep, float("-inf"))


def activation(h: torch.Tensor, spec: ExpertSpec, w3_out: torch.Tensor | None = None) -> torch.Tensor:
    """First-GEMM output [rows, N1] (and the separate up output) -> [rows, I]."""
    if spec.layout == "ungated":
        return _act(h, spec.activation)
    if spec.layout == "separate":
        gate, up = h, w3_out
    elif spec.layout == "interleaved":
        gate, up = h[..., ::2], h[..., 1::2]
    else:
        gate, up = h.chunk(2, dim=-1)
    if spec.activation == "swiglu_oai":
        gate = gate.clamp(max=spec.swiglu_limit)
        up = up.clamp(min=-spec.swiglu_limit, max=spec.swiglu_limit)
        return (up + 1) * (gate * torch.sigmoid(gate * spec.swiglu_alpha))
    if spec.activation == "swiglu_softcap":  # Inkling 2: the sigmoid reads the raw gate; computed in fp32
        g, u = gate.float(), up.float()
        capped = torch.tanh(g / spec.gate_softcap) * spec.gate_softcap
        return (capped * torch.sigmoid(g) * (torch.tanh(u / spec.up_softcap) * spec.up_softcap)).to(gate.dtype)
    return _act(gate, spec.activation) * up


def _act(x: torch.Tensor, name: str) -> torch.Tensor:
    if name == "silu":
        return F.silu(x)
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu(x)
    if name == "relu2":  # squared ReLU (Nemotron-H; transformers' ReLUSquaredActivation)
        return torch.square(F.relu(x))
    raise ValueError(f"activation {name!r} needs a gated layout")


def expert_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    """x [rows, in] @ one expert's weight ([out, in], or [in, out] when transposed) + bias [out]."""
    y = x @ w if transposed else x @ w.t()
    return y + b if b is not None else y


def expert_mlp(x, e, w1, w3, w2, b1, b3, b2, spec: ExpertSpec):
    """One expert e applied to its rows x [rows, H] -> [rows, H] (w* stacked [E, ...] or per-expert sequences)."""
    dt = w1[e].dtype
    x = x.to(dt)
    h = expert_linear(x, w1[e], None if b1 is None else b1[e], spec.transposed)
    up = expert_linear(x, w3[e], None if b3 is None else b3[e], spec.transposed) if w3 is not None else None
    a = activation(h, spec, up)
    return expert_linear(a.to(dt), w2[e], None if b2 is None else b2[e], spec.transposed)


def experts_forward(hidden2d, ids, weights, w1, w3, w2, b1, b3, b2, spec: ExpertSpec) -> torch.Tensor:
    """Dropless experts: hidden [T, H], ids/weights [T, k] -> fp32 [T, H] (weighted sum over k)."""
    t, k = ids.shape
    h = hidden2d.shape[-1]
    out = hidden2d.new_zeros((t * k, h), dtype=torch.float32)
    if t == 0:
        return out.view(t, k, h).sum(1)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w1.shape[0]).tolist()
    if torch.is_grad_enabled():
        # one unbind per weight: its backward stacks the experts' gradients once, where w[e] per
        # expert would write a zero-filled [E, ...] gradient for every expert (O(E^2) memory traffic)
        w1, w3, w2, b1, b3, b2 = (None if w is None else w.unbind(0) for w in (w1, w3, w2, b1, b3, b2))
    rows = hidden2d[order // k]
    start = 0
    for e, n in enumerate(counts):
        if n:
            sl = order[start:start + n]
            out[sl] = expert_mlp(rows[start:start + n], e, w1, w3, w2, b1, b3, b2, spec).float()
        start += n
    return (out.view(t, k, h) * weights.float().unsqueeze(-1)).sum(1)


def moe_forward(hidden, router_logits, score_bias, w1, w3, w2, b1, b3, b2, spec: MoESpec) -> torch.Tensor:
    """The MoE op's reference: returns hidden's shape and dtype."""
    h = hidden.shape[-1]
    x = hidden.reshape(-1, h)
    ids, weights = route(router_logits.reshape(x.shape[0], spec.router.num_experts), score_bias, spec.router)
    if spec.router.scales_input:
        rows, slot_ids, unit = scaled_slots(x, ids, weights)
        y = experts_forward(rows, slot_ids, unit, w1, w3, w2, b1, b3, b2, spec.experts).view(*ids.shape, h).sum(1)
    else:
        y = experts_forward(x, ids, weights, w1, w3, w2, b1, b3, b2, spec.experts)
    return y.to(hidden.dtype).reshape(hidden.shape)


def scaled_slots(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> tuple:
    """RouterSpec.scales_input (Llama 4, torchtitan's score_before_experts): one row per (token, slot)
    holding x[t] * w[t, j] (in x's dtype, as Llama 4 multiplies by scores cast to it), routed to
    ids[t, j] with a unit weight; the layer's output is each token's k row outputs summed.
    x [T, H], ids and weights [T, k] -> (rows [T*k, H], ids [T*k, 1], unit weights [T*k, 1])."""
    T, k = ids.shape
    rows = (x.unsqueeze(1) * weights.to(x.dtype).unsqueeze(-1)).reshape(T * k, x.shape[-1])
    return rows, ids.reshape(T * k, 1), torch.ones_like(weights).reshape(T * k, 1)
