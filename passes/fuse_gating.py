"""fuse_gating: split each moe op into one fused gating op and the routed experts.

Before:
    y = moe_compiler.moe(x, logits, bias, w1, w3, w2, b1, b3, b2, spec)       # x [T, H], logits [T, E]
After:
    g = moe_compiler.gating(logits, bias, spec)     # softmax/sigmoid -> (bias, group-limited) top-k
    ids = g[0]                                      #   -> renormalise/scale, all in one op: [T, k] int64
    w = g[1]                                        #   [T, k] fp32, differentiable wrt logits
    y = moe_compiler.routed_experts(x, ids, w, w1, w3, w2, b1, b3, b2, spec)  # [T, H]

The gating op computes scores in fp32 and selects with torch.topk itself, so expert ids (ties
included) are those eager computes. Its backward differentiates the chosen weights only
(a [T, E] softmax/sigmoid + gather, no top-k).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import ClassVar

import torch

from moe_compiler import _compat
from moe_compiler.codegen.ops import GATING_OP, ROUTED_EXPERTS_OP
from moe_compiler.ir import MOE_OP
from moe_compiler.pipeline import PassContext, PassResult


@dataclass(frozen=True)
class FuseGating:
    """Split moe ops into a fused gating op and routed_experts."""

    name: ClassVar[str] = "fuse_gating"

    def call(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        graph = gm.graph
        fake_mode = _compat.fake_mode_of(gm)
        n_done = 0
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target is not MOE_OP:
                continue
            x, logits, bias, w1, w3, w2, b1, b3, b2, spec = node.args
            with graph.inserting_before(node):
                g = graph.call_function(GATING_OP, (logits, bias, spec))
                ids = graph.call_function(operator.getitem, (g, 0))
                w = graph.call_function(operator.getitem, (g, 1))
                y = graph.call_function(ROUTED_EXPERTS_OP, (x, ids, w, w1, w3, w2, b1, b3, b2, spec))
            with fake_mode:
                g.meta["val"] = GATING_OP(logits.meta["val"], bias.meta["val"] if bias is not None else None, spec)
                ids.meta["val"], w.meta["val"] = g.meta["val"]
                y.meta["val"] = node.meta["val"]
            for n in (g, ids, w, y):
                n.meta["moe_compiler_pass"] = self.name
            y.meta["moe_spec"] = node.meta.get("moe_spec")
            node.replace_all_uses_with(y)
            graph.erase_node(node)
            n_done += 1
        if n_done:
            gm.recompile()
        return PassResult(gm, bool(n_done), {"gating_fused": n_done})
