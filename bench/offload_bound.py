"""What a cache alone can do: hit rates of the offload policies and of the optimal one on a routing trace.

    python bench/offload_bound.py                        # the reference model's held-out trace
    python bench/offload_bound.py --ratio 2.81           # also: decode speedup over on-demand loading
    python bench/offload_bound.py --trace my_trace.npz --budgets 0.25,0.5 --steps 4096

Replays consecutive tokens of a routing trace (moe_compiler.routing_trace format, e.g. recorded with
moe_compiler.record_routing; one token = one decode step at batch 1) through the expert store's cache
policies (moe_compiler.runtime.cache_replay: the policies' own code, driven as the store drives them,
no prefetching) and through Belady's optimal eviction, the best any cache without prefetching can
do. Budgets are fractions of all experts (every expert the same size). ``--ratio`` (bench/offload.py's
``resident_over_on_demand``: resident decode speed over on-demand loading) turns hit rates into decode
speedups over on-demand loading, and gives the hit rate a 2x speedup needs. The last line is JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from moe_compiler.routing_trace import RoutingTrace  # noqa: E402
from moe_compiler.runtime.cache_policy import POLICIES  # noqa: E402
from moe_compiler.runtime.cache_replay import belady, hit_rate_for_speedup, replay, speedup_over_on_demand  # noqa: E402

TRACE = os.path.join(os.path.dirname(HERE), "tests", "data", "reference_lm", "routing_heldout.npz")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", default=TRACE, help="routing trace (.npz)")
    ap.add_argument("--budgets", default="0.25,0.5,0.75", help="comma-separated fractions of all experts")
    ap.add_argument("--steps", type=int, default=2048, help="tokens replayed (from the trace's start)")
    ap.add_argument("--ratio", type=float, default=None,
                    help="resident decode speed over on-demand loading (bench/offload.py: resident_over_on_demand)")
    args = ap.parse_args(argv)
    trace = RoutingTrace.load(args.trace)
    ids = trace.expert_ids[: args.steps]
    steps, layers, _ = ids.shape
    total = layers * trace.num_experts
    print(f"trace {args.trace}: {steps} steps x {layers} layers x top-{ids.shape[2]}, {trace.num_experts} experts "
          f"per layer ({total} in all)" + (f"; resident / on-demand speed {args.ratio}" if args.ratio else ""))
    head = f"{'budget':>7} {'policy':>10} {'hit rate':>9}" + (f" {'x on-demand':>12}" if args.ratio else "")
    print(head)
    out = {"trace": os.path.basename(args.trace), "steps": steps, "hit_rate": {}, "belady": {}}
    for frac in (float(b) for b in args.budgets.split(",")):
        capacity = max(1, round(frac * total))
        key = f"{round(frac * 100)}pct"
        rows = {p: replay(ids, p, capacity, trace.num_experts).hit_rate for p in POLICIES}
        rows["belady"] = belady(ids, capacity).hit_rate
        for name, h in rows.items():
            line = f"{frac:>7.0%} {name:>10} {h:9.3f}"
            if args.ratio:
                line += f" {speedup_over_on_demand(h, args.ratio):12.2f}"
            print(line)
        out["hit_rate"][key] = {p: round(rows[p], 4) for p in POLICIES}
        out["belady"][key] = round(rows["belady"], 4)
    if args.ratio:
        need = hit_rate_for_speedup(2.0, args.ratio)
        print(f"a 2x decode speedup over on-demand needs a hit rate of "
              + (f"{need:.3f}" if need is not None else "more than 1 (resident is not 2x on-demand)"))
        out.update(resident_over_on_demand=args.ratio, hit_rate_needed_for_2x=None if need is None else round(need, 4),
                   belady_speedup={k: round(speedup_over_on_demand(h, args.ratio), 3) for k, h in out["belady"].items()})
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
