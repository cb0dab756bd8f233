"""Context-coherent expert parallelism (ExFlow): one dispatch all-to-all per MoE layer.

A token does not go home between MoE layers; it lives on the rank of one of its experts (its
"anchor") and the per-token work between layers (residual add, norm, router) runs there. Per
layer, on the rank where token t resides:

    route      ids [n, k], weights [n, k] from the token's state (its router, locally)
    dispatch   all_to_all: one state row to each distinct rank holding some   <= k rows; none for experts
               of its k experts (ids/weights of those experts ride along)          on this rank
    experts    p_r = sum of w_j * expert_j(state) over the experts on rank r (slot order, fp32)
    combine    all_to_all: p_r of every rank r != anchor to the anchor         <= k - 1 rows (none for top-1)
    anchor     state' = post(state, sum_r p_r); the token now resides on the anchor
    after the last layer: one all_to_all home (the context made coherent for the rest of the model)

Two-all-to-all EP sends k rows out and k rows back home per layer; with an affinity-aware
placement (consecutive layers' experts of a token on one rank) most coherent dispatch rows stay
local. The anchor is the destination rank that holds most of the token's predicted next-layer
experts (``predict``: Fate's trick, the next router applied to this layer's state; the choice
moves bytes, never results), then most of its current experts, then its current rank.

Two users of ``coherent_forward``:
  * ``coherent_stack_forward``: a residual stack with routing given per token (bench/ep.py, tests);
  * the ``moe_compiler::coherent_moe_chain`` op, which the sparse_collectives pass emits for a chain
    of MoE layers joined by per-token ops (row programs, row_program.py) or by attention, whose
    context is made coherent by all-gathers (context_region.py), mode "coherent".
Shapes: x [T, *feat] this rank's tokens -> [T, *feat_out] in the same order.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from moe_compiler import recording, reference
from moe_compiler.codegen.comm import executor
from moe_compiler.codegen.comm.context_region import ChainContext, ContextProgram
from moe_compiler.codegen.comm.ep import EPPlan, _run_experts, local_weights, plan_of, slot_destinations
from moe_compiler.codegen.ops import gating_weights
from moe_compiler.ir import MoESpec, grads_by_recompute


@dataclass
class CoherentLayer:
    """One MoE layer of a coherent chain, as callables on the rows a rank holds."""

    plan: EPPlan
    name: str
    # (state [n, *feat], meta [n, 2] (home rank, home index), ids [n, k] or None) -> ids [n, k] int64,
    # weights [n, k] (given ids: the weights of those experts)
    route: Callable
    # (state rows [c, *feat], ids [c, k] (-1: expert not on this rank), weights [c, k] fp32) -> fp32 [c, *out]
    experts: Callable
    # (state [n, *feat], moe output fp32 [n, *out]) -> next state [n, *feat']
    post: Callable
    # (state, meta) -> predicted expert ids of the NEXT layer [n, k'] (anchor hint), or None
    predict: Optional[Callable] = None
    # generator (state, meta, hop) -> (state', meta'): a context region after post (attention between
    # this layer and the next, context_region.ChainContext.step), yielding its exchanges; or None
    context: Optional[Callable] = None


def anchor_slot(dest: torch.Tensor, rank: int, prefer: torch.Tensor | None = None) -> torch.Tensor:
    """dest [n, k] ranks of each token's expert copies -> the slot [n] whose rank becomes the token's anchor.

    The number of combine rows does not depend on the choice; the next layer's dispatch does. Order:
    the rank holding most predicted next-layer experts (prefer [n, G] counts), then most of this
    layer's k experts, then this rank (the residence), then the lower slot."""
    n, k = dest.shape
    same = (dest[:, :, None] == dest[:, None, :]).sum(-1)
    score = same * 4 + (dest == rank).long() * 2 + (torch.arange(k, device=dest.device) == 0).long()[None, :]
    if prefer is not None:
        score = score + prefer.gather(1, dest).long() * 4 * (k + 1)
    return score.argmax(1)


def coherent_destinations(ids: torch.Tensor, plan: EPPlan, rank: int) -> torch.Tensor:
    """ids [n, k] on this rank -> the rank [n, k] each slot is sent to. A replicated expert's copy is
    chosen for locality: the copy on a rank holding most of the token's experts, then this rank's
    copy, then the round-robin spread of slot_destinations; one-copy experts go to their rank."""
    n, k = ids.shape
    spread = slot_destinations(ids.reshape(-1), plan, rank).view(n, k)
    if max(len(r) for r in plan.placement) == 1 or ids.numel() == 0:
        return spread
    width = max(len(r) for r in plan.placement)
    holds = _holds(plan, max(max(r) for r in plan.placement) + 1, ids.device)
    table = torch.tensor([list(r) + [-1] * (width - len(r)) for r in plan.placement], dtype=torch.int64,
                         device=ids.device)
    cand = table[ids]                                                   # [n, k, W] (-1: no copy)
    valid = cand >= 0
    c = cand.clamp(min=0)
    others = holds[ids].sum(1)                                          # [n, G] experts each rank holds
    # fewest distinct ranks first (a copy beside the token's other experts saves a dispatch row and a
    # combine row), then this rank's copy, then the round-robin spread
    score = others.gather(1, c.view(n, -1)).view(n, k, width) * 4 + (c == rank).long() * 2 \
        + (c == spread[:, :, None]).long()
    score = torch.where(valid, score, torch.full_like(score, -1))
    return c.gather(2, score.argmax(2, keepdim=True))[:, :, 0]


def _holds(plan: EPPlan, size: int, device) -> torch.Tensor:
    """[E, G] int64: 1 where rank g holds a copy of expert e."""
    holds = torch.zeros(len(plan.placement), size, dtype=torch.int64)
    for e, ranks in enumerate(plan.placement):
        holds[e, list(ranks)] = 1
    return holds.to(device)


def _rank_votes(ids: torch.Tensor, plan: EPPlan, size: int) -> torch.Tensor:
    """Predicted ids [n, k'] -> [n, G] how many of them each rank holds a copy of."""
    return _holds(plan, size, ids.device)[ids].sum(1)


def coherent_forward(x: torch.Tensor, layers: list, group=None, *, record: list | None = None,
                     replay: list | None = None) -> torch.Tensor:
    """x [T, *feat] (this rank's tokens) -> [T, *feat_out], through the layers' coherent dispatch.

    record: a list that receives each layer's (ids, anchor) of the rows routed here; replay: such a list,
    whose routing and anchors are used instead of recomputing them (a backward recompute must follow the
    forward's routing exactly: top-k ties can flip under the autograd path's different rounding)."""
    hop = _hop(group)
    return run_exchanges([coherent_steps(x, layers, hop, record=record, replay=replay)], hop, pipelined=False)[0]


def _hop(group):
    return executor.world_hop(group if group is not None else executor.resolve_group("world"))


@dataclass
class Exchange:
    """An all-to-all a coherent_steps generator asks its driver for: row i of every tensor goes to group
    rank dest[i]; the generator is sent back the received tensors."""

    tensors: list
    dest: torch.Tensor
    layer: str
    name: str


def run_exchanges(steps: list, hop, *, pipelined: bool) -> list:
    """Drive coherent_steps generators (one per token chunk) -> their outputs, in order.

    pipelined=False: each generator runs to its end in turn, every exchange a blocking (and, under
    autograd, differentiable) all-to-all. pipelined=True (no gradients): round robin, every exchange
    issued with async_op=True, so chunk c+1's dispatch is in flight while chunk c's experts run, and
    chunk c's combine while chunk c+1's do. Every chunk makes the same exchanges (empty ones
    included), so all ranks issue the same all-to-alls in the same order."""
    return _round_robin(steps, hop) if pipelined else [_in_turn(gen, hop) for gen in steps]


def _in_turn(gen, hop):
    try:
        request = next(gen)
        while True:
            received, _ = executor.route_rows(request.tensors, request.dest, hop, layer=request.layer,
                                              name=request.name)
            request = gen.send(received)
    except StopIteration as done:
        return done.value


def _round_robin(steps: list, hop) -> list:
    results, in_flight = [None] * len(steps), {}

    def resume(i, received=None):
        """Run chunk i up to its next exchange and issue it (or keep its output when it is done)."""
        try:
            request = next(steps[i]) if received is None else steps[i].send(received)
        except StopIteration as done:
            results[i] = done.value
            return
        in_flight[i] = executor.start_route_rows(request.tensors, request.dest, hop, layer=request.layer,
                                                 name=request.name)

    for i in range(len(steps)):
        resume(i)
    while in_flight:
        for i in sorted(in_flight):
            received, _ = in_flight.pop(i).finish()
            resume(i, received)
    return results


def coherent_steps(x: torch.Tensor, layers: list, hop, *, record: list | None = None, replay: list | None = None,
                   prologue: Optional[Callable] = None):
    """coherent_forward as a generator: yields each all-to-all as an Exchange, is sent the received
    tensors, and returns the output [T, *feat_out] (StopIteration.value). prologue(hop): a generator
    run first (the chain's context all-gather)."""
    if prologue is not None:
        yield from prologue(hop)
    T = x.shape[0]
    state = x
    meta = torch.stack([torch.full((T,), hop.rank, dtype=torch.int64, device=x.device),
                        torch.arange(T, dtype=torch.int64, device=x.device)], 1)
    for i, layer in enumerate(layers):
        ids, w = layer.route(state, meta, None if replay is None else replay[i][0])
        n, k = ids.shape
        dest = coherent_destinations(ids, layer.plan, hop.rank)
        if replay is not None:
            anchor = replay[i][1]
        else:
            prefer = None
            if layer.predict is not None and i + 1 < len(layers):
                with torch.no_grad():
                    prefer = _rank_votes(layer.predict(state, meta), layers[i + 1].plan, hop.size)
            anchor = dest.gather(1, anchor_slot(dest, hop.rank, prefer)[:, None])[:, 0]
        if record is not None:
            record.append((ids, anchor))
        # one row per (token, destination rank): the first slot of each rank carries the token's
        # experts on that rank ([k] ids, -1 elsewhere) and their weights (0 elsewhere)
        same = dest[:, :, None] == dest[:, None, :]                       # [n, k, k]
        carrier = ~torch.tril(same, diagonal=-1).any(-1)                   # first slot of its rank
        tok, j = carrier.nonzero(as_tuple=True)
        on_rank = same[tok, j]                                             # [c, k] slots on that rank
        eid = torch.where(on_rank, ids[tok], torch.full_like(ids[tok], -1))
        ew = torch.where(on_rank, w[tok].float(), torch.zeros_like(w[tok].float()))
        is_anchor = (dest[tok, j] == anchor[tok]).long()[:, None]
        cmeta = torch.cat([eid, anchor[tok, None], is_anchor, meta[tok]], 1)   # [c, k + 4]
        xs, m, ws = yield Exchange([state[tok], cmeta, ew], dest[tok, j], layer.name, "dispatch")
        part = layer.experts(xs, m[:, :k], ws)
        first = m[:, k + 1] == 1
        # the anchor row stays here with its state; the other ranks' partial sums go to the anchor
        yp, mp = yield Exchange([part[~first], m[~first]], m[~first, k], layer.name, "combine")
        acc = part[first]
        meta = m[first][:, k + 2:k + 4]
        key = meta[:, 0] * (1 << 32) + meta[:, 1]
        order = torch.argsort(key)
        pos = order[torch.searchsorted(key[order], mp[:, k + 2] * (1 << 32) + mp[:, k + 3])]
        acc = acc.index_add(0, pos, yp)
        state = layer.post(xs[first], acc)
        if layer.context is not None:
            state, meta = yield from layer.context(state, meta, hop)
    home_rows, home_meta = yield Exchange([state, meta], meta[:, 0], "home", "home")
    out = home_rows.new_zeros((T,) + tuple(home_rows.shape[1:]))
    return out.index_copy(0, home_meta[:, 1], home_rows)


def weighted_partials(rows: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, run) -> torch.Tensor:
    """rows [c, H], ids [c, k] (-1: not here), weights [c, k] -> fp32 [c, H_out]: sum_j w_j * run(rows_j, ids_j).

    run(rows [p, H], expert ids [p]) -> [p, H_out] unweighted; called once (also with p = 0, which
    keeps every rank's autograd graph the same)."""
    r, j = (ids >= 0).nonzero(as_tuple=True)
    y = run(rows.index_select(0, r), ids[r, j]).float() * weights[r, j, None]
    return y.new_zeros((rows.shape[0],) + tuple(y.shape[1:])).index_add(0, r, y)


def coherent_stack_forward(x, route, experts, plans, group=None, predict=None) -> torch.Tensor:
    """state_{l+1} = state_l + sum_j w_j * expert_j(state_l) with routing given per token.

    x [T, H] -> [T, H]. route(layer, meta [n, 2] int64 (home rank, home index)) -> ids [n, k], w [n, k];
    experts(layer, rows [m, H], expert ids [m]) -> [m, H] (this rank's experts); plans: EPPlan per layer;
    predict(layer, meta) -> predicted ids of layer + 1 (anchor hint) or None."""
    layers = []
    for l, plan in enumerate(plans):
        layers.append(CoherentLayer(
            plan, f"layer{l}", route=lambda s, m, ids, l=l: route(l, m),
            experts=lambda rows, ids, w, l=l: weighted_partials(rows, ids, w, lambda r, e: experts(l, r, e)),
            post=lambda s, acc: s + acc,
            predict=None if predict is None else (lambda s, m, l=l: predict(l, m))))
    return coherent_forward(x.float(), layers, group).to(x.dtype)


# ------------------------------------------------------------------ the compiled chain

@dataclass
class ChainLayerProgram:
    """One layer of a compiled chain: row programs and where its operands sit in the op's list."""

    spec: MoESpec                 # carries the ("expert_parallel", plan) note
    hidden: Callable              # (state rows, *free) -> (moe input rows [n, H],)
    logits: Callable              # (state rows, *free) -> (router logits [n, E],)
    post: Callable                # (state rows, moe output rows, *free) -> (next state rows,)
    hidden_free: tuple            # operand indices
    logits_free: tuple
    post_free: tuple
    weights: tuple                # operand indices of (score_bias, w1, w3, w2, b1, b3, b2)
    out_dtype: torch.dtype        # the MoE op's output dtype
    context: Optional[ContextProgram] = None   # the region after post, across attention


@dataclass
class ChainProgram:
    layers: list
    state_token_dims: int         # leading token dims of the state input (1: already [T, *feat])
    out_feat: tuple               # feature shape of the chain's output
    out_dtype: torch.dtype
    out_flat: bool = False        # the output is [T, *out_feat] while the state has several token dims
    context_operands: tuple = ()  # operand indices of per-token data from outside (gathered once per chain)
    no_grad_operands: tuple = ()  # operand indices read as attention masks (attention differentiates none)

    @property
    def crosses_context(self) -> bool:
        return any(lp.context is not None for lp in self.layers)

    def out_shape(self, state_shape) -> tuple:
        tokens = tuple(state_shape[:self.state_token_dims])
        if self.out_flat:
            n = 1
            for d in tokens:
                n = n * d
            tokens = (n,)
        return tokens + tuple(self.out_feat)


_CHAINS: dict = {}
_KEYS = itertools.count()


def register_chain(program: ChainProgram) -> str:
    """Keep a chain's programs for the op; returns the key its spec names."""
    key = f"chain{next(_KEYS)}"
    _CHAINS[key] = program
    return key


def program_of(spec: str) -> ChainProgram:
    key = json.loads(spec)["key"]
    if key not in _CHAINS:
        raise RuntimeError(f"coherent_moe_chain: no chain {key!r} in this process (the op is only valid in the "
                           "process that compiled it)")
    return _CHAINS[key]


def _chain_layers(program: ChainProgram, operands: list, rank: int, device, context: ChainContext | None = None
                  ) -> list:
    def free(idx):
        return [operands[j] for j in idx]

    layers = []
    for i, lp in enumerate(program.layers):
        spec, plan = lp.spec, plan_of(lp.spec)
        bias, *w = [None if j is None else operands[j] for j in lp.weights]
        local = plan.local_experts(rank)
        local_w = local_weights(spec, w, local)
        local_index = torch.full((spec.num_experts,), -1, dtype=torch.int64, device=device)
        local_index[local] = torch.arange(len(local), dtype=torch.int64, device=device)

        def route(state, meta, ids, lp=lp, bias=bias, spec=spec):
            logits = lp.logits(state, *free(lp.logits_free))[0]
            if ids is None:
                recording.observe_logits(spec, logits, bias)
                with torch.no_grad():
                    ids, _ = reference.route(logits, bias, spec.router)
            return ids, gating_weights(logits, ids, spec)

        def experts(rows, ids, w, lp=lp, spec=spec, local_w=local_w, local_index=local_index):
            h = lp.hidden(rows, *free(lp.hidden_free))[0]
            return weighted_partials(h, ids, w, lambda r, e: _run_experts(r, e, local_w, local_index, spec))

        def post(state, acc, lp=lp):
            return lp.post(state, acc.to(lp.out_dtype), *free(lp.post_free))[0]

        predict = None
        if i + 1 < len(program.layers):
            nxt = program.layers[i + 1]

            def predict(state, meta, nxt=nxt):
                logits = nxt.logits(state, *free(nxt.logits_free))[0]
                nbias = None if nxt.weights[0] is None else operands[nxt.weights[0]]
                return reference.route(logits, nbias, nxt.spec.router)[0]

        name = spec.path or f"layer{i}"
        step = None
        if lp.context is not None:
            def step(state, meta, hop, prog=lp.context, name=name):
                return context.step(prog, state, meta, hop, name)
        layers.append(CoherentLayer(plan, name, route, experts, post, predict, step))
    return layers


def chain_forward(state: torch.Tensor, operands: list, spec: str, *, record: list | None = None,
                  replay: list | None = None) -> torch.Tensor:
    """The op's semantics on this rank's tokens: state [*tokens, *feat] -> [*tokens, *out_feat].

    The tokens run through the chain in the plan's overlap_degree chunks (the chain is per-token, so
    chunks are independent; every rank runs the same number, empty ones included), pipelined when no
    gradient is taken (run_exchanges), one after another under autograd (the backward's recompute).
    record / replay: one list per chunk of coherent_forward's record= / replay=."""
    program = program_of(spec)
    plan = plan_of(program.layers[0].spec)
    hop = _hop(executor.resolve_group(plan.group))
    x = state.reshape((-1,) + tuple(state.shape[program.state_token_dims:]))
    context = None
    if program.crosses_context:
        context = ChainContext(operands, program.context_operands, tuple(state.shape[:program.state_token_dims]),
                               Exchange, [layer.context for layer in program.layers if layer.context is not None])
    layers = _chain_layers(program, operands, hop.rank, state.device, context)
    chunks = 1 if context is not None else max(1, int(plan.overlap_degree))
    bounds = [x.shape[0] * c // chunks for c in range(chunks + 1)]
    steps = []
    for c in range(chunks):
        log = {} if replay is None else {"replay": replay[c]}
        if record is not None:
            record.append([])
            log["record"] = record[-1]
        steps.append(coherent_steps(x[bounds[c]:bounds[c + 1]], layers, hop, **log,
                                    prologue=None if context is None else context.gather))
    outs = run_exchanges(steps, hop, pipelined=chunks > 1 and not torch.is_grad_enabled())
    out = torch.cat(outs, 0) if chunks > 1 else outs[0]
    return out.to(program.out_dtype).reshape(program.out_shape(state.shape))


_LIB = torch.library.Library("moe_compiler", "FRAGMENT")
_LIB.define("coherent_moe_chain(Tensor state, Tensor[] operands, str spec) -> Tensor")
_LIB.define("coherent_moe_chain_backward(Tensor grad_out, Tensor state, Tensor[] operands, str spec) -> Tensor[]")


def _differentiable(state, operands, spec) -> list:
    """Names of the inputs gradients are taken for: the state and every floating operand but attention
    masks (attention takes none for them)."""
    masks = program_of(spec).no_grad_operands
    return ["state"] + [f"op{i}" for i, t in enumerate(operands) if t.is_floating_point() and i not in masks]


@torch.library.impl(_LIB, "coherent_moe_chain", "CompositeExplicitAutograd")
def _chain(state, operands, spec):
    with torch.no_grad():
        return chain_forward(state, list(operands), spec)


@torch.library.register_fake("moe_compiler::coherent_moe_chain")
def _chain_fake(state, operands, spec):
    program = program_of(spec)
    return state.new_empty(program.out_shape(state.shape), dtype=program.out_dtype)


@torch.library.impl(_LIB, "coherent_moe_chain_backward", "CompositeExplicitAutograd")
def _chain_backward(grad_out, state, operands, spec):
    named = {"state": state, **{f"op{i}": t for i, t in enumerate(operands)}}
    routing: list = []
    with torch.no_grad():   # the forward again, as it ran (same kernels): its routing and anchors
        chain_forward(state, list(operands), spec, record=routing)

    def forward(**kw):
        return chain_forward(kw["state"], [kw[f"op{i}"] for i in range(len(operands))], spec, replay=routing)

    return grads_by_recompute(forward, named, _differentiable(state, operands, spec), grad_out,
                              collective=True)


@torch.library.register_fake("moe_compiler::coherent_moe_chain_backward")
def _chain_backward_fake(grad_out, state, operands, spec):
    named = {"state": state, **{f"op{i}": t for i, t in enumerate(operands)}}
    return [torch.empty_like(named[n]) for n in _differentiable(state, operands, spec)]


def _setup(ctx, inputs, output):
    state, operands, spec = inputs
    ctx.save_for_backward(state, *operands)
    ctx.spec = spec


def _backward(ctx, grad_out):
    state, *operands = ctx.saved_tensors
    grads = iter(torch.ops.moe_compiler.coherent_moe_chain_backward(grad_out.contiguous(), state, operands, ctx.spec))
    g_state = next(grads)
    taken = set(_differentiable(state, operands, ctx.spec))
    g_ops = [next(grads) if f"op{i}" in taken else None for i in range(len(operands))]
    return g_state, g_ops, None


torch.library.register_autograd("moe_compiler::coherent_moe_chain", _backward, setup_context=_setup)

COHERENT_CHAIN_OP = torch.ops.moe_compiler.coherent_moe_chain.default
executor.runs_collectives(COHERENT_CHAIN_OP, torch.ops.moe_compiler.coherent_moe_chain_backward.default)
