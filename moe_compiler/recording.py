"""Record routing traces from any model whose MoE layers the backend raised.

    trace = moe_compiler.record_routing(model, batches)      # -> moe_compiler.routing_trace.RoutingTrace
    trace.save("routing.npz")

The model is compiled with backend "moe"; while recording, every fused gating op
(moe_compiler.gating, one per raised layer) appends its expert ids and weights. Layers appear in
execution order; tokens in the order the layer sees them (batch-major, then sequence).
"""
from __future__ import annotations

import contextlib
import threading

import numpy as np
import torch

_state = threading.local()


def _active():
    return getattr(_state, "recorder", None)


def observe(layer: str, ids: torch.Tensor, weights: torch.Tensor) -> None:
    """Called by the gating op; a no-op unless a RoutingRecorder is active."""
    rec = _active()
    if rec is not None:
        rec.add(layer, ids, weights)


def observe_logits(spec, router_logits: torch.Tensor, score_bias) -> None:
    """For ops that route internally (expert-parallel, FSSDP): route the logits and report them, only
    while a RoutingRecorder is active."""
    if _active() is None:
        return
    from moe_compiler import reference

    with torch.no_grad():
        ids, w = reference.route(router_logits.reshape(-1, spec.num_experts), score_bias, spec.router)
    observe(spec.path, ids, w)


class RoutingRecorder:
    """Collects (layer -> list of [T, k] ids / weights) while active."""

    def __init__(self):
        self.layers: dict[str, list] = {}

    def add(self, layer: str, ids: torch.Tensor, weights: torch.Tensor) -> None:
        self.layers.setdefault(layer, []).append((ids.detach().cpu().numpy(), weights.detach().float().cpu().numpy()))

    @contextlib.contextmanager
    def active(self):
        prev = _active()
        _state.recorder = self
        try:
            yield self
        finally:
            _state.recorder = prev

    def to_trace(self, num_experts: int | None = None, model: str = ""):
        from moe_compiler.routing_trace import RoutingTrace

        if not self.layers:
            raise RuntimeError("no routing was recorded: the backend raised no MoE layer in this model "
                               "(run moe_compiler.explain(model, *inputs) to see why)")
        names = list(self.layers)
        ids = [np.concatenate([i for i, _ in self.layers[n]]) for n in names]
        ws = [np.concatenate([w for _, w in self.layers[n]]) for n in names]
        counts = {n: len(i) for n, i in zip(names, ids)}
        if len(set(counts.values())) != 1 or len({i.shape[1] for i in ids}) != 1:
            raise RuntimeError(f"layers saw different token counts or top-k and cannot form one trace: "
                               f"{ {n: (len(i), i.shape[1]) for n, i in zip(names, ids)} }")
        return RoutingTrace(expert_ids=np.stack(ids, axis=1), weights=np.stack(ws, axis=1).astype(np.float32),
                            num_experts=num_experts or int(max(i.max() for i in ids if i.size) + 1),
                            model=model, layer_names=tuple(names))


def record_routing(model, batches, *, num_experts: int | None = None, model_name: str = "", **options):
    """Run `model` compiled with backend "moe" on each batch (a tensor, or a tuple of positional
    arguments) and return the RoutingTrace of every raised MoE layer."""
    from moe_compiler.explain import known_tensor_names_for

    compiled = torch.compile(model, backend="moe", options=options)
    rec = RoutingRecorder()
    with rec.active(), known_tensor_names_for(model), torch.no_grad():
        for batch in batches:
            compiled(*(batch if isinstance(batch, (tuple, list)) else (batch,)))
    if num_experts is None:
        num_experts = _num_experts(model)
    return rec.to_trace(num_experts=num_experts, model=model_name or type(model).__name__)


def _num_experts(model) -> int | None:
    for m in model.modules():
        spec = getattr(m, "spec", None)
        if spec is not None and hasattr(spec, "num_experts"):
            return spec.num_experts
        n = getattr(getattr(m, "experts", None), "num_experts", None)
        if isinstance(n, int):
            return n
    return None
