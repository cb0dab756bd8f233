"""Offline replay of routing traces through the expert cache (moe_compiler.runtime.cache_replay)."""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_compiler.runtime.cache_policy import POLICIES
from moe_compiler.runtime.cache_replay import (belady, hit_rate_for_speedup, replay, speedup_over_on_demand)
from moe_compiler.runtime.expert_store import ExpertStore


@st.composite
def traces(draw):
    """(expert_ids [steps, layers, k], num_experts, capacity) with distinct experts per token row."""
    layers, experts = draw(st.integers(1, 4)), draw(st.integers(1, 8))
    k, steps = draw(st.integers(1, min(3, experts))), draw(st.integers(0, 30))
    seed = draw(st.integers(0, 2 ** 16))
    rng = np.random.default_rng(seed)
    skew = rng.dirichlet(np.full(experts, draw(st.sampled_from([0.2, 1.0, 10.0]))), size=layers)
    ids = np.array([[rng.choice(experts, size=k, replace=False, p=skew[l]) for l in range(layers)]
                    for _ in range(steps)], dtype=np.int64).reshape(steps, layers, k)
    capacity = draw(st.integers(k, layers * experts))
    return ids, experts, capacity


def _uses(ids) -> int:
    return sum(len(set(row.tolist())) for step in ids for row in step)


@given(traces())
@settings(max_examples=60, deadline=None)
def test_belady_bounds_every_policy(trace):
    ids, experts, capacity = trace
    best = belady(ids, capacity)
    assert best.uses == _uses(ids)
    for policy in POLICIES:
        got = replay(ids, policy, capacity, experts)
        assert got.uses == best.uses and 0 <= got.hits <= best.hits, policy


@given(traces())
@settings(max_examples=40, deadline=None)
def test_a_cache_holding_every_expert_misses_each_expert_once(trace):
    ids, experts, _ = trace
    capacity = ids.shape[1] * experts
    distinct = len({(l, int(e)) for step in ids for l, row in enumerate(step) for e in row})
    for policy in POLICIES:
        assert replay(ids, policy, capacity, experts).hits == _uses(ids) - distinct
    assert belady(ids, capacity).hits == _uses(ids) - distinct


@given(traces())
@settings(max_examples=40, deadline=None)
def test_lru_replay_matches_a_plain_lru(trace):
    """The replay drives runtime's LRU like a textbook LRU that never evicts the running layer's experts."""
    ids, experts, capacity = trace
    cache, hits = OrderedDict(), 0
    for step in ids:
        for layer, row in enumerate(step):
            used = sorted(set(row.tolist()))
            missing = []
            for e in used:
                if (layer, e) in cache:
                    hits += 1
                    cache.move_to_end((layer, e))
                else:
                    missing.append((layer, e))
            for key in missing:
                if len(cache) >= capacity:
                    victim = next(k for k in cache if k[0] != layer or k[1] not in used)
                    del cache[victim]
                cache[key] = None
    assert replay(ids, "lru", capacity, experts).hits == hits


@pytest.mark.parametrize("policy", POLICIES)
def test_replay_counts_what_the_expert_store_counts(tmp_path, policy):
    """The same trace through a real ExpertStore (experts of one size, budget = capacity experts) hits
    exactly as often as the replay says."""
    rng = np.random.default_rng(3)
    layers, experts, k, capacity = 3, 6, 2, 7
    ids = np.stack([np.stack([rng.choice(experts, size=k, replace=False, p=[.4, .2, .15, .1, .1, .05])
                              for _ in range(layers)]) for _ in range(40)])
    g = torch.Generator().manual_seed(0)
    expert_bytes = (6 * 4 + 4 * 3) * 4  # w1 [6, 4] + w2 [4, 3], fp32
    store = ExpertStore(str(tmp_path), budget=capacity * expert_bytes, policy=policy, loader="thread")
    weights = [{"w1": torch.randn(experts, 6, 4, generator=g), "w2": torch.randn(experts, 4, 3, generator=g)}
               for _ in range(layers)]
    for layer, w in enumerate(weights):
        store.add_layer(f"l{layer}", w, transposed=False)
    assert store.layers[0].expert_bytes == expert_bytes
    try:
        for step in ids:
            for layer, row in enumerate(step):
                for e in store.begin_step(layer, sorted(set(row.tolist()))):
                    with store.use(layer, e) as w:   # the layer computes with expert e: it must be e's weights
                        assert torch.equal(w["w2"], weights[layer]["w2"][e])
        stats = store.stats()
    finally:
        store.close()
    got = replay(ids, policy, capacity, experts)
    assert (stats["hits"], stats["hits"] + stats["misses"]) == (got.hits, got.uses)


def test_bad_traces_and_capacities_are_refused():
    ids = np.zeros((2, 1, 2), dtype=np.int64)
    ids[:, 0, 1] = 1
    with pytest.raises(ValueError, match=r"\[steps, layers, top_k\]"):
        replay(ids[0], "lru", 4)
    with pytest.raises(ValueError, match=r"\[steps, layers, top_k\]"):
        belady(ids.astype(np.float32), 4)
    with pytest.raises(ValueError, match=">= 0"):
        replay(-ids - 1, "lru", 4)
    with pytest.raises(ValueError, match="cannot hold the 2 experts"):
        belady(ids, 1)
    with pytest.raises(ValueError, match="unknown cache policy"):
        replay(ids, "fifo", 4)
    assert replay(np.zeros((0, 3, 2), dtype=np.int64), "lru", 1).hit_rate == 0.0


def test_speedup_model():
    assert speedup_over_on_demand(0.0, 3.0) == pytest.approx(1.0)
    assert speedup_over_on_demand(1.0, 3.0) == pytest.approx(3.0)
    # bench/offload.py, session 11, readahead loader: resident 2.81x on-demand, LRU hit 0.672 -> measured 1.76x
    assert speedup_over_on_demand(0.672, 2.81) == pytest.approx(1.76, abs=0.01)
    for h in (0.1, 0.5, 0.776, 0.9):
        assert hit_rate_for_speedup(speedup_over_on_demand(h, 2.81), 2.81) == pytest.approx(h)
    assert hit_rate_for_speedup(3.0, 2.81) is None
    assert hit_rate_for_speedup(1.0, 1.0) == 0.0
    with pytest.raises(ValueError, match="resident_over_on_demand"):
        speedup_over_on_demand(0.5, 0.5)


def test_replay_gives_predictions_to_the_policy_before_each_layer():
    """predicted_ids reach the policy as votes (on_prediction) before the layer's own accesses, one
    call per step and layer; a prediction trace of other steps or layers is refused."""
    from moe_compiler.runtime.cache_policy import LRU

    calls = []

    class Recording(LRU):
        def on_prediction(self, layer, votes):
            calls.append(("predict", layer, sorted(votes)))

        def on_use(self, layer, experts):
            calls.append(("use", layer, list(experts)))

    ids = np.array([[[0, 1], [2, 3]], [[1, 2], [0, 3]]])          # [steps 2, layers 2, k 2]
    predicted = np.array([[[0, 1, 2], [2, 3, 3]], [[1, 2, 0], [0, 3, 1]]])
    replay(ids, Recording(), capacity=4, num_experts=4, predicted_ids=predicted)
    assert calls == [("predict", 0, [0, 1, 2]), ("use", 0, [0, 1]), ("predict", 1, [2, 3]), ("use", 1, [2, 3]),
                     ("predict", 0, [0, 1, 2]), ("use", 0, [1, 2]), ("predict", 1, [0, 1, 3]), ("use", 1, [0, 3])]
    with pytest.raises(ValueError, match="predicted_ids must have expert_ids' steps and layers"):
        replay(ids, "predicted", capacity=4, num_experts=4, predicted_ids=predicted[:1])
