"""Which cached expert to evict: one interface, four policies.

A key is (layer index, expert id); layers are numbered in the order the model runs them. The expert
store owns the budget, the pins and the bytes; a policy only keeps its bookkeeping and, when room is
needed, yields the keys it holds from "evict first" to "evict last" (``order``; ``victims`` is the
same ranking of a given list). The store skips keys that are in use and stops at the first key it
can evict, so a policy never has to know about pins and an eviction costs O(1) in the usual case.

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

from collections import OrderedDict

POLICIES = ("lru", "arc", "shallow", "predicted")


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
        return iter(list(self._order))  # a copy: the caller evicts while iterating


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
        t1, t2 = list(self.t1), list(self.t2)
        t1_first = bool(t1) and (len(t1) > self.p or (self._incoming_from_b2 and len(t1) == int(self.p)))
        return iter(t1 + t2 if t1_first else t2 + t1)


class _Quota(CachePolicy):
    """Per-layer byte quotas; over-quota layers give up entries first, LRU order inside a layer."""

    def __init__(self):
        self._lru = LRU()
        self._layers: dict = {}   # layer -> OrderedDict of its keys, least recently used first

    def quotas(self) -> list:
        raise NotImplementedError

    def on_access(self, key):
        self._lru.on_access(key)
        mine = self._layers.setdefault(key[0], OrderedDict())
        mine[key] = None
        mine.move_to_end(key)

    on_insert = on_access

    def on_evict(self, key):
        self._lru.on_evict(key)
        self._layers.get(key[0], {}).pop(key, None)

    def inner_order(self, keys: list) -> list:
        """keys of one layer, first to evict first; ``keys`` arrive in LRU order."""
        return keys

    def order(self, incoming):
        quotas = self.quotas()
        own = incoming[0] if incoming is not None else -1
        pressure = {}  # bytes over quota (the incoming layer counts its new entry); most over quota goes first
        for layer, keys in self._layers.items():
            if not keys:
                continue
            if layer >= len(quotas):
                pressure[layer] = float("inf")
            else:
                pressure[layer] = (len(keys) + (layer == own)) * self.expert_bytes[layer] - quotas[layer]
        for layer in sorted(pressure, key=lambda l: -pressure[l]):
            yield from self.inner_order(list(self._layers[layer]))


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
        # layer -> {expert: decayed predicted + used count}, and its sum (kept per layer, so a step's
        # update and the quotas cost O(experts of one layer) and O(layers), not O(all experts))
        self._demand: dict = {}
        self._total: dict = {}

    def demand_of(self, key) -> float:
        """The decayed demand of (layer, expert)."""
        return self._demand.get(key[0], {}).get(key[1], 0.0)

    def _add(self, layer: int, weights: dict, decay: float = 1.0) -> None:
        mine = self._demand.setdefault(layer, {})
        if decay != 1.0:
            for e in mine:
                mine[e] *= decay
        for e, w in weights.items():
            mine[int(e)] = mine.get(int(e), 0.0) + float(w)
        self._total[layer] = sum(mine.values())

    def on_prediction(self, layer, votes):
        total = sum(votes.values()) or 1.0
        self._add(layer, {e: v / total for e, v in votes.items()}, self.decay)

    def on_use(self, layer, experts):
        experts = list(experts)  # real-time correction: what was used counts as demand too
        self._add(layer, {e: 1.0 / max(1, len(experts)) for e in experts})

    def quotas(self):
        n = len(self.num_experts)
        per_layer = [self._total.get(layer, 0.0) for layer in range(n)]
        floor = [min(b, self.budget / max(1, n)) for b in self.expert_bytes]  # every layer keeps >= one expert
        spare = max(0.0, self.budget - sum(floor))
        total = sum(per_layer)
        if total <= 0:
            return [f + spare / max(1, n) for f in floor]
        return [f + spare * d / total for f, d in zip(floor, per_layer)]

    def inner_order(self, keys):
        # keys arrive in LRU order; sorted() is stable, so recency breaks demand ties
        mine = self._demand.get(keys[0][0], {}) if keys else {}
        return sorted(keys, key=lambda k: mine.get(k[1], 0.0))


def make_policy(name: str, **kwargs) -> CachePolicy:
    """A policy by name (see POLICIES); kwargs go to its constructor (shallow: shallow_layers)."""
    table = {"lru": LRU, "arc": ARC, "shallow": ShallowFavoring, "predicted": PredictedDemand}
    if name not in table:
        raise ValueError(f"unknown cache policy {name!r}; accepted: {list(POLICIES)}")
    return table[name](**kwargs)
