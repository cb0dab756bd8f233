"""The project's reference MoE layer, for people writing new models.

``MoELayer`` holds a router [E, H] and stacked expert weights (transformers 5 layout:
gate_up_proj [E, 2I, H], down_proj [E, H, I]) and an optional shared expert. Its forward computes the
router logits with a plain linear and calls the ``moe_compiler.moe`` op, so eager runs the reference
implementation and ``torch.compile(backend="moe")`` gets the op directly.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_compiler.ir import ExpertSpec, MoESpec, RouterSpec


class MoELayer(nn.Module):
    """x [..., H] -> [..., H]: top-k routed gated MLP experts (+ an optional shared expert).

    Args: hidden_size H, ffn_size I, num_experts E, top_k, score_func ("softmax"|"sigmoid"|"sqrtsoftplus"),
    renormalize (divide the chosen weights by their sum), activation ("silu"|"gelu"|"gelu_tanh"|"relu"|"relu2"),
    shared_ffn_size (0 = no shared expert), shared_gate (sigmoid-gated shared expert, as Qwen2-MoE).
    """

    def __init__(self, hidden_size: int, ffn_size: int, num_experts: int, top_k: int, *,
                 score_func: str = "softmax", renormalize: bool = True, activation: str = "silu",
                 shared_ffn_size: int = 0, shared_gate: bool = False, dtype=None):
        super().__init__()
        self.spec = MoESpec(
            router=RouterSpec(num_experts=num_experts, top_k=top_k, score_func=score_func, renormalize=renormalize),
            experts=ExpertSpec(hidden_size=hidden_size, ffn_size=ffn_size, activation=activation),
            shared_expert="none" if not shared_ffn_size else ("gated" if shared_gate else "plain"),
            pattern="moe_compiler.MoELayer",
        )
        self._spec_json = self.spec.to_json()  # computed once: forward passes a constant string
        kw = {"dtype": dtype}
        self.router = nn.Parameter(torch.empty(num_experts, hidden_size, **kw))
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * ffn_size, hidden_size, **kw))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_size, **kw))
        self.shared = None
        if shared_ffn_size:
            self.shared = nn.ModuleDict({
                "gate_up": nn.Linear(hidden_size, 2 * shared_ffn_size, bias=False, **kw),
                "down": nn.Linear(shared_ffn_size, hidden_size, bias=False, **kw),
            })
            if shared_gate:
                self.shared["gate"] = nn.Linear(hidden_size, 1, bias=False, **kw)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for p in (self.router, self.gate_up_proj, self.down_proj):
            nn.init.normal_(p, std=p.shape[-1] ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x.reshape(-1, x.shape[-1]), self.router)
        y = torch.ops.moe_compiler.moe(x, logits, None, self.gate_up_proj, None, self.down_proj, None, None, None,
                                       self._spec_json)
        if self.shared is not None:
            g, u = self.shared["gate_up"](x).chunk(2, dim=-1)
            s = self.shared["down"](F.silu(g) * u)
            if "gate" in self.shared:
                s = torch.sigmoid(self.shared["gate"](x)) * s
            y = y + s
        return y
