"""hoist_prefetch: predict each offloaded layer's experts from an earlier gate input (Fate).

For offloaded layer m (graph order) and prefetch depth d, the source is layer m-d's gate input
(the tensor its router reads), or, for the first d layers, the embedding output. Layer m's router
subgraph (the nodes between its gate input and its logits, e.g. view -> mm with the router weight)
is copied with the source substituted, right after the source exists:

    h_j   = <layer j's gate input>                              # [T, H], j = m - d
    l_hat = <layer m's router subgraph>(h_j)                     # [T, E]   (hoisted copy)
    p_m   = moe_compiler.prefetch_experts(l_hat, bias_m, store, m, spec_m)   # [T, k+1], loads start
    ...   (layers j .. m-1 run while the experts load)
    y_m   = moe_compiler.offloaded_experts(x_m, ids_m, w_m, p_m, store, m, spec_m)

With prefetch_lookahead n, layer m is also predicted from the n-1 sources before that one (layer
m-d-1's gate input, ...; for prefetch_source "residual", the residual stream entering block m-1, ...),
farthest first, each prediction the next one's ``earlier`` input:

    p_far = moe_compiler.prefetch_experts(l_hat_far, bias_m, store, m, spec_m + ("prefetch_ahead", 1))
    p_m   = moe_compiler.prefetch_experts(l_hat, bias_m, store, m, spec_m, p_far)

The store queues a farther prediction's loads after every nearer one's, and a nearer prediction
drops the farther one's unstarted loads it no longer predicts.

The prediction only decides what is loaded early; layer m computes with the experts its own router
picks (mispredicted ones load on demand), so outputs never change. The hoisted nodes carry
meta["moe_compiler_pass"] = "hoist_prefetch" and show in the pass dumps; each layer's spec notes
where its prediction comes from, or why it has none.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import ClassVar

import torch

from moe_compiler import _compat
from moe_compiler.codegen.offload_ops import OFFLOADED_EXPERTS_OP, PREFETCH_EXPERTS_OP
from moe_compiler.codegen.ops import GATING_OP
from moe_compiler.ir import MoESpec
from moe_compiler.pipeline import PassContext, PassResult

_aten = torch.ops.aten

_GATE_SEARCH = 32  # values searched for the router's input, from the expert input back


def _router_slice(roots, gate_input, param_nodes):
    """Nodes computing roots from gate_input and parameters only (graph order), or None."""
    seen, stack, reached = set(), [r for r in roots if isinstance(r, torch.fx.Node)], False
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        if n is gate_input:
            reached = True
            continue
        if n.op == "placeholder":
            if n not in param_nodes:
                return None  # depends on another activation
            continue
        if n.op == "get_attr":
            continue
        seen.add(n)
        if n.op != "call_function":
            return None
        stack.extend(a for a in n.all_input_nodes)
    return seen if reached else None


def _gate(node, param_nodes):
    """(gate input, router slice, logits, bias) of an offloaded layer, or a reason string."""
    ids = node.args[1]
    while isinstance(ids, torch.fx.Node) and ids.target is _aten.view.default:  # an input-scaling router's
        ids = ids.args[0]                                                        # [T*k, 1] slot ids
    if not (isinstance(ids, torch.fx.Node) and ids.target is operator.getitem
            and getattr(ids.args[0], "target", None) is GATING_OP):
        return "its routing does not come from a gating op"
    logits, bias, _ = ids.args[0].args
    # the expert input, then what it is computed from (nearest first): the router may read an earlier
    # value than the experts do (Gemma 4 norms the residual twice; Llama 4's experts read x * weight)
    frontier, seen = [node.args[0]], set()
    while frontier and len(seen) < _GATE_SEARCH:
        candidate = frontier.pop(0)
        if not isinstance(candidate, torch.fx.Node) or candidate in seen or candidate in param_nodes:
            continue
        seen.add(candidate)
        nodes = _router_slice([logits, bias], candidate, param_nodes)
        if nodes is not None:
            return candidate, nodes, logits, bias
        if candidate.op == "call_function" and candidate.target not in _HEAVY:
            frontier.extend(candidate.all_input_nodes)
    return "its router does not read its expert input (or a value it is computed from) through parameters only"


_HEAVY = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.convolution.default,
          _aten._scaled_dot_product_flash_attention_for_cpu.default, _aten._scaled_dot_product_efficient_attention.default,
          _aten._scaled_dot_product_flash_attention.default}


def _residual_source(gate_input, param_nodes, limit: int = 64):
    """prefetch_source "residual": the residual stream entering the layer's block.

    The gate input is norm(x_mid) with x_mid = x_in + f(x_in) (attention); returns (x_in, the norm
    nodes from x_mid to the gate input, x_mid) or a reason string. x_mid is the nearest add of two
    activations the gate input follows from through parameters only; x_in is its operand the other
    operand is computed from."""
    seen, frontier = [], [gate_input]
    while frontier and len(seen) < limit:
        n = frontier.pop(0)
        if not isinstance(n, torch.fx.Node) or n in seen:
            continue
        seen.append(n)
        frontier.extend(n.all_input_nodes)
    for a in seen:   # (the gate input itself may be the add: a router without a norm)
        if a.op != "call_function" or a.target is not _aten.add.Tensor or len(a.args) < 2:
            continue
        lhs, rhs = a.args[:2]
        if not (isinstance(lhs, torch.fx.Node) and isinstance(rhs, torch.fx.Node)) or \
                lhs in param_nodes or rhs in param_nodes:
            continue
        norm = _router_slice([gate_input], a, param_nodes)
        if norm is None or any(n.target in _HEAVY for n in norm):   # a norm, not a block (attention)
            continue
        if _is_ancestor(lhs, rhs):
            return lhs, norm, a
        if _is_ancestor(rhs, lhs):
            return rhs, norm, a
    return "no residual add (x + f(x)) found before its norm"


def _is_ancestor(a, b, limit: int = 256) -> bool:
    seen, stack = set(), [b]
    while stack and len(seen) < limit:
        n = stack.pop()
        if n is a:
            return True
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return False


def _embedding(graph, hidden_size):
    for n in graph.nodes:
        if n.op == "call_function" and n.target is _aten.embedding.default:
            v = n.meta.get("val")
            if v is not None and v.shape[-1] == hidden_size:
                return n
    return None


def _depth(spec: MoESpec, option) -> int:
    if option != "auto":
        return int(option)
    choice = spec.note("decision:prefetch_depth")
    try:
        return max(1, int(choice))
    except (TypeError, ValueError):
        return 1


@dataclass(frozen=True)
class HoistPrefetch:
    """Insert cross-layer expert predictors and prefetches ahead of offloaded layers."""

    name: ClassVar[str] = "hoist_prefetch"

    def call(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        from moe_compiler.runtime import offload

        options = offload.normalize_options(getattr(ctx.config, "offload", None))
        graph = gm.graph
        layers = [n for n in graph.nodes if n.op == "call_function" and n.target is OFFLOADED_EXPERTS_OP]
        if options is None or not options["prefetch"] or not layers:
            return PassResult(gm, False, {})
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        params = {n for n, p in zip(placeholders, ctx.placeholder_paths + [None] * len(placeholders)) if p}
        fake_mode = _compat.fake_mode_of(gm)
        gates = [_gate(n, params) for n in layers]
        counters = {"layers_predicted": 0, "from_embedding": 0, "not_predicted": 0, "hoisted_nodes": 0}
        for m, node in enumerate(layers):
            spec = MoESpec.from_json(node.args[-1])
            note = self._hoist(gm, node, m, spec, gates, params, options, fake_mode, counters)
            spec = spec.replace(notes=spec.notes + (("prefetch", note),))
            node.args = node.args[:-1] + (spec.to_json(),)
            node.meta["moe_spec"] = spec
        graph.lint()
        gm.recompile()
        return PassResult(gm, counters["layers_predicted"] > 0, counters)

    def _hoist(self, gm, node, m, spec, gates, params, options, fake_mode, counters) -> str:
        target = gates[m]
        if isinstance(target, str):
            counters["not_predicted"] += 1
            return f"not predicted: {target}"
        gate_input, nodes, logits, bias = target
        residual = _residual_source(gate_input, params) if options["prefetch_source"] == "residual" else None
        if isinstance(residual, tuple):
            # layer m's norm and router, applied to the residual stream entering block m, m-1, ...
            nodes, gate_input = set(nodes) | set(residual[1]), residual[2]
        router = (gate_input, nodes, logits, bias)
        sources = self._sources(gm.graph, m, spec, gates, params, options, residual)
        if isinstance(sources[0], str):
            counters["not_predicted"] += 1
            return f"not predicted: {sources[0]}"
        made, skipped, earlier = [], [], None
        for ahead in reversed(range(len(sources))):  # farthest first: each feeds the next as `earlier`
            if isinstance(sources[ahead], str):
                skipped.append(sources[ahead])
                continue
            source, origin, depth = sources[ahead]
            pred = self._predictor(gm.graph, node, spec, router, source, ahead, earlier, options, fake_mode)
            if isinstance(pred, str):
                if ahead == 0:
                    for _, _, added in reversed(made):  # farther predictors already inserted: take them out
                        for n in reversed(added):
                            gm.graph.erase_node(n)
                    counters["not_predicted"] += 1
                    return f"not predicted: {pred.format(origin=origin)}"
                skipped.append(pred.format(origin=origin))
                continue
            made.append((origin, depth, pred[1]))
            earlier = pred[0]
        node.args = node.args[:3] + (earlier,) + node.args[4:]
        counters["layers_predicted"] += 1
        counters["hoisted_nodes"] += sum(len(added) for _, _, added in made)
        counters["from_embedding"] += sources[0][1] == "the embedding output"
        extra = options["prefetch_extra"]
        (origin, depth, _), farther = made[-1], made[-2::-1]
        ahead = f"{depth} layer(s) ahead" if depth else "during the block's attention"
        if isinstance(residual, str):
            origin += f"; prefetch_source 'residual' not used: {residual}"
        text = (f"predicted from {origin} ({ahead}): router copied ({len(router[1])} node(s)), "
                f"top-{min(spec.top_k + extra, spec.num_experts)} per token, experts ranked by votes")
        if farther:
            text += "; earlier, nearest first, from " + ", ".join(
                f"{o} ({d} layer(s) ahead; loads queued after nearer ones)" for o, d, _ in farther)
        if skipped:
            text += "; lookahead not used: " + "; ".join(skipped)
        return text

    def _sources(self, graph, m, spec, gates, params, options, residual) -> list:
        """[(source node, description, layers ahead) or a reason string] for lookahead 0 (the nearest
        source) .. prefetch_lookahead - 1; the first entry is a reason when layer m cannot be predicted."""
        lookahead = options["prefetch_lookahead"]
        out, seen = [], set()
        if isinstance(residual, tuple):
            out.append((residual[0], f"the residual stream {residual[0].name} entering the layer's block", 0))
            seen.add(residual[0])
            for ahead in range(1, lookahead):
                j = m - ahead
                if j < 0:
                    break
                if isinstance(gates[j], str):
                    out.append(f"layer {j} has no usable gate input")
                    break
                r = _residual_source(gates[j][0], params)
                if isinstance(r, str):
                    out.append(f"the residual stream entering layer {j}'s block: {r}")
                    break
                if r[0] in seen:
                    break
                seen.add(r[0])
                out.append((r[0], f"the residual stream {r[0].name} entering layer {j}'s block", ahead))
            return out
        depth = _depth(spec, options["prefetch_depth"])
        for ahead in range(lookahead):
            j = m - depth - ahead
            if j >= 0 and not isinstance(gates[j], str):
                source, origin = gates[j][0], f"layer {spec_path(gates, j)} gate input"
            elif j >= 0:
                out.append(f"the source layer {j} has no usable gate input")
                break
            else:
                source, origin = _embedding(graph, spec.experts.hidden_size), "the embedding output"
                if source is None:
                    out.append("no earlier gate input in this graph (no embedding output of width H)")
                    break
            if source in seen:  # the embedding output stands for every source before layer 0
                break
            seen.add(source)
            out.append((source, origin, depth + ahead))
        return out

    def _predictor(self, graph, node, spec, router, source, ahead, earlier, options, fake_mode):
        """Copy layer node's router onto source right after it exists and issue its prefetch;
        (prefetch node, the nodes added in graph order) or a reason ("{origin}" stands for the
        source's description)."""
        gate_input, nodes, logits, bias = router
        want, have = gate_input.meta["val"], source.meta["val"]
        reshape = None
        if str(tuple(want.shape)) != str(tuple(have.shape)):
            if want.dim() == 2 and isinstance(want.shape[-1], int) and have.shape[-1] == want.shape[-1]:
                reshape = [-1, int(want.shape[-1])]
            else:
                return f"{{origin}} has shape {tuple(have.shape)}, the router reads {tuple(want.shape)}"
        order = {n: i for i, n in enumerate(graph.nodes)}
        ext = [a for n in nodes for a in n.all_input_nodes if a not in nodes and a is not gate_input]
        anchor = max([source] + ext + ([earlier] if earlier is not None else []), key=lambda n: order[n])
        if order[anchor] >= order[node]:
            return "the router's inputs exist only after the layer runs"
        env, cursor, added = {}, anchor, []

        def put(make):
            nonlocal cursor
            with graph.inserting_after(cursor):
                new = make()
            new.meta["moe_compiler_pass"] = self.name
            cursor = new
            added.append(new)
            return new

        if reshape is not None:
            sub = put(lambda: graph.call_function(_aten.reshape.default, (source, reshape)))
            with fake_mode:
                sub.meta["val"] = have.reshape(reshape)
        else:
            sub = source
        env[gate_input] = sub
        for n in sorted(nodes, key=lambda n: order[n]):
            copy = put(lambda n=n: graph.node_copy(n, lambda a: env.get(a, a)))
            copy.meta.update({k: v for k, v in n.meta.items() if k == "val"})
            copy.meta["moe_compiler_pass"] = self.name
            env[n] = copy
        new_logits = env.get(logits, logits)
        new_bias = env.get(bias, bias) if isinstance(bias, torch.fx.Node) else bias
        store, layer = node.args[4], node.args[5]
        notes = (("prefetch_extra", options["prefetch_extra"]),) + ((("prefetch_ahead", ahead),) if ahead else ())
        pspec = spec.replace(notes=spec.notes + notes).to_json()
        args = (new_logits, new_bias, store, layer, pspec) + ((earlier,) if earlier is not None else ())
        pred = put(lambda: graph.call_function(PREFETCH_EXPERTS_OP, args))
        with fake_mode:
            pred.meta["val"] = PREFETCH_EXPERTS_OP(new_logits.meta["val"],
                                                   new_bias.meta["val"] if isinstance(new_bias, torch.fx.Node) else None,
                                                   store, layer, pspec)
        return pred, added


def spec_path(gates, index) -> str:
    g = gates[index]
    return str(index) if isinstance(g, str) else f"{index} ({g[0].name})"
