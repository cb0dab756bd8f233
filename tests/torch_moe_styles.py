"""MoE layers written the ways people write them by hand, for detection tests.

- MaskedLoopMoE: per-expert nn.Linear modules; for each expert a mask-weighted dense pass
  (no data-dependent shapes), accumulated into the output.
- TorchTitanMoE: stacked [E, I, H] weights, argsort permutation, histc counts, torch._grouped_mm.
- NearMissTopK: softmax + top-k that is not a router (no expert weights): must not be matched.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Expert(nn.Module):
    def __init__(self, h, i):
        super().__init__()
        self.w1 = nn.Linear(h, i, bias=False)
        self.w3 = nn.Linear(h, i, bias=False)
        self.w2 = nn.Linear(i, h, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MaskedLoopMoE(nn.Module):
    def __init__(self, h, i, e, k, score_func="softmax", renormalize=True):
        super().__init__()
        self.gate = nn.Linear(h, e, bias=False)
        self.experts = nn.ModuleList(Expert(h, i) for _ in range(e))
        self.k, self.score_func, self.renormalize = k, score_func, renormalize

    def forward(self, x):
        x2 = x.reshape(-1, x.shape[-1])
        logits = self.gate(x2)
        probs = logits.float().softmax(-1) if self.score_func == "softmax" else logits.float().sigmoid()
        vals, ids = torch.topk(probs, self.k, dim=-1)
        if self.renormalize:
            vals = vals / vals.sum(-1, keepdim=True)
        out = torch.zeros_like(x2)
        for e, expert in enumerate(self.experts):
            w = (vals * (ids == e)).sum(-1, keepdim=True).to(x.dtype)
            out = out + w * expert(x2)
        return out.reshape(x.shape)


class TorchTitanMoE(nn.Module):
    """torchtitan's MoE: router -> top-k -> argsort by expert -> histc -> grouped_mm experts."""

    def __init__(self, h, i, e, k, score_func="sigmoid", score_before_experts=False):
        super().__init__()
        self.router = nn.Linear(h, e, bias=False)
        self.w1 = nn.Parameter(torch.randn(e, i, h) * h ** -0.5)
        self.w2 = nn.Parameter(torch.randn(e, h, i) * i ** -0.5)
        self.w3 = nn.Parameter(torch.randn(e, i, h) * h ** -0.5)
        self.e, self.k, self.score_func = e, k, score_func
        self.score_before_experts = score_before_experts  # torchtitan's option (its Llama 4): scale the input

    def forward(self, x):
        bs, slen, dim = x.shape
        x2 = x.view(-1, dim)
        scores = self.router(x2)
        scores = torch.sigmoid(scores.float()) if self.score_func == "sigmoid" else F.softmax(scores.float(), dim=1)
        top_scores, selected = torch.topk(scores, k=self.k, dim=1)
        counts = torch.histc(selected.view(-1).float(), bins=self.e, min=0, max=self.e - 1)
        order = torch.argsort(selected.view(-1), stable=True)
        top_scores = top_scores.view(-1)[order]
        token_idx = order // self.k
        routed = x2[token_idx]
        if self.score_before_experts:
            routed = (routed.float() * top_scores.reshape(-1, 1)).to(x.dtype)
        offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
        h = F.silu(torch._grouped_mm(routed, self.w1.transpose(-2, -1), offs=offs))
        h = h * torch._grouped_mm(routed, self.w3.transpose(-2, -1), offs=offs)
        out = torch._grouped_mm(h, self.w2.transpose(-2, -1), offs=offs)
        if not self.score_before_experts:
            out = (out.float() * top_scores.reshape(-1, 1)).to(x.dtype)
        y = torch.zeros_like(x2).index_add(0, token_idx, out)
        return y.view(bs, slen, dim)


class NearMissTopK(nn.Module):
    """Softmax + top-k over a projection, used to pick features: not an MoE layer."""

    def __init__(self, h, e, k):
        super().__init__()
        self.proj = nn.Linear(h, e, bias=False)
        self.out = nn.Linear(k, h, bias=False)
        self.k = k

    def forward(self, x):
        vals, idx = torch.topk(self.proj(x).softmax(-1), self.k, dim=-1)
        return x + self.out(vals * idx.float())


class ResidualMoEStack(nn.Module):
    """Pre-norm residual blocks of the project's MoELayer: x + moe(layer_norm(x)) (distributed tests)."""

    def __init__(self, layers=2, hidden=16, ffn=12, experts=6, top_k=2):
        super().__init__()
        from moe_compiler import MoELayer

        self.layers = nn.ModuleList([MoELayer(hidden, ffn, experts, top_k) for _ in range(layers)])

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(F.layer_norm(x, x.shape[-1:]))
        return x


class ChainedMoEStack(nn.Module):
    """Residual MoE blocks joined by per-token ops only (coherent-mode tests):
    x = x + moe(norm(x)) [+ shared(norm(x))] [+ pos_mix(x) between blocks].

    norm: "layer_norm" (no affine) | "rms" (learned weight, HF-style fp32 upcast) | "none".
    mix_tokens=True adds a cumulative sum over the sequence after the first block (tokens interact:
    coherent mode must not chain across it); tap=i reads the state after block i outside the chain."""

    def __init__(self, layers=2, hidden=16, ffn=12, experts=6, top_k=2, norm="layer_norm", shared=False,
                 mix_tokens=False, tap=None):
        super().__init__()
        from moe_compiler import MoELayer

        self.norm = norm
        self.layers = nn.ModuleList([MoELayer(hidden, ffn, experts, top_k) for _ in range(layers)])
        self.norm_w = nn.ParameterList([nn.Parameter(1 + 0.1 * torch.randn(hidden)) for _ in range(layers)])
        self.shared = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(layers)]) if shared else None
        self.mix_tokens = mix_tokens
        self.tap = tap   # also add 0.5 * (the state after layer `tap`) to the output: read outside a chain

    def _norm(self, x, i):
        if self.norm == "layer_norm":
            return F.layer_norm(x, x.shape[-1:])
        if self.norm == "rms":
            h = x.float()
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
            return self.norm_w[i] * h.to(x.dtype)
        return x

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            h = self._norm(x, i)
            x = x + layer(h)
            if self.shared is not None:
                x = x + self.shared[i](h)
            if self.mix_tokens and i == 0:
                x = x + 0.1 * x.cumsum(1)
            if i == self.tap:
                kept = x
        return x if self.tap is None else x + 0.5 * kept
