"""detect_moe: find MoE layers in a functional ATen graph and raise each to one moe_compiler.moe op.

Before (transformers 5 Mixtral block, grouped_mm experts; shapes in comments):

    x2d = view(x, [T, H])                              # [T, H]
    logits = mm(x2d, t(router_w))                      # [T, E]
    probs = _softmax(_to_copy(logits, f32), -1)        # [T, E]
    vals, ids = topk(probs, k)                         # [T, k]
    w = div(vals, sum(vals, [-1], keepdim))            # [T, k]
    ... sort / index / histc / cumsum / grouped_mm(w1) / silu * up / grouped_mm(w2) / index_put ...
    y = sum(view(weighted, [T, k, H]), [1])            # [T, H]

After:

    x2d = view(x, [T, H])
    logits = mm(x2d, t(router_w))                      # stays: aux losses may use it
    y = moe_compiler.moe(x2d, logits, None, gate_up_proj, None, down_proj, None, None, None, spec)

How a layer is proven (node metadata is never trusted):
 1. Anchor: a top-k over the last dim of a [T, E] tensor that derives from a matmul with an [E, H]
    parameter (the router). The logits node L is that matmul's output.
 2. Region: for a candidate output Y (a node after the top-k with the hidden state's shape and dtype),
    the backward slice of Y stopped at L's ancestors and at placeholders. Its inputs must be only:
    L, views of the hidden state, shape integers, constants, and parameters that classify as
    expert weights/biases ([E, ...] tensors, or E per-expert tensors stacked by the rewrite) and an
    optional [E] score bias (it reaches the top-k) or per-expert weight scale (it does not: Gemma 4).
    When the experts read another activation of the output's shape than the router (Gemma 4 norms
    the residual twice), that activation is the layer's hidden input instead. Later candidates are
    tried first, so the whole layer is taken.
 3. Spec: router and expert settings are read from the region's ops (patterns are data, below),
    with a few candidates where the graph alone is ambiguous (gate/up order, layout).
 4. Proof: each candidate spec's reference (moe_compiler.reference) must reproduce Y on the example
    inputs and on random inputs of the same shapes. A layer no candidate reproduces is left untouched
    and reported with the reason.
"""
from __future__ import annotations

import dataclasses
import logging
import operator
import re
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.fx

from moe_compiler import _compat, reference
from moe_compiler.ir import GATED_ONLY, MOE_OP, ExpertSpec, MoESpec, RouterSpec
from moe_compiler.passes.unrecognised_experts import unrecognised_expert_layers
from moe_compiler.pipeline import PassContext, PassResult

log = logging.getLogger(__name__)
aten = torch.ops.aten


def _ops(*names):
    """OpOverloadPackets/overloads by name, skipping ones this torch lacks."""
    out = set()
    for name in names:
        pkt_name, _, overload = name.partition(".")
        pkt = getattr(aten, pkt_name, None)
        if pkt is None:
            continue
        if overload:
            op = getattr(pkt, overload, None)
            if op is not None:
                out.add(op)
        else:
            out.update(getattr(pkt, o) for o in pkt.overloads())
    return frozenset(out)


# ---------------------------------------------------------------- patterns (data, not code paths)
VIEW_OPS = _ops("view", "_unsafe_view", "reshape", "alias", "squeeze", "unsqueeze", "flatten")
LAYOUT_OPS = VIEW_OPS | _ops("t", "transpose", "permute", "expand", "_to_copy", "clone", "contiguous")
ROUTER_MATMULS = _ops("mm", "addmm", "linear", "matmul")
SCORE_OPS = {"softmax": _ops("_softmax", "softmax", "_safe_softmax"), "sigmoid": _ops("sigmoid"),
             "sqrtsoftplus": _ops("softplus")}  # sqrt(softplus(x)) (DeepSeek-V4); the numeric proof checks the sqrt
TOPK_OPS = _ops("topk")
SUM_OPS = _ops("sum")
DIV_OPS = _ops("div")
MUL_OPS = _ops("mul")
ADD_OPS = _ops("add")
AMAX_OPS = _ops("amax", "max")
CLAMP_OPS = _ops("clamp", "clamp_max", "clamp_min")
SCATTER_OPS = _ops("scatter", "scatter_")
REPEAT_OPS = _ops("repeat", "expand", "repeat_interleave")
GATHER_OPS = _ops("index", "index_select", "gather")
ACTIVATION_OPS = {"silu": _ops("silu"), "gelu": _ops("gelu"), "relu": _ops("relu")}
TANH_OPS = _ops("tanh")
# an activation candidate is (name, *constants); the constants fill these ExpertSpec fields
_ACTIVATION_CONSTANTS = {"swiglu_oai": ("swiglu_alpha", "swiglu_limit"), "swiglu_softcap": ("gate_softcap", "up_softcap")}
GROUPED_GEMM_NAMES = {"transformers.grouped_mm_fallback": "transformers.grouped_mm",
                      "aten._grouped_mm": "grouped_mm", "aten.bmm": "batched_mm",
                      "aten.mm": "per_expert_mm", "aten.matmul": "per_expert_mm"}

FIX_GRAPH_BREAK = (
    "the expert computation is not in this graph: dynamo broke the graph inside the layer "
    "(transformers' 'eager' experts loop breaks at nonzero()). Fix, for models with stacked expert "
    "weights: model.set_experts_implementation('grouped_mm') (or 'batched_mm') before torch.compile; "
    "a model whose own expert loop breaks the graph (DBRX, JetMoE) keeps it"
)


@dataclass
class Router:
    topk: torch.fx.Node
    logits: torch.fx.Node  # L
    matmul: torch.fx.Node
    hidden_root: torch.fx.Node  # the activation the router reads (through views and casts)
    num_experts: int
    top_k: int
    weight_path: str
    ancestors: set = field(default_factory=set)  # of L, L included


@dataclass
class Region:
    output: torch.fx.Node  # Y
    nodes: set
    hidden: torch.fx.Node  # view of the hidden state with Y's shape
    activation_inputs: list
    param_inputs: list  # parameter placeholders (or their casts) the layer reads


@dataclass
class LayerPlan:
    router: Router
    region: Region
    candidates: list  # [(MoESpec, operand names -> node|list)]
    path: str
    shared_expert: str


@dataclass(frozen=True)
class DetectMoE:
    """Raise every proven MoE layer to one moe_compiler.moe op."""

    name: ClassVar[str] = "detect_moe"
    # check candidates numerically against the original subgraph (off = trust the structure)
    verify: bool = True
    # relative tolerance multiplier for the numerical proof (1.0 = dtype defaults)
    tolerance_scale: float = 1.0

    def call(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        from moe_compiler.explain import MoELayerReport

        graph = gm.graph
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        paths = dict(zip(placeholders, ctx.placeholder_paths + [None] * len(placeholders)))
        counts = {"layers_found": 0, "layers_raised": 0, "layers_rejected": 0, "existing_ops": 0, "topk_not_moe": 0}

        # Layers written with the op already (moe_compiler.MoELayer) are raised by construction.
        for n in list(graph.nodes):
            if n.op == "call_function" and n.target is MOE_OP:
                spec = MoESpec.from_json(n.args[-1])
                if not spec.path:
                    spec = spec.replace(path=_module_of(paths.get(n.args[3]) or ""), pattern="moe_compiler.moe")
                    n.args = (*n.args[:-1], spec.to_json())
                n.meta.setdefault("moe_compiler_pass", self.name)
                counts["existing_ops"] += 1
                counts["layers_found"] += 1
                ctx.moe_layers.append(MoELayerReport.from_spec(spec, True, "", ctx.graph_id))

        routers = find_routers(graph, paths)
        plans, rejects = [], []
        order = {n: i for i, n in enumerate(graph.nodes)}
        for i, r in enumerate(routers):
            limit = order[routers[i + 1].matmul] if i + 1 < len(routers) else len(order)
            options, reason = plan_layer(r, graph, paths, order, limit)
            if options is None:
                rejects.append((r, reason))
            else:
                plans.append(options)

        values = {}
        if plans and self.verify:
            needed = set()
            for p in (p for options in plans for p in options):
                needed |= {p.region.output, p.region.hidden, p.router.logits, *p.region.activation_inputs}
                needed |= set(p.region.param_inputs)
                # placeholders too: a graph with dynamic shapes passes its sizes (SymInt inputs) to the region
                needed |= _region_inputs(p.region)
            values = capture_values(gm, ctx.example_inputs, needed)

        changed = False
        for options in plans:
            accepted, reasons = None, []
            for p in options:
                for spec, operands in p.candidates:
                    if not self.verify:
                        accepted = (p, spec, operands)
                        break
                    ok, reason = verify_candidate(p, spec, operands, values, self.tolerance_scale)
                    if ok:
                        accepted = (p, spec, operands)
                        break
                    reasons.append(reason)
                if accepted is not None:
                    break
            if accepted is None:
                rejects.append((options[0].router, "no candidate reproduced the layer numerically ("
                                + "; ".join(dict.fromkeys(reasons)) + ")"))
                continue
            p, spec, operands = accepted
            rewrite(gm, p, spec, operands)
            changed = True
            counts["layers_found"] += 1
            counts["layers_raised"] += 1
            ctx.moe_layers.append(MoELayerReport.from_spec(spec, True, "", ctx.graph_id))

        for r, reason in rejects:
            if not _looks_like_moe(reason):
                counts["topk_not_moe"] += 1
                log.debug("top-k %s is not an MoE router: %s", r.topk.name, reason)
                continue
            counts["layers_found"] += 1
            counts["layers_rejected"] += 1
            ctx.moe_layers.append(MoELayerReport(
                path=_module_of(_module_of(r.weight_path)), num_experts=r.num_experts, top_k=r.top_k,
                rewritten=False, reason=reason, graph_id=ctx.graph_id))
            log.info("MoE layer at %s not rewritten: %s", _module_of(_module_of(r.weight_path)), reason)
        unclaimed = unrecognised_expert_layers(
            [paths.get(p) for p in placeholders], [_shape_of(p) for p in placeholders],
            [m.path for m in ctx.moe_layers],
            [(r.weight_path, reason) for r, reason in rejects if not _looks_like_moe(reason)], ctx.graph_id)
        counts["layers_unrecognised"] = len(unclaimed)
        ctx.moe_layers.extend(unclaimed)
        if changed:
            graph.eliminate_dead_code()
            gm.recompile()
        return PassResult(gm, changed, counts)


NOT_MOE_REASONS = ("parameters that are not expert weights", "no expert weights", "no node after the top-k",
                   "does not depend on the router", "reads another activation", "does not read the router logits")


def _shape_of(node):
    v = _val(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _looks_like_moe(reason: str) -> bool:
    """Rejected anchors that are plainly not MoE layers (a softmax+top-k elsewhere) are not reported."""
    return not any(r in reason for r in NOT_MOE_REASONS)


# ---------------------------------------------------------------- step 1: routers
def _through(n, ops):
    """Follow single-input ops in `ops` upwards from n."""
    while isinstance(n, torch.fx.Node) and n.op == "call_function" and n.target in ops and n.args:
        n = n.args[0]
    return n


def _val(n):
    return n.meta.get("val") if isinstance(n, torch.fx.Node) else None


def _static_int(x):
    """x as an int when it is a constant; None for symbolic sizes (int() on those would add a guard)."""
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    if isinstance(x, bool) or not isinstance(x, (int, torch.SymInt)) or not is_concrete_int(x):
        return None
    return int(x)


def find_routers(graph: torch.fx.Graph, paths: dict) -> list:
    routers = []
    for n in graph.nodes:
        if n.op != "call_function" or n.target not in TOPK_OPS:
            continue
        inp = n.args[0]
        v = _val(inp)
        if v is None or v.dim() != 2:
            continue
        dim = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", -1)
        if dim not in (-1, 1):
            continue
        e = _static_int(v.shape[-1])
        k = _static_int(n.args[1])
        if e is None or k is None:
            continue
        found = _find_router_matmul(inp, e, paths)
        if found is None:
            continue
        mm, weight_ph, x_in = found
        logits = mm
        while len(logits.users) == 1 and next(iter(logits.users)).target in VIEW_OPS:
            logits = next(iter(logits.users))
        r = Router(topk=n, logits=logits, matmul=mm, hidden_root=_through(x_in, LAYOUT_OPS),
                   num_experts=e, top_k=k, weight_path=paths.get(weight_ph) or "")
        r.ancestors = _ancestors(logits)
        routers.append(r)
    return routers


def _find_router_matmul(start, num_experts, paths, max_nodes=64):
    """Nearest matmul above `start` whose weight is an [E, H] (or [H, E]) parameter."""
    seen, frontier = set(), [start]
    while frontier and len(seen) < max_nodes:
        n = frontier.pop(0)
        if not isinstance(n, torch.fx.Node) or n in seen or n.op != "call_function":
            continue
        seen.add(n)
        if n.target in ROUTER_MATMULS:
            for a in n.all_input_nodes:
                ph = _through(a, LAYOUT_OPS)
                pv = _val(ph)
                if ph.op == "placeholder" and paths.get(ph) and pv is not None and pv.dim() == 2 \
                        and num_experts in (_static_int(pv.shape[0]), _static_int(pv.shape[1])):
                    others = [b for b in n.all_input_nodes if b is not a and _val(b) is not None and _val(b).dim() >= 2]
                    if others:
                        return n, ph, others[0]
        frontier.extend(n.all_input_nodes)
    return None


def _ancestors(node, expand=None):
    """node and the nodes it is computed from (only through nodes ``expand`` accepts, when given)."""
    out, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in out:
            continue
        out.add(n)
        if expand is None or n is node or expand(n):
            stack.extend(n.all_input_nodes)
    return out


def _module_of(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


# ---------------------------------------------------------------- step 2: regions
def _hidden_views(root):
    """Nodes that are pure views of `root` (same data, same element order), root included."""
    views, stack = {root}, [root]
    while stack:
        n = stack.pop()
        for u in n.users:
            if u.op == "call_function" and u.target in VIEW_OPS and u.args[0] is n and u not in views:
                views.add(u)
                stack.append(u)
    return views


def _forward_closure(start, order, limit):
    out, stack = set(), [start]
    while stack:
        n = stack.pop()
        for u in n.users:
            if u not in out and order[u] < limit:
                out.add(u)
                stack.append(u)
    return out


MAX_OUTPUT_CANDIDATES = 8  # later nodes of the hidden shape may be pure functions of the output (a norm, a scale)


def plan_layer(r: Router, graph, paths, order, limit):
    """Structurally valid layer plans (candidate output + spec candidates), latest output first."""
    chain, n = [], r.matmul
    while True:  # the router's input, then up through casts and views to the root activation
        nxt = [a for a in n.all_input_nodes if a is not None and _val(a) is not None and _val(a).dim() >= 2
               and not paths.get(_through(a, LAYOUT_OPS))] if n is r.matmul else \
            ([n.args[0]] if n.op == "call_function" and n.target in LAYOUT_OPS else [])
        if not nxt:
            break
        n = nxt[0]
        chain.append(n)
    xviews = set()
    for c in chain:
        xviews |= {v for v in _hidden_views(c) if v in r.ancestors}
    if not xviews:
        return None, "the router input has no shape information"
    fwd = _forward_closure(r.topk, order, limit)
    routed = _forward_closure(r.logits, order, limit)  # everything the routing decides
    cands = []
    for n in fwd:
        v = _val(n)
        if n.op != "call_function" or not isinstance(v, torch.Tensor):
            continue
        match = [x for x in sorted(xviews, key=order.get)
                 if _val(x).dtype == v.dtype and _same_shape(_val(x).shape, v.shape)]
        if match:
            cands.append((n, match[0]))
    if not cands:
        reaches_output = any(u.op == "output" for n in fwd | {r.topk} for u in n.users)
        return None, FIX_GRAPH_BREAK if reaches_output else "no node after the top-k has the hidden state's shape"
    last_reason, options = "", []
    for y, xnode in sorted(cands, key=lambda c: -order[c[0]]):
        region, reason = slice_region(r, y, xnode, xviews, paths)
        if region is None and "reads another activation" in reason:  # the experts' own input (Gemma 4)?
            region = slice_region(r, y, xnode, xviews, paths, routed)[0]
        if region is None:
            last_reason = reason
            continue
        candidates, reason = infer_specs(r, region, paths)
        if not candidates:
            last_reason = reason
            continue
        path = _common_module([paths.get(p) or "" for p in region.param_inputs] + [r.weight_path])
        shared = _shared_expert_kind(y, r, xviews)
        candidates = [(s.replace(path=path, shared_expert=shared), ops) for s, ops in candidates]
        options.append(LayerPlan(r, region, candidates, path, shared))
        if len(options) == MAX_OUTPUT_CANDIDATES:
            break
    if options:
        # latest output first: the whole layer if it is provable, else a smaller one (e.g. before a
        # scale the model applies to the layer's output)
        return options, ""
    if "no expert weights" in last_reason:
        reaches_output = any(u.op == "output" for n in fwd | {r.topk} for u in n.users)
        if reaches_output:
            return None, FIX_GRAPH_BREAK
    return None, last_reason


def _same_shape(a, b):
    return len(a) == len(b) and all(_compat.statically_equal(x, y) for x, y in zip(a, b))


def slice_region(r: Router, y, xnode, xviews, paths, routed=None):
    """The nodes between the router logits / hidden state / parameters and y, or (None, reason).

    With ``routed`` (the nodes that depend on the logits; plan_layer passes it when the plain slice
    read another activation), an activation of y's shape and dtype that does not depend on the
    logits and is not an ancestor of them ends the slice too: the experts may read another
    normalisation of the residual than the router (Gemma 4). It becomes the layer's hidden input when
    the layer reads no view of the router's input besides."""
    yv = _val(y)
    nodes, inputs, stack, other = set(), set(), [y], []
    while stack:
        n = stack.pop()
        if n in nodes or n in inputs:
            continue
        if n in r.ancestors or n.op in ("placeholder", "get_attr"):
            inputs.add(n)
            continue
        v = _val(n)
        if routed is not None and n is not y and n not in routed and n.op == "call_function" \
                and isinstance(v, torch.Tensor) and v.dtype == yv.dtype and _same_shape(v.shape, yv.shape) \
                and _through(n, LAYOUT_OPS).op != "placeholder":
            inputs.add(n)
            other.append(n)
            continue
        nodes.add(n)
        stack.extend(n.all_input_nodes)
    if r.topk not in nodes:
        return None, "candidate output does not depend on the router's top-k"
    act, params = [], []
    for n in inputs:
        v = _val(n)
        if n is r.logits or n in other:
            continue
        if n in xviews:
            act.append(n)
        elif n.op == "get_attr" or not isinstance(v, torch.Tensor):
            continue  # constants and shape integers
        elif n.op == "placeholder" and paths.get(n):
            params.append(n)
        elif n.op == "call_function" and n.target in LAYOUT_OPS and _through(n, LAYOUT_OPS).op == "placeholder" \
                and paths.get(_through(n, LAYOUT_OPS)):
            params.append(n)  # a parameter seen through a cast/view computed before the router
        elif v.numel() == 1 or v.dim() == 0:
            continue
        else:
            return None, f"the layer reads another activation ({n.name}, shape {tuple(v.shape)})"
    if r.logits not in inputs:
        return None, "the region does not read the router logits"
    if other:
        if act or len(other) > 1:
            n = other[-1]
            return None, f"the layer reads another activation ({n.name}, shape {tuple(_val(n).shape)})"
        xnode = other[0]  # the experts' own input: the op's hidden; the router keeps its logits
    return Region(output=y, nodes=nodes, hidden=xnode, activation_inputs=act,
                  param_inputs=sorted(params, key=lambda p: p.name)), ""


def _region_inputs(region):
    out = set()
    for n in region.nodes:
        out |= {a for a in n.all_input_nodes if a not in region.nodes}
    return out


_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def _expert_index(path):
    m = list(_INDEX.finditer(path or ""))
    return int(m[-1].group(1)) if m else None


def _first_use(node, region, order):
    uses = [order[u] for u in node.users if u in region.nodes]
    return min(uses) if uses else 1 << 30


def infer_specs(r: Router, region: Region, paths):
    """Spec candidates for the region, or ([], reason)."""
    E, k = r.num_experts, r.top_k
    H = _static_int(_val(region.hidden).shape[-1])
    order = {n: i for i, n in enumerate(r.topk.graph.nodes)}
    score_bias, weight_scale, w3d, b2d, loose = None, None, [], [], []
    # per-expert tensors first: E parameters whose paths differ only in an index ("experts.3.w1.weight")
    indexed = {}
    for p in region.param_inputs:
        path = paths.get(_through(p, LAYOUT_OPS)) or ""
        if _val(p).dim() in (1, 2) and _INDEX.search(path):
            indexed.setdefault((re.sub(r"\.\d+\.", ".*.", "." + path + "."), tuple(_val(p).shape)), []).append(p)
    per_expert = {id(p) for g in indexed.values() if len(g) == E for p in g}
    for p in region.param_inputs:
        v = _val(p)
        shape = [_static_int(s) for s in v.shape]
        if None in shape:
            return [], f"parameter {paths.get(_through(p, LAYOUT_OPS))} has a dynamic shape"
        if id(p) in per_expert:
            loose.append(p)
        elif shape[-1:] == [E] and v.numel() == E and score_bias is None and _feeds(p, r.topk, region):
            score_bias = p  # [E] or [1, E] (Ernie 4.5) correction bias used to choose experts
        elif shape == [E] and E > 1 and weight_scale is None and not _feeds(p, r.topk, region):
            weight_scale = p  # per-expert factor of the chosen weights (Gemma 4's per_expert_scale)
        elif v.dim() == 3 and shape[0] == E:
            w3d.append(p)
        elif v.dim() == 2 and shape[0] == E and E > 1:
            b2d.append(p)
        else:
            loose.append(p)
    stacked = False
    if loose:
        groups = {}
        for p in loose:
            path = paths.get(_through(p, LAYOUT_OPS)) or p.name
            key = (re.sub(r"\.\d+\.", ".*.", "." + path + "."), tuple(_val(p).shape))
            groups.setdefault(key, []).append(p)
        if any(len(g) != E for g in groups.values()):
            sizes = {k_[0].strip("."): len(g) for k_, g in groups.items()}
            return [], f"parameters that are not expert weights of {E} experts: {sizes}"
        wg = [g for (key, shape), g in groups.items() if len(shape) == 2]
        bg = [g for (key, shape), g in groups.items() if len(shape) == 1]
        for g in wg + bg:
            g.sort(key=lambda p: (_expert_index(paths.get(_through(p, LAYOUT_OPS)) or "") or 0, order[p]))
        if w3d or b2d:
            return [], "mixes stacked and per-expert expert weights"
        weights, biases, stacked = wg, bg, True
    else:
        weights, biases = w3d, b2d
    if len(weights) not in (2, 3):
        return [], f"found {len(weights)} expert weight tensors (no expert weights / need 2 or 3)"

    def first(w):
        return min(_first_use(x, region, order) for x in (w if isinstance(w, list) else [w]))

    weights = sorted(weights, key=first)
    biases = sorted(biases, key=first)
    down = weights[-1]
    ups = weights[:-1]
    orders = [ups + [down]]
    if len(ups) == 2:
        orders.append([ups[1], ups[0], down])

    def shape_of(w):
        v = _val(w[0] if isinstance(w, list) else w)
        s = [_static_int(x) for x in v.shape]
        return s[-2:] if not isinstance(w, list) else s

    try:
        router_specs = _router_candidates(r, region, score_bias is not None)
        if weight_scale is not None:
            if score_bias is not None:
                raise _Unsupported("the router has both a choice bias and a per-expert weight scale "
                                   "(one [E] operand holds either)")
            router_specs = [dataclasses.replace(rs, weight_scale=True) for rs in router_specs]
    except _Unsupported as e:
        return [], str(e)
    if not router_specs:
        return [], "could not read the routing function"
    acts = _activation_candidates(region)
    pattern = _pattern_name(region, stacked)
    cands = []
    for ws in orders:
        w1, w2 = ws[0], ws[-1]
        w3 = ws[1] if len(ws) == 3 else None
        (a1, b1_), (a2, b2_) = shape_of(w1), shape_of(w2)
        for transposed in (False, True):
            n1, h_in = (b1_, a1) if transposed else (a1, b1_)
            h_out, i_in = (b2_, a2) if transposed else (a2, b2_)
            if h_in != H or h_out != H:
                continue
            if w3 is not None:
                layouts = ["separate"] if n1 == i_in and shape_of(w3) == shape_of(w1) else []
            elif n1 == 2 * i_in:
                layouts = ["concat", "interleaved"]
            elif n1 == i_in:
                layouts = ["ungated"]
            else:
                layouts = []
            for layout in layouts:
                operands = _assign_biases(w1, w3, w2, biases, n1, i_in, H, shape_of)
                if operands is None:
                    continue
                for act in acts:
                    if layout == "ungated" and act[0] in GATED_ONLY:
                        continue
                    es = ExpertSpec(hidden_size=H, ffn_size=i_in, activation=act[0], layout=layout,
                                    transposed=transposed, has_bias=bool(biases),
                                    **dict(zip(_ACTIVATION_CONSTANTS.get(act[0], ()), act[1:])))
                    for rs in router_specs:
                        cands.append((MoESpec(router=rs, experts=es, pattern=pattern),
                                      {**operands, "score_bias": weight_scale if rs.weight_scale else score_bias}))
    if not cands:
        return [], f"expert weight shapes do not fit a gated MLP with hidden size {H}"
    return cands, ""


def _assign_biases(w1, w3, w2, biases, n1, i_size, H, shape_of):
    ops = {"w1": w1, "w3": w3, "w2": w2, "b1": None, "b3": None, "b2": None}
    if not biases:
        return ops
    want = [("b1", n1)] + ([("b3", i_size)] if w3 is not None else []) + [("b2", H)]
    if len(biases) != len(want):
        return None
    for (name, size), b in zip(want, biases):
        if shape_of(b)[-1] != size:
            return None
        ops[name] = b
    return ops


def _feeds(node, target, region):
    """Whether `node` reaches `target` through region nodes."""
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n is target:
            return True
        for u in n.users:
            if u in region.nodes and u not in seen:
                seen.add(u)
                stack.append(u)
    return False


def _scalar_args(n):
    return [a for a in n.args[1:] if isinstance(a, (int, float)) and not isinstance(a, bool)]


def _router_candidates(r: Router, region: Region, has_bias: bool):
    """Read the routing function from the ops between L and the experts."""
    pre = {n for n in region.nodes if _feeds(n, r.topk, region) or n is r.topk}
    post = region.nodes - pre
    T_k = _val(r.topk)[0].shape
    score = None
    for name, ops in SCORE_OPS.items():
        if any(n.target in ops for n in pre if n.op == "call_function"):
            score = name
            break
    topk_first = False
    if score is None:
        for name, ops in SCORE_OPS.items():
            if any(n.target in ops and _is_tk(n, T_k) for n in post):
                score, topk_first = name, True
                break
    if score is None:
        # Llama 4: the top-k values scattered into a [T, E] tensor of -inf, then scored elementwise
        # (sigmoid(-inf) = 0 for the experts not chosen): a score of the k values
        for name, ops in SCORE_OPS.items():
            if any(n.target in ops and _reads_scattered_topk(n, r.topk, region) for n in post):
                score, topk_first = name, True
                break
    if score is None:
        return []
    n_group, topk_group, group_score = 1, 1, "top2_sum"
    for n in pre:
        if n.target in TOPK_OPS and n is not r.topk:
            v = _val(n.args[0])
            g = _static_int(v.shape[-1])
            if v.dim() == 2 and g and g < r.num_experts and r.num_experts % g == 0:
                n_group, topk_group = g, _static_int(n.args[1])
    if n_group > 1 and any(n.target in AMAX_OPS for n in pre) and not any(
            n.target in TOPK_OPS and _val(n.args[0]).dim() == 3 for n in pre):
        group_score = "max"
    renorm, eps = False, 0.0
    scale = 1.0
    weight_path = {n for n in post if _is_tk(n, T_k)}
    for n in weight_path:
        if n.target in DIV_OPS and isinstance(n.args[1], torch.fx.Node):
            d = n.args[1]
            if d.target in ADD_OPS and _scalar_args(d):
                eps = float(_scalar_args(d)[0])
                d = d.args[0]
            if d.target in SUM_OPS:
                renorm = True
        if n.target in MUL_OPS and _scalar_args(n):
            scale *= float(_scalar_args(n)[0])
    for n in weight_path:
        if n.target in DIV_OPS and _scalar_args(n):
            scale /= float(_scalar_args(n)[0])
    base = dict(num_experts=r.num_experts, top_k=r.top_k, score_func=score, topk_before_score=topk_first,
                n_group=n_group, topk_group=topk_group, group_score=group_score, has_score_bias=has_bias,
                renormalize=renorm, renorm_eps=eps, scaling_factor=scale)
    out = [RouterSpec(**base)]
    if not renorm and score == "softmax" and not topk_first:
        out.append(RouterSpec(**{**base, "renormalize": True}))
    if _scores_scale_input(region, post, r.topk):
        out = [RouterSpec(**{**base, "scales_input": True})] + out
    return out


class _Unsupported(Exception):
    """A layer read correctly whose semantics no lowering supports (the message says which)."""


def _reads_scattered_topk(n, topk, region) -> bool:
    """Whether n's input is the top-k values scattered into a [T, E] tensor (through casts and views)."""
    src = n.args[0] if n.args and isinstance(n.args[0], torch.fx.Node) else None
    while src is not None and src in region.nodes and src.target in LAYOUT_OPS:
        src = src.args[0] if isinstance(src.args[0], torch.fx.Node) else None
    if src is None or src not in region.nodes or src.target not in SCATTER_OPS:
        return False
    return any(a.target is operator.getitem and a.args[0] is topk for a in src.all_input_nodes)


def _scores_scale_input(region, post, topk) -> bool:
    """Whether the hidden state (through views, casts, repeats and row gathers only, no GEMM) is
    multiplied by values derived from the top-k values (through views, casts, gathers, scatters and
    score functions): the weights scale the experts' input (Llama 4, torchtitan's score_before_experts)."""
    def upstream(n, through):  # nodes n reads through ``through`` region ops, n included
        return _ancestors(n, lambda m: m in region.nodes and (m.target in through or m.target is operator.getitem))

    hidden = set(region.activation_inputs) | {region.hidden}
    score_ops = frozenset().union(*SCORE_OPS.values())
    for n in post:
        if n.target not in MUL_OPS or len([a for a in n.args[:2] if isinstance(a, torch.fx.Node)]) != 2:
            continue
        a, b = n.args[:2]
        for x, w in ((a, b), (b, a)):
            if upstream(x, LAYOUT_OPS | REPEAT_OPS | GATHER_OPS) & hidden and \
                    topk in upstream(w, LAYOUT_OPS | GATHER_OPS | SCATTER_OPS | score_ops):
                return True
    return False


def _is_tk(n, T_k):
    v = _val(n)
    return isinstance(v, torch.Tensor) and v.dim() == 2 and _same_shape(v.shape, T_k)


def _activation_candidates(region: Region):
    ops = {n.target for n in region.nodes if n.op == "call_function"}
    found = []
    if ops & ACTIVATION_OPS["silu"]:
        found.append(("silu",))
    for n in region.nodes:
        if n.op == "call_function" and n.target in ACTIVATION_OPS["gelu"]:
            approx = n.kwargs.get("approximate", n.args[1] if len(n.args) > 1 else "none")
            found.append(("gelu_tanh",) if approx == "tanh" else ("gelu",))
    if ops & ACTIVATION_OPS["relu"]:
        found += [("relu",), ("relu2",)]  # relu2 squares it (Nemotron-H); the numeric proof tells them apart
    if ops & CLAMP_OPS and ops & SCORE_OPS["sigmoid"]:
        alpha, limit = 1.702, 7.0
        for n in region.nodes:
            if n.op != "call_function":
                continue
            if n.target in MUL_OPS and _scalar_args(n) and any(u.target in SCORE_OPS["sigmoid"] for u in n.users):
                alpha = float(_scalar_args(n)[0])
            if n.target in CLAMP_OPS:
                nums = [a for a in list(n.args[1:]) + list(n.kwargs.values()) if isinstance(a, (int, float))]
                if nums:
                    limit = float(max(abs(x) for x in nums))
        found.append(("swiglu_oai", alpha, limit))
    if ops & TANH_OPS and ops & SCORE_OPS["sigmoid"]:
        caps = _softcaps(region)
        if len(caps) == 2:  # which cap bounds the gate and which the up: the numeric proof tells
            found += [("swiglu_softcap", caps[0], caps[1]), ("swiglu_softcap", caps[1], caps[0])]
    if ops & SCORE_OPS["sigmoid"] and not found:
        found.append(("silu",))  # x * sigmoid(x) written by hand
    if not found:
        found = [("silu",), ("gelu",), ("gelu_tanh",), ("relu",), ("relu2",)]
    return list(dict.fromkeys(found))


def _softcaps(region: Region) -> list:
    """The constants c of soft caps c * tanh(v / c) in the region, in graph order (Inkling 2's SwiGLU)."""
    caps = []
    for n in region.nodes:
        if n.op != "call_function" or n.target not in TANH_OPS or not isinstance(n.args[0], torch.fx.Node):
            continue
        src = n.args[0]
        if src.target in DIV_OPS and _scalar_args(src):
            caps.append(float(_scalar_args(src)[0]))
        elif src.target in MUL_OPS and _scalar_args(src) and float(_scalar_args(src)[0]) != 0:
            caps.append(1.0 / float(_scalar_args(src)[0]))
    return caps


def _pattern_name(region: Region, stacked: bool) -> str:
    names = {str(n.target).rsplit(".", 1)[0] for n in region.nodes if n.op == "call_function"}
    for key, label in GROUPED_GEMM_NAMES.items():
        if key in names:
            if label == "per_expert_mm":
                return "masked_loop" if stacked and "aten.index" not in names else "per_expert_loop"
            return label
    return "unknown"


def _common_module(paths):
    parts = [p.split(".")[:-1] for p in paths if p]
    if not parts:
        return ""
    common = []
    for xs in zip(*parts):
        if len(set(xs)) != 1:
            break
        common.append(xs[0])
    return ".".join(common)


def _shared_expert_kind(y, r: Router, xviews):
    """'gated' / 'plain' when Y is added to a dense MLP of the same input (kept outside the op)."""
    n = y
    for _ in range(4):
        adds = [u for u in n.users if u.op == "call_function" and u.target in ADD_OPS]
        if adds:
            other = [a for a in adds[0].args if isinstance(a, torch.fx.Node) and a is not n]
            if not other:
                return "none"
            nodes, inputs, stack = set(), set(), [other[0]]
            while stack:
                m = stack.pop()
                if m in nodes or m in inputs:
                    continue
                if m in r.ancestors or m.op != "call_function":
                    inputs.add(m)
                    continue
                nodes.add(m)
                stack.extend(m.all_input_nodes)
            mms = [m for m in nodes if m.target in ROUTER_MATMULS]
            if not (inputs & xviews) or len(mms) < 2:
                return "none"
            gated = any(m.target in SCORE_OPS["sigmoid"] and isinstance(_val(m), torch.Tensor)
                        and _static_int(_val(m).shape[-1]) == 1 for m in nodes)
            return "gated" if gated else "plain"
        views = [u for u in n.users if u.op == "call_function" and u.target in VIEW_OPS]
        if len(views) != 1:
            return "none"
        n = views[0]
    return "none"


# ---------------------------------------------------------------- step 4: proof
class _Recorder(torch.fx.Interpreter):
    def __init__(self, gm, needed):
        super().__init__(gm)
        self.needed, self.values = needed, {}

    def run_node(self, n):
        out = super().run_node(n)
        if n in self.needed:
            self.values[n] = out
        return out


def capture_values(gm, example_inputs, needed):
    """Run the graph once on the example inputs, keeping the values of `needed` nodes.

    A graph with dynamic shapes takes its sizes as SymInt inputs: they run as their example values."""
    rec = _Recorder(gm, needed)
    inputs = [_compat.size_hint(a) if isinstance(a, torch.SymInt) else a for a in example_inputs]
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        rec.run(*inputs)
    return rec.values


def _materialize(x, values, syn=None):
    if x is None:
        return None
    if isinstance(x, list):
        return torch.stack([_materialize(p, values, syn) for p in x])
    return values[x]


def _tolerances(dtype, scale):
    if dtype in (torch.float16, torch.bfloat16):
        return dict(rtol=3e-2, atol=3e-2 * max(scale, 1e-3))
    return dict(rtol=2e-4, atol=2e-5 * max(scale, 1.0))


def verify_candidate(plan: LayerPlan, spec: MoESpec, operands, values, tol_scale=1.0):
    """Does `spec`'s reference reproduce the region's output (example and random inputs)?"""
    reg, r = plan.region, plan.router
    ops = {k: _materialize(v, values) for k, v in operands.items()}
    try:
        with torch.no_grad():
            for trial in range(2):
                if trial == 0:
                    hidden, logits, expected = values[reg.hidden], values[r.logits], values[reg.output]
                else:
                    hidden, logits, expected = _random_trial(plan, values)
                got = reference.moe_forward(hidden, logits, ops["score_bias"], ops["w1"], ops["w3"], ops["w2"],
                                            ops["b1"], ops["b3"], ops["b2"], spec)
                scale = float(expected.detach().abs().float().nan_to_num(0, 0, 0).max()) if expected.numel() else 1.0
                tol = _tolerances(expected.dtype, scale)
                torch.testing.assert_close(got.float(), expected.float(), equal_nan=True,
                                           rtol=tol["rtol"] * tol_scale, atol=tol["atol"] * tol_scale)
    except AssertionError as e:
        first = str(e).strip().splitlines()
        return False, f"{spec.experts.activation}/{spec.experts.layout}: " + " ".join(first[:3])
    except Exception as e:  # a candidate that cannot even run does not match
        return False, f"{type(e).__name__}: {e}"
    return True, ""


def _random_trial(plan: LayerPlan, values):
    """Evaluate the region on random hidden states and logits of the example's shapes."""
    reg, r = plan.region, plan.router
    root = values[reg.hidden]
    g = torch.Generator().manual_seed(1234)
    std = float(root.float().std()) if root.numel() > 1 else 1.0
    # drawn on the CPU (one generator for every device, so the trial is the same everywhere), then moved
    flat = (torch.randn(root.numel(), generator=g) * (std if std == std and std > 0 else 1.0)).to(root.device, root.dtype)
    lval = values[r.logits]
    lstd = float(lval.float().std()) if lval.numel() > 1 else 1.0
    logits = (torch.randn(lval.shape, generator=g) * (lstd if lstd == lstd and lstd > 0 else 1.0)).to(lval.device,
                                                                                                      lval.dtype)
    env = {}
    for a in reg.activation_inputs + [reg.hidden]:
        env[a] = flat.reshape(values[a].shape).to(values[a].dtype)
    env[r.logits] = logits
    order = {n: i for i, n in enumerate(r.topk.graph.nodes)}
    for n in sorted(reg.nodes, key=order.get):
        args = torch.fx.node.map_arg(n.args, lambda a: env[a] if a in env else values[a])
        kwargs = torch.fx.node.map_arg(n.kwargs, lambda a: env[a] if a in env else values[a])
        env[n] = n.target(*args, **kwargs)
    return env[reg.hidden], logits, env[reg.output]


# ---------------------------------------------------------------- rewrite
def rewrite(gm: torch.fx.GraphModule, plan: LayerPlan, spec: MoESpec, operands) -> torch.fx.Node:
    graph = gm.graph
    y = plan.region.output
    fake_mode = _compat.fake_mode_of(gm)

    def val(x):
        return x.meta["val"] if isinstance(x, torch.fx.Node) else x

    def node_for(x):
        if not isinstance(x, list):
            return x
        with graph.inserting_before(y):
            s = graph.call_function(aten.stack.default, ([node_for(p) for p in x],))
        with fake_mode:
            s.meta["val"] = torch.stack([val(p) for p in x])
        s.meta["moe_compiler_pass"] = DetectMoE.name
        return s

    args = [plan.region.hidden, plan.router.logits] + [node_for(operands[k]) for k in ("score_bias", "w1", "w3", "w2", "b1", "b3", "b2")]
    with graph.inserting_before(y):
        node = graph.call_function(MOE_OP, (*args, spec.to_json()))
    with fake_mode:
        node.meta["val"] = MOE_OP(*[val(a) for a in args], spec.to_json())
    node.meta["moe_compiler_pass"] = DetectMoE.name
    node.meta["moe_spec"] = spec
    y.replace_all_uses_with(node)
    _erase_region(graph, plan.region.nodes)
    return node


ASSERT_OPS = _ops("_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size")


def _erase_region(graph: torch.fx.Graph, region_nodes) -> None:
    """Delete the replaced layer's nodes that nothing outside uses any more.

    fx's eliminate_dead_code keeps custom ops (e.g. transformers.grouped_mm_fallback) and metadata
    asserts; region nodes are known to be pure, so they go once unused.
    """
    order = {n: i for i, n in enumerate(graph.nodes)}
    for n in sorted(region_nodes, key=order.get, reverse=True):
        for u in list(n.users):
            if u.op == "call_function" and u.target in ASSERT_OPS and not u.users:
                graph.erase_node(u)
        if not n.users:
            graph.erase_node(n)

