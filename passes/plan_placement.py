"""plan_placement: give every MoE layer an expert -> ranks placement (consumed by expert parallelism).

Off unless ``options={"placement": {...}}`` is set:

    {"file": "placement.json"}                                   # a plan made earlier (moe-compiler plan)
    {"trace": "routing.npz", "ranks": 4, "ranks_per_node": 2,    # plan now from a routing trace
     "method": "ilp", "replicas": 0, "time_limit": 60, "seed": 0,
     "coherent_weight": 10.0}    # ILP only: weight per row coherent EP sends (default: 10 when
                                 # the expert_parallel mode is "coherent", else 0)

The graph is unchanged except for each MoE op's spec, whose notes gain
("placement", ((ranks of expert 0), (ranks of expert 1), ...)) and the method's metrics;
the dumps show them. Layers are matched to the plan by module path (the trace's layer names)
when the trace has them, else by their order in the graph. Plans are cached per options.
The solvers live beside this file in placement.py.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import torch

from moe_compiler.codegen.ops import GROUPED_EXPERTS_FWD_OP, GROUPED_EXPERTS_OP, ROUTED_EXPERTS_OP
from moe_compiler.config import ConfigError
from moe_compiler.ir import MOE_OP, MoESpec
from moe_compiler.pipeline import PassContext, PassResult

LAYER_OPS = (MOE_OP, ROUTED_EXPERTS_OP, GROUPED_EXPERTS_OP, GROUPED_EXPERTS_FWD_OP)
KEYS = {"file", "trace", "ranks", "ranks_per_node", "method", "replicas", "time_limit", "seed", "coherent_weight"}
# per coherent row (placement.ObjectiveWeights.coherent) when expert_parallel's mode is "coherent":
# bench/ep.py --quick: coherent/two-all-to-all bytes 0.61 at 0, 0.54 at 10 (worst layer load 1.4 -> 1.6)
COHERENT_WEIGHT = 10.0
_CACHE: dict = {}


def load_or_plan(opts: dict):
    """(Placement, layer_names, metrics dict) for the placement options."""
    bad = sorted(set(opts) - KEYS)
    if bad:
        raise ConfigError(f"option 'placement' has unknown keys {bad}; accepted keys are {sorted(KEYS)}")
    key = json.dumps(opts, sort_keys=True, default=str)
    if key in _CACHE:
        return _CACHE[key]
    from moe_compiler.passes.placement import ObjectiveWeights, Placement, Topology, plan
    from moe_compiler.routing_trace import RoutingTrace

    if "file" in opts:
        placement = Placement.load(opts["file"])
        names = tuple(placement.metadata.get("layer_names", ())) if isinstance(placement.metadata, dict) else ()
        result = (placement, names, {"source": opts["file"]})
    elif "trace" in opts and "ranks" in opts:
        trace = RoutingTrace.load(opts["trace"])
        topo = Topology(int(opts["ranks"]), opts.get("ranks_per_node"))
        try:
            weights = ObjectiveWeights(coherent=float(opts.get("coherent_weight", 0.0)))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"option placement['coherent_weight']: {e}") from e
        if weights.coherent and opts.get("method", "eplb") != "ilp":
            raise ConfigError(f"option placement['coherent_weight'] weighs the ILP's objective; method "
                              f"{opts.get('method', 'eplb')!r} has none (use method 'ilp')")
        r = plan(trace, topo, method=opts.get("method", "eplb"), replica_slots=int(opts.get("replicas", 0)),
                 time_limit=float(opts.get("time_limit", 60.0)), seed=int(opts.get("seed", 0)), progress=False,
                 weights=weights)
        m = r.metrics
        result = (r.placement, tuple(trace.layer_names),
                  {"method": r.method, "solve_seconds": round(r.solve_seconds, 3),
                   "transitions_per_token": round(m.transitions_per_token, 4),
                   "coherent_rows_per_token": round(m.coherent_rows_per_token, 4),
                   "coherent_weight": weights.coherent,
                   "max_over_mean_load": round(m.load_max_over_mean, 4)})
    else:
        raise ConfigError("option 'placement' needs {'file': PATH} or {'trace': PATH, 'ranks': N, ...}")
    _CACHE[key] = result
    return result


def _with_mode_defaults(opts: dict, config) -> dict:
    """An ILP placement planned now for expert_parallel mode "coherent" weighs coherent rows unless told."""
    if "trace" in opts and opts.get("method") == "ilp" and "coherent_weight" not in opts:
        from moe_compiler.runtime.expert_parallel import normalize_options

        ep = normalize_options(getattr(config, "expert_parallel", None))
        if ep and ep.get("mode") == "coherent":
            opts["coherent_weight"] = COHERENT_WEIGHT
    return opts


@dataclass(frozen=True)
class PlanPlacement:
    """Attach an expert placement (from a file or planned from a routing trace) to every MoE layer."""

    name: ClassVar[str] = "plan_placement"

    def call(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        opts = getattr(ctx.config, "placement", None)
        if not opts:
            return PassResult(gm, False, {"skipped": 1})
        placement, names, metrics = load_or_plan(_with_mode_defaults(dict(opts), ctx.config))
        layers = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in LAYER_OPS]
        placed = 0
        for i, node in enumerate(layers):
            spec = MoESpec.from_json(node.args[-1])
            idx = names.index(spec.path) if spec.path and spec.path in names else i
            if idx >= len(placement.layers):
                raise ValueError(f"the placement has {len(placement.layers)} layers; layer {idx} ({spec.path}) has none")
            ranks = placement.layers[idx]
            if len(ranks) != spec.num_experts:
                raise ValueError(f"placement layer {idx} places {len(ranks)} experts, {spec.path or 'the layer'} "
                                 f"has {spec.num_experts}")
            note = (("placement", tuple(tuple(r) for r in ranks)), ("placement_ranks", placement.num_ranks),
                    ("placement_plan", tuple(sorted((k, v) for k, v in metrics.items() if v is not None))))
            node.args = (*node.args[:-1], spec.replace(notes=spec.notes + note).to_json())
            placed += 1
        if placed:
            gm.recompile()
        return PassResult(gm, bool(placed), {"layers_placed": placed})
