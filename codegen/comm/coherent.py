"""Context-coherent expert parallelism (ExFlow) for a stack of residual MoE blocks, on the executor.

Executor-level only: the sparse_collectives pass does not emit it (its option accepts
"all_to_all" and "hierarchical"); benchmarks and callers with their own routing use it directly.

The stack is  state_{l+1} = state_l + sum_j w[t, l, j] * expert_{l, e[t, l, j]}(state_l)  (top-k),
with routing given per token (e.g. a recorded trace) by ``route(layer, meta_rows) -> (ids, weights)``.
A token does not go home between layers; it lives on the rank of one of its experts (its "anchor":
the rank holding most of its k experts, preferring the rank it is on; see anchor_slot):

    per layer, on the rank where token t resides:
      dispatch   all_to_all: one state row to each distinct rank holding      <= k rows; none for experts
                 some of its k experts (ids/weights of those experts ride along)   on this rank
      experts    p_r = sum of w_j * expert_j(state) over the experts on rank r (slot order)
      combine    all_to_all: p_r of every rank r != anchor to the anchor       <= k - 1 rows (none for top-1)
      anchor     state' = state + sum_r p_r; the token now resides on the anchor
    after the last layer: one all_to_all home (the context made coherent for the rest of the model)

Two-all-to-all EP sends k rows out and k rows back home per layer; with an affinity-aware
placement (consecutive layers' experts of a token on one rank) most coherent dispatch rows stay
local. Shapes: x [T, H] this rank's tokens -> [T, H] in the same order.
"""
from __future__ import annotations

import torch

from moe_compiler.codegen.comm import executor
from moe_compiler.codegen.comm.ep import slot_destinations


def anchor_slot(dest: torch.Tensor, rank: int) -> torch.Tensor:
    """dest [n, k] ranks of each token's expert copies -> the slot [n] whose rank becomes the token's anchor:
    the rank holding most of its k experts (fewest partial outputs to move), then this rank (the
    residence), then the lower slot."""
    n, k = dest.shape
    same = (dest[:, :, None] == dest[:, None, :]).sum(-1)
    score = same * 4 + (dest == rank).long() * 2 + (torch.arange(k) == 0).long()[None, :]
    return score.argmax(1)


def coherent_stack_forward(x, route, experts, plans, group=None) -> torch.Tensor:
    """x [T, H] -> [T, H]. route(layer, meta [n, 2] int64 (home rank, home index)) -> ids [n, k], w [n, k];
    experts(layer, rows [m, H], expert ids [m]) -> [m, H] (this rank's experts); plans: EPPlan per layer."""
    hop = executor.world_hop(group if group is not None else executor.resolve_group("world"))
    T, H = x.shape
    state = x.float()
    meta = torch.stack([torch.full((T,), hop.rank, dtype=torch.int64), torch.arange(T, dtype=torch.int64)], 1)
    for layer, plan in enumerate(plans):
        ids, w = route(layer, meta)
        n, k = ids.shape
        dest = slot_destinations(ids.reshape(-1), plan, hop.rank).view(n, k)
        jstar = anchor_slot(dest, hop.rank)
        anchor = dest.gather(1, jstar[:, None])[:, 0]
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
        (xs, m, ws), _ = executor.route_rows([state[tok], cmeta, ew], dest[tok, j], hop, layer=f"layer{layer}",
                                             name="dispatch")
        # this rank's experts of each received row, weighted and summed in slot order
        part = torch.zeros_like(xs)
        for jj in range(k):
            has = m[:, jj] >= 0
            if has.any():
                part[has] = part[has] + experts(layer, xs[has], m[has, jj]).float() * ws[has, jj:jj + 1]
        first = m[:, k + 1] == 1
        # the anchor row stays here with its state; the other ranks' partial sums go to the anchor
        (yp, mp), _ = executor.route_rows([part[~first], m[~first]], m[~first, k], hop, layer=f"layer{layer}",
                                          name="combine")
        acc = part[first]
        meta = m[first][:, k + 2:k + 4]
        if yp.shape[0]:
            key = meta[:, 0] * (1 << 32) + meta[:, 1]
            order = torch.argsort(key)
            pos = order[torch.searchsorted(key[order], mp[:, k + 2] * (1 << 32) + mp[:, k + 3])]
            acc = acc.index_add(0, pos, yp)
        state = xs[first] + acc
    (home_rows, home_meta), _ = executor.route_rows([state, meta], meta[:, 0], hop, layer="home", name="home")
    out = torch.empty((T, H), dtype=torch.float32)
    out[home_meta[:, 1]] = home_rows
    return out.to(x.dtype)
