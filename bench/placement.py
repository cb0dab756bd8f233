"""Expert-placement benchmark: every planner method on synthetic (and optionally real) traces.

    python bench/placement.py [--quick] [--trace TRACE.npz [--num-experts E]] [--time-limit S]

Traces (``moe_compiler.routing_trace.synthetic_trace``):
  affinity  strong cross-layer affinity: each top-2 choice follows a per-layer successor with
            p = 0.9 (5% of successors collide), fresh draws from a topic group 80% of the time
            (experts specialise by topic), mild Zipf(0.5) popularity
  markov    the same successors, no topic groups, Zipf(1.0)
  zipf      no affinity, Zipf(1.0) popularity, with one replica slot per rank
  real      the --trace file, if given

Prints a table, then as the LAST line one JSON object:
  transitions_vs_round_robin  ilp / round_robin cross-rank transitions per token, affinity trace,
                              32 layers x 64 experts x 8 ranks (target <= 0.6)
  transitions_vs_sequential   ilp / sequential on the same trace (target: clearly < 1)
  max_over_mean_load          eplb, one replica slot per rank, zipf trace (target <= 1.02);
                              ilp_max_over_mean_load gives the ILP's figure
  solve_seconds               ILP wall time on the 32 x 64 x 8 affinity trace (target < 60)
``--quick`` (under a minute on 2 cores) uses fewer tokens, fewer scenarios and a 30 s ILP limit.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:
    import moe_compiler.passes.placement  # noqa: F401
except ImportError:  # a checkout that is not installed: map passes/ as moe_compiler.passes
    import importlib
    import types

    sys.path.insert(0, _ROOT)
    importlib.import_module("moe_compiler")
    _passes = types.ModuleType("moe_compiler.passes")
    _passes.__path__ = [os.path.join(_ROOT, "passes")]  # type: ignore[attr-defined]
    sys.modules["moe_compiler.passes"] = _passes

from moe_compiler.passes.placement import METHODS, Topology, plan  # noqa: E402
from moe_compiler.routing_trace import RoutingTrace, synthetic_trace  # noqa: E402


def affinity_trace(tokens: int, layers: int, experts: int, seed: int = 1) -> RoutingTrace:
    return synthetic_trace(tokens, layers, experts, 2, zipf=0.5, affinity=0.9, collisions=0.05,
                           coactivation=0.8, group_size=8, seed=seed, model="synthetic-affinity")


def markov_trace(tokens: int, layers: int, experts: int, seed: int = 2) -> RoutingTrace:
    return synthetic_trace(tokens, layers, experts, 2, zipf=1.0, affinity=0.9, collisions=0.05,
                           seed=seed, model="synthetic-markov")


def zipf_trace(tokens: int, layers: int, experts: int, seed: int = 3) -> RoutingTrace:
    return synthetic_trace(tokens, layers, experts, 2, zipf=1.0, seed=seed,
                           model="synthetic-zipf")


def run(name: str, trace: RoutingTrace, ranks: int, nodes: int, replicas: int,
        time_limit: float, methods=METHODS, rows=None) -> dict:
    topo = Topology(ranks, ranks // nodes)
    out = {}
    for m in methods:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t0 = time.perf_counter()
            res = plan(trace, topo, m, replica_slots=replicas, time_limit=time_limit,
                       progress=False)
            wall = time.perf_counter() - t0
        mt = res.metrics
        cut = any("time limit" in str(w.message) for w in caught)
        out[m] = {"load": mt.load_max_over_mean, "load_avg": mt.load_max_over_mean_avg,
                  "trans": mt.transitions_per_token, "xnode": mt.cross_node_per_token,
                  "pair": mt.max_pair_traffic, "replicas": mt.replica_copies,
                  "objective": mt.objective, "seconds": wall, "timed_out": cut}
        r = out[m]
        line = (f"{name:<9} {trace.num_layers:>3}x{trace.num_experts:<4} {ranks:>2}r/{nodes}n "
                f"s={replicas} {m:<12} {r['load']:>6.3f} {r['load_avg']:>6.3f} "
                f"{r['trans']:>8.3f} {r['xnode']:>7.3f} {r['pair']:>8.1f} {r['replicas']:>5d} "
                f"{r['seconds']:>7.2f}{' (time limit)' if cut else ''}")
        print(line, flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="under a minute on 2 cores")
    ap.add_argument("--trace", help="a real routing trace (.npz) to add")
    ap.add_argument("--num-experts", type=int, default=None)
    ap.add_argument("--time-limit", type=float, default=None, help="ILP limit, seconds")
    args = ap.parse_args(argv)
    quick = args.quick
    limit = args.time_limit or (30.0 if quick else 60.0)
    tokens = 4000 if quick else 20000

    print(f"{'trace':<9} {'LxE':>8} {'ranks':>5} {'rep':>3} {'method':<12} {'load':>6} "
          f"{'avg':>6} {'trans/t':>8} {'xnode/t':>7} {'maxpair':>8} {'copies':>5} "
          f"{'sec':>7}")
    t_all = time.perf_counter()
    # the headline: strong affinity, 32 layers x 64 experts x 8 ranks
    aff = affinity_trace(tokens, 32, 64)
    head = run("affinity", aff, 8, 1, 0, limit)
    # load balance with one replica slot per rank on Zipf loads
    zl = 8 if quick else 32
    z = zipf_trace(tokens, zl, 64)
    zmethods = ("round_robin", "eplb") if quick else METHODS
    zres = run("zipf", z, 8, 1, 1, limit, zmethods)
    if not quick:
        run("affinity", aff, 8, 2, 0, limit)
        run("affinity", affinity_trace(tokens, 32, 64), 4, 1, 0, limit)
        run("markov", markov_trace(tokens, 32, 64), 8, 1, 0, limit)
        run("zipf", z, 8, 2, 1, limit, ("round_robin", "eplb", "ilp"))
    if args.trace:
        real = RoutingTrace.load(args.trace, num_experts=args.num_experts)
        for ranks in (4, 8):
            if real.num_experts >= ranks:
                run("real", real, ranks, 1, 0, limit)
    summary = {
        "transitions_vs_round_robin": round(head["ilp"]["trans"] / head["round_robin"]["trans"],
                                            4),
        "transitions_vs_sequential": round(head["ilp"]["trans"] / head["sequential"]["trans"],
                                           4),
        "max_over_mean_load": round(zres["eplb"]["load"], 4),
        "ilp_max_over_mean_load": round(zres["ilp"]["load"], 4) if "ilp" in zres else None,
        "solve_seconds": round(head["ilp"]["seconds"], 2),
        "solve_timed_out": head["ilp"]["timed_out"],
        "quick": quick,
        "tokens": tokens,
        "bench_seconds": round(time.perf_counter() - t_all, 1),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
