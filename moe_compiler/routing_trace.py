"""The routing-trace format of moe_compiler: which experts each token was routed to, per MoE layer.

One trace, one format (DESIGN.md: "one routing-trace format"). Everything that records routing
(the runtime's trace hook, a converter for a foreign dump) writes a :class:`RoutingTrace`;
everything that consumes routing (the expert-placement planner ``moe_compiler.passes.placement``,
``moe-compiler plan``, benchmarks) reads one. This module is pure numpy (no torch) so that it is
cheap to import; convert tensors with ``tensor.cpu().numpy()`` first.

In memory::

    RoutingTrace(
        expert_ids   int   [tokens, layers, top_k]   expert chosen by token t at MoE layer l,
                                                      each in [0, num_experts), distinct within a
                                                      token's top-k row (order = router order)
        weights      float32 [tokens, layers, top_k] router weights of those choices, or None
        num_experts  int                              experts per layer (same for every layer)
        model        str                              free-form model name ("" if unknown)
        layer_names  tuple[str, ...]                  one name per MoE layer, or () if unknown
    )

On disk: one ``.npz`` file (``numpy.savez_compressed``, no pickles) holding

    expert_ids   the int array above (stored as int16/int32, whichever fits)
    weights      optional float32 array of the same shape
    metadata     0-d unicode array holding JSON:
                 {"format": "moe_compiler.routing_trace", "version": 1, "model": ...,
                  "num_experts": ..., "layer_names": [...]}

:meth:`RoutingTrace.load` also accepts foreign ``.npz`` files that hold only ``expert_ids``
(and optionally ``weights``); ``num_experts`` is then taken from the argument or inferred as
``max id + 1``.

Token-level transitions (used for cross-layer expert affinity, ExFlow / MoETuner): for a token
routed to experts ``A`` at layer ``l`` and ``B`` at layer ``l+1``, every one of the ``k x k``
pairs ``(a, b)`` counts once in ``transition_counts(l)[a, b]``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["RoutingTrace", "FORMAT_NAME", "FORMAT_VERSION", "synthetic_trace"]

FORMAT_NAME = "moe_compiler.routing_trace"
FORMAT_VERSION = 1


def _readonly(a: np.ndarray) -> np.ndarray:
    """A contiguous read-only array: copies unless ``a`` already is one (so the caller's array
    is never changed)."""
    if a.flags.writeable or not a.flags.c_contiguous:
        a = np.array(a, copy=True, order="C")
        a.flags.writeable = False
    return a


@dataclass(frozen=True, eq=False)
class RoutingTrace:
    """Per-token expert choices for every MoE layer of a model (see the module docstring).

    Arrays are validated, converted (ids to int32, weights to float32) and made read-only.
    """

    expert_ids: np.ndarray
    weights: Optional[np.ndarray]
    num_experts: int
    model: str = ""
    layer_names: Tuple[str, ...] = ()

    # ------------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        ids = self.expert_ids
        if not isinstance(ids, np.ndarray):
            raise TypeError(
                f"RoutingTrace.expert_ids must be a numpy array [tokens, layers, top_k], got "
                f"{type(ids).__name__} (convert torch tensors with .cpu().numpy())")
        if ids.ndim != 3:
            raise ValueError(
                f"RoutingTrace.expert_ids must have 3 dims [tokens, layers, top_k], got "
                f"{ids.ndim} dims with shape {tuple(ids.shape)}")
        if ids.dtype == np.bool_ or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(
                f"RoutingTrace.expert_ids must have an integer dtype (int8..int64, uint8..), "
                f"got {ids.dtype}")
        t, l, k = ids.shape
        if l < 1 or k < 1:
            raise ValueError(
                f"RoutingTrace.expert_ids needs at least one layer and top_k >= 1, got shape "
                f"{tuple(ids.shape)} [tokens, layers, top_k]")
        ne = self.num_experts
        if isinstance(ne, (bool, np.bool_)) or not isinstance(ne, (int, np.integer)) or ne < 1:
            raise ValueError(f"RoutingTrace.num_experts must be a positive int, got {ne!r}")
        ne = int(ne)
        object.__setattr__(self, "num_experts", ne)
        if k > ne:
            raise ValueError(
                f"RoutingTrace top_k={k} exceeds num_experts={ne}: a token's top-k experts must "
                f"be distinct")
        if ids.size:
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= ne:
                bad = lo if lo < 0 else hi
                where = tuple(int(i) for i in np.argwhere(ids == bad)[0])
                raise ValueError(
                    f"RoutingTrace.expert_ids must lie in [0, num_experts={ne}), found {bad} at "
                    f"[token, layer, slot]={list(where)}")
        ids = _readonly(ids.astype(np.int32, copy=False))
        if k > 1 and ids.size:
            s = np.sort(ids, axis=-1)
            dup = np.argwhere((s[..., 1:] == s[..., :-1]).any(-1))
            if len(dup):
                tok, lay = (int(x) for x in dup[0])
                raise ValueError(
                    f"RoutingTrace.expert_ids has a duplicate expert within a token's top-k row "
                    f"(token {tok}, layer {lay}: {ids[tok, lay].tolist()}); each row must hold "
                    f"{k} distinct experts ({len(dup)} such rows)")
        object.__setattr__(self, "expert_ids", ids)

        w = self.weights
        if w is not None:
            if not isinstance(w, np.ndarray):
                raise TypeError(
                    f"RoutingTrace.weights must be a numpy array or None, got {type(w).__name__}")
            if w.shape != ids.shape:
                raise ValueError(
                    f"RoutingTrace.weights must have the same shape as expert_ids "
                    f"{tuple(ids.shape)}, got {tuple(w.shape)} (or pass weights=None)")
            if not (np.issubdtype(w.dtype, np.floating) or np.issubdtype(w.dtype, np.integer)):
                raise ValueError(
                    f"RoutingTrace.weights must be a real floating array, got dtype {w.dtype}")
            w = w.astype(np.float32, copy=False)
            if not np.isfinite(w).all():
                raise ValueError("RoutingTrace.weights contains NaN or inf")
            object.__setattr__(self, "weights", _readonly(w))

        if not isinstance(self.model, str):
            raise ValueError(f"RoutingTrace.model must be a str, got {type(self.model).__name__}")
        names = self.layer_names
        if isinstance(names, str) or not isinstance(names, (tuple, list)):
            raise ValueError(
                f"RoutingTrace.layer_names must be a tuple of str (one per layer) or (), got "
                f"{type(names).__name__}")
        names = tuple(names)
        if names and len(names) != l:
            raise ValueError(
                f"RoutingTrace.layer_names has {len(names)} names but the trace has {l} layers; "
                f"give one name per layer or ()")
        if not all(isinstance(n, str) for n in names):
            raise ValueError("RoutingTrace.layer_names must all be str")
        object.__setattr__(self, "layer_names", names)

    # ------------------------------------------------------------------ shape helpers
    @property
    def num_tokens(self) -> int:
        return int(self.expert_ids.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.expert_ids.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.expert_ids.shape[2])

    def __repr__(self) -> str:
        return (f"RoutingTrace(tokens={self.num_tokens}, layers={self.num_layers}, "
                f"top_k={self.top_k}, num_experts={self.num_experts}, model={self.model!r}, "
                f"weights={'yes' if self.weights is not None else 'no'})")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RoutingTrace):
            return NotImplemented
        if (self.num_experts, self.model, self.layer_names) != (
                other.num_experts, other.model, other.layer_names):
            return False
        if not np.array_equal(self.expert_ids, other.expert_ids):
            return False
        if (self.weights is None) != (other.weights is None):
            return False
        return self.weights is None or np.array_equal(self.weights, other.weights)

    __hash__ = None  # type: ignore[assignment]

    def _check_layer(self, layer: int, *, pair: bool = False) -> int:
        n = self.num_layers - (1 if pair else 0)
        if not isinstance(layer, (int, np.integer)) or not 0 <= layer < n:
            what = "layer pairs (l -> l+1) exist for l" if pair else "layers are"
            raise IndexError(f"layer {layer!r} out of range: {what} 0..{n - 1}")
        return int(layer)

    # ------------------------------------------------------------------ statistics
    def expert_load(self, layer: int) -> np.ndarray:
        """Tokens routed to each expert at ``layer``: int64 counts [num_experts]."""
        layer = self._check_layer(layer)
        return np.bincount(self.expert_ids[:, layer, :].ravel(),
                           minlength=self.num_experts).astype(np.int64)

    def expert_loads(self) -> np.ndarray:
        """``expert_load`` for every layer: int64 [layers, num_experts]."""
        e = self.num_experts
        off = (np.arange(self.num_layers, dtype=np.int64) * e)[None, :, None]
        flat = (self.expert_ids.astype(np.int64) + off).ravel()
        return np.bincount(flat, minlength=self.num_layers * e).reshape(self.num_layers, e)

    def transition_counts(self, layer: int) -> np.ndarray:
        """Counts [E, E] of (expert a at ``layer`` -> expert b at ``layer + 1``) per token.

        All ``top_k x top_k`` pairs of a token count once each, so the total is
        ``num_tokens * top_k ** 2``.
        """
        layer = self._check_layer(layer, pair=True)
        e = self.num_experts
        a = self.expert_ids[:, layer, :].astype(np.int64)
        b = self.expert_ids[:, layer + 1, :].astype(np.int64)
        flat = (a[:, :, None] * e + b[:, None, :]).ravel()
        return np.bincount(flat, minlength=e * e).reshape(e, e)

    # ------------------------------------------------------------------ combining
    @classmethod
    def concat(cls, traces: Sequence["RoutingTrace"]) -> "RoutingTrace":
        """Concatenate traces along tokens; layers, top_k, num_experts and names must agree."""
        traces = list(traces)
        if not traces:
            raise ValueError("RoutingTrace.concat needs at least one trace")
        first = traces[0]
        for i, t in enumerate(traces[1:], 1):
            if not isinstance(t, RoutingTrace):
                raise TypeError(f"RoutingTrace.concat: item {i} is {type(t).__name__}")
            if (t.num_layers, t.top_k, t.num_experts) != (first.num_layers, first.top_k,
                                                          first.num_experts):
                raise ValueError(
                    f"RoutingTrace.concat: trace {i} has (layers, top_k, num_experts)="
                    f"{(t.num_layers, t.top_k, t.num_experts)}, trace 0 has "
                    f"{(first.num_layers, first.top_k, first.num_experts)}")
            if t.layer_names and first.layer_names and t.layer_names != first.layer_names:
                raise ValueError(f"RoutingTrace.concat: trace {i} has different layer_names")
            if (t.weights is None) != (first.weights is None):
                raise ValueError(
                    "RoutingTrace.concat: either all traces carry weights or none does")
        ids = np.concatenate([t.expert_ids for t in traces], axis=0)
        w = None if first.weights is None else np.concatenate([t.weights for t in traces], 0)
        models = {t.model for t in traces}
        names = next((t.layer_names for t in traces if t.layer_names), ())
        return cls(ids, w, first.num_experts, models.pop() if len(models) == 1 else "", names)

    def slice_tokens(self, start: int, stop: Optional[int] = None) -> "RoutingTrace":
        """Tokens ``[start, stop)`` (Python slice semantics) as a new trace."""
        sl = slice(start, stop)
        w = None if self.weights is None else self.weights[sl]
        return RoutingTrace(self.expert_ids[sl], w, self.num_experts, self.model,
                            self.layer_names)

    # ------------------------------------------------------------------ files
    def save(self, path: "str | os.PathLike[str]") -> None:
        """Write the trace to ``path`` (an .npz file; the name is used as given)."""
        meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "model": self.model,
                "num_experts": self.num_experts, "layer_names": list(self.layer_names)}
        dtype = np.int16 if self.num_experts <= np.iinfo(np.int16).max else np.int32
        arrays = {"expert_ids": self.expert_ids.astype(dtype),
                  "metadata": np.array(json.dumps(meta))}
        if self.weights is not None:
            arrays["weights"] = self.weights
        with open(path, "wb") as f:
            np.savez_compressed(f, **arrays)

    @classmethod
    def load(cls, path: "str | os.PathLike[str]",
             num_experts: Optional[int] = None) -> "RoutingTrace":
        """Read a trace written by :meth:`save`, or a foreign .npz holding ``expert_ids``.

        ``num_experts`` overrides inference for foreign files (default ``max id + 1``); when the
        file records its own value, the two must agree.
        """
        where = os.fspath(path)
        try:
            npz = np.load(where, allow_pickle=False)
        except FileNotFoundError:
            raise
        except Exception as exc:  # noqa: BLE001 - re-raised with context
            raise ValueError(f"{where}: not a readable .npz routing trace ({exc})") from exc
        if not hasattr(npz, "files"):
            raise ValueError(
                f"{where}: expected an .npz archive with an 'expert_ids' array, got a single "
                f"array file")
        with npz:
            keys = set(npz.files)
            if "expert_ids" not in keys:
                raise ValueError(
                    f"{where}: missing 'expert_ids' (int [tokens, layers, top_k]); the file "
                    f"holds {sorted(keys)}")
            try:
                ids = npz["expert_ids"]
                weights = npz["weights"] if "weights" in keys else None
                raw_meta = npz["metadata"] if "metadata" in keys else None
            except ValueError as exc:
                raise ValueError(f"{where}: could not read arrays ({exc}); object/pickled "
                                 f"arrays are not accepted") from exc
        meta: dict = {}
        if raw_meta is not None:
            try:
                meta = json.loads(str(raw_meta[()]))
            except Exception as exc:  # noqa: BLE001
                raise ValueError(f"{where}: 'metadata' is not a JSON string ({exc})") from exc
            if not isinstance(meta, dict):
                raise ValueError(f"{where}: 'metadata' must be a JSON object")
            version = meta.get("version", FORMAT_VERSION)
            if not isinstance(version, int) or version > FORMAT_VERSION:
                raise ValueError(
                    f"{where}: routing-trace format version {version!r} is newer than this "
                    f"moe_compiler understands ({FORMAT_VERSION})")
        if ids.ndim != 3:
            raise ValueError(
                f"{where}: 'expert_ids' must have 3 dims [tokens, layers, top_k], got shape "
                f"{tuple(ids.shape)}")
        if ids.dtype == np.bool_ or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"{where}: 'expert_ids' must be integers, got dtype {ids.dtype}")
        if ids.size and int(ids.min()) < 0:
            raise ValueError(f"{where}: 'expert_ids' holds negative ids (min {int(ids.min())})")
        recorded = meta.get("num_experts")
        if num_experts is not None and recorded is not None and int(recorded) != num_experts:
            raise ValueError(
                f"{where}: the file records num_experts={recorded} but num_experts={num_experts} "
                f"was given")
        ne = num_experts if num_experts is not None else recorded
        if ne is None:
            if not ids.size:
                raise ValueError(f"{where}: empty 'expert_ids'; pass num_experts explicitly")
            ne = int(ids.max()) + 1
        if ids.size and int(ids.max()) >= int(ne):
            raise ValueError(
                f"{where}: 'expert_ids' holds id {int(ids.max())} but num_experts={ne}; ids must "
                f"lie in [0, num_experts)")
        names = meta.get("layer_names", [])
        try:
            return cls(ids, weights, int(ne), str(meta.get("model", "")), tuple(names or ()))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: {exc}") from exc


# ---------------------------------------------------------------------- synthetic traces
def _zipf_weights(n: int, a: float, rng: np.random.Generator) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** a
    w = w[rng.permutation(n)]
    return w / w.sum()


def _next_groups(groups: Sequence[np.ndarray], succ: np.ndarray, num_experts: int
                 ) -> List[np.ndarray]:
    """Topic groups one layer down: each expert joins the group of an expert that maps onto
    it; experts nothing maps onto fill the smallest groups (sizes stay balanced)."""
    owner = np.full(num_experts, -1, dtype=np.int64)
    for c, members in enumerate(groups):
        for m in members:
            if owner[succ[m]] < 0:
                owner[succ[m]] = c
    sizes = np.bincount(owner[owner >= 0], minlength=len(groups))
    for e in np.flatnonzero(owner < 0):
        c = int(np.argmin(sizes))
        owner[e] = c
        sizes[c] += 1
    return [np.flatnonzero(owner == c) for c in range(len(groups))]


def synthetic_trace(num_tokens: int, num_layers: int, num_experts: int, top_k: int = 2, *,
                    zipf: float = 1.0, affinity: float = 0.0, collisions: float = 0.0,
                    coactivation: float = 0.0, group_size: Optional[int] = None,
                    seed: int = 0, model: str = "synthetic") -> RoutingTrace:
    """A random trace with Zipf-skewed expert popularity and Markov cross-layer affinity.

    - Each layer has its own Zipf(``zipf``) popularity over a random order of experts
      (``zipf=0`` is uniform).
    - Layer l+1: each of a token's choices follows a fixed per-layer successor ``succ_l[a]``
      of its choice ``a`` at layer l with probability ``affinity``, else it is a fresh draw.
      ``succ_l`` is a random permutation in which a fraction ``collisions`` of experts map onto
      a random expert instead ("permutation-ish": several experts then share a successor).
    - Fresh draws (all of layer 0, the rest later) come from the Zipf popularity, except that
      with probability ``coactivation`` they come from the token's *topic group*: experts
      specialise by topic. Each token has a uniform random topic; a topic owns
      ``group_size`` experts at layer 0 (default ``num_experts // 8``, at least ``top_k``) and
      the successors of its experts at layer l+1 (topped up to equal sizes), so groups stay
      consistent with ``succ``.
    Duplicates within a row are redrawn from the Zipf popularity.
    """
    rng = np.random.default_rng(seed)
    t, L, E, k = int(num_tokens), int(num_layers), int(num_experts), int(top_k)
    if k > E:
        raise ValueError(f"top_k={k} exceeds num_experts={E}")
    pop = [_zipf_weights(E, zipf, rng) for _ in range(L)]
    succ = []
    for _ in range(max(L - 1, 0)):
        s = rng.permutation(E)
        hit = rng.random(E) < collisions
        s[hit] = rng.integers(0, E, int(hit.sum()))
        succ.append(s)
    g = max(int(group_size or E // 8), k, 1)
    order = rng.permutation(E)
    groups = [order[i:i + g] for i in range(0, E - g + 1, g)] or [order]
    topic = rng.integers(0, len(groups), t)
    ids = np.empty((t, L, k), dtype=np.int64)

    def dedupe(rows: np.ndarray, p: np.ndarray) -> np.ndarray:
        for j in range(1, k):
            while True:
                bad = (rows[:, :j] == rows[:, j:j + 1]).any(1)
                if not bad.any():
                    break
                rows[bad, j] = rng.choice(E, int(bad.sum()), p=p)
        return rows

    def fresh(layer: int) -> np.ndarray:
        out = rng.choice(E, (t, k), p=pop[layer])
        if coactivation > 0:
            use = rng.random((t, k)) < coactivation
            for c, members in enumerate(groups):
                sel = use & (topic == c)[:, None]
                cnt = int(sel.sum())
                if cnt:
                    pw = pop[layer][members] / pop[layer][members].sum()
                    out[sel] = rng.choice(members, cnt, p=pw)
        return out

    ids[:, 0] = dedupe(fresh(0), pop[0])
    for layer in range(1, L):
        groups = _next_groups(groups, succ[layer - 1], E)
        follow = rng.random((t, k)) < affinity
        nxt = np.where(follow, succ[layer - 1][ids[:, layer - 1]], fresh(layer))
        ids[:, layer] = dedupe(nxt, pop[layer])
    w = rng.random((t, L, k)).astype(np.float32) + 0.1
    w /= w.sum(-1, keepdims=True)
    w = -np.sort(-w, axis=-1)
    return RoutingTrace(ids, w, E, model)
