"""The expert-parallel MoE op: ``moe_compiler::ep_moe``, built on the collective executor.

sparse_collectives rewrites ``moe(x, L, bias, w1, w3, w2, b1, b3, b2, spec)`` into
``ep_moe(...same operands..., spec')`` where spec' carries the note ("expert_parallel", JSON of
{group, mode, ranks_per_node, overlap_degree, placement}). On every rank of the EP group:

    x [T, H], L [T, E]  (this rank's own tokens)
    ids [T, k]   = top-k routing, locally                      weights [T, k] fp32 (differentiable in L)
    dest [T*k]   = rank of each slot's expert (replicas: slots of an expert spread round-robin over them)
    -- per token chunk (overlap_degree chunks; in the forward, chunk c+1's dispatch and chunk c's
       combine are in flight while chunk c's experts run) --
    counts [G]   = scatter_add(dest)                           fixed size, exchanged with all_to_all_single
                   (pipelined forward: every chunk's first-hop counts in one [G, chunks] exchange)
    xr [S_recv, H], er [S_recv] = all_to_all_single(x[slot token], ids)     data-dependent splits
    yr [S_recv, H] fp32 = local grouped experts (this rank's weights only)
    ys [T*k, H]  = reverse all_to_all_single(yr)               back to the slots' home rank
    out [T, H]   = sum_k ys * weights                          same fp32 combine as the reference
    (hierarchical: each all_to_all is an intra-node then an inter-node one, Tutel 2DH)

Expert weights are either the full [E, ...] tensors (rows of other ranks' experts are never read;
their gradients are zero here) or only this rank's experts [E_local, ...] in ascending expert
order (what ``moe_compiler.shard_experts`` leaves). Backward (``ep_moe_backward``) re-runs the
forward under autograd, collectives included: the all-to-all's backward is the reverse all-to-all,
so hidden/router gradients return to the token's rank and expert gradients stay on the owner.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from moe_compiler import recording, reference
from moe_compiler.codegen.comm import executor
from moe_compiler.codegen.ops import gating_weights
from moe_compiler.ir import MoESpec, _spec, differentiable, grads_by_recompute, operand_grads
from moe_compiler.runtime import ep_weights

NOTE = "expert_parallel"
_OPERANDS = ("hidden", "router_logits", "score_bias", "w1", "w3", "w2", "b1", "b3", "b2")


@dataclass(frozen=True)
class EPPlan:
    """One layer's expert-parallel plan, as the spec note stores it."""

    group: str                 # process group name ("world" = default group)
    mode: str                  # "all_to_all" | "hierarchical"
    placement: tuple           # per expert: sorted group ranks holding a copy
    ranks_per_node: int = 0    # hierarchical: ranks of one node (0 = not hierarchical)
    overlap_degree: int = 1    # token chunks (Tutel's overlap degree)

    def to_json(self) -> str:
        return json.dumps({"group": self.group, "mode": self.mode, "placement": [list(r) for r in self.placement],
                           "ranks_per_node": self.ranks_per_node, "overlap_degree": self.overlap_degree},
                          sort_keys=True)

    @staticmethod
    def from_json(text: str) -> "EPPlan":
        d = json.loads(text)
        return EPPlan(d["group"], d["mode"], tuple(tuple(r) for r in d["placement"]), int(d["ranks_per_node"]),
                      int(d["overlap_degree"]))

    def local_experts(self, rank: int) -> list:
        return [e for e, ranks in enumerate(self.placement) if rank in ranks]


def plan_of(spec: MoESpec) -> EPPlan:
    for n in spec.notes:
        if isinstance(n, (tuple, list)) and len(n) == 2 and n[0] == NOTE:
            return _plan_cached(n[1])
    raise ValueError(f"ep_moe: spec of {spec.path or 'the layer'} has no {NOTE!r} note")


_PLANS: dict = {}


def _plan_cached(text: str) -> EPPlan:
    p = _PLANS.get(text)
    if p is None:
        p = _PLANS[text] = EPPlan.from_json(text)
    return p


# ------------------------------------------------------------------ the layer
def slot_destinations(flat_ids: torch.Tensor, plan: EPPlan, rank: int) -> torch.Tensor:
    """Expert id of each slot [S] -> group rank [S]; a replicated expert's slots go round-robin over its
    replicas (the n-th slot of expert e on this rank goes to replica (n + rank) % replicas)."""
    E = len(plan.placement)
    width = max(len(r) for r in plan.placement)
    table = torch.tensor([list(r) + [r[0]] * (width - len(r)) for r in plan.placement], dtype=torch.int64,
                         device=flat_ids.device)
    if width == 1:
        return table[flat_ids, 0]
    nrep = torch.tensor([len(r) for r in plan.placement], dtype=torch.int64, device=flat_ids.device)
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.zeros(E, dtype=torch.int64, device=flat_ids.device).scatter_add_(0, flat_ids,
                                                                                    torch.ones_like(flat_ids))
    starts = torch.cumsum(counts, 0) - counts
    occ = torch.empty_like(flat_ids)
    occ[order] = torch.arange(flat_ids.numel(), device=flat_ids.device) - starts[flat_ids[order]]
    return table[flat_ids, (occ + rank) % nrep[flat_ids]]


def local_weights(spec: MoESpec, weights, local: list) -> list:
    """This rank's rows [E_local, ...] of (w1, w3, w2, b1, b3, b2): the rows sparse_collectives kept when
    the spec names them (the module's whole tensors are then released), else selected from the operands."""
    key = spec.note(ep_weights.NOTE)
    if key is not None:
        return list(ep_weights.rows(key))
    return [_local_weight(w, local, spec.num_experts, n) for w, n in zip(weights, ep_weights.WEIGHT_NAMES)]


def _local_weight(w, local: list, num_experts: int, name: str):
    if w is None:
        return None
    ep_weights.check_not_released(w, f"ep_moe weight {name}")
    if w.shape[0] == len(local):
        return w
    if w.shape[0] == num_experts:
        return w.index_select(0, torch.tensor(local, dtype=torch.int64, device=w.device))
    raise ValueError(f"ep_moe: expert weight {name} has {w.shape[0]} rows; expected {num_experts} (all experts) or "
                     f"{len(local)} (this rank's experts {local})")


def _run_experts(xr, er, local_w, index, spec: MoESpec):
    """Received rows xr [R, H] of experts er [R] (index: local_index) -> fp32 [R, H] (unweighted outputs)."""
    li = index[er]
    ones = torch.ones((xr.shape[0], 1), dtype=torch.float32, device=xr.device)
    if torch.is_grad_enabled():
        yr = reference.experts_forward(xr, li.unsqueeze(1), ones, *local_w, spec.experts)
        if not yr.requires_grad:  # no rows here: keep the chain so every rank runs the same backward collectives
            yr = yr + xr.float().sum() * 0
        return yr
    from moe_compiler.codegen import torch_experts

    yr, _ = torch_experts.experts_forward(xr, li.unsqueeze(1), ones, *local_w, spec.experts)
    return yr.float()


def plan_hops(plan: EPPlan) -> tuple:
    """(hops, this process's rank in the plan's group): the group's one hop, or hierarchical's intra-node
    then inter-node hops (of the world group)."""
    if plan.mode == "hierarchical":
        return executor.node_hops(plan.ranks_per_node), executor.dist.get_rank()
    hop = executor.world_hop(executor.resolve_group(plan.group))
    return (hop,), hop.rank


def hop_destinations(dest: torch.Tensor, hop, plan: EPPlan) -> torch.Tensor:
    """Final group ranks dest [S] -> the ranks of this hop's group the rows go to (hierarchical: the
    final rank's position within a node, then its node)."""
    if hop.name == "world":
        return dest
    return dest % plan.ranks_per_node if hop.name == "intra_node" else dest // plan.ranks_per_node


def local_index(plan: EPPlan, rank: int, device) -> torch.Tensor:
    """[E] int64: each expert's row among this rank's local weights (ascending expert order), -1 if not here."""
    local = plan.local_experts(rank)
    index = torch.full((len(plan.placement),), -1, dtype=torch.int64, device=device)
    index[local] = torch.arange(len(local), dtype=torch.int64, device=device)
    return index


def slot_chunks(x, ids, plan: EPPlan, rank: int):
    """Per token chunk (Tutel's overlap degree: overlap_degree chunks, in token order), the chunk's
    slots: (rows [S, H] = each slot's token, meta [S, 2] int64 = (expert, final rank) of each slot)."""
    T, k = ids.shape
    flat = ids.reshape(-1)
    dest = slot_destinations(flat, plan, rank)
    token = torch.div(torch.arange(flat.numel(), device=x.device), k, rounding_mode="floor")
    chunks = max(1, int(plan.overlap_degree))
    for c in range(chunks):
        sl = slice((T * c // chunks) * k, (T * (c + 1) // chunks) * k)
        yield x.index_select(0, token[sl]), torch.stack([flat[sl], dest[sl]], 1)


def ep_experts(x, ids, local_w, spec: MoESpec, plan: EPPlan) -> torch.Tensor:
    """x [T, H], ids [T, k] -> per-slot expert outputs [T*k, H] fp32, computed on the experts' ranks.

    Without gradients (the op's forward) and with overlap_degree > 1 the chunks are pipelined as the
    schedule plans: chunk c+1's dispatch is in flight while chunk c's experts run, and chunk c's
    combine while the next chunks' experts run (Tutel's overlap). Under autograd (the backward's
    recompute) the chunks run one after another through the differentiable all-to-all."""
    layer = spec.path or "moe"
    hops, rank = plan_hops(plan)
    local = local_index(plan, rank, x.device)
    chunks = list(slot_chunks(x, ids, plan, rank))
    if len(chunks) > 1 and not torch.is_grad_enabled():
        return _pipelined_chunks(chunks, hops, local_w, local, spec, plan, layer)
    outs = []
    for xs, meta in chunks:
        routes = []
        for hop in hops:
            (xs, meta), route = executor.route_rows([xs, meta], hop_destinations(meta[:, 1], hop, plan), hop,
                                                    layer=layer, name=_step("dispatch", hop))
            routes.append(route)
        yr = _run_experts(xs, meta[:, 0], local_w, local, spec)
        for route in reversed(routes):
            yr = executor.reverse_rows(yr, route, name=_step("combine", route.hop))
        outs.append(yr)
    return torch.cat(outs, 0) if len(outs) > 1 else outs[0]


def _step(kind: str, hop) -> str:
    """The schedule's step name of a hop: "dispatch", "dispatch_intra_node", "combine_inter_node", ..."""
    return kind if hop.name == "world" else f"{kind}_{hop.name}"


def _pipelined_chunks(chunks, hops, local_w, local, spec: MoESpec, plan: EPPlan, layer: str) -> torch.Tensor:
    """ep_experts' chunks with their collectives in flight across the neighbouring chunks' experts;
    the first hop's counts of every chunk go in one exchange. Every rank issues the same collectives
    in the same order (empty chunks included), so the in-flight all-to-alls pair up across ranks."""
    first_hop = hops[0]
    dests = [hop_destinations(meta[:, 1], first_hop, plan) for _, meta in chunks]
    splits = executor.exchange_splits(dests, first_hop, layer, _step("dispatch", first_hop))   # one counts exchange
    dispatch = _ChunkDispatch(*chunks[0], splits[0], hops, plan, layer)
    combines = []
    for c in range(len(chunks)):
        following = _ChunkDispatch(*chunks[c + 1], splits[c + 1], hops, plan, layer) if c + 1 < len(chunks) else None
        xs, meta, routes = dispatch.finish()
        combines.append(_ChunkCombine(_run_experts(xs, meta[:, 0], local_w, local, spec), routes))
        dispatch = following
    return torch.cat([c.finish() for c in combines], 0)


class _ChunkDispatch:
    """One chunk's dispatch through the hops: the first hop's rows are issued at construction (their
    counts already exchanged: first_splits), each later hop when the one before has arrived (its
    destinations are in the received meta)."""

    def __init__(self, rows, meta, first_splits, hops, plan: EPPlan, layer: str):
        self.hops, self.plan, self.layer, self.routes = hops, plan, layer, []
        self.in_flight = self._issue(0, rows, meta, first_splits)

    def _issue(self, i, rows, meta, splits=None):
        hop = self.hops[i]
        dest = None if splits is not None else hop_destinations(meta[:, 1], hop, self.plan)
        return executor.start_route_rows([rows, meta], dest, hop, layer=self.layer, name=_step("dispatch", hop),
                                         splits=splits)

    def finish(self):
        """-> (rows [R, H] for this rank's experts, their meta [R, 2], the routes taken)."""
        for i in range(len(self.hops)):
            (rows, meta), route = self.in_flight.finish()
            self.routes.append(route)
            if i + 1 < len(self.hops):
                self.in_flight = self._issue(i + 1, rows, meta)
        return rows, meta, self.routes


class _ChunkCombine:
    """One chunk's expert outputs going back through the hops in reverse; the last hop is issued at
    construction, each earlier one when the later has arrived."""

    def __init__(self, y, routes):
        self.routes = list(reversed(routes))
        self.in_flight = executor.start_reverse_rows(y, self.routes[0], name=_step("combine", self.routes[0].hop))

    def finish(self):
        """-> the chunk's per-slot outputs [S, H] fp32 in slot order."""
        for i in range(len(self.routes)):
            y = self.in_flight.finish()
            if i + 1 < len(self.routes):
                route = self.routes[i + 1]
                self.in_flight = executor.start_reverse_rows(y, route, name=_step("combine", route.hop))
        return y


def route_tokens(hidden, router_logits, score_bias, spec: MoESpec) -> tuple:
    """This rank's tokens: (x [T, H], ids [T, k] chosen without gradient, weights [T, k] differentiable
    in the logits, and in the per-expert scale with RouterSpec.weight_scale)."""
    x = hidden.reshape(-1, hidden.shape[-1])
    logits = router_logits.reshape(x.shape[0], spec.num_experts)
    with torch.no_grad():
        ids, _ = reference.route(logits, score_bias, spec.router)
    weights = gating_weights(logits, ids, spec)
    if spec.router.weight_scale:  # Gemma 4: the [E] operand scales the chosen weights
        weights = weights * score_bias[ids]
    return x, ids, weights


def expert_rows(x, ids, weights, spec: MoESpec) -> tuple:
    """What the experts are sent: (rows, row_ids, combine_weights [T, k]).

    An ordinary router sends x [T, H] with ids [T, k] and combines the k outputs with weights [T, k].
    An input-scaling router (RouterSpec.scales_input, Llama 4) sends one row x * w_j per slot [T*k, H]
    with ids [T*k, 1] and sums the k outputs as they are (unit weights [T, k]).
    """
    if not spec.router.scales_input:
        return x, ids, weights
    rows, slot_ids, unit = reference.scaled_slots(x, ids, weights)
    return rows, slot_ids, unit.view(ids.shape)


def combine(per_slot, weights, hidden) -> torch.Tensor:
    """Per-slot expert outputs [T*k, H] and routing weights [T, k] -> hidden's shape and dtype (fp32 sum)."""
    T, k = weights.shape
    out = (per_slot.view(T, k, hidden.shape[-1]) * weights.float().unsqueeze(-1)).sum(1)
    return out.to(hidden.dtype).reshape(hidden.shape)


def ep_moe_forward(hidden, router_logits, score_bias, w1, w3, w2, b1, b3, b2, spec: MoESpec) -> torch.Tensor:
    """The op's semantics on this rank's tokens: returns hidden's shape and dtype."""
    plan = plan_of(spec)
    x, ids, weights = route_tokens(hidden, router_logits, score_bias, spec)
    _, rank = plan_hops(plan)
    local_w = local_weights(spec, (w1, w3, w2, b1, b3, b2), plan.local_experts(rank))
    rows, row_ids, combine_weights = expert_rows(x, ids, weights, spec)
    return combine(ep_experts(rows, row_ids, local_w, spec, plan), combine_weights, hidden)


# ------------------------------------------------------------------ custom ops
_LIB = torch.library.Library("moe_compiler", "FRAGMENT")
_LIB.define("ep_moe(Tensor hidden, Tensor router_logits, Tensor? score_bias, Tensor w1, Tensor? w3, Tensor w2, "
            "Tensor? b1, Tensor? b3, Tensor? b2, str spec) -> Tensor")
_LIB.define("ep_moe_backward(Tensor grad_out, Tensor hidden, Tensor router_logits, Tensor? score_bias, Tensor w1, "
            "Tensor? w3, Tensor w2, Tensor? b1, Tensor? b3, Tensor? b2, str spec) -> Tensor[]")


@torch.library.impl(_LIB, "ep_moe", "CompositeExplicitAutograd")
def _ep_moe(hidden, router_logits, score_bias, w1, w3, w2, b1, b3, b2, spec):
    s = _spec(spec)
    recording.observe_logits(s, router_logits, score_bias)
    with torch.no_grad():
        return ep_moe_forward(hidden, router_logits, score_bias, w1, w3, w2, b1, b3, b2, s)


@torch.library.register_fake("moe_compiler::ep_moe")
def _ep_moe_fake(hidden, router_logits, score_bias, w1, w3, w2, b1, b3, b2, spec):
    return hidden.new_empty(hidden.shape)


@torch.library.impl(_LIB, "ep_moe_backward", "CompositeExplicitAutograd")
def _ep_moe_backward(grad_out, hidden, router_logits, score_bias, w1, w3, w2, b1, b3, b2, spec):
    operands = dict(hidden=hidden, router_logits=router_logits, score_bias=score_bias, w1=w1, w3=w3, w2=w2,
                    b1=b1, b3=b3, b2=b2)

    def forward(hidden, router_logits, score_bias, w1, w3, w2, b1, b3, b2):
        return ep_moe_forward(hidden, router_logits, score_bias, w1, w3, w2, b1, b3, b2, _spec(spec))

    return grads_by_recompute(forward, operands, differentiable(spec), grad_out, collective=True)


@torch.library.register_fake("moe_compiler::ep_moe_backward")
def _ep_moe_backward_fake(grad_out, hidden, router_logits, score_bias, w1, w3, w2, b1, b3, b2, spec):
    operands = dict(hidden=hidden, router_logits=router_logits, score_bias=score_bias, w1=w1, w3=w3, w2=w2,
                    b1=b1, b3=b3, b2=b2)
    return [torch.empty_like(operands[n]) for n in differentiable(spec) if operands[n] is not None]


def _setup(ctx, inputs, output):
    ctx.present = [t is not None for t in inputs[:-1]]
    ctx.save_for_backward(*[t for t in inputs[:-1] if t is not None])
    ctx.spec = inputs[-1]


def _backward(ctx, grad_out):
    saved = iter(ctx.saved_tensors)
    operands = [next(saved) if p else None for p in ctx.present]
    return operand_grads(operands, torch.ops.moe_compiler.ep_moe_backward(grad_out.contiguous(), *operands, ctx.spec),
                         differentiable(ctx.spec), _OPERANDS)


torch.library.register_autograd("moe_compiler::ep_moe", _backward, setup_context=_setup)

EP_MOE_OP = torch.ops.moe_compiler.ep_moe.default
executor.runs_collectives(EP_MOE_OP, torch.ops.moe_compiler.ep_moe_backward.default)
