"""Expert-parallel communication benchmark: bytes and time per MoE layer on gloo ranks (CPU).

    python bench/ep.py [--quick] [--ranks 4] [--tokens N] [--trace routing.npz]

Routing: tests/data/reference_lm/routing_heldout.npz (the trained reference model's held-out
trace) when present, else moe_compiler.routing_trace.synthetic_trace (affinity 0.6). The stack
state_{l+1} = state_l + MoE_l(state_l) runs with the trace's expert ids and weights forced, random
expert weights (hidden/ffn from the reference model's config, or 64), fp32, tokens split evenly
over the ranks. Dispatch styles, each under a contiguous and a planned (ILP, affinity-aware)
placement:

  allgather   Megatron's allgather dispatcher: all-gather every token (+ routing), each rank runs
              its experts on all tokens, partial outputs return with an equal-split all-to-all
  a2a         two all-to-alls per layer (moe_compiler's expert_parallel "all_to_all" executor)
  hier        the same, hierarchical: intra-node then inter-node (2 ranks per node)
  coherent    one dispatch all-to-all per layer (+ the top-k partial combine to the token's anchor),
              tokens return home once at the end (codegen/comm/coherent.py); the anchor is the expert
              rank holding most of the token's predicted next-layer experts, predicted from its
              experts at this layer with transition counts of the trace's other tokens (ExpertFlow-
              style path statistics). coherent_nohint: no prediction; coherent_oracle: the true next
              layer's experts (a bound, not a method)
Placements: contiguous, planned (ILP, one copy per expert), replicated (the ILP with one extra
copy per rank and layer: more expert memory, printed as copies per expert) and coh_planned (the ILP
with a weight per row coherent EP sends, ObjectiveWeights.coherent: one copy per expert, the
experts a token chooses together kept on one rank, at some cost in load balance, printed).

Bytes are hidden-state payload bytes sent to OTHER ranks, summed over ranks, per layer; routing
metadata (ids, counts) is reported apart. Every style's output is compared with single-process
eager on each rank's tokens. The LAST line is one JSON object:
  bytes_coherent_over_a2a     coherent on coh_planned / two all-to-alls on planned: each style on the
                              one-copy placement planned for it, equal expert memory (target <= 0.55)
  bytes_coherent_over_a2a_same_placement   both on planned
  load_max_over_mean_planned, load_max_over_mean_coh_planned   worst layer's max/mean rank load
  bytes_a2a_over_allgather    two-all-to-all / allgather payload bytes, contiguous placement
  bytes_coherent_replicated_over_a2a_replicated, bytes_coherent_replicated_over_a2a
                              coherent on the replicated placement / two all-to-alls on it, and / two
                              all-to-alls on the planned one-copy placement; expert_copies_replicated
  outputs_equal               every style == single-process eager on every rank (rtol = atol = 1e-5)
``--quick`` (under a minute on 2 cores): 1024 tokens, 4 ranks.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TRACE = os.path.join(ROOT, "tests", "data", "reference_lm", "routing_heldout.npz")
STYLES = ("allgather", "a2a", "hier", "coherent")


def load_trace(path: str | None, tokens: int):
    from moe_compiler.routing_trace import RoutingTrace, synthetic_trace

    if path and os.path.exists(path):
        t = RoutingTrace.load(path)
        src = os.path.relpath(path, ROOT)
    else:
        t = synthetic_trace(tokens, 8, 16, 2, zipf=0.5, affinity=0.6, seed=0)
        src = "synthetic_trace(affinity=0.6)"
    ids, w = t.expert_ids[:tokens].astype(np.int64), t.weights[:tokens].astype(np.float32)
    return ids, w, t.num_experts, src, t


def model_dims() -> tuple[int, int]:
    cfg = os.path.join(ROOT, "tests", "data", "reference_lm", "config.json")
    if os.path.exists(cfg):
        c = json.load(open(cfg))
        return int(c.get("dim", 64)), int(c.get("ffn", 64))
    return 64, 64


def transition_counts(expert_ids: np.ndarray, num_experts: int) -> list:
    """[tokens, L, k] ids -> per layer l < L-1 an [E, E] int64 table: how often expert a at layer l is followed
    by expert b at layer l+1 (ExpertFlow's routing-path statistics, from tokens the bench does not run)."""
    L = expert_ids.shape[1]
    out = []
    for l in range(L - 1):
        a, b = expert_ids[:, l, :], expert_ids[:, l + 1, :]
        t = np.zeros((num_experts, num_experts), dtype=np.int64)
        np.add.at(t, (np.repeat(a, b.shape[1], axis=1).ravel(), np.tile(b, (1, a.shape[1])).ravel()), 1)
        out.append(t)
    return out


# ------------------------------------------------------------------ runs inside each rank
def worker(rank, world, ids, w, num_experts, hidden, ffn, placements, repeats, successors):
    import torch.distributed as dist

    from moe_compiler import reference
    from moe_compiler.codegen.comm import executor
    from moe_compiler.codegen.comm.coherent import coherent_stack_forward
    from moe_compiler.codegen.comm.ep import EPPlan, ep_experts
    from moe_compiler.ir import ExpertSpec, MoESpec, RouterSpec

    T_all, L, k = ids.shape
    T = T_all // world
    mine = slice(rank * T, (rank + 1) * T)
    g = torch.Generator().manual_seed(0)
    # small weights: a gated MLP is quadratic in its input, the residual stack must not blow up
    w1 = [torch.randn(num_experts, 2 * ffn, hidden, generator=g) * 0.5 * hidden ** -0.5 for _ in range(L)]
    w2 = [torch.randn(num_experts, hidden, ffn, generator=g) * 0.5 * ffn ** -0.5 for _ in range(L)]
    x_all = torch.randn(T_all, hidden, generator=g)
    ids_t, w_t = torch.from_numpy(ids), torch.from_numpy(w)
    successors = [torch.from_numpy(s) for s in successors]
    spec = MoESpec(RouterSpec(num_experts, k), ExpertSpec(hidden, ffn))
    x = x_all[mine]

    def layer_ids(l, sl=mine):
        return ids_t[sl, l], w_t[sl, l]

    ref = x.clone()
    with torch.no_grad():
        for l in range(L):
            i, wt = layer_ids(l)
            ref = ref + reference.experts_forward(ref, i, wt, w1[l], None, w2[l], None, None, None, spec.experts)

    out = {}
    for pname, rows_per_layer in placements.items():
        plans = [EPPlan("world", "all_to_all", rows) for rows in rows_per_layer]
        hplans = [EPPlan("world", "hierarchical", rows, 2) for rows in rows_per_layer]
        local = [p.local_experts(rank) for p in plans]
        lw = [(w1[l][local[l]], None, w2[l][local[l]], None, None, None) for l in range(L)]
        lidx = []
        for l in range(L):
            t_ = torch.full((num_experts,), -1, dtype=torch.int64)
            t_[local[l]] = torch.arange(len(local[l]))
            lidx.append(t_)

        def a2a(plan_list):
            s = x.clone()
            for l in range(L):
                i, wt = layer_ids(l)
                ys = ep_experts(s, i, lw[l], spec, plan_list[l])
                s = s + (ys.view(T, k, hidden) * wt.unsqueeze(-1)).sum(1)
            return s

        def allgather():
            s = x.clone()
            for l in range(L):
                parts = [torch.empty_like(s) for _ in range(world)]
                dist.all_gather(parts, s)
                xa = torch.cat(parts)
                executor.note_traffic(f"layer{l}", "allgather", executor.world_hop(dist.group.WORLD),
                               [T] * world, [T] * world, hidden * 4)
                ia, wa = ids_t[:, l], w_t[:, l]     # routing of every token (all-gathered in Megatron)
                owner = torch.tensor([r[0] for r in rows_per_layer[l]])
                sel = owner[ia] == rank                            # [T_all, k] slots of my experts
                wl = torch.where(sel, wa, torch.zeros_like(wa))
                il = torch.where(sel, ia, torch.full_like(ia, local[l][0] if local[l] else 0))
                li = lidx[l][il].clamp(min=0)
                if local[l]:
                    part = reference.experts_forward(xa, li, wl, *lw[l], spec.experts) if sel.any() else \
                        torch.zeros_like(xa)
                else:
                    part = torch.zeros_like(xa)
                back = torch.empty_like(part)
                dist.all_to_all_single(back, part.contiguous())
                executor.note_traffic(f"layer{l}", "allgather_return", executor.world_hop(dist.group.WORLD),
                               [T] * world, [T] * world, hidden * 4)
                s = s + back.view(world, T, hidden).sum(0)
            return s

        def coherent(hint=None):
            def route(l, meta):
                gidx = meta[:, 0] * T + meta[:, 1]
                return ids_t[gidx, l], w_t[gidx, l]

            def predict(l, meta):  # the next layer's likely experts, from the token's experts at layer l
                gidx = meta[:, 0] * T + meta[:, 1]
                if hint == "oracle":
                    return ids_t[gidx, l + 1]
                votes = successors[l][ids_t[gidx, l]].sum(1)          # [n, E] transition counts
                return votes.topk(k, dim=1).indices

            def experts(l, rows, e):
                if rows.shape[0] == 0:
                    return rows.new_zeros((0, hidden))
                ones = torch.ones((rows.shape[0], 1))
                return reference.experts_forward(rows, lidx[l][e].unsqueeze(1), ones, *lw[l], spec.experts)

            return coherent_stack_forward(x, route, experts, plans, predict=None if hint is None else predict)

        runs = {"allgather": allgather, "a2a": lambda: a2a(plans), "hier": lambda: a2a(hplans),
                "coherent_nohint": coherent, "coherent": lambda: coherent("path"),
                "coherent_oracle": lambda: coherent("oracle")}
        for style, fn in runs.items():
            if style == "allgather" and any(len(r) > 1 for rows in rows_per_layer for r in rows):
                continue
            with torch.no_grad(), executor.record_traffic() as traffic:
                y = fn()
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(repeats):
                with torch.no_grad():
                    fn()
            dist.barrier()
            seconds = (time.perf_counter() - t0) / repeats
            payload = sum(t["bytes_remote"] for t in traffic if not t["step"].endswith("_meta"))
            meta = sum(t["bytes_remote"] for t in traffic if t["step"].endswith("_meta"))
            ok = bool(torch.allclose(y, ref, rtol=1e-5, atol=1e-5))
            out[(pname, style)] = dict(payload=payload, meta=meta, seconds=seconds, equal=ok,
                                       err=float((y - ref).abs().max()))
    return out


# ------------------------------------------------------------------ driver
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--trace", default=DEFAULT_TRACE)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--coherent-weight", type=float, default=None,
                   help="ILP weight per coherent row for the coh_planned placement (ObjectiveWeights.coherent; "
                        "default: passes.plan_placement.COHERENT_WEIGHT, what mode 'coherent' plans with)")
    a = p.parse_args(argv)
    if a.ranks % 2:
        p.error("--ranks must be even (the hierarchical style uses 2 ranks per node)")
    tokens = a.tokens or (1024 if a.quick else 4096)
    tokens -= tokens % a.ranks
    repeats = a.repeats or (1 if a.quick else 3)
    sys.path.insert(0, ROOT)
    from moe_compiler.passes.placement import ObjectiveWeights, Placement, Topology, evaluate, plan
    from moe_compiler.passes.plan_placement import COHERENT_WEIGHT
    if a.coherent_weight is None:
        a.coherent_weight = COHERENT_WEIGHT
    from moe_compiler.routing_trace import RoutingTrace
    from moe_compiler.runtime.expert_parallel import contiguous_rows
    from moe_compiler.runtime.launch import run_ranks

    ids, w, E, src, full = load_trace(a.trace, tokens)
    L = ids.shape[1]
    hidden, ffn = model_dims()
    # plan on the trace's other tokens (the first `tokens` are the ones we run)
    rest = full.expert_ids[tokens:] if full.expert_ids.shape[0] > 2 * tokens else full.expert_ids
    plan_trace = RoutingTrace(np.ascontiguousarray(rest), None, E)
    t0 = time.perf_counter()
    limit = 10 if a.quick else 60
    planned = plan(plan_trace, Topology(a.ranks, 2), method="ilp", time_limit=limit, progress=False)
    plan_s = time.perf_counter() - t0
    replicated = plan(plan_trace, Topology(a.ranks, 2), method="ilp", replica_slots=1, time_limit=limit,
                      progress=False)
    for_coherent = plan(plan_trace, Topology(a.ranks, 2), method="ilp", time_limit=limit, progress=False,
                        weights=ObjectiveWeights(coherent=a.coherent_weight))
    placements = {"contiguous": [contiguous_rows(E, a.ranks)] * L, "planned": list(planned.placement.layers),
                  "replicated": list(replicated.placement.layers),
                  "coh_planned": list(for_coherent.placement.layers)}
    run_trace = RoutingTrace(np.ascontiguousarray(ids), None, E)
    balance = {name: evaluate(run_trace, Placement(a.ranks, rows), Topology(a.ranks, 2))
               for name, rows in placements.items()}
    copies = sum(len(r) for rows in replicated.placement.layers for r in rows) / (E * L)
    t0 = time.perf_counter()
    res = run_ranks("ep:worker", a.ranks, dict(ids=ids, w=w, num_experts=E, hidden=hidden, ffn=ffn,
                                               placements=placements, repeats=repeats,
                                               successors=transition_counts(plan_trace.expert_ids, E)),
                    timeout=600, pg_timeout=120, python_path=(os.path.dirname(os.path.abspath(__file__)),))
    run_s = time.perf_counter() - t0
    print(f"routing: {src}, {ids.shape[0]} tokens x {L} layers, {E} experts, top-{ids.shape[2]}; "
          f"{a.ranks} gloo ranks (2 per node), hidden {hidden}, ffn {ffn}, fp32")
    print(f"replicated: the ILP with one extra copy per rank and layer ({copies:.2f} copies per expert)")
    print(f"planned placement: ILP over {plan_trace.expert_ids.shape[0]} other tokens in {plan_s:.1f}s; "
          f"ranks run {run_s:.1f}s")
    print(f"coh_planned: the ILP with {a.coherent_weight:g} per coherent row (one copy per expert)")
    print("load max/mean on the measured tokens (worst layer / mean over layers): " + ", ".join(
        f"{n} {m.load_max_over_mean:.2f} / {m.load_max_over_mean_avg:.2f}" for n, m in balance.items()))
    print(f"{'placement':<11} {'style':<10} {'KiB/layer':>10} {'meta KiB/l':>10} {'ms/layer':>9}  equal")
    agg = {}
    for key in res[0]:
        payload = sum(r[key]["payload"] for r in res) / L
        meta = sum(r[key]["meta"] for r in res) / L
        ms = max(r[key]["seconds"] for r in res) / L * 1e3
        eq = all(r[key]["equal"] for r in res)
        agg[key] = dict(payload=payload, meta=meta, ms=ms, equal=eq)
        err = max(r[key]["err"] for r in res)
        print(f"{key[0]:<11} {key[1]:<10} {payload / 1024:10.1f} {meta / 1024:10.1f} {ms:9.2f}  {eq} "
              f"(max err {err:.1e})")
    summary = {
        # each style on the one-copy placement planned for it (equal expert memory)
        "bytes_coherent_over_a2a": round(agg[("coh_planned", "coherent")]["payload"]
                                         / agg[("planned", "a2a")]["payload"], 4),
        "bytes_coherent_over_a2a_same_placement": round(agg[("planned", "coherent")]["payload"]
                                                        / agg[("planned", "a2a")]["payload"], 4),
        "load_max_over_mean_planned": round(balance["planned"].load_max_over_mean, 3),
        "load_max_over_mean_coh_planned": round(balance["coh_planned"].load_max_over_mean, 3),
        "bytes_a2a_over_allgather": round(agg[("contiguous", "a2a")]["payload"]
                                          / agg[("contiguous", "allgather")]["payload"], 4),
        "bytes_coherent_over_a2a_contiguous": round(agg[("contiguous", "coherent")]["payload"]
                                                    / agg[("contiguous", "a2a")]["payload"], 4),
        "bytes_planned_over_contiguous_a2a": round(agg[("planned", "a2a")]["payload"]
                                                   / agg[("contiguous", "a2a")]["payload"], 4),
        # one extra expert copy per rank and layer (expert memory x copies): coherent sends to the
        # local/most-shared copy, two all-to-alls spread a replicated expert's slots over its copies
        "bytes_coherent_replicated_over_a2a_replicated": round(agg[("replicated", "coherent")]["payload"]
                                                               / agg[("replicated", "a2a")]["payload"], 4),
        "bytes_coherent_replicated_over_a2a": round(agg[("replicated", "coherent")]["payload"]
                                                    / agg[("planned", "a2a")]["payload"], 4),
        "expert_copies_replicated": round(copies, 3),
        "outputs_equal": all(v["equal"] for v in agg.values()),
        "routing": src,
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
