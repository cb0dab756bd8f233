"""cost_decisions: ask the cost model for each MoE layer's decisions and record them in its spec.

The graph's nodes are unchanged; each MoE op's spec (its last argument) gains one note per decision

    ("decision:<name>", "<choice>", "why: the alternatives' predicted costs, the bytes compared,
                                     and the token counts over which the choice holds")

so they appear in the pass dumps (the spec JSON) and in explain() (MoELayerReport.decisions).
Decisions (moe_compiler.cost_model.decisions): ep_mode, overlap_degree (token chunks per EP layer),
movement (tokens vs weights), replicas, prefetch_depth, and the single-device choice: cpu_gemm (oneDNN prepacked vs plain) on CPU,
cuda_tile (BLOCK_M) on CUDA.

    y = moe_compiler.moe(x, logits, ..., spec)          # x [T, H]
 -> y = moe_compiler.moe(x, logits, ..., spec')         # spec'.notes += decisions (same node, same val)

Profile: the calibrated CPU profile when the layer's tensors are on CPU (bundled cpu_generic when
none is cached, or, with a warning, when the cached file is broken), else by CUDA device name (H200 /
H100 / A100); ``pass_options={"cost_decisions": {"profile": "h200"}}`` overrides (a name or a path
to a profile JSON; a bad one is an error). The token count is the
graph's size hint for T (costs are symbolic; the notes say where each choice changes). Ranks: the
torch.distributed world size when initialised, else one node of the profile (``ranks`` overrides).

Under torch.distributed with several ranks, each rank compiles for its own token count, but the EP
decisions (ep_mode, overlap_degree, movement, replicas) fix which collectives run and must agree. Without a
``tokens`` option they are taken alike on every rank: ep_mode, overlap_degree and movement pick the alternative
closest to the cheapest at every token count of the grid (``decisions.least_worst_ratio``), replicas
are sized at ``decisions.SHARED_TOKENS`` tokens per rank. With ``tokens`` every rank decides at it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch

from moe_compiler import _compat
from moe_compiler.cost_model import decisions as D
from moe_compiler.cost_model.compute import LayerShape
from moe_compiler.cost_model.profiles import HardwareProfile, ProfileError, load_profile, profile_for_device
from moe_compiler.ir import MoESpec

log = logging.getLogger(__name__)

_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
PREFIX = "decision:"
# (layer shape, pass options, device, numel, training, layers) -> decisions: identical layers cost once
_CACHE: dict = {}


def layer_shape(spec: MoESpec, dtype: torch.dtype) -> LayerShape:
    """The cost model's view of a layer (shared experts stay outside the op and are not counted)."""
    e = spec.experts
    return LayerShape(num_experts=spec.num_experts, top_k=spec.top_k, hidden=e.hidden_size, ffn=e.ffn_size,
                      gated=e.layout != "ungated", dtype=_DTYPES.get(dtype, "fp32"))


def decisions_of(spec: MoESpec) -> list:
    """[(name, choice, why)] recorded by this pass in a spec's notes."""
    return [(n[0][len(PREFIX):], n[1], n[2]) for n in spec.notes
            if isinstance(n, (tuple, list)) and len(n) == 3 and str(n[0]).startswith(PREFIX)]


def _is_layer(node) -> bool:
    if node.op != "call_function" or not node.args or not isinstance(node.args[-1], str):
        return False
    ns = getattr(node.target, "namespace", None) or str(node.target).split(".")[0]
    return ns == "moe_compiler" and node.args[-1].lstrip().startswith("{")


@dataclass(frozen=True)
class CostDecisions:
    """Record the cost model's per-layer decisions (EP mode, tokens vs weights, replicas, prefetch, GEMM)."""

    name: ClassVar[str] = "cost_decisions"
    # "auto" (by the tensors' device), a bundled profile name ("h200", "h100", "a100", "cpu", "cpu_generic")
    # or a path to a profile JSON file
    profile: str = "auto"
    # ranks the EP decisions are made for; 0 = torch.distributed world size, else the profile's ranks_per_node
    ranks: int = 0
    # ranks per node; 0 = the profile's
    ranks_per_node: int = 0
    # token count the decisions are evaluated at; 0 = the graph's size hint
    tokens: int = 0
    # seconds of non-MoE compute a weight transfer can hide behind; < 0 = the attention projections' estimate
    window_s: float = -1.0

    def _profile(self, val) -> HardwareProfile:
        if self.profile != "auto":
            return load_profile(self.profile)
        dev = val.device
        name = ""
        if dev.type == "cuda" and torch.cuda.is_available():
            name = torch.cuda.get_device_name(dev.index or 0)
        try:
            return profile_for_device(dev.type, name)
        except ProfileError as e:  # a broken cache must not cost the layer its lowering
            fallback = "cpu_generic" if dev.type == "cpu" else "h100"
            log.warning("cost_decisions: %s; using the bundled %s profile", e, fallback)
            return load_profile(fallback)

    def _ranks(self, profile: HardwareProfile) -> int:
        if self.ranks:
            return int(self.ranks)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size()
        return profile.ranks_per_node

    def every_rank(self) -> bool:
        """True when the EP decisions must come out the same on every rank: torch.distributed runs several
        ranks, each compiling for its own token count, and no shared ``tokens`` was given. A rank that chose
        another EP mode, movement or replica count would run other collectives than its peers."""
        return (not self.tokens and torch.distributed.is_available() and torch.distributed.is_initialized()
                and torch.distributed.get_world_size() > 1)

    def decide(self, spec: MoESpec, val, *, training: bool, num_layers: int) -> list:
        """The Decision list for one layer whose hidden-state value (fake tensor) is ``val``."""
        layer, profile, tokens, ranks = self._layer_inputs(spec, val)
        rpn = self.ranks_per_node or None
        window = None if self.window_s < 0 else float(self.window_s)
        shared = self.every_rank()
        out = [D.decide_ep_mode(layer, profile, ranks, tokens, ranks_per_node=rpn, num_layers=num_layers,
                                training=training, every_rank=shared),
               D.decide_overlap_degree(layer, profile, ranks, tokens, ranks_per_node=rpn, every_rank=shared),
               D.decide_movement(layer, profile, ranks, tokens, ranks_per_node=rpn, window=window,
                                 training=training, num_layers=num_layers, every_rank=shared),
               D.decide_replicas(layer, profile, ranks, tokens, ranks_per_node=rpn, window=window, every_rank=shared),
               D.decide_prefetch_depth(layer, profile, tokens, window=window)]
        if profile.kind == "cpu":
            out.append(D.decide_cpu_gemm(layer, profile, tokens, training=training))
        else:
            out.append(D.decide_cuda_tile(layer, profile, tokens))
        suffix = f" [profile {profile.name}, {ranks} ranks]"
        return [D.Decision(d.name, d.choice, d.why + suffix, d.costs, d.exprs) for d in out]

    def _layer_inputs(self, spec: MoESpec, val):
        """(LayerShape, profile, tokens, ranks) of one layer whose hidden-state value (fake tensor) is ``val``."""
        layer = layer_shape(spec, val.dtype)
        profile = self._profile(val)
        tokens = max(1, int(self.tokens or _compat.size_hint(val.numel() // max(1, layer.hidden))))
        return layer, profile, tokens, self._ranks(profile)

    def decide_ep_mode(self, spec: MoESpec, val, *, training: bool, num_layers: int, context_values: int):
        """The ep_mode Decision of one layer whose coherent chain all-gathers `context_values` values per
        token after it (attention follows; sparse_collectives asks once it has found the chain)."""
        layer, profile, tokens, ranks = self._layer_inputs(spec, val)
        d = D.decide_ep_mode(layer, profile, ranks, tokens, ranks_per_node=self.ranks_per_node or None,
                             num_layers=num_layers, training=training, context_values=context_values,
                             every_rank=self.every_rank())
        return D.Decision(d.name, d.choice, d.why + f" [profile {profile.name}, {ranks} ranks]", d.costs, d.exprs)

    def decide_hierarchical_overlap(self, spec: MoESpec, val, *, ranks_per_node: int):
        """The overlap_degree Decision of a layer that runs hierarchical all-to-alls over nodes of
        ``ranks_per_node`` ranks (expert_parallel's, which may differ from this pass's option; the pass's
        own decision priced flat all-to-alls)."""
        layer, profile, tokens, ranks = self._layer_inputs(spec, val)
        d = D.decide_overlap_degree(layer, profile, ranks, tokens, ranks_per_node=ranks_per_node, hierarchical=True,
                                    every_rank=self.every_rank())
        return D.Decision(d.name, d.choice, d.why + f" [profile {profile.name}, {ranks} ranks, hierarchical over "
                          f"nodes of {ranks_per_node}]", d.costs, d.exprs)

    def call(self, gm: torch.fx.GraphModule, ctx) -> "PassResult":
        from moe_compiler.pipeline import PassResult

        layers = [n for n in gm.graph.nodes if _is_layer(n)]
        reports = [r for r in ctx.moe_layers if r.rewritten and getattr(r, "graph_id", "") in ("", ctx.graph_id)]
        done = 0
        for i, node in enumerate(layers):
            spec = MoESpec.from_json(node.args[-1])
            val = node.args[0].meta.get("val") if isinstance(node.args[0], torch.fx.Node) else None
            if val is None:
                log.info("cost_decisions: %s has no example value; skipped", spec.path or f"layer {i}")
                continue
            prof = self._profile(val)
            key = (layer_shape(spec, val.dtype), self, prof.name, prof.source, str(val.device),
                   _compat.size_hint(val.numel()), ctx.training, len(layers))
            if key not in _CACHE:
                _CACHE[key] = self.decide(spec, val, training=ctx.training, num_layers=len(layers))
            decisions = _CACHE[key]
            kept = tuple(n for n in spec.notes if not (isinstance(n, (tuple, list)) and str(n[0]).startswith(PREFIX)))
            spec = spec.replace(notes=kept + tuple(d.note() for d in decisions))
            node.args = (*node.args[:-1], spec.to_json())
            match = [r for r in reports if r.path == spec.path] or (reports[i:i + 1] if len(reports) == len(layers) else [])
            for r in match[:1]:
                r.decisions = [(d.name, d.choice, d.why) for d in decisions]
            for d in decisions:
                log.info("cost_decisions %s: %s = %s (%s)", spec.path or f"layer {i}", d.name, d.choice, d.why)
            done += 1
        if done:
            gm.recompile()
        return PassResult(gm, bool(done), {"layers_decided": done})
