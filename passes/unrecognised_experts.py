"""Expert weights that no detected MoE layer claims: reported, so a layer that runs unchanged says why.

detect_moe anchors every layer on a top-k router. A graph can hold a model's expert weights and
still yield no layer: the routing picks experts without a top-k (PhiMoE's sparsemixer, hash
routing), a graph break left the router in another graph, or the only top-k nearby was turned
down as not an MoE router (its reason is passed on). Expert weights are the parameters under a
module path component named ``experts`` (``...mlp.experts.gate_up_proj`` stacked [E, ...], or
``...experts.3.w1.weight`` per expert); ``shared_experts`` are not routed and do not count.

    reports = unrecognised_expert_layers(param_paths, shapes, claimed_paths, turned_down, graph_id)
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)

NO_TOPK = ("the graph holds these expert weights but no top-k: the routing is in another graph (a graph "
           "break) or picks experts without a top-k (e.g. PhiMoE's sparsemixer, hash routing), which "
           "detect_moe does not recognise; the layer runs unchanged")
NO_ROUTER = ("no top-k router of the graph leads to these expert weights (routers detect_moe recognises: "
             "softmax / sigmoid / sqrt-softplus scores and a top-k over [tokens, experts] from one matmul; "
             "experts chosen by a lookup, as hash routing does, have none); the layer runs unchanged")


def expert_groups(param_paths, shapes) -> dict:
    """Parameter paths (None for non-parameters) and their shapes -> {experts module path: number of
    experts}: the leading size of stacked [E, ...] weights, or the count of per-expert submodules."""
    groups: dict = {}
    for path, shape in zip(param_paths, shapes):
        if not path:
            continue
        parts = path.split(".")
        if "experts" not in parts[:-1]:
            continue
        i = parts.index("experts")
        key = ".".join(parts[: i + 1])
        nxt = parts[i + 1]
        if nxt.isdigit():
            groups.setdefault(key, set()).add(int(nxt))
        elif shape is not None and len(shape) >= 3:  # [E, out, in]; a fused 2-D [E*I, H] (DBRX) says no E
            groups.setdefault(key, set()).update(range(int(shape[0])))
    return {k: len(v) for k, v in groups.items() if v}


def _claims(layer_path: str, experts_path: str) -> bool:
    return not layer_path or experts_path == layer_path or experts_path.startswith(layer_path + ".") \
        or layer_path.startswith(experts_path + ".")


def _parent(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


def unrecognised_expert_layers(param_paths, shapes, claimed_paths, turned_down, graph_id: str,
                               has_topk: bool = True) -> list:
    """MoELayerReports (rewritten=False, top_k 0: unknown) for expert modules no claimed path covers.

    claimed_paths: module paths of the layers detect_moe reported (raised or not); turned_down:
    [(router weight path, reason)] of top-k anchors it judged not to be MoE routers; has_topk: whether
    the graph has a top-k at all."""
    from moe_compiler.explain import MoELayerReport

    out = []
    for experts_path, n in sorted(expert_groups(param_paths, shapes).items()):
        if any(_claims(p, experts_path) for p in claimed_paths):
            continue
        block = _parent(experts_path)
        near = [(w, why) for w, why in turned_down if w and (w.startswith(block + ".") or not block)]
        if not has_topk:
            reason = NO_TOPK
        elif near:
            w, why = near[0]
            reason = f"the top-k on {_parent(w)} was not taken as this layer's router: {why}; the layer runs unchanged"
        else:
            reason = NO_ROUTER
        log.info("moe_compiler: expert weights at %s (%d experts) are in no MoE layer: %s", experts_path, n, reason)
        out.append(MoELayerReport(path=block, num_experts=n, top_k=0, rewritten=False, reason=reason,
                                  graph_id=graph_id))
    return out
