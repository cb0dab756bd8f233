"""Which cached expert to evict: one interface, four policies.

A key is (layer index, expert id); layers are numbered in the order the model runs them. The expert
store owns the budget, the pins and the bytes; a policy only keeps its bookkeeping and, when room is
needed, yields the keys it holds from "evict first" to "evict last" (``order``; ``victims`` is the
same ranking of a given list). The store skips keys that are in use and stops at the first key it
can evict, so a policy never has to know about pins. Orders are read lazily, never copied: the usual
eviction costs O(1) (lru, arc), O(layers) (shallow) or O(layers + experts of one layer) (predicted),
not O(cached experts) (bench/cache_policy.py).

    lru        least recently used (the baseline)
    arc        Adaptive Replacement Cache (Megiddo & Modha): recency list T1, frequency list T2,
               ghost lists B1/B2 steer the target size p of T1
    shallow    Fate's shallow-favouring allocation: the first ``shallow_layers`` layers keep all their
               experts, the rest of the budget is shared equally by the deeper layers; LRU inside a layer
    predicted  ExpertFlow's PLEC: each layer's share of the budget follows its predicted demand (decayed
               predictor votes, corrected by the experts actually used); inside a layer the expert with
               the least predicted demand goes first
"""
from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict

POLICIES = ("lru", "arc", "shallow", "predicted")


def front_first(keys: OrderedDict):
    """Iterator over ``keys`` from the front, without copying them all: a store that needs one victim
    reads one or two keys, not the whole cache (58 layers x 256 experts at 50% hold 7424). The caller
    may evict keys it has been given while iterating (the only change allowed meanwhile); each batch
    is read afresh from the front, skipping those, with batches doubling in size."""
    given: set = set()
    batch = 4
    while True:
        # keys already given that are still there come first: len(given) covers them
        fresh = [k for k in itertools.islice(keys, len(given) + batch) if k not in given]
        if not fresh:
            return
        given.update(fresh)
        yield from fresh
        batch *= 2


class CachePolicy:
    """Bookkeeping of one eviction policy; see the module docstring."""

    name = "base"

    def setup(self, expert_bytes: list, num_experts: list, budget: int) -> None:
        """Called whenever the layers or the budget change: bytes of one expert and expert count per layer."""
        self.expert_bytes, self.num_experts, self.budget = list(expert_bytes), list(num_experts), int(budget)

    def on_access(self, key) -> None:
        """key was used (a hit, or a load that finished for a use)."""

    def on_insert(self, key) -> None:
        """key was admitted into the cache (a load was issued for it)."""

    def on_evict(self, key) -> None:
        """key left the cache."""

    def on_prediction(self, layer: int, votes: dict) -> None:
        """The predictor's votes for a layer's experts (expert -> tokens that predict it)."""

    def on_use(self, layer: int, experts) -> None:
        """The experts a layer actually used this step."""

    def order(self, incoming):
        """Iterator over the keys the policy holds (inserted, not evicted), first to evict first;
        ``incoming`` is the key that needs the room. The caller may evict while iterating."""
        raise NotImplementedError

    def victims(self, resident: list, incoming) -> list:
        """resident keys ordered from the first to evict to the last (keys the policy never saw first)."""
        res = set(resident)
        ranked = [k for k in self.order(incoming) if k in res]
        seen = set(ranked)
        return [k for k in resident if k not in seen] + ranked


class LRU(CachePolicy):
    name = "lru"

    def __init__(self):
        self._order: OrderedDict = OrderedDict()

    def on_access(self, key):
        self._order[key] = None
        self._order.move_to_end(key)

    on_insert = on_access

    def on_evict(self, key):
        self._order.pop(key, None)

    def order(self, incoming):
        return front_first(self._order)


class ARC(CachePolicy):
    """ARC over entries (capacity c = budget / mean expert bytes)."""

    name = "arc"

    def __init__(self):
        self.t1: OrderedDict = OrderedDict()
        self.t2: OrderedDict = OrderedDict()
        self.b1: OrderedDict = OrderedDict()
        self.b2: OrderedDict = OrderedDict()
        self.p = 0.0
        self.c = 1
        self._incoming_from_b2 = False

    def setup(self, expert_bytes, num_experts, budget):
        super().setup(expert_bytes, num_experts, budget)
        total = sum(b * n for b, n in zip(expert_bytes, num_experts))
        count = sum(num_experts)
        self.c = max(1, int(budget // max(1.0, total / max(1, count))))

    def on_access(self, key):
        if key in self.t1:
            del self.t1[key]
            self.t2[key] = None
        elif key in self.t2:
            self.t2.move_to_end(key)

    def on_insert(self, key):
        self._incoming_from_b2 = False
        if key in self.b1:  # recency was evicted too early: grow T1's target
            self.p = min(self.c, self.p + max(len(self.b2) / max(1, len(self.b1)), 1))
            del self.b1[key]
            self.t2[key] = None
        elif key in self.b2:  # frequency was evicted too early: shrink T1's target
            self.p = max(0.0, self.p - max(len(self.b1) / max(1, len(self.b2)), 1))
            del self.b2[key]
            self.t2[key] = None
            self._incoming_from_b2 = True
        else:
            self.t1[key] = None
        for ghost in (self.b1, self.b2):  # ghosts are bounded by c each
            while len(ghost) > self.c:
                ghost.popitem(last=False)

    def on_evict(self, key):
        if key in self.t1:
            del self.t1[key]
            self.b1[key] = None
        elif key in self.t2:
            del self.t2[key]
            self.b2[key] = None

    def order(self, incoming):
        n1 = len(self.t1)
        t1_first = n1 > 0 and (n1 > self.p or (self._incoming_from_b2 and n1 == int(self.p)))
        first, second = (self.t1, self.t2) if t1_first else (self.t2, self.t1)
        return itertools.chain(front_first(first), front_first(second))


class _Quota(CachePolicy):
    """Per-layer byte quotas; over-quota layers give up entries first, LRU order inside a layer."""

    def __init__(self):
        self._layers: dict = {}   # layer -> OrderedDict of its keys, least recently used first

    def quotas(self) -> list:
        raise NotImplementedError

    def on_access(self, key):
        mine = self._layers.setdefault(key[0], OrderedDict())
        mine[key] = None
        mine.move_to_end(key)

    on_insert = on_access

    def on_evict(self, key):
        self._layers.get(key[0], {}).pop(key, None)

    def inner_order(self, layer: int):
        """Iterator over one layer's keys, first to evict first (here: least recently used first)."""
        return front_first(self._layers[layer])

    def order(self, incoming):
        quotas = self.quotas()
        own = incoming[0] if incoming is not None else -1
        # bytes over quota (the incoming layer counts its new entry); most over quota goes first, ties
        # by layer. A heap: the usual eviction reads the first layer only.
        pressure = []
        for layer, keys in self._layers.items():
            if not keys:
                continue
            over = float("inf") if layer >= len(quotas) else \
                (len(keys) + (layer == own)) * self.expert_bytes[layer] - quotas[layer]
            pressure.append((-over, layer))
        heapq.heapify(pressure)
        while pressure:
            yield from self.inner_order(heapq.heappop(pressure)[1])


class ShallowFavoring(_Quota):
    """Fate: keep every expert of the first ``shallow_layers`` layers; share the rest equally."""

    name = "shallow"

    def __init__(self, shallow_layers: int = 1):
        super().__init__()
        self.shallow_layers = int(shallow_layers)

    def setup(self, expert_bytes, num_experts, budget):
        super().setup(expert_bytes, num_experts, budget)
        self._quotas = self._shares()

    def quotas(self):
        return self._quotas

    def _shares(self):
        n = len(self.num_experts)
        full = [b * e for b, e in zip(self.expert_bytes, self.num_experts)]
        shallow = min(self.shallow_layers, n)
        keep = 0
        q = [0] * n
        for layer in range(shallow):  # only as many shallow layers as the budget holds whole
            if keep + full[layer] > self.budget:
                break
            q[layer] = full[layer]
            keep += full[layer]
        deep = [layer for layer in range(n) if q[layer] == 0]
        share = (self.budget - keep) / max(1, len(deep))
        for layer in deep:
            q[layer] = share
        return q


class PredictedDemand(_Quota):
    """ExpertFlow's PLEC: quotas in proportion to predicted demand, with correction from real use."""

    name = "predicted"

    def __init__(self, decay: float = 0.8):
        super().__init__()
        self.decay = float(decay)
        # layer -> {expert: stored demand}; an expert's demand is stored * scale[layer]. Decaying a
        # layer only shrinks its scale, so a step's update costs O(its votes), not O(experts of the layer)
        self._stored: dict = {}
        self._scale: dict = {}
        self._total: dict = {}    # layer -> the sum of its demand
        self._quotas = None       # until the demand or the setup changes

    def setup(self, expert_bytes, num_experts, budget):
        super().setup(expert_bytes, num_experts, budget)
        self._quotas = None

    def demand_of(self, key) -> float:
        """The decayed demand of (layer, expert)."""
        return self._stored.get(key[0], {}).get(key[1], 0.0) * self._scale.get(key[0], 1.0)

    def _add(self, layer: int, weights: dict, decay: float = 1.0) -> None:
        stored = self._stored.setdefault(layer, {})
        scale = self._scale.get(layer, 1.0) * decay
        if scale < 1e-200:  # fold the scale in before it underflows (every ~2000 decays at 0.8)
            for e in stored:
                stored[e] *= scale
            scale = 1.0
        self._scale[layer] = scale
        added = 0.0
        for e, w in weights.items():
            e, w = int(e), float(w)
            stored[e] = stored.get(e, 0.0) + w / scale
            added += w
        self._total[layer] = self._total.get(layer, 0.0) * decay + added
        self._quotas = None

    def on_prediction(self, layer, votes):
        total = sum(votes.values()) or 1.0
        self._add(layer, {e: v / total for e, v in votes.items()}, self.decay)

    def on_use(self, layer, experts):
        experts = list(experts)  # real-time correction: what was used counts as demand too
        self._add(layer, {e: 1.0 / max(1, len(experts)) for e in experts})

    def quotas(self):
        if self._quotas is None:
            n = len(self.num_experts)
            per_layer = [self._total.get(layer, 0.0) for layer in range(n)]
            floor = [min(b, self.budget / max(1, n)) for b in self.expert_bytes]  # every layer keeps >= one expert
            spare = max(0.0, self.budget - sum(floor))
            total = sum(per_layer)
            if total <= 0:
                self._quotas = [f + spare / max(1, n) for f in floor]
            else:
                self._quotas = [f + spare * d / total for f, d in zip(floor, per_layer)]
        return self._quotas

    def inner_order(self, layer):
        # least demand first, recency (the keys' LRU order) breaking ties. The usual eviction takes the
        # first key: one min() over the layer, no sort; a heap of the rest only if the caller reads on.
        # The caller may evict what it was given.
        keys, stored = self._layers[layer], self._stored.get(layer, {})
        if not keys:
            return
        first = min(keys, key=lambda k: stored.get(k[1], 0.0))   # the first of equal minima: LRU order
        yield first
        heap = [(stored.get(k[1], 0.0), i, k) for i, k in enumerate(keys) if k != first]
        heapq.heapify(heap)
        while heap:
            yield heapq.heappop(heap)[2]


def make_policy(name: str, **kwargs) -> CachePolicy:
    """A policy by name (see POLICIES); kwargs go to its constructor (shallow: shallow_layers)."""
    table = {"lru": LRU, "arc": ARC, "shallow": ShallowFavoring, "predicted": PredictedDemand}
    if name not in table:
        raise ValueError(f"unknown cache policy {name!r}; accepted: {list(POLICIES)}")
    return table[name](**kwargs)
