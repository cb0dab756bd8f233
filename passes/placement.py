"""Expert placement planner: which ranks hold which experts, per MoE layer, from a routing trace.

A pure library (numpy, scipy, networkx, optional highspy; no torch, no torch.fx): the placement
*pass* and ``moe-compiler plan`` call :func:`plan`; runtime code reads the resulting
:class:`Placement` JSON.

Input: a :class:`~moe_compiler.routing_trace.RoutingTrace` (ids [tokens, layers, top_k]) and a
:class:`Topology` (ranks, ranks per node, hop costs). Output: a :class:`Placement`::

    {"num_ranks": N,
     "layers": [[[ranks of expert 0], [ranks of expert 1], ...],   # layer 0
                ...],                                               # one list per MoE layer
     "metadata": {...}}

An expert may sit on several ranks (replicas). The *slot budget* (see :func:`slot_bounds`): with
E experts, R ranks and ``replica_slots`` s, every rank holds between floor(E/R) and
ceil(E/R) + s expert copies per layer, at most E + R*s copies per layer, and copies of one expert
sit on distinct ranks. Without replicas that is "equal experts per rank" (the remainder spread).

Cost model (:func:`evaluate`; all quantities per layer or per consecutive layer pair):

    load[l, r]       tokens (top-k assignments) computed by rank r; a replicated expert's tokens
                     are spread evenly over its copies                      -> max/mean per layer
    transitions      for each token and layer pair l -> l+1, each of the k x k (a, b) pairs
                     weighs 1/k^2 and crosses ranks unless the rank the token sits on (a copy of
                     a, each copy equally likely) also holds b: "cross-rank transitions per
                     token" lies in [0, layers - 1] (ExFlow counts "out of 31" for 32 layers)
    cross-node       the same, crossing nodes (no copy of b on the token's node)
    pair traffic     tokens sent from rank i to rank j (i != j) per layer pair, non-local tokens
                     spread evenly over b's copies                    -> max over pairs (MoETuner)
    coherent rows    the rows context-coherent EP (ExFlow; codegen/comm/coherent.py) sends per
                     token and layer: a dispatch row to each rank computing one of its experts
                     other than the rank it sits on (its anchor), and a partial sum from each of
                     those ranks but one. A token's expert runs on the copy on the rank holding
                     most of its experts; the anchor is an expert rank of the layer before that
                     also computes one of this layer's experts when there is one (a perfect
                     next-layer hint), at layer 0 the token's home (uniform over ranks)

Planner objective (:func:`objective`, lower is better, per token; :class:`ObjectiveWeights`)::

    ( sum_l  w_load * (max_r load[l] - mean load[l])
           + w_excess * max(0, max_r load[l] - tolerance * mean load[l])      # soft balance
    + w_trans * sum_l (intra * cross-rank_l + (inter - intra) * cross-node_l)  # ExFlow
    + w_pair * sum_l max_{i != j} traffic_l[i, j]                               # MoETuner
    + w_coherent * sum_l coherent rows_l ) / tokens      # off by default; for mode "coherent"

Methods (all behind :func:`plan`)::

    contiguous   expert e on rank e // (E/R) (Megatron default)       baseline
    round_robin  expert e on rank e % R                                baseline
    sequential   layer 0 balanced by load; then, layer by layer, each expert goes to the rank of
                 its strongest predecessor at l-1 that still has a free slot    simple greedy
    eplb         DeepSeek EPLB: pack experts onto nodes balanced by load; per node replicate the
                 expert with the highest load per replica until the replica budget is used; pack
                 the copies onto the node's ranks greedily by load (then a swap refinement)
    ilp          1. greedy starts: the four above, "flow" (each layer an exact min-cost flow,
                    networkx, of hop costs from the layer before) and "chains" (a global view:
                    a maximum-weight matching links experts of consecutive layers into E chains;
                    the chain affinity graph is partitioned over nodes, then over each node's
                    ranks, Kernighan-Lin style, with a soft load penalty); with a coherent weight
                    also "coactivated" (per layer, a balanced partition of the experts tokens
                    choose together, relabelled to follow the layer before);
                 2. forward construction from "chains" and from "eplb": re-solve layers 1..L-1
                    in order, each given the layer before (ExFlow's consecutive-layer pairs);
                 3. block-coordinate descent: one MILP per layer with both neighbouring layers
                    fixed, sweeping forward and backward until no layer improves. With the
                    neighbours fixed, the transition term, the load terms (max variables) and
                    the max-pair term (max variables) are linear in the layer's 0/1 assignment
                    x[e, r] (replica counts fixed), so each sub-MILP is exact for its block
                    (HiGHS: highspy with the current placement as warm start, or
                    scipy.optimize.milp). Layers with many experts x ranks are split further
                    into random rank blocks (a large-neighbourhood search).
                 4. swap descent on the result (15% of the time limit): exchange two experts'
                    ranks within a layer while the true objective improves; it sees the terms
                    that couple experts of one layer (coherent rows), which the sub-MILPs leave out.
                 A sub-solution is kept only if the true objective improves, and the result is
                 the best over the paths and the greedy starts: never worse than the best greedy.

Determinism: the same inputs and seed give the same placement, unless a time limit cuts the
ILP short (then a warning says so and the best placement found so far is returned).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import networkx as nx
import numpy as np
import scipy.sparse as sp

try:  # a test/extra dependency; scipy.optimize.milp (also HiGHS) is the fallback
    import highspy as _highspy
except ImportError:  # pragma: no cover - depends on the environment
    _highspy = None

from moe_compiler.routing_trace import RoutingTrace

__all__ = [
    "METHODS", "Topology", "Placement", "Metrics", "ObjectiveWeights", "PlanResult",
    "slot_bounds", "check_budget", "evaluate", "objective", "affinity_graph", "plan",
]

METHODS = ("contiguous", "round_robin", "sequential", "eplb", "ilp")
PLACEMENT_FORMAT_VERSION = 1


# ====================================================================== data types
@dataclass(frozen=True)
class Topology:
    """Ranks grouped into nodes; hop costs weigh cross-rank transitions (ExFlow: 1 and 2)."""

    num_ranks: int
    ranks_per_node: Optional[int] = None  # None: all ranks on one node
    intra_node_cost: float = 1.0          # cost of a token hop between ranks of one node
    inter_node_cost: float = 2.0          # cost of a token hop between nodes

    def __post_init__(self) -> None:
        r = self.num_ranks
        if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 1:
            raise ValueError(f"Topology.num_ranks must be a positive int, got {r!r}")
        object.__setattr__(self, "num_ranks", int(r))
        m = self.ranks_per_node
        if m is None:
            m = int(r)
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1 or r % m:
            raise ValueError(
                f"Topology.ranks_per_node must be a positive int dividing num_ranks={r}, "
                f"got {self.ranks_per_node!r}")
        object.__setattr__(self, "ranks_per_node", int(m))
        a, b = float(self.intra_node_cost), float(self.inter_node_cost)
        if not (math.isfinite(a) and math.isfinite(b)) or a < 0 or b < a:
            raise ValueError(
                f"Topology costs need 0 <= intra_node_cost <= inter_node_cost, got "
                f"intra={self.intra_node_cost!r}, inter={self.inter_node_cost!r}")
        object.__setattr__(self, "intra_node_cost", a)
        object.__setattr__(self, "inter_node_cost", b)

    @property
    def num_nodes(self) -> int:
        return self.num_ranks // int(self.ranks_per_node)  # type: ignore[arg-type]

    def node_of(self, rank: int) -> int:
        return int(rank) // int(self.ranks_per_node)  # type: ignore[arg-type]

    def node_ids(self) -> np.ndarray:
        """Node of each rank, int [R]."""
        return np.arange(self.num_ranks) // int(self.ranks_per_node)  # type: ignore[arg-type]

    def node_matrix(self) -> np.ndarray:
        """One-hot [R, nodes] float matrix of rank -> node."""
        g = np.zeros((self.num_ranks, self.num_nodes))
        g[np.arange(self.num_ranks), self.node_ids()] = 1.0
        return g

    def hop_cost(self) -> np.ndarray:
        """[R, R] cost of one token hop between ranks (0 on the diagonal)."""
        nd = self.node_ids()
        c = np.where(nd[:, None] == nd[None, :], self.intra_node_cost, self.inter_node_cost)
        np.fill_diagonal(c, 0.0)
        return c

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Placement:
    """Per layer, per expert, the sorted ranks that hold a copy of it."""

    num_ranks: int
    layers: Tuple[Tuple[Tuple[int, ...], ...], ...]
    metadata: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        r = self.num_ranks
        if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 1:
            raise ValueError(f"Placement.num_ranks must be a positive int, got {r!r}")
        object.__setattr__(self, "num_ranks", int(r))
        if not isinstance(self.layers, (list, tuple)) or not self.layers:
            raise ValueError("Placement.layers must be a non-empty list (one entry per layer)")
        out = []
        num_e = None
        for li, layer in enumerate(self.layers):
            if not isinstance(layer, (list, tuple)) or not layer:
                raise ValueError(
                    f"Placement layer {li} must be a non-empty list of per-expert rank lists")
            if num_e is None:
                num_e = len(layer)
            elif len(layer) != num_e:
                raise ValueError(
                    f"Placement layer {li} has {len(layer)} experts but layer 0 has {num_e}; "
                    f"every layer must list the same experts")
            row = []
            for e, ranks in enumerate(layer):
                if not isinstance(ranks, (list, tuple)) or not ranks:
                    raise ValueError(
                        f"Placement layer {li} expert {e}: expected a non-empty list of ranks, "
                        f"got {ranks!r} (every expert needs at least one rank)")
                for x in ranks:
                    if isinstance(x, bool) or not isinstance(x, (int, np.integer)) \
                            or not 0 <= x < r:
                        raise ValueError(
                            f"Placement layer {li} expert {e}: rank {x!r} is not an int in "
                            f"[0, num_ranks={r})")
                if len(set(int(x) for x in ranks)) != len(ranks):
                    raise ValueError(
                        f"Placement layer {li} expert {e}: duplicate ranks {list(ranks)}; a rank "
                        f"holds at most one copy of an expert")
                row.append(tuple(sorted(int(x) for x in ranks)))
            out.append(tuple(row))
        object.__setattr__(self, "layers", tuple(out))
        object.__setattr__(self, "metadata", dict(self.metadata or {}))

    # ----------------------------------------------------------------- views
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_experts(self) -> int:
        return len(self.layers[0])

    def ranks_of(self, layer: int, expert: int) -> Tuple[int, ...]:
        return self.layers[layer][expert]

    def to_matrix(self) -> np.ndarray:
        """Bool [layers, experts, ranks]: True where a rank holds a copy of the expert."""
        x = np.zeros((self.num_layers, self.num_experts, self.num_ranks), dtype=bool)
        for li, layer in enumerate(self.layers):
            for e, ranks in enumerate(layer):
                x[li, e, list(ranks)] = True
        return x

    @classmethod
    def from_matrix(cls, x: np.ndarray, metadata: Optional[Mapping[str, Any]] = None
                    ) -> "Placement":
        x = np.asarray(x, dtype=bool)
        if x.ndim != 3:
            raise ValueError(f"placement matrix must be [layers, experts, ranks], got {x.shape}")
        layers = tuple(tuple(tuple(int(r) for r in np.flatnonzero(x[l, e]))
                             for e in range(x.shape[1])) for l in range(x.shape[0]))
        return cls(int(x.shape[2]), layers, dict(metadata or {}))

    @classmethod
    def from_assignment(cls, ranks: np.ndarray, num_ranks: int,
                        metadata: Optional[Mapping[str, Any]] = None) -> "Placement":
        """One copy per expert: ``ranks[l, e]`` is the rank of expert e at layer l."""
        ranks = np.asarray(ranks)
        if ranks.ndim != 2:
            raise ValueError(f"assignment must be [layers, experts], got {ranks.shape}")
        layers = tuple(tuple((int(r),) for r in row) for row in ranks)
        return cls(int(num_ranks), layers, dict(metadata or {}))

    def copies_per_rank(self) -> np.ndarray:
        """Int [layers, ranks]: expert copies each rank holds."""
        return self.to_matrix().sum(1)

    def replica_copies(self) -> int:
        """Extra copies beyond one per expert, summed over layers."""
        return int(sum(len(r) - 1 for layer in self.layers for r in layer))

    # ----------------------------------------------------------------- files
    def to_json(self) -> Dict[str, Any]:
        return {"num_ranks": self.num_ranks,
                "layers": [[list(r) for r in layer] for layer in self.layers],
                "metadata": dict(self.metadata)}

    @classmethod
    def from_json(cls, obj: Any) -> "Placement":
        if not isinstance(obj, Mapping):
            raise ValueError(
                f"placement JSON must be an object with keys 'num_ranks' and 'layers', got "
                f"{type(obj).__name__}")
        missing = [k for k in ("num_ranks", "layers") if k not in obj]
        if missing:
            raise ValueError(
                f"placement JSON is missing {missing}; expected {{'num_ranks': N, 'layers': "
                f"[[[ranks of expert 0], ...], ...], 'metadata': {{...}}}}")
        meta = obj.get("metadata", {})
        if not isinstance(meta, Mapping):
            raise ValueError("placement JSON 'metadata' must be an object")
        version = meta.get("version", PLACEMENT_FORMAT_VERSION)
        if isinstance(version, int) and version > PLACEMENT_FORMAT_VERSION:
            raise ValueError(
                f"placement format version {version} is newer than supported "
                f"({PLACEMENT_FORMAT_VERSION})")
        return cls(obj["num_ranks"], obj["layers"], meta)

    def save(self, path: "str | os.PathLike[str]") -> None:
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=None, separators=(",", ":"))
            f.write("\n")

    @classmethod
    def load(cls, path: "str | os.PathLike[str]") -> "Placement":
        where = os.fspath(path)
        with open(where) as f:
            try:
                obj = json.load(f)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc})") from exc
        try:
            return cls.from_json(obj)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from exc


@dataclass(frozen=True)
class ObjectiveWeights:
    """Weights of the planner objective (see the module docstring); all per token."""

    load: float = 0.1            # per token of (max - mean) rank load, summed over layers
    load_excess: float = 8.0     # per token of max rank load above load_tolerance * mean
    load_tolerance: float = 1.05  # max/mean rank load that costs only `load`
    transitions: float = 1.0     # per hop-cost-weighted cross-rank transition
    pair: float = 1.0            # per token of max rank-pair traffic, summed over layer pairs
    # per row context-coherent EP sends (module docstring). Two all-to-alls send a row per slot
    # wherever the experts sit; coherent EP sends fewer when a token's experts share a rank
    coherent: float = 0.0

    def __post_init__(self) -> None:
        for k in ("load", "load_excess", "transitions", "pair", "coherent"):
            v = getattr(self, k)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"ObjectiveWeights.{k} must be a finite number >= 0, got {v!r}")
        if not (isinstance(self.load_tolerance, (int, float)) and self.load_tolerance >= 1.0):
            raise ValueError(
                f"ObjectiveWeights.load_tolerance must be >= 1.0, got {self.load_tolerance!r}")


@dataclass(frozen=True)
class Metrics:
    """What :func:`evaluate` measures for one placement on one trace."""

    load_max_over_mean: float        # worst layer's max/mean rank load (1.0 = perfect)
    load_max_over_mean_avg: float    # the same averaged over layers
    worst_layer: int                 # the layer with the worst max/mean
    load_max: float                  # max rank load (tokens) in the worst layer
    load_mean: float                 # mean rank load (tokens) per layer
    transitions_per_token: float     # cross-rank transitions per token (0 .. layers-1)
    cross_node_per_token: float      # cross-node transitions per token
    transition_cost_per_token: float  # hop-cost weighted (intra/inter node costs)
    max_pair_traffic: float          # max tokens between one (src, dst) rank pair, any layer pair
    replica_copies: int              # extra expert copies, summed over layers
    replica_memory: float            # replica_copies / (layers * experts): extra expert memory
    objective: float                 # objective() with default weights
    solve_seconds: float = 0.0
    coherent_rows_per_token: float = 0.0  # rows context-coherent EP sends per token, all layers
    per_layer_load: Tuple[float, ...] = ()  # max/mean per layer

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["per_layer_load"] = list(self.per_layer_load)
        return d


@dataclass(frozen=True)
class PlanResult:
    """What :func:`plan` returns; ``metrics`` are :func:`evaluate` of ``placement``."""

    placement: Placement
    metrics: Metrics
    solve_seconds: float
    method: str
    notes: Tuple[str, ...] = ()
    details: Mapping[str, Any] = field(default_factory=dict, compare=False)


# ====================================================================== budget
def slot_bounds(num_experts: int, num_ranks: int, replica_slots: int = 0
                ) -> Tuple[int, int, int]:
    """(min copies per rank, max copies per rank, max copies per layer) for one layer."""
    lo = num_experts // num_ranks
    hi = -(-num_experts // num_ranks) + replica_slots
    return lo, hi, num_experts + num_ranks * replica_slots


def _fixed_caps(num_experts: int, num_ranks: int) -> np.ndarray:
    base = np.full(num_ranks, num_experts // num_ranks, dtype=np.int64)
    base[: num_experts % num_ranks] += 1
    return base


def check_budget(placement: Placement, replica_slots: int = 0,
                 num_experts: Optional[int] = None) -> None:
    """Raise ValueError unless ``placement`` respects the slot and replica budget."""
    e, r = placement.num_experts, placement.num_ranks
    if num_experts is not None and e != num_experts:
        raise ValueError(f"placement has {e} experts per layer, the trace has {num_experts}")
    lo, hi, total_max = slot_bounds(e, r, replica_slots)
    counts = placement.copies_per_rank()
    for li in range(placement.num_layers):
        c = counts[li]
        if c.min() < lo or c.max() > hi:
            raise ValueError(
                f"placement layer {li}: copies per rank {c.tolist()} outside [{lo}, {hi}] "
                f"(experts={e}, ranks={r}, replica_slots={replica_slots})")
        if c.sum() > total_max:
            raise ValueError(
                f"placement layer {li}: {int(c.sum())} copies exceed the budget {total_max}")


# ====================================================================== evaluation core
class _Stats:
    """Trace statistics the planner needs: loads [L, E] and scaled transitions [L-1, E, E]."""

    def __init__(self, trace: RoutingTrace):
        self.tokens = max(trace.num_tokens, 1)
        self.k = trace.top_k
        self.L = trace.num_layers
        self.E = trace.num_experts
        self.loads = trace.expert_loads().astype(np.float64)
        self.trans = np.stack([trace.transition_counts(l) for l in range(self.L - 1)]
                              ).astype(np.float64) / self.k ** 2 if self.L > 1 else \
            np.zeros((0, self.E, self.E))
        self.ids = trace.expert_ids.astype(np.int64)          # [T, L, k]
        self.coact = _coactivation(trace)


def _coactivation(trace: RoutingTrace) -> np.ndarray:
    """[L, E, E] float: tokens whose top-k at layer l holds experts a < b (upper triangle), each of a
    token's k (k - 1) / 2 pairs weighing 1 / (k - 1); zeros for top-1."""
    ids = trace.expert_ids.astype(np.int64)
    T, L, k = ids.shape
    E = trace.num_experts
    out = np.zeros((L, E, E))
    if k < 2:
        return out
    i, j = np.triu_indices(k, 1)
    a, b = ids[:, :, i], ids[:, :, j]                                   # [T, L, pairs]
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    layer = np.broadcast_to(np.arange(L)[None, :, None], lo.shape)
    keep = lo != hi
    flat = (layer[keep] * E + lo[keep]) * E + hi[keep]
    return np.bincount(flat, minlength=L * E * E).reshape(L, E, E) / (k - 1)


def _compute_ranks(ids_l: np.ndarray, xl: np.ndarray) -> np.ndarray:
    """ids_l [T, k], xl [E, R] bool -> [T, k] the rank computing each slot under coherent dispatch:
    the copy on the rank that holds most of the token's experts (the lowest such rank on ties)."""
    holds = xl[ids_l]                                                   # [T, k, R]
    score = np.where(holds, holds.sum(1, keepdims=True), -1)
    return score.argmax(2)


def _distinct_ranks(ranks: np.ndarray) -> np.ndarray:
    s = np.sort(ranks, 1)
    return 1 + (s[:, 1:] != s[:, :-1]).sum(1)


def _coherent_rows(st: "_Stats", x: np.ndarray, layers) -> float:
    """Rows context-coherent EP sends at each of ``layers``, summed over tokens (module docstring).
    Each layer's compute ranks are found once, also where the next layer needs them as anchors."""
    ranks: dict = {}

    def of(l):
        if l not in ranks:
            ranks[l] = _compute_ranks(st.ids[:, l], x[l])
        return ranks[l]

    rows = 0.0
    for l in layers:
        cur = of(l)
        m = _distinct_ranks(cur)
        if l == 0:
            at_anchor = m / x.shape[2]
        else:
            at_anchor = (of(l - 1)[:, :, None] == cur[:, None, :]).any((1, 2))
        rows += float((2 * m - 1 - at_anchor).sum())
    return rows


def _rank_load(load_l: np.ndarray, xl: np.ndarray) -> np.ndarray:
    n = xl.sum(1)
    return (load_l / n) @ xl


def _pair_terms(a: np.ndarray, xa: np.ndarray, xb: np.ndarray, g: np.ndarray
                ) -> Tuple[float, float, float]:
    """(cross-rank, cross-node, max pair traffic) for transitions ``a`` [E, E] from xa to xb."""
    xa = xa.astype(np.float64)
    xb = xb.astype(np.float64)
    sa = xa / xa.sum(1, keepdims=True)
    cross_rank = float((a * (1.0 - sa @ xb.T)).sum())
    if g.shape[1] > 1:
        nb = (xb @ g > 0).astype(np.float64)
        cross_node = float((a * (1.0 - (sa @ g) @ nb.T)).sum())
    else:
        cross_node = 0.0
    traffic = ((sa.T @ a) * (1.0 - xb.T)) @ (xb / xb.sum(1, keepdims=True))
    return max(cross_rank, 0.0), max(cross_node, 0.0), float(traffic.max(initial=0.0))


class _Scorer:
    """Objective terms per layer and layer pair, recomputed locally during the search."""

    def __init__(self, stats: _Stats, topo: Topology, weights: ObjectiveWeights):
        self.s, self.t, self.w = stats, topo, weights
        self.g = topo.node_matrix()
        self.mean = stats.loads.sum(1) / topo.num_ranks

    def layer(self, x: np.ndarray, l: int) -> float:
        """Weighted load term of layer ``l``."""
        mx = float(_rank_load(self.s.loads[l], x[l]).max())
        m = self.mean[l]
        return self.w.load * (mx - m) + self.w.load_excess * max(0.0, mx - self.w.load_tolerance * m)

    def pair(self, x: np.ndarray, l: int) -> Tuple[float, float, float, float]:
        cr, cn, pm = _pair_terms(self.s.trans[l], x[l], x[l + 1], self.g)
        cost = self.t.intra_node_cost * cr + (self.t.inter_node_cost
                                              - self.t.intra_node_cost) * cn
        return cr, cn, cost, pm

    def local(self, x: np.ndarray, l: int, use_next: bool = True) -> float:
        """Objective terms (unscaled) that depend on layer ``l`` (without l -> l+1 if not
        ``use_next``)."""
        w = self.w
        v = self.layer(x, l)
        for p in ((l - 1, l) if use_next else (l - 1,)):
            if 0 <= p < self.s.L - 1:
                _, _, cost, pm = self.pair(x, p)
                v += w.transitions * cost + w.pair * pm
        if w.coherent:  # layer l's rows depend on layers l - 1 and l; layer l + 1's on l and l + 1
            v += w.coherent * _coherent_rows(self.s, x, [q for q in ((l, l + 1) if use_next else (l,))
                                                         if q < self.s.L])
        return v

    def total(self, x: np.ndarray) -> float:
        w = self.w
        v = sum(self.layer(x, l) for l in range(self.s.L))
        if w.coherent:
            v += w.coherent * _coherent_rows(self.s, x, range(self.s.L))
        for p in range(self.s.L - 1):
            _, _, cost, pm = self.pair(x, p)
            v += w.transitions * cost + w.pair * pm
        return float(v / self.s.tokens)


def _check_compatible(trace: RoutingTrace, placement: Placement, topology: Topology) -> None:
    if placement.num_layers != trace.num_layers or placement.num_experts != trace.num_experts:
        raise ValueError(
            f"placement is for {placement.num_layers} layers x {placement.num_experts} experts, "
            f"the trace has {trace.num_layers} x {trace.num_experts}")
    if placement.num_ranks != topology.num_ranks:
        raise ValueError(f"placement has {placement.num_ranks} ranks, the topology "
                         f"{topology.num_ranks}")


def evaluate(trace: RoutingTrace, placement: Placement, topology: Topology,
             solve_seconds: float = 0.0) -> Metrics:
    """Measure ``placement`` on ``trace`` (definitions in the module docstring)."""
    _check_compatible(trace, placement, topology)
    st = _Stats(trace)
    x = placement.to_matrix()
    sc = _Scorer(st, topology, ObjectiveWeights())
    ratios, maxes = [], []
    for l in range(st.L):
        lr = _rank_load(st.loads[l], x[l])
        maxes.append(float(lr.max()))
        m = sc.mean[l]
        ratios.append(float(lr.max() / m) if m > 0 else 1.0)
    worst = int(np.argmax(ratios))
    cr = cn = cost = pm = 0.0
    for p in range(st.L - 1):
        a, b, c, d = sc.pair(x, p)
        cr, cn, cost, pm = cr + a, cn + b, cost + c, max(pm, d)
    extra = placement.replica_copies()
    return Metrics(
        load_max_over_mean=ratios[worst],
        load_max_over_mean_avg=float(np.mean(ratios)),
        worst_layer=worst,
        load_max=maxes[worst],
        load_mean=float(sc.mean.mean()),
        transitions_per_token=cr / st.tokens,
        cross_node_per_token=cn / st.tokens,
        transition_cost_per_token=cost / st.tokens,
        max_pair_traffic=pm,
        replica_copies=extra,
        replica_memory=extra / (st.L * st.E),
        objective=sc.total(x),
        solve_seconds=float(solve_seconds),
        coherent_rows_per_token=_coherent_rows(st, x, range(st.L)) / st.tokens,
        per_layer_load=tuple(ratios),
    )


def objective(trace: RoutingTrace, placement: Placement, topology: Topology,
              weights: Optional[ObjectiveWeights] = None) -> float:
    """The planner objective (lower is better) of ``placement`` on ``trace``."""
    _check_compatible(trace, placement, topology)
    return _Scorer(_Stats(trace), topology, weights or ObjectiveWeights()).total(
        placement.to_matrix())


def affinity_graph(trace: RoutingTrace, layers: Optional[Sequence[int]] = None) -> nx.DiGraph:
    """Directed graph with nodes ``(layer, expert)`` (attribute ``load``) and edges
    ``(l, a) -> (l+1, b)`` weighted by transition counts (all k x k pairs per token)."""
    g = nx.DiGraph()
    ls = range(trace.num_layers) if layers is None else sorted(set(layers))
    loads = trace.expert_loads()
    for l in ls:
        for e in range(trace.num_experts):
            g.add_node((l, e), load=int(loads[l, e]))
    for l in ls:
        if l + 1 >= trace.num_layers or (layers is not None and l + 1 not in ls):
            continue
        t = trace.transition_counts(l)
        for a, b in zip(*np.nonzero(t)):
            g.add_edge((l, int(a)), (l + 1, int(b)), weight=int(t[a, b]))
    return g


# ====================================================================== greedy methods
def _balanced_packing(weights: np.ndarray, caps: np.ndarray, items: Optional[np.ndarray] = None,
                      holds: Optional[np.ndarray] = None, mins: Optional[np.ndarray] = None
                      ) -> Tuple[np.ndarray, np.ndarray]:
    """Greedy LPT: heaviest item first onto the lightest bin with room (ties: fewest items).

    ``items`` names the expert of each item (copies of one expert go to distinct bins, tracked
    in ``holds`` [experts, bins]). Bins get at most ``caps`` items and, when there are enough
    items, at least ``mins``. Returns (bin of each item or -1, bin loads).
    """
    n, nb = len(weights), len(caps)
    items = np.arange(n) if items is None else items
    if holds is None:
        holds = np.zeros((int(items.max(initial=-1)) + 1, nb), dtype=bool)
    mins = np.zeros(nb, dtype=np.int64) if mins is None else np.asarray(mins, dtype=np.int64)
    left = caps.astype(np.int64).copy()
    count = np.zeros(nb, dtype=np.int64)
    load = np.zeros(nb)
    where = np.full(n, -1, dtype=np.int64)
    for rem, i in enumerate(np.argsort(-weights, kind="stable")):
        remaining = n - rem
        ok = (left > 0) & ~holds[items[i]]
        need = np.maximum(mins - count, 0)
        if remaining <= need.sum() and (ok & (need > 0)).any():
            ok &= need > 0  # the rest of the items must fill the bins still below their minimum
        if not ok.any():
            continue
        cand = np.flatnonzero(ok)
        b = cand[np.lexsort((count[cand], load[cand]))[0]]
        where[i] = b
        left[b] -= 1
        count[b] += 1
        load[b] += weights[i]
        holds[items[i], b] = True
    return where, load


def _contiguous(st: _Stats, topo: Topology) -> np.ndarray:
    caps = _fixed_caps(st.E, topo.num_ranks)
    ranks = np.repeat(np.arange(topo.num_ranks), caps)
    return np.broadcast_to(ranks, (st.L, st.E)).copy()


def _round_robin(st: _Stats, topo: Topology) -> np.ndarray:
    return np.broadcast_to(np.arange(st.E) % topo.num_ranks, (st.L, st.E)).copy()


def _assign_to_x(ranks: np.ndarray, r: int) -> np.ndarray:
    x = np.zeros(ranks.shape + (r,), dtype=bool)
    np.put_along_axis(x, ranks[..., None], True, axis=-1)
    return x


def _sequential(st: _Stats, topo: Topology) -> np.ndarray:
    """Layer 0 balanced by load; then each expert follows its strongest free predecessor."""
    r = topo.num_ranks
    caps = _fixed_caps(st.E, r)
    out = np.zeros((st.L, st.E), dtype=np.int64)
    out[0], _ = _balanced_packing(st.loads[0], caps)
    for l in range(1, st.L):
        a = st.trans[l - 1]
        left = caps.copy()
        prev = out[l - 1]
        for e in np.argsort(-a.max(0), kind="stable"):
            dest = -1
            for p in np.argsort(-a[:, e], kind="stable"):
                if a[p, e] <= 0:
                    break
                if left[prev[p]] > 0:
                    dest = int(prev[p])
                    break
            if dest < 0:
                dest = int(np.argmax(left))
            out[l, e] = dest
            left[dest] -= 1
    return out


def _min_cost_assignment(cost: np.ndarray, caps: np.ndarray) -> np.ndarray:
    """Experts -> ranks with rank capacities, minimising total cost: a min-cost flow."""
    e, r = cost.shape
    span = float(cost.max() - cost.min())
    ci = np.zeros_like(cost, dtype=np.int64) if span <= 0 else \
        np.rint((cost - cost.min()) / span * 100000).astype(np.int64)
    g = nx.DiGraph()
    g.add_node("s", demand=-e)
    g.add_node("t", demand=e)
    for i in range(e):
        g.add_edge("s", ("e", i), capacity=1, weight=0)
        for j in range(r):
            g.add_edge(("e", i), ("r", j), capacity=1, weight=int(ci[i, j]))
    for j in range(r):
        g.add_edge(("r", j), "t", capacity=int(caps[j]), weight=0)
    _, flow = nx.network_simplex(g)
    out = np.empty(e, dtype=np.int64)
    for i in range(e):
        f = flow[("e", i)]
        out[i] = next(j for j in range(r) if f[("r", j)] > 0)
    return out


def _flow_greedy(st: _Stats, topo: Topology, first: np.ndarray) -> np.ndarray:
    """Forward sweep: each layer is an exact min-cost flow of hop costs from the layer before."""
    caps = _fixed_caps(st.E, topo.num_ranks)
    hop = topo.hop_cost()
    out = np.zeros((st.L, st.E), dtype=np.int64)
    out[0] = first
    for l in range(1, st.L):
        a = st.trans[l - 1]                       # [E_prev, E]
        cost = a.T @ hop[out[l - 1]]              # [E, R]: sum_a A[a,e] * hop(rank(a), r)
        out[l] = _min_cost_assignment(cost, caps)
    return out


def _partition(w: np.ndarray, sizes: Sequence[int], loads: Optional[np.ndarray] = None,
               penalty: float = 0.0, tolerance: float = 1.0, max_swaps: Optional[int] = None
               ) -> np.ndarray:
    """Split the nodes of a symmetric affinity matrix ``w`` into groups of the given sizes,
    maximising the affinity inside groups minus ``penalty`` times each group's load above
    ``tolerance`` x its fair share, per column of ``loads`` [nodes, layers]: greedy growth,
    then Kernighan-Lin style best swaps. Returns the group of each node."""
    n, ng = len(w), len(sizes)
    sizes_a = np.asarray(sizes, dtype=np.float64)
    group = np.full(n, -1, dtype=np.int64)
    if n == 0:
        return group
    strength = w.sum(1)
    for g, size in enumerate(sizes):
        if size <= 0:
            continue
        free = np.flatnonzero(group < 0)
        seed_node = free[np.argmax(strength[free])]
        group[seed_node] = g
        for _ in range(size - 1):
            free = np.flatnonzero(group < 0)
            gain = w[np.ix_(free, np.flatnonzero(group == g))].sum(1)
            group[free[np.argmax(gain)]] = g
    use_load = loads is not None and penalty > 0
    if use_load:
        loads = np.asarray(loads, dtype=np.float64)
        cap = tolerance * loads.sum(0)[None, :] * (sizes_a / max(n, 1))[:, None]  # [g, L]
    scale = max(1.0, float(np.abs(w).max()))
    for _ in range(max_swaps if max_swaps is not None else 20 * n):
        m = np.stack([w[:, group == g].sum(1) for g in range(ng)], 1)  # [n, groups]
        own = m[np.arange(n), group]
        cross = m[:, group]  # cross[i, j]: affinity of i to j's group
        gain = (cross - own[:, None]) + (cross.T - own[None, :]) - 2 * w
        if use_load:
            gl = np.stack([loads[group == g].sum(0) for g in range(ng)])       # [g, L]
            d = loads[:, None, :] - loads[None, :, :]                           # [n, n, L]
            ex = np.maximum(gl - cap, 0.0)
            gi_l, gi_c = gl[group][:, None, :], cap[group][:, None, :]
            gj_l, gj_c = gl[group][None, :, :], cap[group][None, :, :]
            new = (np.maximum(gi_l - d - gi_c, 0.0) + np.maximum(gj_l + d - gj_c, 0.0)
                   - ex[group][:, None, :] - ex[group][None, :, :]).sum(-1)
            gain = gain - penalty * new
        gain[group[:, None] == group[None, :]] = -np.inf
        i, j = np.unravel_index(int(np.argmax(gain)), gain.shape)
        if not gain[i, j] > 1e-9 * scale:
            break
        group[i], group[j] = group[j], group[i]
    return group


_CHAIN_LOAD_PENALTY = 1.0 / 32
_SKIP_DESCENT_RATIO = 1.08  # skip a path's descent if it starts this much above the best


def _chains(st: _Stats, topo: Topology, weights: Optional[ObjectiveWeights] = None
            ) -> np.ndarray:
    """Chain construction (ExFlow-style global view): link experts of consecutive layers by a
    maximum-weight matching of their transition counts, giving E chains through all layers;
    partition the chains over nodes, then over each node's ranks, keeping chains with high
    mutual affinity together (recursive partitioning on the chain affinity graph)."""
    from scipy.optimize import linear_sum_assignment

    E, L, R = st.E, st.L, topo.num_ranks
    chain = np.zeros((L, E), dtype=np.int64)  # chain[l, i] = expert of chain i at layer l
    chain[0] = np.arange(E)
    for l in range(1, L):
        rows, cols = linear_sum_assignment(-st.trans[l - 1])
        succ = np.empty(E, dtype=np.int64)
        succ[rows] = cols
        chain[l] = succ[chain[l - 1]]
    w = np.zeros((E, E))
    for l in range(L - 1):
        p = st.trans[l][np.ix_(chain[l], chain[l + 1])]
        w += p + p.T
    np.fill_diagonal(w, 0.0)
    caps = _fixed_caps(E, R)
    node = topo.node_ids()
    wt = weights or ObjectiveWeights()
    cload = np.stack([st.loads[l][chain[l]] for l in range(L)], 1)  # [chains, L]
    # a soft load penalty: the descent repairs the balance later, and a strict one here
    # breaks up the chain groups the descent cannot rebuild (measured on synthetic traces)
    kw = dict(penalty=wt.load_excess * _CHAIN_LOAD_PENALTY, tolerance=wt.load_tolerance)
    rank_of_chain = np.empty(E, dtype=np.int64)
    node_of_chain = _partition(w, [int(caps[node == n].sum()) for n in range(topo.num_nodes)],
                               cload, **kw)
    for n in range(topo.num_nodes):
        members = np.flatnonzero(node_of_chain == n)
        ranks = np.flatnonzero(node == n)
        sub = _partition(w[np.ix_(members, members)], [int(caps[r]) for r in ranks],
                         cload[members], **kw)
        rank_of_chain[members] = ranks[sub]
    out = np.empty((L, E), dtype=np.int64)
    for l in range(L):
        out[l, chain[l]] = rank_of_chain
    return out


def _coactivated(st: _Stats, topo: Topology, weights: ObjectiveWeights) -> np.ndarray:
    """Co-activation construction (for the coherent-rows term): per layer, partition the experts over
    the ranks keeping experts that tokens choose together on one rank (soft load penalty), then
    relabel each layer's groups to follow the layer before (most transitions kept on a rank)."""
    from scipy.optimize import linear_sum_assignment

    E, L, R = st.E, st.L, topo.num_ranks
    caps = _fixed_caps(E, R)
    kw = dict(penalty=weights.load_excess * _CHAIN_LOAD_PENALTY, tolerance=weights.load_tolerance)
    out = np.empty((L, E), dtype=np.int64)
    for l in range(L):
        c = st.coact[l] + st.coact[l].T
        group = _partition(c, [int(v) for v in caps], st.loads[l][:, None], **kw)
        if l > 0 and (caps == caps[0]).all():  # equal groups: any group may take any rank
            prev = _assign_to_x(out[l - 1], R).astype(np.float64)            # [E, R]
            kept = prev.T @ st.trans[l - 1] @ _assign_to_x(group, R)          # [rank, group]
            ranks, groups = linear_sum_assignment(-kept)
            label = np.empty(R, dtype=np.int64)
            label[groups] = ranks
            group = label[group]
        out[l] = group
    return out


def _refine_swaps(w: np.ndarray, items: np.ndarray, where: np.ndarray, bins: np.ndarray,
                  max_iter: int = 200) -> None:
    """In place: swap items between the heaviest bin and others while the max drops."""
    for _ in range(max_iter):
        load = np.array([w[where == b].sum() for b in bins])
        hi = int(np.argmax(load))
        best = None
        on_hi = np.flatnonzero(where == bins[hi])
        exp_hi = set(items[on_hi].tolist())
        for lo in range(len(bins)):
            if lo == hi:
                continue
            on_lo = np.flatnonzero(where == bins[lo])
            exp_lo = set(items[on_lo].tolist())
            for i in on_hi:
                if items[i] in exp_lo:
                    continue
                for j in on_lo:
                    if items[j] in exp_hi or w[i] <= w[j]:
                        continue
                    d = w[i] - w[j]
                    new_max = max(load[hi] - d, load[lo] + d)
                    if new_max < load[hi] - 1e-12 and (best is None or new_max < best[0]):
                        best = (new_max, i, j, lo)
        if best is None:
            return
        _, i, j, lo = best
        where[i], where[j] = bins[lo], bins[hi]


def _fill_minimum(items: np.ndarray, where: np.ndarray, bins: int, minimum: int) -> None:
    """In place: move items from bins above ``minimum`` into bins below it (distinct experts
    per bin), lightest moves first; a no-op when every bin already has ``minimum``."""
    for _ in range(bins * max(minimum, 1)):
        count = np.bincount(where, minlength=bins)
        low = np.flatnonzero(count < minimum)
        if not len(low):
            return
        b = int(low[0])
        there = set(items[where == b].tolist())
        movable = [i for i in range(len(items))
                   if count[where[i]] > minimum and items[i] not in there]
        if not movable:
            return
        where[movable[0]] = b


def _eplb_layer(load: np.ndarray, topo: Topology, replica_slots: int) -> np.ndarray:
    """DeepSeek-EPLB-style hierarchical balanced packing with replicas; returns bool [E, R]."""
    e, r, m = len(load), topo.num_ranks, int(topo.ranks_per_node)  # type: ignore[arg-type]
    caps = _fixed_caps(e, r)
    node = topo.node_ids()
    nn = topo.num_nodes
    node_caps = np.array([caps[node == n].sum() for n in range(nn)])
    exp_node, _ = _balanced_packing(load, node_caps)
    x = np.zeros((e, r), dtype=bool)
    for n in range(nn):
        ranks = np.flatnonzero(node == n)
        mine = np.flatnonzero(exp_node == n)
        copies = np.ones(len(mine), dtype=np.int64)
        for _ in range(m * replica_slots):
            per = np.where(copies < m, load[mine] / copies, -1.0)
            if len(mine) == 0 or per.max() <= 0:
                break
            copies[int(np.argmax(per))] += 1
        items = np.repeat(mine, copies)
        w = np.repeat(load[mine] / copies, copies)
        holds = np.zeros((e, len(ranks)), dtype=bool)
        where, _ = _balanced_packing(w, caps[ranks] + replica_slots, items, holds,
                                     np.full(len(ranks), e // r))
        if (where < 0).any():  # a copy found no rank without that expert: drop it
            keep = where >= 0
            items, where = items[keep], where[keep]
            cnt = np.bincount(items, minlength=e)
            w = load[items] / cnt[items]
        _fill_minimum(items, where, len(ranks), e // r)
        _refine_swaps(w, items, where, np.arange(len(ranks)))
        x[items, ranks[where]] = True
    return x


def _eplb(st: _Stats, topo: Topology, replica_slots: int) -> np.ndarray:
    return np.stack([_eplb_layer(st.loads[l], topo, replica_slots) for l in range(st.L)])


def _add_replicas(x: np.ndarray, counts: np.ndarray, load: np.ndarray, caps: np.ndarray
                  ) -> np.ndarray:
    """Give expert e ``counts[e]`` copies by adding copies to the least-loaded ranks with room."""
    x = x.copy()
    rl = _rank_load(load, x)
    for e in np.argsort(-(load / counts), kind="stable"):
        for _ in range(int(counts[e] - x[e].sum())):
            ok = (x.sum(0) < caps) & ~x[e]
            if not ok.any():
                break
            cand = np.flatnonzero(ok)
            x[e, cand[np.argmin(rl[cand])]] = True
            rl = _rank_load(load, x)
    return x


# ====================================================================== MILP machinery
_BANNER_DONE = False


def _new_highs():
    """A silent highspy.Highs (the first construction prints a banner on fd 1)."""
    global _BANNER_DONE
    if _BANNER_DONE:
        h = _highspy.Highs()
    else:
        try:
            sys.stdout.flush()
            fd = os.dup(1)
            with open(os.devnull, "w") as dn:
                os.dup2(dn.fileno(), 1)
                try:
                    h = _highspy.Highs()
                finally:
                    os.dup2(fd, 1)
                    os.close(fd)
        except OSError:  # pragma: no cover
            h = _highspy.Highs()
        _BANNER_DONE = True
    h.setOptionValue("output_flag", False)
    return h


@dataclass
class _Milp:
    c: np.ndarray
    a: sp.csr_matrix
    rlo: np.ndarray
    rhi: np.ndarray
    clo: np.ndarray
    chi: np.ndarray
    integer: np.ndarray  # bool per column
    x0: np.ndarray


def _solve_milp(p: _Milp, time_limit: float, seed: int, node_limit: int,
                use_highspy: bool = True, gap: float = 5e-3) -> Optional[np.ndarray]:
    """Solve; returns the best primal solution found (or None)."""
    n = len(p.c)
    if use_highspy and _highspy is not None:
        h = _new_highs()
        lp = _highspy.HighsLp()
        lp.num_col_, lp.num_row_ = n, p.a.shape[0]
        lp.col_cost_ = p.c
        lp.col_lower_, lp.col_upper_ = p.clo, p.chi
        lp.row_lower_, lp.row_upper_ = p.rlo, p.rhi
        a = p.a.tocsc()
        lp.a_matrix_.format_ = _highspy.MatrixFormat.kColwise
        lp.a_matrix_.start_ = a.indptr
        lp.a_matrix_.index_ = a.indices
        lp.a_matrix_.value_ = a.data
        lp.a_matrix_.num_col_, lp.a_matrix_.num_row_ = n, p.a.shape[0]
        lp.integrality_ = [_highspy.HighsVarType.kInteger if i else
                           _highspy.HighsVarType.kContinuous for i in p.integer]
        h.passModel(lp)
        h.setOptionValue("time_limit", float(max(time_limit, 0.05)))
        h.setOptionValue("random_seed", int(seed) % 2147483647)
        h.setOptionValue("mip_max_nodes", int(node_limit))
        h.setOptionValue("mip_rel_gap", float(gap))
        h.setOptionValue("presolve", "off")  # measured: about 2x faster on these models
        sol = _highspy.HighsSolution()
        sol.col_value = list(map(float, p.x0))
        sol.value_valid = True
        h.setSolution(sol)
        h.run()
        info = h.getInfo()
        if info.primal_solution_status < 1:
            return None
        return np.asarray(h.getSolution().col_value, dtype=np.float64)
    from scipy.optimize import Bounds, LinearConstraint, milp
    res = milp(p.c, constraints=LinearConstraint(p.a, p.rlo, p.rhi),
               integrality=p.integer.astype(np.int64), bounds=Bounds(p.clo, p.chi),
               options={"time_limit": float(max(time_limit, 0.05)), "node_limit": node_limit,
                        "mip_rel_gap": float(gap), "presolve": False})
    return None if res.x is None else np.asarray(res.x)


class _Builder:
    """Row-wise sparse matrix under construction."""

    def __init__(self) -> None:
        self.rows: List[np.ndarray] = []
        self.cols: List[np.ndarray] = []
        self.vals: List[np.ndarray] = []
        self.lo: List[float] = []
        self.hi: List[float] = []

    def add(self, cols: np.ndarray, vals: np.ndarray, lo: float, hi: float) -> None:
        self.rows.append(np.full(len(cols), len(self.lo)))
        self.cols.append(np.asarray(cols))
        self.vals.append(np.asarray(vals, dtype=np.float64))
        self.lo.append(lo)
        self.hi.append(hi)

    def matrix(self, n: int) -> sp.csr_matrix:
        if not self.lo:
            return sp.csr_matrix((0, n))
        return sp.csr_matrix((np.concatenate(self.vals),
                              (np.concatenate(self.rows), np.concatenate(self.cols))),
                             shape=(len(self.lo), n))


def _layer_milp(sc: _Scorer, x: np.ndarray, l: int, free: np.ndarray, use_next: bool = True
                ) -> Optional[Tuple[_Milp, np.ndarray, np.ndarray]]:
    """The sub-MILP for layer ``l`` over the ranks ``free`` with every other layer fixed.

    Variables: x[b, r] (movable expert b, free rank r) binary; y[b, n] node presence (only for
    the cross-node term of incoming transitions); Lmax; Pin; Pout. Returns (model, movable
    experts, free ranks) or None if nothing can move.
    """
    st, topo, w = sc.s, sc.t, sc.w
    E, R = st.E, topo.num_ranks
    xl = x[l]
    n = xl.sum(1).astype(np.float64)
    movable = np.flatnonzero(xl[:, free].any(1))
    if len(movable) < 2 or len(free) < 2:
        return None
    mb, f = len(movable), len(free)
    m_copies = xl[np.ix_(movable, free)].sum(1)
    nb = n[movable]
    node = topo.node_ids()
    g = sc.g
    intra, dn = topo.intra_node_cost, topo.inter_node_cost - topo.intra_node_cost
    beta, alpha, gamma = w.transitions, w.load, w.pair
    nx_ = mb * f
    idx = np.arange(nx_).reshape(mb, f)
    cx = np.zeros((mb, f))
    has_in, has_out = l > 0, use_next and l < st.L - 1
    ycols: List[Tuple[int, int, float]] = []  # (movable index, node, cost)
    if has_in:
        a_in = st.trans[l - 1]
        xa = x[l - 1].astype(np.float64)
        sa = xa / xa.sum(1, keepdims=True)
        u_in = sa.T @ a_in                              # [R, E]
        cx -= beta * intra * u_in[np.ix_(free, movable)].T
        if g.shape[1] > 1 and dn > 0:
            un = (sa @ g).T @ a_in                      # [N, E]
            free_nodes = np.unique(node[free])
            for i, b in enumerate(movable):
                for nd in free_nodes:
                    outside = xl[b, (node == nd)].sum() - xl[b, free[node[free] == nd]].sum()
                    coef = -beta * dn * un[nd, b]
                    if outside == 0 and coef < 0:
                        ycols.append((i, int(nd), coef))
    if has_out:
        b_out = st.trans[l]
        xc = x[l + 1].astype(np.float64)
        nc = xc.sum(1, keepdims=True)
        bx = b_out @ xc                                 # [E, R]
        bn = b_out @ (xc @ g > 0).astype(np.float64)    # [E, N]
        cx -= beta / nb[:, None] * (intra * bx[np.ix_(movable, free)]
                                    + dn * bn[np.ix_(movable, node[free])])
    ny = len(ycols)
    i_l = nx_ + ny
    i_in = i_l + 1
    i_out = i_in + 1
    i_ex = i_out + 1
    ncol = i_ex + 1
    c = np.zeros(ncol)
    c[:nx_] = cx.ravel()
    for k, (_, _, coef) in enumerate(ycols):
        c[nx_ + k] = coef
    c[i_l] = alpha
    c[i_in] = gamma if has_in and R > 1 else 0.0
    c[i_out] = gamma if has_out and R > 1 else 0.0
    c[i_ex] = w.load_excess
    clo = np.zeros(ncol)
    chi = np.ones(ncol)
    chi[i_l:] = np.inf
    integer = np.zeros(ncol, dtype=bool)
    integer[:nx_] = True
    rows = _Builder()
    notfree = np.setdiff1d(np.arange(R), free)
    # each movable expert keeps its number of copies within the free ranks
    for i in range(mb):
        rows.add(idx[i], np.ones(f), float(m_copies[i]), float(m_copies[i]))
    # copies per rank: floor/ceil of the layer total (widened to the current counts)
    counts = xl.sum(0)
    total = int(counts.sum())
    lo = min(total // R, int(counts.min()))
    hi = max(-(-total // R), int(counts.max()))
    for j in range(f):
        rows.add(idx[:, j], np.ones(mb), float(lo), float(hi))
    # load: sum_b load_b / n_b x[b, r] <= Lmax
    per_copy = st.loads[l][movable] / nb
    cur_load = _rank_load(st.loads[l], xl)
    for j in range(f):
        rows.add(np.append(idx[:, j], i_l), np.append(per_copy, -1.0), -np.inf, 0.0)
    clo[i_l] = float(cur_load[notfree].max(initial=0.0))
    # excess load above the tolerance: Lmax - excess <= tolerance * mean
    rows.add(np.array([i_l, i_ex]), np.array([1.0, -1.0]), -np.inf,
             float(w.load_tolerance * sc.mean[l]))
    # node presence y[b, n] <= sum_{free r in n} x[b, r]
    for k, (i, nd, _) in enumerate(ycols):
        js = np.flatnonzero(node[free] == nd)
        rows.add(np.append(idx[i, js], nx_ + k), np.append(-np.ones(len(js)), 1.0),
                 -np.inf, 0.0)
    if has_in and R > 1:
        # incoming pair traffic i -> j for free j (upper bound when b is replicated)
        coef = u_in[:, movable] / nb[None, :]           # [R, mb]
        traffic = u_in @ (xl / n[:, None])              # [R, R] (approx.)
        np.fill_diagonal(traffic, 0.0)
        clo[i_in] = float(traffic[:, notfree].max(initial=0.0))
        for jj, j in enumerate(free):
            for i in range(R):
                if i != j:
                    rows.add(np.append(idx[:, jj], i_in), np.append(coef[i], -1.0),
                             -np.inf, 0.0)
    if has_out and R > 1:
        dc = xc / nc
        sl = xl / n[:, None]
        pout_fixed = pout_cur = 0.0
        wis = {}
        free_set = set(free.tolist())
        for i in range(R):
            wi = b_out @ ((1.0 - xc[:, i])[:, None] * dc)   # [E, R]
            t_i = sl[:, i] @ wi
            t_i[i] = 0.0
            pout_cur = max(pout_cur, float(t_i.max(initial=0.0)))
            if i in free_set:
                wis[i] = wi
            else:
                pout_fixed = max(pout_fixed, float(t_i.max(initial=0.0)))
        clo[i_out] = pout_fixed
        for ii, i in enumerate(free):
            wi = wis[int(i)][movable] / nb[:, None]          # [mb, R]
            for j in range(R):
                if j != i:
                    rows.add(np.append(idx[:, ii], i_out), np.append(wi[:, j], -1.0),
                             -np.inf, 0.0)
    a = rows.matrix(ncol)
    # warm start = the current assignment, with the max variables at their current values
    x0 = np.zeros(ncol)
    x0[:nx_] = xl[np.ix_(movable, free)].ravel()
    for k, (i, nd, _) in enumerate(ycols):
        x0[nx_ + k] = float(min(1.0, xl[movable[i], free[node[free] == nd]].sum()))
    x0[i_l] = max(clo[i_l], float(cur_load[free].max()))
    if has_in and R > 1:
        x0[i_in] = max(clo[i_in], float(traffic.max(initial=0.0)))
    if has_out and R > 1:
        x0[i_out] = max(clo[i_out], pout_cur)
    x0[i_ex] = max(0.0, x0[i_l] - w.load_tolerance * sc.mean[l])
    return _Milp(c, a, np.array(rows.lo), np.array(rows.hi), clo, chi, integer, x0), \
        movable, free


SWAP_PAIRS_EXHAUSTIVE = 64   # experts per layer up to which every pair is tried each sweep


def _swap_descent(sc: _Scorer, x: np.ndarray, deadline: float, seed: int) -> Tuple[np.ndarray, int]:
    """First-improvement local search: exchange the ranks of two experts' copies within one layer
    while the true objective (``sc.local``) improves. Copies per rank and per expert stay as they
    are, so the slot budget holds. Catches what the per-layer MILPs cannot see as linear, such as
    the coherent-rows term (the experts a token chooses together are variables of the same layer).
    Returns (placement, swaps made)."""
    rng = np.random.default_rng(seed)
    x = x.copy()
    L, E = x.shape[0], x.shape[1]
    swaps, improved = 0, True
    while improved and time.perf_counter() < deadline:
        improved = False
        for l in range(L):
            xl = x[l]
            base = sc.local(x, l)
            if E <= SWAP_PAIRS_EXHAUSTIVE:
                pairs = [(a, b) for a in range(E) for b in range(a + 1, E)]
            else:  # a random sample of pairs per sweep, the most co-activated first
                coact = sc.s.coact[l] + sc.s.coact[l].T
                top = np.dstack(np.unravel_index(np.argsort(-coact, axis=None)[:4 * E], coact.shape))[0]
                rand = rng.integers(0, E, size=(8 * E, 2))
                pairs = [(int(a), int(b)) for a, b in np.concatenate([top, rand]) if a != b]
            for a, b in pairs:
                if time.perf_counter() >= deadline:
                    return x, swaps
                for r1 in np.flatnonzero(xl[a] & ~xl[b]):
                    done = False
                    for r2 in np.flatnonzero(xl[b] & ~xl[a]):
                        xl[a, r1], xl[a, r2], xl[b, r2], xl[b, r1] = False, True, False, True
                        new = sc.local(x, l)
                        if new < base - 1e-9 * max(1.0, abs(base)):
                            base, swaps, improved, done = new, swaps + 1, True, True
                            break
                        xl[a, r1], xl[a, r2], xl[b, r2], xl[b, r1] = True, False, True, False
                    if done:
                        break
    return x, swaps


def _ilp(sc: _Scorer, starts: Mapping[str, np.ndarray], *, time_limit: float, seed: int,
         progress: bool, max_sweeps: int, max_block_vars: int, node_limit: int,
         use_highspy: bool) -> Tuple[np.ndarray, Dict[str, Any]]:
    """Construct, then improve by block-coordinate descent; see the module docstring.

    Paths (the time limit is shared among them; the best result wins):
      a. the best greedy start, if it is neither of the following;
      b. "chains" and "eplb" starts after a forward construction: re-solve layers 1..L-1 in
         order, each given only the layer before it (ExFlow's consecutive-layer-pair
         decomposition, with the load terms);
    each then descends: sweep forward / backward, re-solving each layer (or rank block) with
    both neighbours fixed, keeping a sub-solution only if the true objective improves.
    """
    from tqdm.auto import tqdm

    st, topo = sc.s, sc.t
    E, R, L = st.E, topo.num_ranks, st.L
    t0 = time.perf_counter()
    deadline = t0 + time_limit
    rng = np.random.default_rng(seed)
    # ranks per block: a block of g ranks has about g * (E/R) movable experts x g ranks
    g_ranks = R
    while g_ranks > 2 and (E * g_ranks // R) * g_ranks > max_block_vars:
        g_ranks //= 2
    scores = {k: sc.total(v) for k, v in starts.items()}
    best_start = min(scores, key=lambda k: (scores[k], k))
    start_obj = scores[best_start]
    stats = {"solves": 0, "improved": 0, "timed_out": False}
    sub_limit = max(1.0, time_limit / 8)

    def blocks(l: int) -> List[np.ndarray]:
        if g_ranks >= R:
            return [np.arange(R)]
        perm = rng.permutation(R)
        return [np.sort(perm[i:i + g_ranks]) for i in range(0, R, g_ranks)]

    def improve(x: np.ndarray, l: int, use_next: bool, until: float) -> np.ndarray:
        for free in blocks(l):
            left = min(deadline, until) - time.perf_counter()
            if left <= 0:
                stats["timed_out"] = True  # a path was cut short by the time limit
                return x
            sub = _layer_milp(sc, x, l, free, use_next=use_next)
            if sub is None:
                continue
            model, movable, fr = sub
            sol = _solve_milp(model, min(left, sub_limit), seed + stats["solves"], node_limit,
                              use_highspy)
            stats["solves"] += 1
            if sol is None:
                continue
            xb = sol[:len(movable) * len(fr)].reshape(len(movable), len(fr)) > 0.5
            cand = x.copy()
            cand[l][np.ix_(movable, fr)] = xb
            if not (cand[l].sum(1) == x[l].sum(1)).all():
                continue
            old = sc.local(x, l, use_next=use_next)
            new = sc.local(cand, l, use_next=use_next)
            if new < old - 1e-9 * max(1.0, abs(old)):
                x = cand
                stats["improved"] += 1
        return x

    # descent paths: the best greedy start as is, and forward constructions seeded by the
    # balanced "eplb" start and by the global "chains" start; the best result wins
    paths: List[Tuple[str, bool]] = [(n, True) for n in ("chains", "eplb") if n in starts]
    if best_start not in ("chains", "eplb"):
        paths.insert(0, (best_start, False))
    bar = tqdm(total=len(paths) * (L + max_sweeps * L), desc="ilp placement",
               disable=not progress, leave=False, unit="layer")
    history: Dict[str, List[float]] = {}
    built: Dict[str, float] = {}
    skipped: List[str] = []
    x_best, obj_best, origin = starts[best_start].copy(), start_obj, best_start
    try:
        for pi, (name, construct) in enumerate(paths):
            # the first path (usually the best) may use 60% of the time, later ones share
            share = 0.6 if pi == 0 and len(paths) > 1 else 1.0 / (len(paths) - pi)
            path_deadline = time.perf_counter() + (deadline - time.perf_counter()) * share
            x = starts[name].copy()
            label = name
            if construct:
                for l in range(1, L):
                    x = improve(x, l, use_next=False, until=path_deadline)
                    bar.update(1)
                    if time.perf_counter() >= path_deadline:
                        break
                built[name] = sc.total(x)
                label = f"{name} + forward construction"
                if built[name] >= sc.total(starts[name]):
                    x, label = starts[name].copy(), name
                if pi > 0 and sc.total(x) > _SKIP_DESCENT_RATIO * obj_best:
                    skipped.append(label)  # a descent rarely gains this much: save the time
                    continue
            hist = history.setdefault(label if label not in history else f"{label} ({pi})",
                                      [sc.total(x)])
            # a layer needs another solve only if it or a neighbour changed since its last one
            # (with rank blocks, the blocks differ between sweeps: always re-solve)
            dirty = np.ones(L, dtype=bool)
            for sweep in range(max_sweeps):
                if time.perf_counter() >= path_deadline:
                    stats["timed_out"] = True
                    break
                before = hist[-1]
                order = range(L) if sweep % 2 == 0 else range(L - 1, -1, -1)
                for l in order:
                    if dirty[l] or g_ranks < R:
                        prev = x
                        x = improve(x, l, use_next=True, until=path_deadline)
                        dirty[l] = False
                        if x is not prev:
                            dirty[max(l - 1, 0):l + 2] = True
                            dirty[l] = g_ranks < R
                    bar.update(1)
                    bar.set_postfix(objective=f"{sc.total(x):.4f}", refresh=False)
                    if time.perf_counter() >= path_deadline:
                        stats["timed_out"] = True
                        break
                hist.append(sc.total(x))
                if before - hist[-1] <= 1e-4 * max(abs(before), 1e-12):
                    break
            if hist[-1] < obj_best:
                x_best, obj_best, origin = x, hist[-1], label
    finally:
        bar.close()
    x = x_best
    final = sc.total(x)
    if final > start_obj:  # cannot happen (every accepted step improves); guard anyway
        x, final = starts[best_start].copy(), start_obj
    info = {"start": best_start, "start_objective": start_obj, "start_scores": scores,
            "constructed_objective": built, "descent_from": origin, "skipped": skipped,
            "final_objective": final, "sub_solves": stats["solves"],
            "improving_solves": stats["improved"],
            "sweeps": sum(len(h) - 1 for h in history.values()),
            "timed_out": stats["timed_out"], "ranks_per_block": g_ranks, "history": history,
            "solver": "highspy" if use_highspy and _highspy is not None else "scipy.milp",
            "seconds": time.perf_counter() - t0}
    return x, info


# ====================================================================== the planner
def _greedy_candidates(st: _Stats, topo: Topology, replica_slots: int,
                       weights: Optional[ObjectiveWeights] = None) -> Dict[str, np.ndarray]:
    r = topo.num_ranks
    seq = _sequential(st, topo)
    cands = {"contiguous": _assign_to_x(_contiguous(st, topo), r),
             "round_robin": _assign_to_x(_round_robin(st, topo), r),
             "sequential": _assign_to_x(seq, r),
             "flow": _assign_to_x(_flow_greedy(st, topo, seq[0]), r),
             "chains": _assign_to_x(_chains(st, topo, weights), r),
             "eplb": _eplb(st, topo, replica_slots)}
    if weights is not None and weights.coherent > 0 and st.k > 1:
        cands["coactivated"] = _assign_to_x(_coactivated(st, topo, weights), r)
    return cands


def plan(trace: RoutingTrace, topology: Topology, method: str = "ilp", replica_slots: int = 0,
         time_limit: float = 60.0, seed: int = 0, progress: bool = True, *,
         weights: Optional[ObjectiveWeights] = None, max_sweeps: int = 6,
         max_block_vars: int = 1024, node_limit: int = 30,
         solver: str = "auto") -> PlanResult:
    """Place every expert of every layer of ``trace`` on ``topology``'s ranks.

    ``method``: one of :data:`METHODS`. ``replica_slots``: extra expert copies per rank per
    layer (used by "eplb" and "ilp"; the other methods place one copy per expert).
    ``time_limit``: wall-clock seconds for the ILP's search; when it cuts the search short a
    RuntimeWarning says so and the best placement found is returned. ``seed``: HiGHS seeds
    and rank-block choice. ``progress``: a tqdm bar (stderr) for the ILP.
    ILP knobs: ``weights`` (the objective), ``max_sweeps`` (descent sweeps per path),
    ``max_block_vars`` (x[e, r] variables per sub-MILP before layers are split into rank
    blocks), ``node_limit`` (branch-and-bound nodes per sub-MILP, a deterministic work
    limit), ``solver`` ("auto": highspy if installed, else scipy.optimize.milp).
    The ILP's ``details`` hold the start scores, objective history and solve counts.
    """
    if not isinstance(trace, RoutingTrace):
        raise TypeError(f"plan() needs a RoutingTrace, got {type(trace).__name__}")
    if not isinstance(topology, Topology):
        raise TypeError(f"plan() needs a Topology, got {type(topology).__name__}")
    if method not in METHODS:
        raise ValueError(f"unknown placement method {method!r}; choose one of {list(METHODS)}")
    if isinstance(replica_slots, bool) or not isinstance(replica_slots, (int, np.integer)) \
            or replica_slots < 0:
        raise ValueError(f"replica_slots must be an int >= 0, got {replica_slots!r}")
    if not time_limit > 0:
        raise ValueError(f"time_limit must be > 0 seconds, got {time_limit!r}")
    if solver not in ("auto", "highspy", "scipy"):
        raise ValueError(f"solver must be 'auto', 'highspy' or 'scipy', got {solver!r}")
    if solver == "highspy" and _highspy is None:
        raise ImportError("solver='highspy' but highspy is not installed (pip install highspy)")
    replica_slots = int(replica_slots)
    weights = weights or ObjectiveWeights()
    t0 = time.perf_counter()
    st = _Stats(trace)
    r = topology.num_ranks
    notes: List[str] = []
    details: Dict[str, Any] = {}
    if replica_slots and method in ("contiguous", "round_robin", "sequential"):
        notes.append(f"{method} places one copy per expert; replica_slots ignored")
    if method == "contiguous":
        x = _assign_to_x(_contiguous(st, topology), r)
    elif method == "round_robin":
        x = _assign_to_x(_round_robin(st, topology), r)
    elif method == "sequential":
        x = _assign_to_x(_sequential(st, topology), r)
    elif method == "eplb":
        x = _eplb(st, topology, replica_slots)
    else:
        sc = _Scorer(st, topology, weights)
        cands = _greedy_candidates(st, topology, replica_slots, weights)
        if replica_slots:
            counts = cands["eplb"].sum(2)
            caps = _fixed_caps(st.E, r) + replica_slots
            for name in list(cands):
                if name != "eplb":
                    cands[name] = np.stack([_add_replicas(cands[name][l], counts[l],
                                                          st.loads[l], caps)
                                            for l in range(st.L)])
        spent = time.perf_counter() - t0
        x, info = _ilp(sc, cands, time_limit=max(0.85 * (time_limit - spent), 0.1), seed=seed,
                       progress=progress, max_sweeps=max_sweeps, max_block_vars=max_block_vars,
                       node_limit=node_limit, use_highspy=solver != "scipy")
        before = sc.total(x)
        x, swaps = _swap_descent(sc, x, max(t0 + time_limit, time.perf_counter() + 0.05), seed)
        info["swaps"], info["final_objective"] = swaps, sc.total(x)
        details.update(info)
        notes.append("greedy starts: " + ", ".join(
            f"{k}={v:.4f}" for k, v in info["start_scores"].items())
            + f"; best = {info['start']}; forward constructions: " + ", ".join(
                f"{k}={v:.4f}" for k, v in info["constructed_objective"].items())
            + f"; result from {info['descent_from']}")
        notes.append(f"ilp: {info['sub_solves']} sub-MILPs ({info['solver']}), "
                     f"{info['improving_solves']} improving, {info['sweeps']} sweeps; objective "
                     f"{info['start_objective']:.4f} (best greedy) -> {before:.4f}; "
                     f"{swaps} improving swaps -> {info['final_objective']:.4f}")
        if info["timed_out"]:
            msg = (f"ILP placement hit the time limit ({time_limit:.1f} s) after "
                   f"{info['sub_solves']} sub-MILPs; returning the best placement found "
                   f"(objective {info['final_objective']:.4f}, greedy start "
                   f"{info['start_objective']:.4f})")
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            notes.append(msg)
    seconds = time.perf_counter() - t0
    meta = {"format": "moe_compiler.placement", "version": PLACEMENT_FORMAT_VERSION,
            "method": method, "replica_slots": replica_slots, "seed": seed,
            "topology": topology.to_dict(), "model": trace.model,
            "num_experts": trace.num_experts, "trace_tokens": trace.num_tokens,
            "layer_names": list(trace.layer_names)}
    placement = Placement.from_matrix(x, meta)
    check_budget(placement, replica_slots if method in ("eplb", "ilp") else 0, st.E)
    metrics = evaluate(trace, placement, topology, solve_seconds=seconds)
    meta["metrics"] = {k: v for k, v in metrics.to_dict().items() if k != "per_layer_load"}
    placement = Placement(placement.num_ranks, placement.layers, meta)
    return PlanResult(placement, metrics, seconds, method, tuple(notes), details)
