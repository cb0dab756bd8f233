"""sparse_collectives: expert parallelism on torch.distributed (one op per MoE layer, one schedule per graph).

On when ``options={"expert_parallel": True | {...}}`` (moe_compiler.runtime.expert_parallel) and
torch.distributed is initialised; otherwise the graph is unchanged (a logged reason says why).

Before:
    y = moe_compiler.moe(x, logits, bias, w1, w3, w2, b1, b3, b2, spec)        # x [T, H] this rank's tokens
After (modes all_to_all / hierarchical, option collectives "functional", the default):
    y = codegen.comm.functional.ep_layer(x, logits, bias, w1, w3, w2, b1, b3, b2, spec')   # [T, H]
        # a call that aot_autograd traces into functional collectives (all_to_all_single with SymInt
        # splits, wait_tensor) beside the rest of the graph; kept rows become buffers of the graph module
After (option collectives "op"):
    y = moe_compiler.ep_moe(x, logits, bias, w1, w3, w2, b1, b3, b2, spec')    # [T, H]
        # spec' notes += ("expert_parallel", {"group", "mode", "placement": ((ranks of e0), ...),
        #                                     "ranks_per_node", "overlap_degree"})
        # inside (codegen/comm/ep.py): local routing -> counts [G] -> all_to_all_single(counts)
        #   -> all_to_all_single(rows, data-dependent splits) -> this rank's grouped experts
        #   -> reverse all_to_all_single -> fp32 weighted combine

Inference graphs (option release_parameters, default on): each layer whose expert weights are whole
module tensors reads this rank's rows (its placement's experts; under FSSDP the experts it owns),
kept by runtime/ep_weights (spec note ("ep_weights", key)), and the whole tensors are released once
the graph is compiled (counter expert_weights_released).

With movement "weights" (or "auto" where the cost model's movement decision says so) a layer becomes
Hecate's FSSDP instead (codegen/comm/fssdp.py): experts move to the tokens.
    (y, need, handle) = moe_compiler.fssdp_moe(x, logits, bias, w1, w3, w2, b1, b3, b2, spec'')
    y' = getitem(..., 0)             # spec'' notes += ("fssdp", {"group", "owners", "materialize", ...})

Either way the graph compiles in one piece. The ep_moe op keeps its collectives inside one opaque
custom op with an autograd formula (its backward re-runs the forward's communication; the executor
records its traffic); functional collectives are Inductor's to place, and the backward graph holds
the reverse all-to-alls. Coherent chains and FSSDP layers always run as their ops.

Placement per layer: the option's placement (file or Placement; layers matched by the placement's
layer_names, else by order in the graph), else the ("placement", ...) note of plan_placement, else
contiguous (expert e on rank e * G // E). The per-layer collective schedule
(codegen/comm/schedule.py) is dumped as ``comm_schedule.rank<R>.json`` beside the pass dumps.
"""
from __future__ import annotations

import json
import logging
import math
import operator
from dataclasses import dataclass
from typing import ClassVar

import torch

from moe_compiler import _compat
from moe_compiler.codegen.comm.ep import NOTE, EP_MOE_OP, EPPlan
from moe_compiler.codegen.comm.functional import ep_layer as functional_ep_layer
from moe_compiler.codegen.comm import coherent, fssdp
from moe_compiler.codegen.comm.row_program import row_layout
from moe_compiler.codegen.comm.executor import group_name
from moe_compiler.codegen.comm.schedule import Schedule, plan_coherent_layer, plan_fssdp_layer, plan_layer
from moe_compiler.config import ConfigError
from moe_compiler.ir import MOE_OP, MoESpec
from moe_compiler.pipeline import DumpWriter, PassContext, PassResult
from moe_compiler.passes.coherent_chains import CHECKS, find_chains, layer_nodes
from moe_compiler.runtime import ep_weights
from moe_compiler.runtime.expert_parallel import check_rows, contiguous_rows, load_placement, normalize_options

log = logging.getLogger(__name__)


def _layer_rows(spec: MoESpec, index: int, placement, num_ranks: int) -> tuple:
    where = f"expert_parallel placement for {spec.path or f'MoE layer {index}'}"
    if placement is not None:
        if placement.num_ranks != num_ranks:
            raise ConfigError(f"option expert_parallel['placement'] is for {placement.num_ranks} ranks; the "
                              f"expert-parallel group has {num_ranks}")
        names = list(placement.metadata.get("layer_names", ())) if isinstance(placement.metadata, dict) else []
        idx = names.index(spec.path) if spec.path and spec.path in names else index
        if idx >= placement.num_layers:
            raise ValueError(f"{where}: the placement has {placement.num_layers} layers, this is layer {idx}")
        return check_rows(placement.layers[idx], spec.num_experts, num_ranks, where)
    for n in spec.notes:
        if isinstance(n, (tuple, list)) and len(n) == 2 and n[0] == "placement":
            return check_rows(n[1], spec.num_experts, num_ranks, where + " (from plan_placement)")
    return contiguous_rows(spec.num_experts, num_ranks)


@dataclass(frozen=True)
class SparseCollectives:
    """Rewrite every moe op into ep_moe (dispatch/combine all-to-alls on torch.distributed)."""

    name: ClassVar[str] = "sparse_collectives"

    def call(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        opts = normalize_options(getattr(ctx.config, "expert_parallel", None))
        if opts is None:
            return PassResult(gm, False, {"skipped": 1})
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            log.warning("sparse_collectives: option 'expert_parallel' is set but torch.distributed is not "
                        "initialised; MoE layers stay single-process")
            return PassResult(gm, False, {"skipped_no_process_group": 1})
        group = opts["group"]
        gname = group if isinstance(group, str) else group_name(group)
        from moe_compiler.codegen.comm.executor import resolve_group

        pg = resolve_group(gname)
        size = dist.get_world_size(pg)
        mode, rpn = opts["mode"], opts["ranks_per_node"] or 0
        if mode == "hierarchical":  # ("auto" checks per layer, falling back to all_to_all)
            if gname != "world":
                raise ConfigError("option expert_parallel: mode 'hierarchical' needs group None (the world group)")
            if size % rpn:
                raise ConfigError(f"option expert_parallel['ranks_per_node']={rpn} must divide the world size {size}")
        placement = load_placement(opts["placement"])
        schedule = Schedule(ctx.graph_id)
        graph = gm.graph
        done = fssdp_done = 0
        layers = [n for n in graph.nodes if n.op == "call_function" and n.target is MOE_OP]
        # routers that scale the experts' input or weight them per expert (Llama 4, Gemma 4): the ep_moe
        # op, the functional layer and FSSDP do that; coherent chains do not
        scaled = {n: _scaled_routing(MoESpec.from_json(n.args[-1])) for n in layers}
        scaled = {n: why for n, why in scaled.items() if why}
        not_coherent: dict = {}
        chained = 0
        kept = _KeptRows(gm, ctx, opts["release_parameters"], dist.get_rank(pg))
        if mode in ("coherent", "auto"):
            chained, not_coherent = self._emit_chains(gm, ctx, [n for n in layers if n not in scaled], opts,
                                                      placement, gname, size, schedule, kept)
            not_coherent.update(scaled)
        index_of = {n: i for i, n in enumerate(layers)}   # a layer's index in the graph (placement rows)
        if mode in ("coherent", "auto"):
            layers = [n for n in layers if n in not_coherent]
        for node in layers:
            i = index_of[node]
            spec = MoESpec.from_json(node.args[-1])
            rows = _layer_rows(spec, i, placement, size)
            reports = _reports(ctx, spec)
            why = _why_movement(spec, opts["movement"])
            moves_weights = _moves_weights(spec, opts["movement"])
            if moves_weights and _chunkable(node) is not True:
                why, moves_weights = f"FSSDP not possible: {_chunkable(node)}", False
                log.warning("sparse_collectives: %s stays expert-parallel (tokens move): %s", spec.path or f"layer {i}",
                            why)
            if moves_weights:
                plan = _fssdp_plan(spec, i, rows, gname, size, opts)
                self._emit_fssdp(graph, node, spec, plan, kept)
                for r in reports[:1]:
                    r.strategy = (f"FSSDP over {size} ranks: experts move to the tokens (materialize {plan.materialize}"
                                  + (f", top {plan.replicate} by load" if plan.materialize == "sparse" else "")
                                  + f", rematerialize {'on' if plan.rematerialize else 'off'}; {why})")
                schedule.layers.append(plan_fssdp_layer(plan.layer, size, [plan.owned(g) for g in range(size)],
                                                        plan.materialize, plan.rematerialize))
                fssdp_done += 1
                continue
            layer_mode = {"auto": _mode_from_cost_model(spec, gname, size, rpn),
                          "coherent": "all_to_all"}.get(mode, mode)
            if layer_mode == "hierarchical" and opts["overlap_degree"] == "auto":
                spec = _hierarchical_overlap_decision(spec, node, ctx, rpn, reports)
            chunks = _overlap_degree(spec, opts["overlap_degree"])
            plan = EPPlan(gname, layer_mode, rows, rpn if layer_mode == "hierarchical" else 0, chunks)
            if mode == "coherent":
                why = f"coherent mode does not apply: {not_coherent.get(node, 'not in a chain')}"
            elif mode == "auto" and spec.note("decision:ep_mode") == "single_all_to_all":
                why = f"{why}; no coherent chain: {not_coherent.get(node, 'not in a chain')}"
            for r in reports[:1]:
                r.strategy = f"expert parallel over {size} ranks: tokens move to the experts (mode {layer_mode}; {why})"
            new_spec = spec.replace(notes=spec.notes + ((NOTE, plan.to_json()),))
            new_spec = kept.note(new_spec, node.args[3:9], plan.local_experts(kept.rank))
            functional = opts["collectives"] == "functional"  # all_to_all or hierarchical
            for r in reports[:1]:
                r.strategy += "; functional collectives in the graph" if functional else "; in the ep_moe op"
                r.strategy += _chunking(chunks)
            with graph.inserting_before(node):
                if functional:
                    args, new_spec = _functional_operands(gm, node, new_spec, i)
                    ep = graph.call_function(functional_ep_layer, (*args, new_spec.to_json()))
                else:
                    ep = graph.call_function(EP_MOE_OP, (*node.args[:-1], new_spec.to_json()))
            ep.meta["val"] = node.meta["val"]
            ep.meta["moe_compiler_pass"] = self.name
            ep.meta["moe_spec"] = new_spec
            node.replace_all_uses_with(ep)
            graph.erase_node(node)
            per_rank = [[e for e, r in enumerate(rows) if g in r] for g in range(size)]
            schedule.layers.append(plan_layer(spec.path or f"layer{i}", layer_mode, size,
                                              (rpn if layer_mode == "hierarchical" else 0) or size, per_rank,
                                              chunks))
            done += 1
        done += chained
        released = kept.schedule_release(gm)
        if done or fssdp_done:
            gm.recompile()
            from moe_compiler.backend import _dump_root

            fname = f"comm_schedule.rank{dist.get_rank()}.json" if dist.get_world_size() > 1 else "comm_schedule.json"
            DumpWriter(_dump_root(ctx.config), ctx.graph_id).write(fname, schedule.to_json())
            log.info("sparse_collectives: %d MoE layer(s) expert-parallel (mode %s), %d FSSDP, over %d ranks",
                     done, mode, fssdp_done, size)
        return PassResult(gm, bool(done or fssdp_done), {"layers_expert_parallel": done, "layers_fssdp": fssdp_done,
                                                         "layers_coherent": chained,
                                                         "expert_weights_released": released,
                                                         "group_size": size if done or fssdp_done else 0})

    def _emit_chains(self, gm, ctx, layers, opts, placement, gname, size, schedule, kept) -> tuple[int, dict]:
        """Mode "coherent" (or "auto" where the cost model chose single_all_to_all): every chain of MoE
        layers joined by per-token ops becomes one coherent_moe_chain op. Returns (layers chained,
        {MoE node left out: why})."""
        index = {n: i for i, n in enumerate(layers)}
        specs = {n: MoESpec.from_json(n.args[-1]) for n in layers}
        candidates, why = [], {}
        for n in layers:
            if _moves_weights(specs[n], opts["movement"]):
                why[n] = "the layer moves weights (FSSDP)"
            elif opts["mode"] == "auto" and specs[n].note("decision:ep_mode") != "single_all_to_all":
                why[n] = f"the cost model chose {specs[n].note('decision:ep_mode')!r}"
            else:
                candidates.append(n)
        chains, reasons = find_chains(candidates, _param_test(gm, ctx.placeholder_paths, ctx.constant_placeholders),
                                      _graph_values(gm, ctx))
        why.update(reasons)
        if opts["mode"] == "auto":
            chains = [c for c in chains if _context_pays(c, ctx, specs, len(layers), why)]
        chained, emitted = 0, {}   # emitted: a chain's end node -> the op that replaced it
        for chain in chains:
            chain.start = emitted.get(chain.start, chain.start)   # a chain may start where the last one ended
            crosses = [l.context for l in chain.layers if l.context is not None]
            wanted = min(_overlap_degree(specs[l.moe], opts["overlap_degree"]) for l in chain.layers)
            overlap = 1 if crosses else wanted   # attention mixes the tokens of any chunks
            plans = [EPPlan(gname, "coherent", _layer_rows(specs[l.moe], index[l.moe], placement, size),
                            overlap_degree=overlap) for l in chain.layers]
            names = chain.names
            for layer, plan in zip(chain.layers, plans):
                spec = specs[layer.moe]
                for r in _reports(ctx, spec)[:1]:
                    r.strategy = (f"context-coherent expert parallel over {size} ranks, chain {names[0]} .. {names[-1]} "
                                  f"({len(names)} layers): one dispatch all-to-all per layer, top-k partials to the "
                                  f"token's anchor rank, tokens go home once after {names[-1]}"
                                  + ("; in the coherent_moe_chain op (functional collectives cover modes all_to_all "
                                     "and hierarchical)" if opts["collectives"] == "functional" else "")
                                  + (f"; {layer.context.describe(chain.token_dims)}" if layer.context else "")
                                  + (_chunking(overlap) if overlap == wanted else
                                     "; one token chunk (attention in the chain mixes the tokens of any chunks)"))
                per_rank = [[e for e, r in enumerate(plan.placement) if g in r] for g in range(size)]
                schedule.layers.append(plan_coherent_layer(
                    spec.path or layer.moe.name, size, per_rank, last=layer is chain.layers[-1], overlap_degree=overlap,
                    first_in_context_chain=bool(crosses) and layer is chain.layers[0],
                    context=layer.context.describe(chain.token_dims) if layer.context else None))
            chain_specs = [kept.note(specs[l.moe], l.moe.args[3:9], p.local_experts(kept.rank))
                           for l, p in zip(chain.layers, plans)]
            key, emitted[chain.end] = self._emit_chain(gm.graph, chain, plans, chain_specs)
            self._dump_chain(ctx, key, chain)
            chained += len(chain.layers)
            log.info("sparse_collectives: coherent chain %s (%d layers)", " -> ".join(names), len(names))
        for n, reason in why.items():
            if opts["mode"] == "coherent":
                log.info("sparse_collectives: %s: coherent mode does not apply (%s); two all-to-alls",
                         specs[n].path or n.name, reason)
        return chained, why

    def _emit_chain(self, graph, chain, plans, specs) -> tuple:
        """Replace the chain by one coherent_moe_chain op; returns (its program key, the op node)."""
        operands: list = []

        def take(nodes) -> tuple:  # operand indices; None stays None (the op's list holds tensors only)
            idx = []
            for n in nodes:
                idx.append(None if n is None else len(operands))
                if n is not None:
                    operands.append(n)
            return tuple(idx)

        programs, context_operands, masks = [], [], []
        for layer, plan, spec in zip(chain.layers, plans, specs):
            new_spec = spec.replace(notes=spec.notes + ((NOTE, plan.to_json()),))
            context = None
            if layer.context is not None:
                context, idx, mask_idx = _context_program(layer.context, take, chain.token_dims)
                context_operands += idx
                masks += mask_idx
            programs.append(coherent.ChainLayerProgram(
                new_spec, layer.hidden.module, layer.logits.module, layer.post.module, take(layer.hidden.free),
                take(layer.logits.free), take(layer.post.free), take(list(layer.moe.args[2:9])),
                layer.moe.meta["val"].dtype, context))
        state_dims, _ = row_layout(chain.start, chain.token_dims)
        out_dims, out_feat = row_layout(chain.end, chain.token_dims)
        program = coherent.ChainProgram(programs, state_dims, tuple(out_feat), chain.end.meta["val"].dtype,
                                        out_flat=out_dims == 1 and state_dims > 1,
                                        context_operands=tuple(context_operands), no_grad_operands=tuple(masks))
        key = coherent.register_chain(program)
        spec_text = json.dumps({"key": key, "layers": chain.names})
        with graph.inserting_before(chain.end):
            op = graph.call_function(coherent.COHERENT_CHAIN_OP, (chain.start, operands, spec_text))
        with _compat.fake_mode_of(graph.owning_module):
            op.meta["val"] = coherent.COHERENT_CHAIN_OP(
                chain.start.meta["val"], [o.meta["val"] for o in operands],
                spec_text)
        op.meta["moe_compiler_pass"] = self.name
        chain.end.replace_all_uses_with(op)
        inside = {chain.end}
        for layer in chain.layers:
            inside |= layer_nodes(layer)
        for n in list(inside):   # metadata checks of values the chain now computes inside the op
            for u in list(n.users):
                if u.target in CHECKS and not u.users:
                    graph.erase_node(u)
        order = {n: i for i, n in enumerate(graph.nodes)}
        for n in sorted(inside, key=order.__getitem__, reverse=True):
            if not n.users:
                graph.erase_node(n)
        return key, op

    def _dump_chain(self, ctx, key: str, chain) -> None:
        """coherent_<key>.py beside the pass dumps: the row programs each rank runs between the collectives."""
        from moe_compiler.backend import _dump_root

        text = [f"# coherent chain {key}: {' -> '.join(chain.names)}; state = {chain.start.name}, output = "
                f"{chain.end.name}\n# rows [n, *feat]; free operands = parameters (in the op's operand list)\n"]
        for layer, name in zip(chain.layers, chain.names):
            for what, prog in (("hidden", layer.hidden), ("router_logits", layer.logits), ("post", layer.post)):
                text.append(f"# ---- {name}: {what} (free: {[n.name for n in prog.free]})")
                text.append(prog.module.code.strip() + "\n")
            if layer.context is not None:
                c = layer.context
                for node, prog in zip(c.cut_nodes, c.cuts):
                    text.append(f"# ---- {name}: context cut {node.name} (all-gathered; free: "
                                f"{[n.name for n in prog.free]})")
                    text.append(prog.module.code.strip() + "\n")
                text.append(f"# ---- {name}: context region {c.state.name} -> {c.out.name}, once per home rank "
                            f"(free: {[n.name for n in c.free]}; per-token context: {[n.name for n in c.context]})")
                text.append(c.module.code.strip() + "\n")
        DumpWriter(_dump_root(ctx.config), ctx.graph_id).write(f"coherent_{key}.py", "\n".join(text))

    def _emit_fssdp(self, graph, node, spec: MoESpec, plan: "fssdp.FSSDPPlan", kept: "_KeptRows") -> None:
        new_spec = spec.replace(notes=spec.notes + ((fssdp.NOTE, plan.to_json()),))
        new_spec = kept.note(new_spec, node.args[3:9], plan.owned(kept.rank))
        with graph.inserting_before(node):
            op = graph.call_function(fssdp.FSSDP_MOE_OP, (*node.args[:-1], new_spec.to_json()))
            out = graph.call_function(operator.getitem, (op, 0))
        with _compat.fake_mode_of(graph.owning_module):
            op.meta["val"] = fssdp.FSSDP_MOE_OP(*[a.meta["val"] if isinstance(a, torch.fx.Node) else a for a in op.args])
        for n in (op, out):
            n.meta["moe_compiler_pass"] = self.name
            n.meta["moe_spec"] = new_spec
        out.meta["val"] = node.meta["val"]
        node.replace_all_uses_with(out)
        graph.erase_node(node)


class _KeptRows:
    """Inference graphs (option release_parameters): each layer whose expert weights are whole module
    tensors reads this rank's rows from runtime/ep_weights instead; once the graph is compiled the whole
    tensors are released, so the rank holds only its placement's experts."""

    def __init__(self, gm, ctx, enabled: bool, rank: int):
        self.ctx, self.rank, self.sources = ctx, rank, {}   # sources: placeholder node -> its whole tensor
        self.on = enabled and not ctx.training
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.value = {n: ctx.example_inputs[i] for i, n in enumerate(placeholders)
                      if ctx.placeholder_paths[i] is not None}   # module parameters and buffers
        self.why = ("option release_parameters is False" if not enabled else "a training graph" if ctx.training
                    else "")

    def note(self, spec: MoESpec, weight_nodes, experts) -> MoESpec:
        """spec, with the ("ep_weights", key) note when the rows of ``experts`` (this rank's: its
        placement's under EP, its owned ones under FSSDP) are kept."""
        if not self.on:
            return spec
        nodes = list(weight_nodes)
        values = [None if a is None else self.value.get(a) for a in nodes]
        whole = all(v is not None and v.shape[0] == spec.num_experts and ep_weights.releasable(v)
                    and all(u.target in _MOE_TARGETS for u in a.users)
                    for a, v in zip(nodes, values) if a is not None)
        if not whole:  # a copy beside a tensor that stays could go stale if the tensor is updated in place
            log.info("sparse_collectives: %s keeps its expert weights as given (computed in the graph, already "
                     "sharded, views of a larger tensor, or read by other ops too)", spec.path or "a layer")
            return spec
        key = ep_weights.keep(values, experts)
        self.sources.update({a: v for a, v in zip(nodes, values) if a is not None})
        return spec.replace(notes=spec.notes + ((ep_weights.NOTE, key),))

    def schedule_release(self, gm) -> int:
        """After the compile, release each kept tensor that nothing but ops given kept rows reads.
        Returns how many will be released."""
        if not self.on:
            if self.why:
                log.info("sparse_collectives: expert weights stay whole on every rank (%s)", self.why)
            return 0
        free = [v for n, v in self.sources.items() if all(reads_kept_rows(u) for u in n.users)]
        if free:
            self.ctx.after_compile.append(lambda: [ep_weights.release(v) for v in free])
        return len(free)


# a layer's op before and after this pass
_MOE_TARGETS = (MOE_OP, EP_MOE_OP, coherent.COHERENT_CHAIN_OP, fssdp.FSSDP_MOE_OP, functional_ep_layer)


def reads_kept_rows(node) -> bool:
    """Is node an expert-parallel op that computes with kept rows (never its whole weight operands)?"""
    if node.op != "call_function":
        return False
    if node.target in (EP_MOE_OP, fssdp.FSSDP_MOE_OP):
        return MoESpec.from_json(node.args[-1]).note(ep_weights.NOTE) is not None
    if node.target is coherent.COHERENT_CHAIN_OP:
        return all(lp.spec.note(ep_weights.NOTE) is not None for lp in coherent.program_of(node.args[-1]).layers)
    return False


def _functional_operands(gm, node, spec: MoESpec, index: int) -> tuple:
    """The ep_layer call's operands: the moe op's, with kept rows (option release_parameters) as buffers of
    the graph module in place of the whole weights (so tracing sees them as module state, not as
    tensors read from a registry), and the spec without the ep_weights note."""
    args = list(node.args[:-1])
    key = spec.note(ep_weights.NOTE)
    if key is None:
        return args, spec
    for slot, tensor in zip(range(3, 9), ep_weights.rows(key)):
        if tensor is None:
            continue
        name = f"_moe_ep_rows_{index}_{slot - 3}"
        gm.register_buffer(name, tensor)
        attr = gm.graph.get_attr(name)
        attr.meta["val"] = _compat.fake_like(gm, tensor)
        args[slot] = attr
    notes = tuple(n for n in spec.notes if not (isinstance(n, (tuple, list)) and n and n[0] == ep_weights.NOTE))
    return args, spec.replace(notes=notes)


def _scaled_routing(spec: MoESpec) -> str:
    """Why no coherent chain takes this layer (its routing weights scale the experts' input, or a
    per-expert factor scales them: the chain's router and experts callables do neither), or ""."""
    if spec.router.scales_input:
        return "its routing weights scale the experts' input (Llama 4)"
    if spec.router.weight_scale:
        return "a per-expert factor scales its routing weights (Gemma 4)"
    return ""


def _reports(ctx, spec: MoESpec) -> list:
    """explain()'s reports of this layer in this graph."""
    return [r for r in ctx.moe_layers if r.rewritten and r.path == spec.path and
            getattr(r, "graph_id", "") in ("", ctx.graph_id)]


def _context_program(link, take, token_dims):
    """A ContextLink -> (coherent.ContextProgram, operand indices of its per-token context operands, of its
    attention masks)."""
    from moe_compiler.codegen.comm.context_region import ContextProgram

    region_free = take(link.free)
    context = tuple(i for i, n in zip(region_free, link.free) if n in link.context)
    masks = tuple(i for i, n in zip(region_free, link.free) if n in link.masks)
    out_dims, out_feat = row_layout(link.out, token_dims)
    prog = ContextProgram(link.module, region_free, [p.module for p in link.cuts],
                          tuple(take(p.free) for p in link.cuts),
                          row_layout(link.state, token_dims)[0],
                          tuple(row_layout(n, token_dims)[0] for n in link.cut_nodes), out_dims, tuple(out_feat),
                          link.out.meta["val"].dtype, link.describe(token_dims),
                          repr([list(row_layout(n, token_dims)[1]) for n in link.cut_nodes or [link.state]]))
    return prog, context, masks


def _cost_decisions(ctx):
    """The cost_decisions pass as configured for this compile (its pass_options), to ask it again."""
    from moe_compiler.passes.cost_decisions import CostDecisions

    return CostDecisions(**ctx.config.pass_options.get("cost_decisions", {}))


def _context_pays(chain, ctx, specs, num_layers: int, why: dict) -> bool:
    """Mode "auto": does the cost model still choose the single all-to-all for every layer of the chain once
    the context all-gathers after it (attention follows) are counted? If not, says why for each layer."""
    costs = _cost_decisions(ctx)
    links = [layer for layer in chain.layers if layer.context is not None]
    tokens = max(1, _compat.size_hint(math.prod(chain.token_dims)))
    # context operands (masks, rotary tables) are all-gathered once per chain: spread over its regions per
    # token. Their size per token depends on this rank's batch, so where every rank must decide alike
    # (CostDecisions.every_rank) they are left out and the decision depends on the cut alone.
    once = 0 if costs.every_rank() else \
        math.ceil(sum(layer.context.context_values() for layer in links) / tokens / max(1, len(links)))
    for layer in links:
        d = costs.decide_ep_mode(specs[layer.moe], layer.moe.args[0].meta["val"], training=ctx.training,
                                 num_layers=num_layers,
                                 context_values=layer.context.per_token_values(chain.token_dims) + once)
        if d.choice != "single_all_to_all":
            for m in chain.layers:
                why[m.moe] = (f"the cost model chose {d.choice!r} once the context all-gather after "
                              f"{chain.names[chain.layers.index(layer)]} is counted ({d.why})")
            return False
    return True


def _graph_values(gm, ctx):
    """values(nodes) -> {node: value on the example inputs}, cached (each new set runs the graph once)."""
    from moe_compiler.passes.detect_moe import capture_values

    cache: dict = {}

    def values(nodes):
        missing = {n for n in nodes if n not in cache}
        if missing:
            cache.update(capture_values(gm, ctx.example_inputs, missing))
        return cache

    return values


def _param_test(gm, placeholder_paths, constants=()):
    """node -> True when its value comes from parameters/buffers/constants only (never from activations).
    constants: per placeholder, a module attribute lifted to an input (counts as a constant)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    params = {n for n, p in zip(placeholders, placeholder_paths) if p is not None}
    params |= {n for n, c in zip(placeholders, constants) if c}
    memo: dict = {}

    def is_param(n) -> bool:
        if n.op == "placeholder":
            return n in params
        if n.op == "get_attr":
            return True
        if n.op != "call_function":
            return False
        if n not in memo:
            memo[n] = all(is_param(a) for a in n.all_input_nodes)
        return memo[n]

    return is_param


def _mode_from_cost_model(spec: MoESpec, group_name: str, size: int, ranks_per_node: int) -> str:
    """mode "auto": the cost_decisions pass's ep_mode choice, where this group can run it."""
    choice = spec.note("decision:ep_mode")
    if choice == "hierarchical" and ranks_per_node and group_name == "world" and size % ranks_per_node == 0 \
            and ranks_per_node < size:
        return "hierarchical"
    if choice not in (None, "two_all_to_all"):
        log.info("sparse_collectives: %s: cost model chose %r; running all_to_all (%s)", spec.path or "layer", choice,
                 "this layer is in no coherent chain" if choice == "single_all_to_all"
                 else "hierarchical needs the world group and a ranks_per_node that divides it")
    return "all_to_all"


def _moves_weights(spec: MoESpec, movement: str) -> bool:
    """movement "weights" -> FSSDP; "auto" -> the cost_decisions pass's movement choice (EP when absent)."""
    if movement == "auto":
        return str(spec.note("decision:movement", "")).startswith("weights")
    return movement == "weights"


def _chunkable(node) -> "bool | str":
    """True when the layer's expert weights can form FSSDP chunks (one dtype), else the reason."""
    vals = [a.meta.get("val") for a in node.args[3:9] if isinstance(a, torch.fx.Node)]
    dtypes = sorted({str(v.dtype) for v in vals if isinstance(v, torch.Tensor)})
    if len(dtypes) > 1:
        return f"FSSDP chunks need expert weights of one dtype, this layer's are {dtypes}"
    return True


def _why_movement(spec: MoESpec, movement: str) -> str:
    if movement != "auto":
        return f"option movement {movement!r}"
    choice = spec.note("decision:movement")
    return f"cost model chose {choice!r}" if choice else "movement 'auto' without a cost-model decision: EP"


def _fssdp_plan(spec: MoESpec, index: int, rows: tuple, group_name: str, size: int, opts: dict) -> "fssdp.FSSDPPlan":
    multi = [e for e, r in enumerate(rows) if len(r) != 1]
    if multi:
        raise ConfigError(f"expert_parallel movement 'weights' (FSSDP) shards each expert on exactly one owner; the "
                          f"placement puts experts {multi[:8]} of {spec.path or f'MoE layer {index}'} on several ranks "
                          "(FSSDP replicates per iteration by itself: use a one-rank-per-expert placement)")
    replicate = opts["replicate"]
    if replicate == "auto":
        replicate = _replicated_experts(spec.note("decision:replicas"), spec.num_experts, size)
    return fssdp.FSSDPPlan(group_name, tuple(r[0] for r in rows), opts["materialize"],
                           min(int(replicate), spec.num_experts), opts["rematerialize"], opts["load_window"],
                           spec.path or f"layer{index}")


def _replicated_experts(choice, num_experts: int, size: int) -> int:
    """Experts with more than one replica in the cost model's replicas decision ("4*2,1*6" -> 2).

    Without the decision (pass disabled): a quarter of the experts."""
    if not choice:
        return max(1, num_experts // 4) if size > 1 else 0
    n = 0
    for run in str(choice).split(","):
        reps, count = run.split("*")
        n += int(count) if int(reps) > 1 else 0
    return n


def _overlap_degree(spec: MoESpec, option) -> int:
    """Token chunks of a layer: the option's int, or for "auto" the cost_decisions pass's overlap_degree
    decision (taken alike on every rank; 1 when the pass did not run)."""
    if option != "auto":
        return int(option)
    choice = spec.note("decision:overlap_degree")
    if choice is None:
        log.info("sparse_collectives: %s: overlap_degree 'auto' without a cost-model decision: one chunk",
                 spec.path or "layer")
    return int(choice or 1)


def _hierarchical_overlap_decision(spec: MoESpec, node, ctx, ranks_per_node: int, reports) -> MoESpec:
    """overlap_degree "auto" on a hierarchical layer: the cost_decisions pass priced the chunks of flat
    all-to-alls; asks it again for two-level ones over nodes of ``ranks_per_node`` ranks, and puts that
    decision in the spec's notes and the layer's report (explain() shows the one that runs)."""
    val = node.args[0].meta.get("val") if isinstance(node.args[0], torch.fx.Node) else None
    if val is None or spec.note("decision:overlap_degree") is None:
        return spec   # the pass did not run (or had no example value): _overlap_degree says so
    d = _cost_decisions(ctx).decide_hierarchical_overlap(spec, val, ranks_per_node=ranks_per_node)
    notes = tuple(n for n in spec.notes if not (isinstance(n, (tuple, list)) and n[0] == "decision:overlap_degree"))
    for r in reports[:1]:
        r.decisions = [(d.name, d.choice, d.why) if name == d.name else (name, choice, why)
                       for name, choice, why in r.decisions]
    return spec.replace(notes=notes + (d.note(),))


def _chunking(overlap_degree: int) -> str:
    """explain()'s note on token chunks: how many, and that their all-to-alls overlap compute."""
    if overlap_degree <= 1:
        return ""
    return (f"; {overlap_degree} token chunks, pipelined (one chunk's experts run while the other chunks' "
            f"all-to-alls are in flight)")
