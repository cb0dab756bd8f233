"""Expert parallelism with functional collectives in the graph (option expert_parallel["collectives"]
= "functional"): the layer's dispatch and combine as traceable torch code, not an opaque op.

sparse_collectives emits ``ep_layer(x, logits, bias, w1, w3, w2, b1, b3, b2, spec')`` as one
call_function node (spec' carries the layer's EPPlan, as for ep_moe). aot_autograd traces through
it when the graph is compiled, so the ATen graph Inductor schedules holds, per layer:

    ids, weights  = top-k routing of this rank's tokens (weights differentiable in the logits)
    dest [T*k]    = rank of each slot's expert (replicas: round-robin, as ep_moe)
    send [G]      = per-destination slot counts: a one-hot sum, fixed size (no bincount)
    recv [G]      = _c10d_functional.all_to_all_single(send)          + wait_tensor
    s_i, r_i      = send.tolist(), recv.tolist(): unbacked SymInts, torch._check_is_size'd
    rows [sum r_i, H] = all_to_all_single(x[slot tokens sorted by dest], r, s)     (autograd: the
                        backward is the reverse all-to-all, _c10d_functional_autograd)
    eids          = all_to_all_single(slot experts, r, s)              (no gradient)
    y [sum r_i, H] = this rank's experts (moe_compiler.routed_experts in training, for its
                     backward; grouped_experts in inference)
    back [T*k, H] = all_to_all_single(y, s, r)
    out [T, H]    = sum_k back[slot] * weights                         fp32, as ep_moe

The function is meant to be traced (the backend always hands its graph to aot_autograd): called
eagerly, autograd through all_to_all_single_autograd gave wrong input and weight gradients on gloo
(torch 2.13; the traced backward, with its explicit wait_tensor nodes, is right).

Only the flat all_to_all mode with one token chunk (overlap_degree 1) is built this way; other
layers keep the ep_moe op (sparse_collectives logs why). The collectives are then Inductor's to
place: nothing here records their traffic (executor.record_traffic sees the op path only), and the
comm schedule dump describes the same steps.
"""
from __future__ import annotations

import torch
import torch.distributed._functional_collectives as funcol

from moe_compiler import reference
from moe_compiler.codegen.comm import executor
from moe_compiler.codegen.comm.ep import local_weights, plan_of, slot_destinations
from moe_compiler.codegen.ops import gating_weights
from moe_compiler.ir import _spec


def ep_layer(hidden, router_logits, score_bias, w1, w3, w2, b1, b3, b2, spec: str) -> torch.Tensor:
    """One expert-parallel MoE layer on this rank's tokens hidden [..., H] -> hidden's shape and dtype
    (module docstring). Expert weights: all experts [E, ...] or this rank's rows [E_local, ...]."""
    s = _spec(spec)
    plan = plan_of(s)
    group = executor.resolve_group(plan.group)
    size, rank = executor.dist.get_world_size(group), executor.dist.get_rank(group)
    H, E, k = hidden.shape[-1], s.num_experts, s.top_k
    x = hidden.reshape(-1, H)
    T = x.shape[0]
    logits = router_logits.reshape(T, E)
    with torch.no_grad():
        ids, _ = reference.route(logits, score_bias, s.router)
    weights = gating_weights(logits, ids, s)
    local = plan.local_experts(rank)
    local_w = local_weights(s, (w1, w3, w2, b1, b3, b2), local)
    local_index = torch.full((E,), -1, dtype=torch.int64, device=x.device)
    local_index[local] = torch.arange(len(local), dtype=torch.int64, device=x.device)

    flat = ids.reshape(-1)
    dest = slot_destinations(flat, plan, rank)
    order = torch.argsort(dest, stable=True)
    send_counts = (dest.unsqueeze(1) == torch.arange(size, device=x.device)).sum(0)
    recv_counts = funcol.all_to_all_single(send_counts, [1] * size, [1] * size, group)
    send, recv = send_counts.tolist(), recv_counts.tolist()
    for n in send + recv:
        torch._check_is_size(n)
    xs = x.index_select(0, torch.div(order, k, rounding_mode="floor"))
    rows = funcol.all_to_all_single_autograd(xs, recv, send, group)
    eids = funcol.all_to_all_single(flat.index_select(0, order), recv, send, group)
    y = _local_experts(rows, local_index[eids], local_w, spec)
    back = funcol.all_to_all_single_autograd(y, send, recv, group)
    per_slot = torch.zeros_like(back).index_copy(0, order, back)
    out = (per_slot.view(T, k, H) * weights.float().unsqueeze(-1)).sum(1)
    return out.to(hidden.dtype).reshape(hidden.shape)


def _local_experts(rows, local_ids, local_w, spec: str) -> torch.Tensor:
    """rows [R, H] for this rank's experts local_ids [R] -> fp32 [R, H] unweighted expert outputs."""
    ones = torch.ones((rows.shape[0], 1), dtype=torch.float32, device=rows.device)
    op = torch.ops.moe_compiler.routed_experts if torch.is_grad_enabled() else torch.ops.moe_compiler.grouped_experts
    return op(rows, local_ids.unsqueeze(1), ones, *local_w, spec).float()
