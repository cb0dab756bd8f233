"""Expert parallelism with functional collectives in the graph (option expert_parallel["collectives"]
= "functional"): the layer's dispatch and combine as traceable torch code, not an opaque op.

sparse_collectives emits ``ep_layer(x, logits, bias, w1, w3, w2, b1, b3, b2, spec')`` as one
call_function node (spec' carries the layer's EPPlan, as for ep_moe). aot_autograd traces through
it when the graph is compiled, so the ATen graph Inductor schedules holds, per layer:

    ids, weights  = top-k routing of this rank's tokens (weights differentiable in the logits; a
                    per-expert scale applied, Gemma 4; with an input-scaling router, Llama 4, one
                    row x * w_j per slot routed top-1 with unit weights, ep.expert_rows)
    dest [T*k]    = rank of each slot's expert (replicas: round-robin, as ep_moe)
    per token chunk (overlap_degree chunks; every chunk's dispatch is traced before the first chunk's
    experts), per hop (world; hierarchical: intra-node by dest % M, then inter-node by dest // M,
    Tutel's 2DH):
      send [G]      = per-destination slot counts: a one-hot sum, fixed size (no bincount)
      recv [G]      = _c10d_functional.all_to_all_single(send)          + wait_tensor
                      (the first hop's counts of all chunks go in one [G, chunks] exchange)
      s_i, r_i      = send.tolist(), recv.tolist(): unbacked SymInts, torch._check_is_size'd
      rows [sum r_i, H] = all_to_all_single(rows sorted by dest, r, s)  (autograd: the backward is
                          the reverse all-to-all, _c10d_functional_autograd)
      meta          = all_to_all_single((expert, final rank) of each row, r, s)   (no gradient)
    per chunk:
    y [R, H]      = this rank's experts (moe_compiler.routed_experts in training, for its
                    backward; grouped_experts in inference)
    back          = the reverse all-to-alls, hops in reverse order (the first hop's left in flight
                    while the next chunk's experts run), then back into slot order
    out [T, H]    = sum_k back[slot] * weights                         fp32, as ep_moe

Tracing puts each collective's wait_tensor right after it; ``sink_waits`` (run by the backend on the
forward and backward ATen graphs) moves every wait down to the first op that reads the result, so a
chunk's experts run while the later chunks' dispatch and the earlier chunks' combine are in flight
(Tutel's overlap; the collectives run on gloo's worker threads or NCCL's stream). The issue order is
unchanged, so the ranks still pair their collectives up.

The function is meant to be traced (the backend always hands its graph to aot_autograd): called
eagerly, autograd through all_to_all_single_autograd gave wrong input and weight gradients on gloo
(torch 2.13; the traced backward, with its explicit wait_tensor nodes, is right).

Modes all_to_all and hierarchical, with any overlap_degree, are built this way (coherent chains
and FSSDP keep their ops). The collectives are then Inductor's to place: nothing here records
their traffic (executor.record_traffic sees the op path only), and the comm schedule dump
describes the same steps. A collective that fails in the compiled graph's forward (a peer died or
timed out) is raised as executor.CommError (name_collective_failures), as the op raises it.
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from moe_compiler.codegen.comm.ep import (combine, expert_rows, hop_destinations, local_index, local_weights,
                                          plan_hops, plan_of, route_tokens, slot_chunks)
from moe_compiler.codegen.comm.executor import CommError, peer_failure
from moe_compiler.ir import _spec

# what the process group's own errors say when a peer is gone or late (gloo, NCCL), beside DistError
_PEER_FAILURE_WORDS = ("connection closed", "connection reset", "timed out", "timeout", "gloo", "nccl", "c10d")


def ep_layer(hidden, router_logits, score_bias, w1, w3, w2, b1, b3, b2, spec: str) -> torch.Tensor:
    """One expert-parallel MoE layer on this rank's tokens hidden [..., H] -> hidden's shape and dtype
    (module docstring). Expert weights: all experts [E, ...] or this rank's rows [E_local, ...]."""
    s = _spec(spec)
    plan = plan_of(s)
    hops, rank = plan_hops(plan)
    x, ids, weights = route_tokens(hidden, router_logits, score_bias, s)
    x, ids, weights = expert_rows(x, ids, weights, s)   # Llama 4: a row x * w_j per slot
    local_w = local_weights(s, (w1, w3, w2, b1, b3, b2), plan.local_experts(rank))
    local = local_index(plan, rank, x.device)
    chunks = list(slot_chunks(x, ids, plan, rank))
    first_dests = [hop_destinations(meta[:, 1], hops[0], plan) for _, meta in chunks]
    dispatched = []
    for (rows, meta), dest, counts in zip(chunks, first_dests, _chunk_counts(first_dests, hops[0])):
        rows, meta, route = _route(rows, meta, dest, hops[0], counts)   # every chunk's dispatch before any experts
        routes = [route]
        for hop in hops[1:]:   # hierarchical: to the final rank's position in this node, then across nodes
            rows, meta, route = _route(rows, meta, hop_destinations(meta[:, 1], hop, plan), hop)
            routes.append(route)
        dispatched.append((rows, meta, routes))
    returning = []
    for rows, meta, routes in dispatched:   # chunk c's experts run while the later chunks' rows are in flight
        y = _local_experts(rows, local[meta[:, 0]], local_w, spec)
        first_hop, *later_hops = routes
        for route in reversed(later_hops):   # hierarchical: back across nodes before back within the node
            y = _reverse(y, route)
        returning.append((_send_back(y, first_hop), first_hop))   # in flight while the next chunk's experts run
    outs = [_restore_order(back, route) for back, route in returning]
    return combine(torch.cat(outs, 0) if len(outs) > 1 else outs[0], weights, hidden)


def _send_counts(dest, size: int):
    """Rows per destination group rank: a one-hot sum, fixed size [G] (no bincount)."""
    return (dest.unsqueeze(1) == torch.arange(size, device=dest.device)).sum(0)


def _chunk_counts(dests: list, hop) -> list:
    """Every chunk's (send counts [G], received counts [G]) for destinations dests[c] [S_c], in ONE
    exchange of a [G, chunks] table. Besides saving collectives, it keeps the chunks' collectives
    distinct: chunks of equal (e.g. empty) slices would otherwise be equal expressions, which
    Inductor's common-subexpression elimination merges, so a rank with few tokens would issue fewer
    collectives than its peers."""
    send = torch.stack([_send_counts(d, hop.size) for d in dests], 1)   # [G, chunks]: row j goes to rank j
    recv = funcol.all_to_all_single(send, [1] * hop.size, [1] * hop.size, hop.group)   # row i came from rank i
    return [(send[:, c], recv[:, c]) for c in range(len(dests))]


def _route(rows, meta, dest, hop, counts=None):
    """Send rows [S, H] (differentiable) and meta [S, m] (int64) to group rank dest [S] of the hop:
    -> (received rows, received meta, route for _reverse). Received rows arrive grouped by sender.
    counts: (send [G], received [G]) row counts when already exchanged (_chunk_counts)."""
    size = hop.size
    order = torch.argsort(dest, stable=True)
    if counts is None:
        send_counts = _send_counts(dest, size)
        recv_counts = funcol.all_to_all_single(send_counts, [1] * size, [1] * size, hop.group)
    else:
        send_counts, recv_counts = counts
    # the last send split is the rows left over, so the splits sum to rows.shape[0] by construction: the
    # reverse all-to-all's output then has the rows' own size, not an unbacked sum (Inductor could not
    # view a zero-row batch's [0, k, H] gradient as [u0 + u1, H])
    send, recv = send_counts[:-1].tolist(), recv_counts.tolist()
    send.append(dest.shape[0] - sum(send))
    for n in send + recv:
        torch._check_is_size(n)
    got = funcol.all_to_all_single_autograd(rows.index_select(0, order), recv, send, hop.group)
    got_meta = funcol.all_to_all_single(meta.index_select(0, order), recv, send, hop.group)
    return got, got_meta, (order, send, recv, hop.group)


def _reverse(y, route):
    """Results y [R, H] of rows a _route delivered -> [S, H] in the order the rows were given."""
    return _restore_order(_send_back(y, route), route)


def _send_back(y, route):
    """The all-to-all that returns results y [R, H] to the ranks that sent the rows: -> [S, H] in send order."""
    order, send, recv, group = route
    return funcol.all_to_all_single_autograd(y, send, recv, group)


def _restore_order(back, route):
    """Rows back [S, H] in send order -> the order the rows were given to _route."""
    return torch.zeros_like(back).index_copy(0, route[0], back)


def _local_experts(rows, local_ids, local_w, spec: str) -> torch.Tensor:
    """rows [R, H] for this rank's experts local_ids [R] -> fp32 [R, H] unweighted expert outputs."""
    ones = torch.ones((rows.shape[0], 1), dtype=torch.float32, device=rows.device)
    op = torch.ops.moe_compiler.routed_experts if torch.is_grad_enabled() else torch.ops.moe_compiler.grouped_experts
    return op(rows, local_ids.unsqueeze(1), ones, *local_w, spec).float()


_WAIT = torch.ops._c10d_functional.wait_tensor.default
_ALL_TO_ALL = torch.ops._c10d_functional.all_to_all_single.default


def sink_waits(gm: torch.fx.GraphModule) -> int:
    """Move the wait (``_c10d_functional.wait_tensor``) of every functional all_to_all_single of an
    ATen graph down to just before the first node that reads its result, so the compute between the
    collective's issue and that first use overlaps it (out-of-place all-to-alls only: nothing but the
    wait reads their output). Collectives keep their order (every rank issues the same ones in the
    same order, so they still pair up); Inductor keeps a collective's input alive until its wait (the
    wait's volatile reads). -> the number of waits moved."""
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    moved = 0
    for wait in [n for n in gm.graph.nodes if n.op == "call_function" and n.target is _WAIT]:
        issued = wait.args[0]
        if not wait.users or not (isinstance(issued, torch.fx.Node) and issued.target is _ALL_TO_ALL):
            continue
        first = min(wait.users, key=position.__getitem__)
        if first is not wait.next:
            first.prepend(wait)
            moved += 1
    if moved:
        gm.graph.lint()
        gm.recompile()
    return moved


def name_collective_failures(compiled):
    """The compiled forward of a graph with functional collectives -> the same callable, except that
    a failing collective (a peer died, timed out or ran a different graph: the process group's own
    error, raised from inside the graph) is raised as CommError naming expert parallelism."""

    @functools.wraps(compiled)
    def run(*args):
        try:
            return compiled(*args)
        except CommError:
            raise
        except Exception as e:  # noqa: BLE001 - collective failures re-raised with context, others as they are
            if not _is_peer_failure(e):
                raise
            rank = dist.get_rank() if dist.is_initialized() else 0
            raise peer_failure(f"a collective of the compiled graph (functional collectives) failed on rank {rank}",
                               "graph", e) from e

    return run


def _is_peer_failure(e: Exception) -> bool:
    if isinstance(e, dist.DistError):
        return True
    return isinstance(e, RuntimeError) and any(w in str(e).lower() for w in _PEER_FAILURE_WORDS)
