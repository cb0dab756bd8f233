"""Replay a routing trace through the expert cache offline: what a cache alone can do at a budget.

    replay(expert_ids, "lru", capacity)      -> Replay(uses, hits)   a policy of runtime.cache_policy
    belady(expert_ids, capacity)             -> Replay(uses, hits)   the best any cache can do
    speedup_over_on_demand(hit_rate, ratio)  -> float                what that hit rate is worth

``expert_ids`` [steps, layers, k] (a RoutingTrace's ``expert_ids``; one step = one decode token at
batch 1). At every step the layers run in order and each asks for the distinct experts it was routed
to, the way ``ExpertStore.begin_step`` drives its policy: hits first (``on_access``), then
``on_use``, then each miss makes room by evicting in the policy's order (never an expert the layer
is using) and is inserted (``on_insert``). Every expert takes one slot: ``capacity`` counts experts.
Nothing is prefetched, so the hit rates are a cache's own; Belady's eviction (the resident expert
whose next use is farthest away) is optimal for any cache without prefetching on the same trace.

Speed: a decode step costs R (the resident model) plus c for every expert it has to load. On-demand
loading loads every use (U per step), so ``ratio`` = resident speed / on-demand speed = 1 + U c / R,
and a cache that hits a fraction h decodes (1 + q) / (1 + q (1 - h)) times faster than on-demand,
with q = ratio - 1. Bookkeeping is free in this model, so real caches land at or below it
(bench/offload.py measured ratio 2.81 and LRU at 1.76x with hit rate 0.672; the model says 1.76x).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moe_compiler.runtime.cache_policy import CachePolicy, make_policy


@dataclass(frozen=True)
class Replay:
    uses: int   # (step, layer, expert) requests
    hits: int   # of those, experts already cached

    @property
    def hit_rate(self) -> float:
        return self.hits / self.uses if self.uses else 0.0


def _steps(expert_ids) -> list:
    """[[sorted distinct experts of layer l] for l] per step, validated."""
    ids = np.asarray(expert_ids)
    if ids.ndim != 3 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"expert_ids must be an integer array [steps, layers, top_k], got {ids.dtype}{list(ids.shape)}")
    if ids.size and ids.min() < 0:
        raise ValueError(f"expert_ids must be >= 0, got {int(ids.min())}")
    return [[sorted(set(row.tolist())) for row in step] for step in ids]


def _check_capacity(capacity: int, steps: list) -> None:
    widest = max((len(used) for step in steps for used in step), default=0)
    if capacity < max(widest, 1):
        raise ValueError(f"capacity {capacity} cannot hold the {widest} experts one layer uses at once; "
                         "give at least that many")


def replay(expert_ids, policy: str | CachePolicy, capacity: int, num_experts: int | None = None,
           predicted_ids=None) -> Replay:
    """Hit rate of ``policy`` (a name from cache_policy.POLICIES or an instance) holding ``capacity``
    experts over the trace (module docstring). ``predicted_ids`` [steps, layers, k'] (optional): each
    layer's predicted experts, given to the policy as votes (``on_prediction``) before the layer runs,
    as the store does when prefetching; nothing is loaded for them."""
    steps = _steps(expert_ids)
    _check_capacity(capacity, steps)
    predicted = None
    if predicted_ids is not None:
        predicted = _steps(predicted_ids)
        if [len(step) for step in predicted] != [len(step) for step in steps]:
            want, got = np.asarray(expert_ids).shape[:2], np.asarray(predicted_ids).shape[:2]
            raise ValueError(f"predicted_ids must have expert_ids' steps and layers {list(want)}, got {list(got)}")
    layers = len(steps[0]) if steps else 0
    if num_experts is None:
        num_experts = int(np.asarray(expert_ids).max()) + 1 if steps else 1
    pol = make_policy(policy) if isinstance(policy, str) else policy
    pol.setup([1] * layers, [num_experts] * layers, capacity)
    cached: set = set()
    uses = hits = 0
    for i, step in enumerate(steps):
        for layer, used in enumerate(step):
            if predicted is not None:
                pol.on_prediction(layer, {e: 1 for e in predicted[i][layer]})
            missing = []
            for e in used:
                uses += 1
                if (layer, e) in cached:
                    hits += 1
                    pol.on_access((layer, e))
                else:
                    missing.append((layer, e))
            pol.on_use(layer, used)
            protect = {(layer, e) for e in used}
            for key in missing:
                if len(cached) >= capacity:
                    victim = next((k for k in pol.order(key) if k in cached and k not in protect), None)
                    if victim is None:  # the policy holds nothing evictable: any unprotected key
                        victim = next(k for k in cached if k not in protect)
                    cached.discard(victim)
                    pol.on_evict(victim)
                cached.add(key)
                pol.on_insert(key)
    return Replay(uses, hits)


def belady(expert_ids, capacity: int) -> Replay:
    """Hit rate of the optimal offline eviction (farthest next use) over the trace."""
    steps = _steps(expert_ids)
    _check_capacity(capacity, steps)
    order = [(layer, e) for step in steps for layer, used in enumerate(step) for e in used]
    never = len(order)
    next_use, seen = [never] * len(order), {}
    for i in range(len(order) - 1, -1, -1):
        next_use[i] = seen.get(order[i], never)
        seen[order[i]] = i
    cached: dict = {}  # key -> index of its next use
    hits, i = 0, 0
    for step in steps:
        for layer, used in enumerate(step):
            protect = {(layer, e) for e in used}
            for e in used:
                key = (layer, e)
                if key in cached:
                    hits += 1
                elif len(cached) >= capacity:
                    victim = max((k for k in cached if k not in protect), key=cached.__getitem__)
                    del cached[victim]
                cached[key] = next_use[i]
                i += 1
    return Replay(len(order), hits)


def speedup_over_on_demand(hit_rate: float, resident_over_on_demand: float) -> float:
    """Decode speed of a cache with this hit rate over on-demand loading (module docstring)."""
    if resident_over_on_demand < 1:
        raise ValueError(f"resident_over_on_demand must be >= 1 (resident is the bound), got {resident_over_on_demand}")
    q = resident_over_on_demand - 1.0
    return (1.0 + q) / (1.0 + q * (1.0 - hit_rate))


def hit_rate_for_speedup(speedup: float, resident_over_on_demand: float) -> float | None:
    """The hit rate a cache needs to decode ``speedup`` times faster than on-demand; None when even a
    perfect cache cannot (speedup above resident_over_on_demand)."""
    if speedup > resident_over_on_demand:
        return None
    q = resident_over_on_demand - 1.0
    if q == 0:
        return 0.0
    return max(0.0, 1.0 - ((1.0 + q) / speedup - 1.0) / q)
