"""Custom ops of offloaded MoE layers (inference): experts come from an expert store.

    p = moe_compiler.prefetch_experts(logits_hat, score_bias, store, layer, spec, earlier)
        # logits_hat [T, E]: a later layer's router applied to an earlier gate input (Fate).
        # Scores as the router scores them, top-(k+extra) per token (extra: the spec's
        # "prefetch_extra" note, default 1), experts ranked by votes; issues
        # asynchronous loads of the ranked experts into the store; returns the per-token
        # predictions [T, k+1] int64 (the data dependency that orders it before the layer).
        # earlier (optional): the same layer's prediction from a source further back
        # (prefetch_lookahead); only orders that one first. The spec's "prefetch_ahead" note
        # (default 0) counts the predictions of this layer still to come: the store queues
        # this one's loads after those of nearer predictions.
    y = moe_compiler.offloaded_experts(x, ids, w, p, store, layer, spec)        # [T, H]
        # The same dropless grouped GEMMs as grouped_experts, each expert pinned in the store while
        # it computes, so the output equals the resident layer's bit for bit:
        #   CPU: codegen/torch_experts expert by expert (resident experts first, then those in
        #        flight, then misses loaded on demand);
        #   CUDA: the Triton kernels over the used experts stacked into one workspace
        #        [U, ...] (U = experts the step uses), with the whole layer's tile configs.
"""
from __future__ import annotations

import torch

from moe_compiler import reference
from moe_compiler.codegen import torch_experts
from moe_compiler.codegen.ops import _triton_ok, triton_grouped_experts
from moe_compiler.ir import _spec
from moe_compiler.runtime import offload

_LIB = torch.library.Library("moe_compiler", "FRAGMENT")
_LIB.define("prefetch_experts(Tensor logits, Tensor? score_bias, str store, int layer, str spec, "
            "Tensor? earlier=None) -> Tensor")
_LIB.define("offloaded_experts(Tensor hidden, Tensor ids, Tensor weights, Tensor? prediction, str store, int layer, "
            "str spec) -> Tensor")

NAMES = ("w1", "w3", "w2", "b1", "b3", "b2")


def predicted_per_token(spec) -> int:
    """top-k plus the spec's ("prefetch_extra", n) note (hoist_prefetch; default 1), at most E."""
    return min(spec.router.top_k + int(spec.note("prefetch_extra", 1)), spec.router.num_experts)


def predict(logits: torch.Tensor, score_bias, spec) -> tuple[torch.Tensor, list, dict]:
    """logits [T, E] -> (per-token top-(k+extra) experts [T, k+extra], experts ranked, votes).

    Experts are ranked by votes (tokens predicting them), ties by how high the tokens rank them (the
    sum over tokens of p - position, p = k+extra: a token's first choice before its last), then by
    id. A decode step's single token thus asks for its likeliest expert first and its (k+extra)-th
    last, which is the load dropped when the loader falls behind. NaN scores rank last. Decode-sized
    steps (a few tokens) are ranked in Python: a handful of tensor ops would cost more than the
    ranking itself on the model's critical path.
    """
    r = spec.router
    logits = logits.reshape(-1, r.num_experts).float()
    if score_bias is None:  # every score function keeps each row's order: rank the logits themselves
        scores = logits
    else:
        scores = reference.score(logits, r.score_func)
        scores = scores + score_bias.reshape(-1).float()
    k = predicted_per_token(spec)
    if scores.numel() <= _SMALL_STEP:
        experts = range(r.num_experts)
        rows = [sorted(experts, key=lambda e, row=row: -row[e] if row[e] == row[e] else float("inf"))[:k]
                for row in scores.tolist()]
        per_token = torch.tensor(rows, dtype=torch.int64).reshape(-1, k).to(logits.device)
        counts: dict = {}
        places: dict = {}
        for row in rows:
            for place, e in enumerate(row):
                counts[e] = counts.get(e, 0) + 1
                places[e] = places.get(e, 0) + k - place
        ranked = sorted(counts, key=lambda e: (-counts[e], -places[e], e))
        return per_token, ranked, {e: counts[e] for e in ranked}
    per_token = torch.topk(torch.nan_to_num(scores, nan=-float("inf")), k, dim=-1).indices
    flat = per_token.reshape(-1)
    votes = torch.bincount(flat, minlength=r.num_experts).tolist()
    worth = torch.arange(k, 0, -1, device=flat.device).repeat(per_token.shape[0])
    places = torch.bincount(flat, weights=worth.double(), minlength=r.num_experts).tolist()
    ranked = sorted((e for e in range(r.num_experts) if votes[e]), key=lambda e: (-votes[e], -places[e], e))
    return per_token, ranked, {e: votes[e] for e in ranked}


_SMALL_STEP = 512  # scores (tokens x experts) ranked in Python rather than with tensor ops


def used_experts(ids: torch.Tensor) -> list:
    """Sorted distinct expert ids of ids [T, k] (Python for decode-sized steps, as in predict)."""
    if ids.numel() <= _SMALL_STEP:
        return sorted(set(ids.reshape(-1).tolist()))
    return torch.unique(ids).tolist()


@torch.library.impl(_LIB, "prefetch_experts", "CompositeExplicitAutograd")
def _prefetch(logits, score_bias, store, layer, spec, earlier=None):
    s = _spec(spec)
    per_token, ranked, votes = predict(logits, score_bias, s)
    st = offload.get_store(store)
    st.prefetch(layer, ranked, votes=votes, token_predictions=per_token.cpu(),
                ahead=int(s.note("prefetch_ahead", 0)))
    return per_token


@torch.library.register_fake("moe_compiler::prefetch_experts")
def _prefetch_fake(logits, score_bias, store, layer, spec, earlier=None):
    s = _spec(spec)
    t = logits.numel() // s.router.num_experts
    return logits.new_empty((t, predicted_per_token(s)), dtype=torch.int64)


class _StoreWeights:
    """``w[e]`` of the expert being computed, as experts_forward indexes a stacked weight."""

    def __init__(self, current: dict, name: str, shape, dtype):
        self.current, self.name, self.shape, self.dtype = current, name, shape, dtype

    def __getitem__(self, e):
        return self.current[e][self.name]


@torch.library.impl(_LIB, "offloaded_experts", "CompositeExplicitAutograd")
def _offloaded(hidden, ids, weights, prediction, store, layer, spec):
    s = _spec(spec)
    st = offload.get_store(store)
    lay = st.layers[layer]
    x = hidden.reshape(-1, hidden.shape[-1])
    E = lay.num_experts
    order = st.begin_step(layer, used_experts(ids), ids.cpu() if prediction is not None else None, rows=ids.numel())
    if _triton_ok(hidden, s) and not lay.prepack:
        return _offloaded_triton(x, ids, weights, st, layer, order, s).to(hidden.dtype).reshape(hidden.shape)
    current: dict = {}
    man = lay.manifest
    views = {n: (_StoreWeights(current, n, (E, *man["shapes"][n]), lay.dtype) if n in man["names"] else None)
             for n in NAMES}
    packed = None
    if lay.prepack:
        packed = tuple(_StoreWeights(current, "packed:" + n, None, lay.dtype) if n in lay.prepack else None
                       for n in ("w1", "w3", "w2"))

    def pinned(order):
        for e in order:
            with st.use(layer, e) as tensors:
                current[e] = tensors
                try:
                    yield e
                finally:
                    del current[e]

    loaded = st.pin_loaded(layer, order)
    if loaded is not None:  # every expert already in the fast tier: all pinned at once, no loads
        current.update(loaded)
        gen = iter(order)
    else:
        gen = pinned(order)
    try:
        y, _ = torch_experts.experts_forward(x, ids, weights, views["w1"], views["w3"], views["w2"], views["b1"],
                                             views["b3"], views["b2"], s.experts, prepack=False, packed=packed,
                                             expert_order=gen)
    finally:
        if loaded is not None:
            st.unpin(layer, order)
        else:
            gen.close()
    return y.to(hidden.dtype).reshape(hidden.shape)


def _offloaded_triton(x, ids, weights, st, layer: int, order: list, s):
    """CUDA: the resident layer's Triton path on the used experts only.

    x [T, H], ids/weights [T, k]; the used experts' tensors are stacked (a device copy of U experts,
    a workspace beside the budget) and ids renumbered into the stack. The tile configs are the
    layer's own (the planned note, else choose_config for all E experts), so every output bit
    equals the resident layer's.
    """
    lay = st.layers[layer]
    if not order:
        return x.new_zeros(x.shape)
    names = [n for n in ("w1", "w2", "b1", "b2") if n in lay.manifest["names"]]
    stacked: dict = {}
    for i, e in enumerate(order):  # one expert pinned at a time: all U together may exceed the budget
        with st.use(layer, e) as tensors:
            for n in names:
                t = tensors[n]
                if n not in stacked:
                    stacked[n] = t.new_empty((len(order), *t.shape))
                stacked[n][i].copy_(t)
    local = torch.full((lay.num_experts,), -1, dtype=torch.int64, device=ids.device)
    local[torch.tensor(order, device=ids.device)] = torch.arange(len(order), device=ids.device)
    planned = s.note("cuda_up_gemm_config")
    return triton_grouped_experts(x, local[ids], weights, stacked["w1"], stacked["w2"], stacked.get("b1"),
                                  stacked.get("b2"), s.experts, config=dict(planned) if planned else None,
                                  config_experts=lay.num_experts)


@torch.library.register_fake("moe_compiler::offloaded_experts")
def _offloaded_fake(hidden, ids, weights, prediction, store, layer, spec):
    return hidden.new_empty(hidden.shape)


PREFETCH_EXPERTS_OP = torch.ops.moe_compiler.prefetch_experts.default
OFFLOADED_EXPERTS_OP = torch.ops.moe_compiler.offloaded_experts.default
