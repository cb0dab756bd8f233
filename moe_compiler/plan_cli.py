"""``moe-compiler plan``: plan an expert placement from a routing trace and compare methods.

    moe-compiler plan TRACE.npz --ranks 8 [--ranks-per-node 4] [--replicas 1]
                      [--method all|contiguous|round_robin|sequential|eplb|ilp]
                      [--time-limit 60] [--coherent-weight W] [--plot DIR] -o placement.json

Prints one row per method (load max/mean, cross-rank and cross-node transitions per token, max
rank-pair traffic, rows context-coherent EP would send per token, replica copies, solve seconds),
writes the chosen method's placement as JSON (see ``moe_compiler.passes.placement.Placement``)
and, with ``--plot``, PNG heatmaps.

With ``--method all`` (the default) the written placement is the one with the fewest cross-rank
transitions among the methods whose load (mean over layers of max/mean rank load) is within
``--load-tolerance`` (default 1.05) of the best load any method reached. The cheap methods are
always run for the comparison; the ILP only with ``--method all`` or ``--method ilp``.

``--coherent-weight W`` adds W per coherent row to the ILP's objective: a placement for
expert_parallel mode "coherent", which keeps the experts a token chooses together on one rank
(fewer bytes) at some cost in load balance. Use it with ``--method ilp``.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Optional, TextIO

import numpy as np

__all__ = ["add_plan_subcommand", "run_plan", "choose_method", "format_table"]

_CHOICES = ("all", "contiguous", "round_robin", "sequential", "eplb", "ilp")


def add_plan_subcommand(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Register ``plan`` on an ``add_subparsers()`` object; ``args.func`` is :func:`run_plan`."""
    p = subparsers.add_parser(
        "plan", help="plan expert placement from a routing trace",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace", help="routing trace (.npz: expert_ids [tokens, layers, top_k])")
    p.add_argument("--ranks", type=int, required=True, help="number of ranks (GPUs)")
    p.add_argument("--ranks-per-node", type=int, default=None,
                   help="ranks per node (default: all ranks on one node)")
    p.add_argument("--replicas", type=int, default=0,
                   help="replica slots per rank per layer (extra expert copies; eplb and ilp)")
    p.add_argument("--method", choices=_CHOICES, default="all",
                   help="method whose placement is written (default: all = pick the best)")
    p.add_argument("--time-limit", type=float, default=60.0, help="ILP time limit, seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-experts", type=int, default=None,
                   help="experts per layer for foreign traces (default: max id + 1)")
    p.add_argument("--intra-node-cost", type=float, default=1.0)
    p.add_argument("--inter-node-cost", type=float, default=2.0)
    p.add_argument("--load-tolerance", type=float, default=1.05,
                   help="load slack for choosing a method and for the ILP objective")
    p.add_argument("--coherent-weight", type=float, default=0.0,
                   help="ILP objective weight per row context-coherent EP sends (expert_parallel mode "
                        "'coherent'; e.g. 10, with --method ilp); 0 = plan for two all-to-alls")
    p.add_argument("--plot", metavar="DIR", default=None, help="write PNG heatmaps into DIR")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-o", "--output", required=True, help="placement JSON to write")
    p.set_defaults(func=run_plan)
    return p


def format_table(results: Dict[str, "object"]) -> str:
    head = (f"{'method':<12} {'load max/mean':>13} {'(avg)':>7} {'trans/token':>11} "
            f"{'xnode/token':>11} {'max pair':>9} {'coh rows':>8} {'replicas':>8} {'objective':>9} "
            f"{'solve s':>8}")
    lines = [head, "-" * len(head)]
    for name, res in results.items():
        m = res.metrics  # type: ignore[attr-defined]
        lines.append(
            f"{name:<12} {m.load_max_over_mean:>13.3f} {m.load_max_over_mean_avg:>7.3f} "
            f"{m.transitions_per_token:>11.3f} {m.cross_node_per_token:>11.3f} "
            f"{m.max_pair_traffic:>9.1f} {m.coherent_rows_per_token:>8.3f} {m.replica_copies:>8d} "
            f"{m.objective:>9.4f} "
            f"{res.solve_seconds:>8.2f}")  # type: ignore[attr-defined]
    return "\n".join(lines)


def choose_method(results: Dict[str, "object"], tolerance: float = 1.05) -> "tuple[str, str]":
    """(method, reason): fewest transitions among methods whose mean-over-layers max/mean
    load is within ``tolerance`` x the best one; ties by objective, then name."""
    loads = {k: r.metrics.load_max_over_mean_avg for k, r in results.items()}  # type: ignore
    best_load = min(loads.values())
    ok = [k for k in results if loads[k] <= tolerance * best_load + 1e-12]
    pick = min(ok, key=lambda k: (results[k].metrics.transitions_per_token,  # type: ignore
                                  results[k].metrics.objective, k))  # type: ignore
    reason = (f"fewest cross-rank transitions among methods with load within {tolerance:g}x "
              f"of the best (best mean max/mean load {best_load:.3f}: "
              f"{', '.join(ok)})")
    return pick, reason


def run_plan(args: argparse.Namespace, out: Optional[TextIO] = None) -> int:
    """Run ``moe-compiler plan``; returns the exit status (0 ok, 2 bad input)."""
    from moe_compiler.passes.placement import ObjectiveWeights, Topology, plan
    from moe_compiler.routing_trace import RoutingTrace

    out = out or sys.stdout
    try:
        trace = RoutingTrace.load(args.trace, num_experts=getattr(args, "num_experts", None))
        topo = Topology(args.ranks, getattr(args, "ranks_per_node", None),
                        getattr(args, "intra_node_cost", 1.0),
                        getattr(args, "inter_node_cost", 2.0))
        weights = ObjectiveWeights(load_tolerance=getattr(args, "load_tolerance", 1.05),
                                   coherent=getattr(args, "coherent_weight", 0.0))
    except (OSError, ValueError) as exc:
        print(f"moe-compiler plan: error: {exc}", file=sys.stderr)
        return 2
    method = getattr(args, "method", "all") or "all"
    replicas = int(getattr(args, "replicas", 0) or 0)
    if replicas < 0:
        print("moe-compiler plan: error: --replicas must be >= 0", file=sys.stderr)
        return 2
    seed = int(getattr(args, "seed", 0) or 0)
    progress = not getattr(args, "no_progress", False) and out is sys.stdout
    methods: List[str] = ["contiguous", "round_robin", "sequential", "eplb"]
    if method in ("all", "ilp"):
        methods.append("ilp")
    print(f"trace {args.trace}: {trace.num_tokens} tokens, {trace.num_layers} layers, "
          f"top-{trace.top_k} of {trace.num_experts} experts; {topo.num_ranks} ranks on "
          f"{topo.num_nodes} node(s), {replicas} replica slot(s) per rank", file=out)
    results = {}
    for m in methods:
        results[m] = plan(trace, topo, m, replica_slots=replicas,
                          time_limit=float(getattr(args, "time_limit", 60.0)), seed=seed,
                          progress=progress, weights=weights)
    print(format_table(results), file=out)
    if method == "all":
        chosen, reason = choose_method(results, weights.load_tolerance)
    else:
        chosen, reason = method, "requested with --method"
    res = results[chosen]
    out_dir = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(out_dir, exist_ok=True)
    res.placement.save(args.output)
    print(f"wrote {args.output}: method {chosen} ({reason})", file=out)
    for note in res.notes:
        print(f"  note: {note}", file=out)
    plot_dir = getattr(args, "plot", None)
    if plot_dir:
        files = write_plots(plot_dir, trace, topo, results, chosen)
        print(f"plots: {', '.join(files)}", file=out)
    return 0


def write_plots(directory: str, trace: "object", topo: "object", results: Dict[str, "object"],
                chosen: str) -> List[str]:
    """PNG heatmaps: expert x rank per layer, load per rank, layer-to-layer affinity."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    os.makedirs(directory, exist_ok=True)
    res = results[chosen]
    x = res.placement.to_matrix()  # type: ignore[attr-defined]  [L, E, R]
    loads = trace.expert_loads().astype(float)  # type: ignore[attr-defined]
    L, E, R = x.shape
    copies = x.sum(2, keepdims=True)
    served = x * (loads[:, :, None] / copies)  # tokens each rank serves for each expert
    files = []

    # 1. expert x rank, for up to 8 evenly spaced layers
    layers = sorted(set(np.linspace(0, L - 1, min(L, 8)).round().astype(int).tolist()))
    cols = min(4, len(layers))
    rows = -(-len(layers) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, l in zip(axes.ravel(), layers):
        ax.axis("on")
        order = np.lexsort((np.arange(E), x[l].argmax(1)))
        ax.imshow(served[l][order], aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_title(f"layer {l}")
        ax.set_xlabel("rank")
        ax.set_ylabel("expert (sorted by rank)")
    fig.suptitle(f"{chosen}: tokens served per expert and rank")
    fig.tight_layout()
    path = os.path.join(directory, "placement.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    files.append(path)

    # 2. load per rank (chosen) and max/mean per method
    rank_load = served.sum(1)  # [L, R]
    mean = rank_load.mean(1, keepdims=True)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    im = a1.imshow((rank_load / np.where(mean > 0, mean, 1)).T, aspect="auto", cmap="magma",
                   interpolation="nearest")
    fig.colorbar(im, ax=a1, label="load / mean")
    a1.set_xlabel("layer")
    a1.set_ylabel("rank")
    a1.set_title(f"{chosen}: load per rank")
    names = list(results)
    worst = [results[n].metrics.load_max_over_mean for n in names]  # type: ignore[attr-defined]
    avg = [results[n].metrics.load_max_over_mean_avg for n in names]  # type: ignore
    pos = np.arange(len(names))
    a2.bar(pos - 0.2, worst, 0.4, label="worst layer")
    a2.bar(pos + 0.2, avg, 0.4, label="mean over layers")
    a2.axhline(1.0, color="k", lw=0.8)
    a2.set_xticks(pos, names, rotation=30)
    a2.set_ylabel("max / mean rank load")
    a2.legend()
    fig.tight_layout()
    path = os.path.join(directory, "load.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    files.append(path)

    # 3. layer-to-layer affinity: expert x expert (sorted by rank) and rank x rank
    if L > 1:
        totals = [trace.transition_counts(l) for l in range(L - 1)]  # type: ignore
        l0 = 0
        t = totals[l0].astype(float)
        ra = np.lexsort((np.arange(E), x[l0].argmax(1)))
        rb = np.lexsort((np.arange(E), x[l0 + 1].argmax(1)))
        rr = np.zeros((R, R))
        for l, tl in enumerate(totals):
            sa = x[l] / x[l].sum(1, keepdims=True)
            sb = x[l + 1] / x[l + 1].sum(1, keepdims=True)
            rr += sa.T @ tl @ sb
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.6))
        im = a1.imshow(t[np.ix_(ra, rb)], aspect="auto", cmap="viridis",
                       interpolation="nearest")
        fig.colorbar(im, ax=a1, label="token pairs")
        a1.set_title(f"affinity layer {l0} -> {l0 + 1} (experts sorted by rank)")
        a1.set_xlabel(f"expert at layer {l0 + 1}")
        a1.set_ylabel(f"expert at layer {l0}")
        im = a2.imshow(rr, cmap="viridis", interpolation="nearest")
        fig.colorbar(im, ax=a2, label="token pairs, all layers")
        a2.set_title(f"{chosen}: rank -> rank transitions")
        a2.set_xlabel("to rank")
        a2.set_ylabel("from rank")
        fig.tight_layout()
        path = os.path.join(directory, "affinity.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        files.append(path)
    return files


def main(argv: Optional[List[str]] = None) -> int:  # pragma: no cover - convenience
    parser = argparse.ArgumentParser(prog="moe-compiler")
    add_plan_subcommand(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
