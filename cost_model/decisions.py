"""Decisions the compiler makes from the costs, each with the alternatives' costs and a reason.

Every ``decide_*`` returns a ``Decision(name, choice, why, costs)``; ``costs`` maps each alternative
to its predicted seconds at the evaluated token count, ``exprs`` to its sympy cost in T, and ``why``
says what was compared, the numbers, and over which token counts the choice holds (the costs are
symbolic, so one compiled graph's decision is checked against every batch size on a grid).
``Decision.note()`` is the ("decision:<name>", choice, why) triple the pass stores in spec.notes.

    ep_mode          two all-to-alls (dispatch + combine) / single (ExFlow context-coherent,
                     inference: dispatch only + a per-step all-gather amortised over the layers) /
                     hierarchical (two-level all-to-alls)
    overlap_degree   token chunks per EP layer (1, 2, 4, 8; Tutel): pipelined on GPUs, serial on CPUs
    movement         move tokens (EP) or move weights (FSSDP: sparse all-gather of the experts this
                     rank's tokens need, hidden behind the attention window) -- Hecate's trade-off
    replicas         replica count per expert (Hecate sparse materialisation: overlap degree t vs
                     free memory slots m)
    prefetch_depth   layers of experts to stream ahead from host memory so the copy hides
    cpu_gemm         oneDNN-prepacked vs plain per-expert GEMMs (CPU)
    cuda_tile        BLOCK_M of the fused MoE GEMM (CUDA): padding waste vs tile efficiency
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import sympy

from moe_compiler.cost_model import collectives as C
from moe_compiler.cost_model.compute import (LayerShape, activation_time, active_experts, experts_time, gemm_time,
                                             moe_layer_time)
from moe_compiler.cost_model.memory import exposed, footprint_per_rank, overlap_degree
from moe_compiler.cost_model.profiles import HardwareProfile
from moe_compiler.cost_model.symbols import T, as_expr, evaluate

GRID = tuple(2 ** i for i in range(0, 18))  # token counts a decision is checked over
# tokens per rank a replicas decision is taken at when the ranks' own counts may differ (every_rank)
SHARED_TOKENS = 1024


@dataclass(frozen=True)
class Decision:
    name: str
    choice: str
    why: str
    costs: dict = field(default_factory=dict)   # alternative -> predicted seconds at the token count
    exprs: dict = field(default_factory=dict, compare=False, repr=False)  # alternative -> sympy cost in T

    def note(self) -> tuple:
        return (f"decision:{self.name}", self.choice, self.why)


def fmt_s(seconds: float) -> str:
    s = float(seconds)
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def fmt_b(nbytes: float) -> str:
    b = float(nbytes)
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if b >= scale:
            return f"{b / scale:.2f} {unit}"
    return f"{b:.0f} B"


def _over_grid(exprs: dict, grid=GRID) -> tuple[list, np.ndarray]:
    """(names, costs [alternatives, len(grid)]) of each alternative at every token count of the grid."""
    names = list(exprs)
    vals = np.stack([np.broadcast_to(np.asarray(evaluate(exprs[n], **({"T": np.array(grid, float)}
                                                                       if exprs[n].free_symbols else {})),
                                                 dtype=float), (len(grid),)) for n in names])
    return names, vals


def winners_over_tokens(exprs: dict, grid=GRID) -> str:
    """Which alternative is cheapest over a grid of token counts, as ranges ("a for T<=64; b for T>=128")."""
    names, vals = _over_grid(exprs, grid)
    best = [names[i] for i in vals.argmin(axis=0)]
    parts, start = [], 0
    for i in range(1, len(grid) + 1):
        if i == len(grid) or best[i] != best[start]:
            lo, hi = grid[start], grid[i - 1]
            rng = ("all T" if start == 0 and i == len(grid) else
                   f"T<={hi}" if start == 0 else f"T>={lo}" if i == len(grid) else f"{lo}<=T<={hi}")
            parts.append(f"{best[start]} for {rng}")
            start = i
    return "; ".join(parts)


def least_worst_ratio(exprs: dict, grid=GRID) -> tuple[str, float]:
    """(alternative, ratio): the alternative whose cost is closest to the cheapest one's at every token count
    of the grid, and its largest cost / cheapest cost there. A choice that does not depend on T."""
    names, vals = _over_grid(exprs, grid)
    ratios = ((vals + 1e-12) / (vals.min(axis=0) + 1e-12)).max(axis=1)   # 1e-12 s: costs of 0 (fully hidden)
    i = int(ratios.argmin())
    return names[i], float(ratios[i])


def _choose(name: str, exprs: dict, tokens: float, detail: str, eligible=None, every_rank: bool = False) -> Decision:
    """The cheapest alternative at ``tokens``; with every_rank, the one closest to the cheapest at every T
    (least_worst_ratio), so that ranks holding different token counts choose alike."""
    exprs = {k: as_expr(v) for k, v in exprs.items()}
    costs = {k: float(evaluate(v, T=tokens) if v.free_symbols else evaluate(v)) for k, v in exprs.items()}
    pool = [k for k in costs if eligible is None or k in eligible]
    choice = min(pool, key=lambda k: costs[k])
    listing = ", ".join(f"{k} {fmt_s(v)}" for k, v in costs.items())
    why = f"at T={int(tokens)}: {listing}; {detail}; over T=1..{GRID[-1]}: {winners_over_tokens({k: exprs[k] for k in pool})}"
    if every_rank:
        choice, worst = least_worst_ratio({k: exprs[k] for k in pool})
        why += (f"; chosen alike on every rank whatever its token count: {choice}, within {worst:.2f}x of the "
                f"cheapest at every T (pass_options cost_decisions 'tokens' decides at one token count instead)")
    return Decision(name, choice, why, costs, exprs)


def attention_window(layer: LayerShape, profile: HardwareProfile, tokens=T):
    """Default overlap window: the attention block's projections (8 T H^2 FLOPs) before the layer."""
    return gemm_time(as_expr(tokens), 4 * layer.hidden, layer.hidden, profile, layer.dtype) + \
        gemm_time(as_expr(tokens), layer.hidden, layer.hidden, profile, layer.dtype)


def ep_costs(layer: LayerShape, profile: HardwareProfile, ranks: int, ranks_per_node=None, *,
             num_layers: int = 1, training: bool = False, context_values: int = 0) -> dict:
    """Per-layer communication seconds (sympy in T) of each EP mode, counts and routing metadata included.

    context_values: values per token the single all-to-all mode all-gathers after this layer to make the
    context coherent across attention (the keys/values cut, context_region.py), with their int64 home
    index and rank; 0 when the next layer follows per token."""
    n = T * layer.top_k * layer.hidden * layer.bytes   # routed token copies one rank sends
    # training: ep_moe's backward re-runs the forward's all-to-alls (recompute), then their reverses
    bw = 3 if training else 1
    # each dispatch also exchanges counts [G] int64 and the slots' (expert, rank) ids [S, 2] int64
    meta = (2 if training else 1) * (C.all_to_all(ranks * 8, ranks, profile, ranks_per_node)
                                     + C.all_to_all(T * layer.top_k * 16, ranks, profile, ranks_per_node))
    out = {"two_all_to_all": bw * 2 * C.all_to_all(n, ranks, profile, ranks_per_node) + meta,
           "hierarchical": bw * 2 * C.all_to_all_hierarchical(n, ranks, profile, ranks_per_node) + 2 * meta}
    if not training:
        out["single_all_to_all"] = (C.all_to_all(n, ranks, profile, ranks_per_node) + meta
                                    + C.all_gather(T * layer.hidden * layer.bytes, ranks, profile, ranks_per_node)
                                    / max(1, num_layers))
        if context_values:
            out["single_all_to_all"] += C.all_gather(T * (context_values * layer.bytes + 16), ranks, profile,
                                                     ranks_per_node)
    return out


def decide_ep_mode(layer: LayerShape, profile: HardwareProfile, ranks: int, tokens: float, *,
                   ranks_per_node=None, num_layers: int = 1, training: bool = False,
                   context_values: int = 0, every_rank: bool = False) -> Decision:
    """Two all-to-alls / single (ExFlow) / hierarchical. every_rank: the ranks of the group may hold different
    token counts and must run the same collectives, so the choice may not depend on T (_choose)."""
    exprs = ep_costs(layer, profile, ranks, ranks_per_node, num_layers=num_layers, training=training,
                     context_values=context_values)
    rpn = min(ranks, ranks_per_node or profile.ranks_per_node)
    detail = (f"{ranks} ranks ({rpn} per node), {fmt_b(tokens * layer.top_k * layer.hidden * layer.bytes)} of routed "
              f"tokens per rank per all-to-all" + ("; single all-to-all (ExFlow) is inference-only" if training else
                                                   f"; single = dispatch only + all-gather amortised over "
                                                   f"{num_layers} layers"
                                                   + (f" + a context all-gather of {context_values} values per token "
                                                      "(attention follows)" if context_values else "")))
    return _choose("ep_mode", exprs, tokens, detail, every_rank=every_rank)


OVERLAP_DEGREES = (1, 2, 4, 8)   # token chunks per EP layer the overlap_degree decision compares


def local_experts_time(layer: LayerShape, profile: HardwareProfile, ranks: int, tokens=T):
    """One rank's share of the experts (ceil(E / G) of them) on the T * k slots that arrive there on
    average: the two expert GEMMs and the activation, forward."""
    s = as_expr(tokens) * layer.top_k
    e_local = max(1, -(-layer.num_experts // ranks))
    calls = active_experts(s, e_local, 1)
    return (gemm_time(s, layer.n1, layer.hidden, profile, layer.dtype, calls=calls)
            + gemm_time(s, layer.hidden, layer.ffn, profile, layer.dtype, calls=calls)
            + activation_time(layer, profile, tokens, calls=calls))


def overlap_costs(layer: LayerShape, profile: HardwareProfile, ranks: int, ranks_per_node=None, *,
                  hierarchical: bool = False, degrees=OVERLAP_DEGREES) -> dict:
    """Seconds (sympy in T) of one EP layer's forward -- dispatch, this rank's experts, combine -- with its
    tokens in c chunks (Tutel's overlap degree), keyed by str(c).

    Per chunk of T/c tokens: dispatch d (rows + slot ids), experts e, combine b; one counts exchange for
    every chunk. On a GPU the collectives run on their own stream (NCCL) beside the experts, so the chunks
    pipeline: d + e + b + (c - 1) * Max(d + b, e). On a CPU gloo's copies run on the cores that compute,
    nothing overlaps, and c chunks cost c * (d + e + b): each chunk pays the latencies and small GEMMs
    again (bench/ep_collectives.py: 1.00-2.07x one chunk on 2 cores)."""
    a2a = C.all_to_all_hierarchical if hierarchical else C.all_to_all
    out = {}
    for c in degrees:
        t = T / c
        rows = t * layer.top_k * layer.hidden * layer.bytes
        dispatch = a2a(rows, ranks, profile, ranks_per_node) + a2a(t * layer.top_k * 16, ranks, profile,
                                                                   ranks_per_node)
        combine = a2a(rows, ranks, profile, ranks_per_node)
        experts = local_experts_time(layer, profile, ranks, t)
        if profile.kind == "gpu":
            chunks = dispatch + experts + combine + (c - 1) * sympy.Max(dispatch + combine, experts)
        else:
            chunks = c * (dispatch + experts + combine)
        out[str(c)] = a2a(ranks * 8 * c, ranks, profile, ranks_per_node) + chunks
    return out


def decide_overlap_degree(layer: LayerShape, profile: HardwareProfile, ranks: int, tokens: float, *,
                          ranks_per_node=None, hierarchical: bool = False, every_rank: bool = False) -> Decision:
    """Token chunks per EP layer (expert_parallel overlap_degree "auto"); every_rank as in decide_ep_mode:
    the chunk count fixes how many collectives a rank runs."""
    exprs = overlap_costs(layer, profile, ranks, ranks_per_node, hierarchical=hierarchical)
    detail = ("forward of one EP layer in c token chunks: "
              + ("the collectives run beside the experts (NCCL stream), so the chunks pipeline"
                 if profile.kind == "gpu" else "on a CPU the collectives use the cores that compute: chunks "
                 "add latency and smaller GEMMs, and hide nothing"))
    return _choose("overlap_degree", exprs, tokens, detail, every_rank=every_rank)


def movement_costs(layer: LayerShape, profile: HardwareProfile, ranks: int, ranks_per_node=None, *,
                   window=None, training: bool = False, num_layers: int = 1, rematerialize: bool = False) -> dict:
    """Exposed seconds (sympy in T) of moving tokens (EP, best all-to-all mode) vs weights (FSSDP)."""
    ep = ep_costs(layer, profile, ranks, ranks_per_node, num_layers=num_layers, training=training)
    tokens_cost = sympy.Min(*ep.values())
    need = active_experts(T, layer.num_experts, layer.top_k)          # experts this rank's tokens use
    lam = need * (1 - sympy.Rational(1, ranks)) / layer.num_experts     # of them, owned elsewhere
    gather = C.sparse_all_gather(layer.expert_bytes, layer.num_experts, lam, ranks, profile, ranks_per_node,
                                 hierarchical=True)
    loads = C.all_gather(layer.num_experts * 8, ranks, profile, ranks_per_node)  # the per-expert counts
    gathers = (2 if rematerialize else 1) if training else 1
    transfers = gathers * gather + (C.sparse_reduce_scatter(layer.expert_bytes, layer.num_experts, lam, ranks, profile,
                                                            ranks_per_node, hierarchical=True) if training else 0)
    window = attention_window(layer, profile) if window is None else as_expr(window)
    # each gather and the gradient reduce-scatter hide behind one window; the loads exchange cannot
    # (it follows the router)
    weights_cost = loads + exposed(transfers, (gathers + (1 if training else 0)) * window)
    return {"tokens (EP)": tokens_cost, "weights (FSSDP)": weights_cost}


def decide_movement(layer: LayerShape, profile: HardwareProfile, ranks: int, tokens: float, *,
                    ranks_per_node=None, window=None, training: bool = False, num_layers: int = 1,
                    rematerialize: bool = False, every_rank: bool = False) -> Decision:
    """Move tokens (EP) or weights (FSSDP); every_rank as in decide_ep_mode."""
    exprs = movement_costs(layer, profile, ranks, ranks_per_node, window=window, training=training,
                           num_layers=num_layers, rematerialize=rematerialize)
    need = float(evaluate(active_experts(T, layer.num_experts, layer.top_k), T=tokens))
    tok_b = tokens * layer.top_k * layer.hidden * layer.bytes * (ranks - 1) / ranks * 2
    w_b = need * (1 - 1 / ranks) * layer.expert_bytes
    win = attention_window(layer, profile) if window is None else as_expr(window)
    win_s = float(evaluate(win, T=tokens)) if as_expr(win).free_symbols else float(win)
    detail = (f"bytes per rank: routed tokens {fmt_b(tok_b)} (dispatch + combine) vs needed remote experts "
              f"{fmt_b(w_b)} ({need:.1f} of {layer.num_experts} experts used, {fmt_b(layer.expert_bytes)} each), "
              f"weights hide behind {fmt_s(win_s)} of attention; costs are exposed seconds")
    return _choose("movement", exprs, tokens, detail, every_rank=every_rank)


def decide_replicas(layer: LayerShape, profile: HardwareProfile, ranks: int, tokens: float, *,
                    ranks_per_node=None, window=None, free_bytes=None, loads=None,
                    every_rank: bool = False) -> Decision:
    """Hecate sparse materialisation: replicas per expert from the overlap degree t and free slots m.

    every_rank: every rank of the group must gather the same experts, whatever its token count, so t and m
    are taken at SHARED_TOKENS tokens per rank instead of ``tokens``.

    t = window * bandwidth / expert_bytes; m = free_bytes // expert_bytes (per rank). If t <= m, the
    top-t experts by load get a replica on every rank; otherwise the m * G extra slots are shared
    out in proportion to load. ``loads`` [E] (tokens per expert) defaults to uniform.
    """
    E = layer.num_experts
    tokens = SHARED_TOKENS if every_rank else tokens
    win = attention_window(layer, profile) if window is None else as_expr(window)
    win_s = float(evaluate(win, T=tokens)) if as_expr(win).free_symbols else float(win)
    rpn = min(ranks, ranks_per_node or profile.ranks_per_node)
    link = profile.intra_node if ranks <= rpn else profile.inter_node
    t = min(E, overlap_degree(win_s, link.bandwidth, layer.expert_bytes))
    if free_bytes is None:
        fp = footprint_per_rank(layer, ranks, tokens)["total"]
        free_bytes = max(0.0, 0.5 * profile.memory_bytes / 8 - float(evaluate(fp, T=tokens)))
    m = int(free_bytes // layer.expert_bytes)
    loads = np.ones(E) if loads is None else np.asarray(loads, dtype=float)
    order = np.argsort(-loads, kind="stable")
    counts = np.ones(E, dtype=int)
    if ranks > 1 and min(t, m) > 0:
        if t <= m:
            counts[order[:t]] = ranks
            rule = f"t={t} <= m={m}: the top-{t} experts by load (ties by expert id) on every rank"
        else:
            extra = m * ranks
            share = np.floor(extra * loads / loads.sum()).astype(int)
            counts = np.minimum(ranks, 1 + share)
            rule = f"t={t} > m={m}: {extra} extra slots shared in proportion to load"
    else:
        rule = (f"t={t}, m={m}: no transfer hides behind the window or no free slot" if ranks > 1
                else "one rank: nothing to replicate")
    uniform = "loads unknown at compile time, taken as uniform; " if loads is None or np.all(loads == loads[0]) else ""
    # run-length: "16*4,1*60" = 16 replicas for experts 0-3 (in expert order), 1 for the next 60
    runs, prev, n = [], None, 0
    for c in counts.tolist() + [None]:
        if c != prev and prev is not None:
            runs.append(f"{prev}*{n}")
            n = 0
        prev, n = c, n + 1
    choice = ",".join(runs)
    why = (f"{uniform}{rule} (overlap degree t = window {fmt_s(win_s)} x {fmt_b(link.bandwidth)}/s / "
           f"{fmt_b(layer.expert_bytes)} per expert; m = {fmt_b(free_bytes)} free / expert size)")
    why += "; choice as replicas*experts runs in expert order"
    if every_rank:
        why += (f"; taken at {SHARED_TOKENS} tokens per rank, alike on every rank whatever its token count "
                "(pass_options cost_decisions 'tokens' sets the count)")
    return Decision("replicas", choice, why, {"overlap_degree": float(t), "free_slots": float(m)})


def decide_prefetch_depth(layer: LayerShape, profile: HardwareProfile, tokens: float, *, window=None,
                          slots_layers: int | None = None) -> Decision:
    """Layers of experts to stream ahead from host memory so the copy hides behind compute.

    Per layer, the experts the step's tokens use (expected active experts) cross the host link;
    depth = ceil(copy / (layer compute + window)), at least 1, at most the layers whose experts fit
    in memory (``slots_layers``, default: half the device memory over the layer's expert bytes).
    """
    need = active_experts(T, layer.num_experts, layer.top_k)
    copy = need * layer.expert_bytes / profile.host_link.bandwidth + profile.host_link.latency * need
    win = attention_window(layer, profile) if window is None else as_expr(window)
    compute = moe_layer_time(layer, profile)["total"] + win
    c, w = float(evaluate(copy, T=tokens)), float(evaluate(compute, T=tokens))
    cap = slots_layers if slots_layers is not None else max(
        1, int(0.5 * profile.memory_bytes // (layer.num_experts * layer.expert_bytes)))
    want = max(1, math.ceil(c / max(w, 1e-12)))
    depth = min(want, cap)
    stall = max(0.0, c - depth * w)
    why = (f"at T={int(tokens)}: copying {float(evaluate(need, T=tokens)):.1f} experts "
           f"({fmt_b(float(evaluate(need, T=tokens)) * layer.expert_bytes)}) over the host link takes {fmt_s(c)}, "
           f"one layer computes {fmt_s(w)}: {want} layer(s) ahead hide it"
           + (f"; memory holds {cap} layers of experts, so {fmt_s(stall)} stays exposed per layer" if want > cap else ""))
    return Decision("prefetch_depth", str(depth), why, {"copy": c, "compute": w, "exposed": stall},
                    {"copy": copy, "compute": compute})


def decide_cpu_gemm(layer: LayerShape, profile: HardwareProfile, tokens: float, *, training: bool = False) -> Decision:
    """oneDNN-prepacked vs plain per-expert GEMMs for the routed experts on CPU."""
    exprs = {"plain": experts_time(layer, profile, T, "default")}
    if "prepacked" in profile.gemm_variants:
        exprs["prepacked"] = experts_time(layer, profile, T, "prepacked")
    rows = tokens * layer.top_k / float(evaluate(active_experts(T, layer.num_experts, layer.top_k), T=tokens))
    if training:
        detail = (f"~{rows:.0f} rows per expert; training updates the weights every step, so the prepacked "
                  f"copy would be stale: plain")
        return _choose("cpu_gemm", exprs, tokens, detail, eligible=["plain"])
    detail = f"~{rows:.0f} rows per expert (small-M GEMMs favour the weight-stationary prepacked layout)"
    return _choose("cpu_gemm", exprs, tokens, detail)


def tile_costs(layer: LayerShape, profile: HardwareProfile, tokens: float) -> dict:
    """Seconds of both expert GEMMs per BLOCK_M: rows padded per expert to BLOCK_M, tile efficiency
    BLOCK_M / (BLOCK_M + small_m_rows), bounded below by the weight read."""
    act = float(evaluate(active_experts(T, layer.num_experts, layer.top_k), T=tokens))
    m = tokens * layer.top_k / act
    g = profile.gemm()
    out = {}
    for bm in (16, 32, 64, 128):
        padded = act * math.ceil(m / bm) * bm
        eff = g.gemm_efficiency * bm / (bm + g.small_m_rows)
        flops = 2 * padded * layer.hidden * (layer.n1 + layer.ffn)
        weights = act * layer.expert_bytes / profile.mem_bandwidth
        out[f"BLOCK_M={bm}"] = 2 * g.gemm_overhead_s + max(flops / (profile.flops(layer.dtype) * eff), weights)
    return out


def decide_cuda_tile(layer: LayerShape, profile: HardwareProfile, tokens: float) -> Decision:
    costs = tile_costs(layer, profile, tokens)
    choice = min(costs, key=costs.get)
    act = float(evaluate(active_experts(T, layer.num_experts, layer.top_k), T=tokens))
    why = (f"at T={int(tokens)} (~{tokens * layer.top_k / act:.1f} rows per expert): "
           + ", ".join(f"{k} {fmt_s(v)}" for k, v in costs.items())
           + "; padding waste vs tile efficiency, bounded by the weight read")
    return Decision("cuda_tile", choice, why, costs)
