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

A per-expert scale of the chosen weights (RouterSpec.weight_scale, Gemma 4's per_expert_scale, in
the score_bias slot) is applied after the gating op, so it gets its gradient from autograd:

    w = mul(w, index(scale, [ids]))                           # [T, k] fp32

A layer whose weights scale the experts' input (RouterSpec.scales_input: Llama 4, torchtitan's
score_before_experts) gets one row x[t] * w[t, j] per slot, each routed to its one expert with a unit
weight, so every lowering after this runs it as an ordinary top-1 layer over T*k rows:

    top-1:  xs = mul(view(x, [-1, H]), _to_copy(w, x.dtype))               # [T, H]
            y = view(moe_compiler.routed_experts(xs, ids, ones_like(w), ...), x's shape)
    top-k:  xs = view(mul(unsqueeze(view(x, [-1, H]), 1), unsqueeze(_to_copy(w, x.dtype), -1)), [-1, H])
            ys = moe_compiler.routed_experts(xs, view(ids, [-1, 1]), ones_like(view(w, [-1, 1])), ...)
            y = view(_to_copy(sum(view(ys, [-1, k, H]), [1], dtype=fp32), x.dtype), x's shape)   # [T*k, H] -> x
"""
from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass
from typing import ClassVar

import torch

from moe_compiler import _compat
from moe_compiler.codegen.ops import GATING_OP, ROUTED_EXPERTS_OP
from moe_compiler.ir import MOE_OP, MoESpec
from moe_compiler.pipeline import PassContext, PassResult

aten = torch.ops.aten


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
            router = MoESpec.from_json(spec).router
            scale, gspec = None, spec
            if router.weight_scale:  # the gating op chooses and weights; the scale is applied here
                scale, bias = bias, None
                gspec = MoESpec.from_json(spec).replace(router=dataclasses.replace(router, weight_scale=False)).to_json()
            with graph.inserting_before(node):
                g = graph.call_function(GATING_OP, (logits, bias, gspec))
                ids = graph.call_function(operator.getitem, (g, 0))
                w = graph.call_function(operator.getitem, (g, 1))
            with fake_mode:
                g.meta["val"] = GATING_OP(logits.meta["val"], bias.meta["val"] if bias is not None else None, gspec)
                ids.meta["val"], w.meta["val"] = g.meta["val"]
            added = [g, ids, w]
            if scale is not None:
                with graph.inserting_before(node):
                    chosen = _node(graph, fake_mode, aten.index.Tensor, (scale, [ids]), added)
                    w = _node(graph, fake_mode, aten.mul.Tensor, (w, chosen), added)
            back = None
            if router.scales_input:
                with graph.inserting_before(node):
                    x, ids, w, back = _scale_input(graph, fake_mode, x, ids, w, added)
            with graph.inserting_before(node):
                y = graph.call_function(ROUTED_EXPERTS_OP, (x, ids, w, w1, w3, w2, b1, b3, b2, spec))
            with fake_mode:
                y.meta["val"] = ROUTED_EXPERTS_OP(*[a.meta["val"] if isinstance(a, torch.fx.Node) else a
                                                    for a in y.args])
            added.append(y)
            if back is not None:
                with graph.inserting_before(node):
                    y = back(y)
            for n in added:
                n.meta["moe_compiler_pass"] = self.name
            y.meta["moe_spec"] = node.meta.get("moe_spec")
            node.replace_all_uses_with(y)
            graph.erase_node(node)
            n_done += 1
        if n_done:
            gm.recompile()
        return PassResult(gm, bool(n_done), {"gating_fused": n_done})


def _node(graph, fake_mode, target, args, added, kwargs=None):
    """A new call of an ATen op with its fake value."""
    n = graph.call_function(target, args, kwargs or {})
    with fake_mode:
        n.meta["val"] = target(*[_fake(a) for a in args], **{k: _fake(v) for k, v in (kwargs or {}).items()})
    added.append(n)
    return n


def _fake(a):
    if isinstance(a, torch.fx.Node):
        return a.meta["val"]
    if isinstance(a, (list, tuple)):
        return type(a)(_fake(x) for x in a)
    return a


def _scale_input(graph, fake_mode, x, ids, w, added):
    """The experts' operands for an input-scaling router: (rows [T*k, H] = x[t] * w[t, j], their expert
    ids [T*k, 1], unit weights [T*k, 1], back), where back(y) inserts the nodes that take the experts'
    per-row output [T*k, H] to the layer's (each token's k rows summed, viewed as x), or back is None
    when that is y itself (top-1 and x already [T, H])."""
    xv = x.meta["val"]
    hidden, k = xv.shape[-1], w.meta["val"].shape[-1]
    shape = None
    if xv.dim() != 2:
        shape = [d if not isinstance(d, torch.SymInt) else _node(graph, fake_mode, aten.sym_size.int, (x, i), added)
                 for i, d in enumerate(xv.shape)]
        x = _node(graph, fake_mode, aten.view.default, (x, [-1, hidden]), added)
    scale = _node(graph, fake_mode, aten._to_copy.default, (w,), added, {"dtype": xv.dtype})
    if k == 1:
        rows = _node(graph, fake_mode, aten.mul.Tensor, (x, scale), added)
    else:
        x3 = _node(graph, fake_mode, aten.unsqueeze.default, (x, 1), added)
        s3 = _node(graph, fake_mode, aten.unsqueeze.default, (scale, -1), added)
        rows = _node(graph, fake_mode, aten.view.default,
                     (_node(graph, fake_mode, aten.mul.Tensor, (x3, s3), added), [-1, hidden]), added)
        ids = _node(graph, fake_mode, aten.view.default, (ids, [-1, 1]), added)
        w = _node(graph, fake_mode, aten.view.default, (w, [-1, 1]), added)
    ones = _node(graph, fake_mode, aten.ones_like.default, (w,), added)
    if k == 1 and shape is None:
        return rows, ids, ones, None

    def back(y):
        if k > 1:  # each token's k row outputs, summed in fp32 as the reference does
            y = _node(graph, fake_mode, aten.view.default, (y, [-1, k, hidden]), added)
            y = _node(graph, fake_mode, aten.sum.dim_IntList, (y, [1]), added, {"dtype": torch.float32})
            if xv.dtype != torch.float32:
                y = _node(graph, fake_mode, aten._to_copy.default, (y,), added, {"dtype": xv.dtype})
        return y if shape is None else _node(graph, fake_mode, aten.view.default, (y, shape), added)

    return rows, ids, ones, back
