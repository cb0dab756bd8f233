"""FSSDP vs expert parallelism vs a full all-gather: bytes and training-step time per MoE layer (gloo, CPU).

    python bench/fssdp.py [--quick] [--ranks 2 4] [--tokens 64 256 1024] [--trace routing.npz]
                          [--layers L] [--hidden H --ffn I]   (other expert sizes on the same routing)

Routing: tests/data/reference_lm/routing_heldout.npz (the trained reference model's held-out
trace) when present, else moe_compiler.routing_trace.synthetic_trace. Every layer of the trace
becomes one MoE layer of a residual stack state_{l+1} = state_l + MoE_l(state_l) whose router
logits force the trace's expert ids; expert weights are random (hidden/ffn from the reference
model's config), fp32, sharded by whole experts (contiguous owners). One training step = forward
+ backward of the stack. Strategies, run interleaved in the same ranks:

  fssdp     moe_compiler's fssdp_moe op: sparse all-gather of the experts each rank's tokens use,
            local compute, sparse reduce-scatter of their gradients to the owners (Hecate)
  ep        moe_compiler's ep_moe op: two all-to-alls per layer (tokens to the experts and back),
            and their reverses in backward
  full_ag   FSDP style: all-gather every expert (dist.all_gather), local compute, reduce-scatter of
            all expert gradients (all_to_all_single + sum; gloo has no reduce_scatter)

Bytes are payload bytes sent to OTHER ranks in one step (forward + backward), summed over ranks,
per layer; step time is the median over repeats of the slowest rank, per layer. Each strategy's
output, input gradient and expert gradients are compared with one process on the global batch.
The cost model's per-layer ``movement`` decision (tokens = EP vs weights = FSSDP, training, no
attention window to hide behind) is made for the same sizes with the CPU profile and compared with
the measured winner. The LAST line is one JSON object:

  equals_reference                 every strategy == single process (rel. error <= 1e-4)
  bytes_fssdp_over_full_allgather  FSSDP / full all-gather bytes, summed over all runs
  cost_model_picks_winner          fraction of (ranks, tokens) runs where the cost model's choice
                                   between EP and FSSDP is the one measured faster in communication
                                   (wall time inside the collectives: what the model prices; the
                                   step times, shown too, differ by less than the machine's noise)
  cost_model_picks_faster_step     the same against the step-time winner
``--quick`` (about a minute on 2 cores): 2 and 4 ranks, 64 and 1024 tokens per rank, 4 layers.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
STRATEGIES = ("fssdp", "ep", "full_ag")


# ------------------------------------------------------------------ runs inside each rank
class _FullAllGather(torch.autograd.Function):
    """[E_own, ...] shard -> [E, ...] on every rank; backward: reduce-scatter of the gradient to the owners."""

    @staticmethod
    def forward(ctx, shard, layer):
        import torch.distributed as dist

        from moe_compiler.codegen.comm import executor

        hop = executor.world_hop(dist.group.WORLD)
        parts = [torch.empty_like(shard) for _ in range(hop.size)]
        with executor.timed_collective():
            dist.all_gather(parts, shard.contiguous())
        n = shard.shape[0]
        executor.note_traffic(layer, "full_all_gather", hop, [n] * hop.size, [n] * hop.size, executor._row_bytes(shard))
        ctx.layer, ctx.hop = layer, hop
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, g):
        import torch.distributed as dist

        from moe_compiler.codegen.comm import executor

        G = ctx.hop.size
        n = g.shape[0] // G
        out = torch.empty_like(g)
        with executor.timed_collective():
            dist.all_to_all_single(out, g.contiguous())  # block j of every rank's gradient goes to owner j
        executor.note_traffic(ctx.layer, "full_reduce_scatter", ctx.hop, [n] * G, [n] * G, executor._row_bytes(g))
        return out.view(G, n, *g.shape[1:]).sum(0), None


def _rel(a, b) -> float:
    a, b = a.detach().float(), b.detach().float()
    return 0.0 if a.numel() == 0 else ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()


def worker(rank, world, ids, num_experts, hidden, ffn, token_counts, repeats):
    import torch.distributed as dist

    from moe_compiler.codegen.comm import executor
    from moe_compiler.codegen.comm.ep import NOTE as EP_NOTE, EPPlan
    from moe_compiler.codegen.comm.fssdp import NOTE as FS_NOTE, FSSDPPlan
    from moe_compiler.ir import ExpertSpec, MoESpec, RouterSpec
    from moe_compiler.runtime.expert_parallel import contiguous_rows

    E, (_, L, k) = num_experts, ids.shape
    rows = contiguous_rows(E, world)
    owned = [e for e in range(E) if rows[e][0] == rank]
    g = torch.Generator().manual_seed(0)
    w1 = [torch.randn(E, 2 * ffn, hidden, generator=g) * 0.5 * hidden ** -0.5 for _ in range(L)]
    w2 = [torch.randn(E, hidden, ffn, generator=g) * 0.5 * ffn ** -0.5 for _ in range(L)]
    base = MoESpec(RouterSpec(E, k), ExpertSpec(hidden, ffn))
    specs = {
        "ep": [base.replace(path=f"layer{l}", notes=((EP_NOTE, EPPlan("world", "all_to_all", rows).to_json()),))
               for l in range(L)],
        "fssdp": [base.replace(path=f"layer{l}", notes=((FS_NOTE, FSSDPPlan(
            "world", tuple(r[0] for r in rows), layer=f"layer{l}").to_json()),)) for l in range(L)],
        "full_ag": [base.replace(path=f"layer{l}") for l in range(L)],
    }
    results = {}
    for T in token_counts:
        mine = torch.from_numpy(ids[rank * T:(rank + 1) * T])                      # [T, L, k]
        logits = torch.zeros(T, L, E)
        for j in range(k):  # the trace's j-th choice gets the j-th largest logit
            logits.scatter_(2, mine[:, :, j:j + 1], float(8 - j))
        x = torch.randn(T, hidden, generator=torch.Generator().manual_seed(1000 + rank))
        gy = torch.randn(T, hidden, generator=torch.Generator().manual_seed(2000 + rank))

        def step(strategy, shards1, shards2, xin):
            s = xin
            for l in range(L):
                js = specs[strategy][l].to_json()
                if strategy == "ep":
                    y = torch.ops.moe_compiler.ep_moe(s, logits[:, l], None, shards1[l], None, shards2[l], None,
                                                      None, None, js)
                elif strategy == "fssdp":
                    y = torch.ops.moe_compiler.fssdp_moe(s, logits[:, l], None, shards1[l], None, shards2[l], None,
                                                         None, None, js)[0]
                else:
                    y = torch.ops.moe_compiler.moe(s, logits[:, l], None, _FullAllGather.apply(shards1[l], f"layer{l}"),
                                                   None, _FullAllGather.apply(shards2[l], f"layer{l}"), None, None,
                                                   None, js)
                s = s + y
            (s * gy).sum().backward()
            return s

        # reference: one process, full weights, this rank's tokens; expert grads summed over the ranks
        full1 = [w.clone().requires_grad_() for w in w1]
        full2 = [w.clone().requires_grad_() for w in w2]
        xr = x.clone().requires_grad_()
        s = xr
        for l in range(L):
            s = s + torch.ops.moe_compiler.moe(s, logits[:, l], None, full1[l], None, full2[l], None, None, None,
                                               specs["full_ag"][l].to_json())
        (s * gy).sum().backward()
        ref_y = s.detach()
        ref_g = [p.grad for p in full1 + full2]
        for t in ref_g:
            dist.all_reduce(t)
        times = {st: [] for st in STRATEGIES}
        comm = {st: [] for st in STRATEGIES}
        info = {}
        for rep in range(repeats + 1):
            order = STRATEGIES[rep % len(STRATEGIES):] + STRATEGIES[:rep % len(STRATEGIES)]
            for st in order:
                sh1 = [w[owned].clone().requires_grad_() for w in w1]
                sh2 = [w[owned].clone().requires_grad_() for w in w2]
                xs = x.clone().requires_grad_()
                dist.barrier()
                with executor.record_traffic() as traffic, executor.record_comm_time() as in_comm:
                    t0 = time.perf_counter()
                    y = step(st, sh1, sh2, xs)
                    dist.barrier()
                    dt = time.perf_counter() - t0
                if rep == 0:  # first run: check and count; later runs: time
                    err = max([_rel(y, ref_y), _rel(xs.grad, xr.grad)]
                              + [_rel(p.grad, r[owned]) for p, r in zip(sh1 + sh2, ref_g)])
                    payload = sum(t["bytes_remote"] for t in traffic if not t["step"].split(".")[0].endswith("_meta"))
                    info[st] = dict(err=err, bytes=payload)
                else:
                    times[st].append(dt)
                    comm[st].append(in_comm["seconds"])
        for st in STRATEGIES:
            results[(T, st)] = dict(info[st], seconds=statistics.median(times[st]),
                                    comm_seconds=statistics.median(comm[st]))
    return results


# ------------------------------------------------------------------ driver
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--ranks", type=int, nargs="+", default=None)
    p.add_argument("--tokens", type=int, nargs="+", default=None, help="tokens per rank")
    p.add_argument("--layers", type=int, default=None, help="MoE layers of the trace to run (default all; quick 4)")
    p.add_argument("--trace", default=os.path.join(ROOT, "tests", "data", "reference_lm", "routing_heldout.npz"))
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--hidden", type=int, default=None, help="expert sizes other than the reference model's")
    p.add_argument("--ffn", type=int, default=None)
    a = p.parse_args(argv)
    ranks = a.ranks or [2, 4]
    tokens = a.tokens or ([64, 1024] if a.quick else [16, 64, 256, 1024, 2048])
    repeats = a.repeats or (3 if a.quick else 7)
    sys.path.insert(0, ROOT)
    sys.path.insert(0, HERE)
    from ep import load_trace, model_dims

    from moe_compiler.cost_model.compute import LayerShape
    from moe_compiler.cost_model.decisions import decide_movement
    from moe_compiler.cost_model.profiles import cpu_cache_path, load_profile
    from moe_compiler.runtime.launch import run_ranks

    need_tokens = max(ranks) * max(tokens)
    ids, _, E, src, _ = load_trace(a.trace, need_tokens)
    if ids.shape[0] < need_tokens:
        p.error(f"the trace has {ids.shape[0]} tokens; {max(ranks)} ranks x {max(tokens)} tokens need {need_tokens}")
    layers = a.layers or (4 if a.quick else ids.shape[1])
    ids = np.ascontiguousarray(ids[:, :layers])
    hidden, ffn = model_dims()
    hidden, ffn = a.hidden or hidden, a.ffn or ffn
    k = ids.shape[2]
    if not os.path.exists(cpu_cache_path()):
        from moe_compiler.cost_model.calibrate import calibrate, write_profile

        print(f"no calibrated CPU profile: calibrating ({write_profile(calibrate(log=lambda s: None))})")
    profile = load_profile("cpu")
    shape = LayerShape(E, k, hidden, ffn)
    print(f"routing: {src}, {layers} layers, {E} experts, top-{k}; hidden {hidden}, ffn {ffn}, fp32, "
          f"expert {shape.expert_bytes / 1024:.0f} KiB; profile {profile.name}; {repeats} timed steps")
    print(f"{'ranks':>5} {'tok/rank':>8} {'strategy':<8} {'KiB/layer':>10} {'ms/layer':>9} {'comm ms/l':>9} "
          f"{'max rel err':>11}")
    all_equal, fs_bytes, ag_bytes, picks, step_picks, rows_out = True, 0, 0, [], [], []
    for world in ranks:
        t0 = time.perf_counter()
        res = run_ranks("fssdp:worker", world, dict(ids=ids, num_experts=E, hidden=hidden, ffn=ffn,
                                                    token_counts=tokens, repeats=repeats),
                        timeout=900, pg_timeout=300, python_path=(HERE, ROOT))
        for T in tokens:
            agg = {}
            for st in STRATEGIES:
                agg[st] = dict(bytes=sum(r[(T, st)]["bytes"] for r in res) / layers,
                               ms=max(r[(T, st)]["seconds"] for r in res) / layers * 1e3,
                               comm_ms=max(r[(T, st)]["comm_seconds"] for r in res) / layers * 1e3,
                               err=max(r[(T, st)]["err"] for r in res))
                all_equal &= agg[st]["err"] <= 1e-4
                print(f"{world:>5} {T:>8} {st:<8} {agg[st]['bytes'] / 1024:10.1f} {agg[st]['ms']:9.2f} "
                      f"{agg[st]['comm_ms']:9.2f} {agg[st]['err']:11.1e}")
            fs_bytes += agg["fssdp"]["bytes"]
            ag_bytes += agg["full_ag"]["bytes"]
            d = decide_movement(shape, profile, world, T, training=True, window=0)
            predicted = "fssdp" if d.choice.startswith("weights") else "ep"
            measured = min(("fssdp", "ep"), key=lambda s: agg[s]["comm_ms"])
            faster_step = min(("fssdp", "ep"), key=lambda s: agg[s]["ms"])
            picks.append(predicted == measured)
            step_picks.append(predicted == faster_step)
            rows_out.append(dict(ranks=world, tokens=T, predicted=predicted, measured=measured,
                                 measured_ms={"ep": round(agg["ep"]["comm_ms"], 2),
                                              "fssdp": round(agg["fssdp"]["comm_ms"], 2)},
                                 step_ms={"ep": round(agg["ep"]["ms"], 2), "fssdp": round(agg["fssdp"]["ms"], 2)},
                                 predicted_ms={n: round(v * 1e3, 3) for n, v in d.costs.items()},
                                 bytes_fssdp_over_ep=round(agg["fssdp"]["bytes"] / max(1.0, agg["ep"]["bytes"]), 3)))
        print(f"      ({world} ranks ran {time.perf_counter() - t0:.0f} s)")
    print("\ncost model (movement decision, training, no window) vs the measured winner in communication "
          "time (wall time inside the collectives, per layer):")
    for r in rows_out:
        print(f"  {r['ranks']} ranks, {r['tokens']:>5} tok/rank: predicted {r['predicted']:<5} "
              f"(exposed ms {r['predicted_ms']}), measured {r['measured']:<5} (comm ms/layer {r['measured_ms']}, "
              f"step ms/layer {r['step_ms']}) {'OK' if r['predicted'] == r['measured'] else 'MISS'}; "
              f"FSSDP/EP bytes {r['bytes_fssdp_over_ep']}")
    for world in ranks:
        wins = [r["tokens"] for r in rows_out if r["ranks"] == world and r["measured"] == "fssdp"]
        print(f"  crossover, {world} ranks: FSSDP communicates faster at tokens/rank {wins or 'none of the sizes run'}")
    summary = {"equals_reference": bool(all_equal),
               "bytes_fssdp_over_full_allgather": round(fs_bytes / max(1.0, ag_bytes), 4),
               "cost_model_picks_winner": round(sum(picks) / len(picks), 3),
               "cost_model_picks_faster_step": round(sum(step_picks) / len(step_picks), 3),
               "runs": len(picks), "routing": src}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
