"""The MoE IR: a typed description of one MoE layer and the custom op it is raised to.

Detection (passes/detect_moe.py) turns each MoE layer it proves it understands into ONE call of
``torch.ops.moe_compiler.moe``; every later pass transforms that op, never raw subgraphs.

    moe(hidden        [..., H]   activations (any leading shape; T = numel / H tokens)
        router_logits [T, E]     output of the router linear (stays in the graph: aux losses use it)
        score_bias    [E]?       DeepSeek-V3 correction bias, used only to choose experts, or with
                                 RouterSpec.weight_scale a per-expert factor of the chosen weights (Gemma 4)
        w1            [E, N1, H] first expert GEMM: gate+up fused (N1 = 2I) or gate/up alone (N1 = I)
                                 ([E, H, N1] when ExpertSpec.transposed)
        w3            [E, I, H]? up projection when stored apart from the gate (ExpertSpec.layout "separate")
        w2            [E, H, I]  down projection ([E, I, H] when transposed)
        b1, b3, b2    [E, N]?    expert biases (GPT-OSS)
        spec          str        MoESpec.to_json()
       ) -> [..., H] with hidden's shape and dtype

Shared experts stay outside the op as ordinary dense graph nodes; the spec records that they exist.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch

SCORE_FUNCS = ("softmax", "sigmoid", "sqrtsoftplus")
GROUP_SCORES = ("top2_sum", "max")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "relu2", "swiglu_oai", "swiglu_softcap")
GATED_ONLY = ("swiglu_oai", "swiglu_softcap")  # activations that read a gate and an up half
LAYOUTS = ("concat", "interleaved", "separate", "ungated")


@dataclass(frozen=True)
class RouterSpec:
    """How router logits [T, E] become (expert ids, weights) [T, top_k]."""

    num_experts: int
    top_k: int
    # "softmax", "sigmoid" or "sqrtsoftplus" (sqrt(softplus(x)), DeepSeek-V4) over the logits (in fp32)
    score_func: Literal["softmax", "sigmoid", "sqrtsoftplus"] = "softmax"
    # GPT-OSS: top-k on the raw logits first, then softmax over the k chosen values
    topk_before_score: bool = False
    # DeepSeek-V3 group-limited top-k: experts in n_group groups, keep the best topk_group groups
    n_group: int = 1
    topk_group: int = 1
    # how a group is scored: sum of its top-2 (biased) scores (V3) or its max (V2)
    group_score: Literal["top2_sum", "max"] = "top2_sum"
    # a [E] correction bias is added to the scores for choosing experts only (not to the weights)
    has_score_bias: bool = False
    # divide the chosen weights by their sum (+ renorm_eps)
    renormalize: bool = False
    renorm_eps: float = 0.0
    # multiply the final weights by this factor (DeepSeek routed_scaling_factor)
    scaling_factor: float = 1.0
    # Llama 4, torchtitan's score_before_experts: each chosen weight scales its expert's input,
    # sum_j expert_ids[j](x * w_j), instead of its output (fuse_gating makes one row x * w_j per slot
    # and gives the experts unit weights)
    scales_input: bool = False
    # Gemma 4: the [E] operand in the score_bias slot multiplies the chosen weights (per_expert_scale)
    # instead of biasing the choice (fuse_gating applies it in the graph, so it gets a gradient)
    weight_scale: bool = False

    def __post_init__(self):
        _check(self.num_experts >= 1, f"num_experts must be >= 1, got {self.num_experts}")
        _check(1 <= self.top_k <= self.num_experts,
               f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        _check(self.score_func in SCORE_FUNCS, f"score_func must be one of {SCORE_FUNCS}, got {self.score_func!r}")
        _check(self.group_score in GROUP_SCORES, f"group_score must be one of {GROUP_SCORES}, got {self.group_score!r}")
        _check(self.n_group >= 1 and self.num_experts % self.n_group == 0,
               f"n_group must divide num_experts={self.num_experts}, got {self.n_group}")
        _check(1 <= self.topk_group <= self.n_group, f"topk_group must be in [1, n_group], got {self.topk_group}")
        _check(not (self.weight_scale and self.has_score_bias),
               "weight_scale and has_score_bias both read the [E] score_bias operand: at most one may be set")


@dataclass(frozen=True)
class ExpertSpec:
    """The routed experts: E gated (or plain) MLPs stored as stacked 3D weights."""

    hidden_size: int
    ffn_size: int
    # activation of the gate (or of the single up projection when layout == "ungated")
    activation: Literal["silu", "gelu", "gelu_tanh", "relu", "relu2", "swiglu_oai", "swiglu_softcap"] = "silu"
    # "concat": w1 = [gate; up] halves; "interleaved": gate at even, up at odd rows (GPT-OSS);
    # "separate": w1 = gate, w3 = up; "ungated": w1 = up, act(up) feeds w2
    layout: Literal["concat", "interleaved", "separate", "ungated"] = "concat"
    # weights stored [E, in, out] (GPT-OSS, torchtitan after transpose) instead of [E, out, in]
    transposed: bool = False
    has_bias: bool = False
    # GPT-OSS clamp-SwiGLU constants: gate clamped to <= limit, up to [-limit, limit]
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    # "swiglu_softcap" (Inkling 2): cap(gate, gate_softcap) * sigmoid(gate) * cap(up, up_softcap) in fp32,
    # cap(v, c) = c * tanh(v / c)
    gate_softcap: float = 1.0
    up_softcap: float = 1.0

    def __post_init__(self):
        _check(self.activation in ACTIVATIONS, f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        _check(self.layout in LAYOUTS, f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        _check(self.hidden_size >= 1 and self.ffn_size >= 1, "hidden_size and ffn_size must be >= 1")
        _check(self.activation not in GATED_ONLY or self.layout != "ungated",
               f"activation {self.activation!r} reads a gate and an up projection: layout \"ungated\" has no up")
        _check(self.gate_softcap > 0 and self.up_softcap > 0,
               f"gate_softcap and up_softcap must be > 0, got {self.gate_softcap}, {self.up_softcap}")


@dataclass(frozen=True)
class MoESpec:
    """Everything a pass needs to know about one MoE layer."""

    router: RouterSpec
    experts: ExpertSpec
    # module path of the MoE block, e.g. "model.layers.0.mlp" ("" when unknown)
    path: str = ""
    # "none" | "plain" | "gated": a dense shared expert added beside the routed ones (kept outside the op)
    shared_expert: str = "none"
    # which source pattern was matched (e.g. "transformers.grouped_mm"), for reports
    pattern: str = ""
    # free-form decisions of later passes (kernel configs, explanations), shown in dumps
    notes: tuple = field(default_factory=tuple)

    @property
    def num_experts(self) -> int:
        return self.router.num_experts

    @property
    def top_k(self) -> int:
        return self.router.top_k

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @staticmethod
    def from_json(text: str) -> "MoESpec":
        d = json.loads(text)
        return MoESpec(
            router=RouterSpec(**d["router"]),
            experts=ExpertSpec(**d["experts"]),
            path=d.get("path", ""),
            shared_expert=d.get("shared_expert", "none"),
            pattern=d.get("pattern", ""),
            notes=tuple(tuple(n) if isinstance(n, list) else n for n in d.get("notes", ())),
        )

    def note(self, key: str, default=None):
        """The value recorded under `key` in notes (the last one wins), e.g. note("decision:cpu_gemm")."""
        for n in reversed(self.notes):
            if isinstance(n, (tuple, list)) and len(n) >= 2 and n[0] == key:
                return n[1]
        return default

    def replace(self, **changes) -> "MoESpec":
        return dataclasses.replace(self, **changes)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


# --------------------------------------------------------------------------- custom ops
# Operand order of the op; optional operands may be None.
OPERANDS = ("hidden", "router_logits", "score_bias", "w1", "w3", "w2", "b1", "b3", "b2")
_DIFFERENTIABLE = ("hidden", "router_logits", "w1", "w3", "w2", "b1", "b3", "b2")


def differentiable(spec: "str | MoESpec") -> tuple:
    """The op's differentiable operands, in operand order: the score_bias slot too when it holds a
    weight scale."""
    if not _spec(spec).router.weight_scale:
        return _DIFFERENTIABLE
    return tuple(n for n in OPERANDS if n in _DIFFERENTIABLE or n == "score_bias")


_LIB = torch.library.Library("moe_compiler", "FRAGMENT")
_LIB.define(
    "moe(Tensor hidden, Tensor router_logits, Tensor? score_bias, Tensor w1, Tensor? w3, Tensor w2, "
    "Tensor? b1, Tensor? b3, Tensor? b2, str spec) -> Tensor"
)
# Gradients of the present differentiable operands (differentiable(spec)), in that order (absent ones skipped).
_LIB.define(
    "moe_backward(Tensor grad_out, Tensor hidden, Tensor router_logits, Tensor? score_bias, Tensor w1, "
    "Tensor? w3, Tensor w2, Tensor? b1, Tensor? b3, Tensor? b2, str spec) -> Tensor[]"
)


@torch.library.impl(_LIB, "moe", "CompositeExplicitAutograd")
def _moe_impl(hidden, router_logits, score_bias, w1, w3, w2, b1, b3, b2, spec):
    from moe_compiler import reference
    from moe_compiler.runtime import offload

    for w in (w1, w3, w2):
        if w is not None and offload.is_released(w):
            raise RuntimeError(
                f"MoE layer {_spec(spec).path or '?'}: its expert weights were released to an offload store "
                "(option offload, release_parameters=True), so it runs only inside the compiled graph, and it "
                "was called eagerly. The usual cause is torch._dynamo running the model uncompiled after "
                "too many recompilations: raise torch._dynamo.config.recompile_limit, compile with dynamic=True, "
                "or keep the weights with offload={'release_parameters': False}")
    from moe_compiler.runtime import ep_weights

    for w, name in zip((w1, w3, w2, b1, b3, b2), ep_weights.WEIGHT_NAMES):
        ep_weights.check_not_released(w, f"MoE layer {_spec(spec).path or '?'} (weight {name}, called eagerly)")
    return reference.moe_forward(hidden, router_logits, score_bias, w1, w3, w2, b1, b3, b2, _spec(spec))


@torch.library.register_fake("moe_compiler::moe")
def _moe_fake(hidden, router_logits, score_bias, w1, w3, w2, b1, b3, b2, spec):
    s = _spec(spec)
    torch._check(hidden.shape[-1] == s.experts.hidden_size,
                 lambda: f"moe: hidden size {hidden.shape[-1]} != spec {s.experts.hidden_size}")
    torch._check(router_logits.shape[-1] == s.router.num_experts,
                 lambda: f"moe: router_logits has {router_logits.shape[-1]} experts, spec {s.router.num_experts}")
    return hidden.new_empty(hidden.shape)


def grads_by_recompute(fn, operands: dict, differentiable, grad_out, *, collective: bool = False) -> list:
    """Gradients of fn(**operands) for the present `differentiable` operands, by re-running fn under
    autograd (zeros where nothing flows back, e.g. zero tokens). collective=True always runs the
    backward, so every rank takes part in the collectives inside fn's graph."""
    present = [n for n in differentiable if operands[n] is not None]
    with torch.enable_grad():
        leaves = {n: operands[n].detach().requires_grad_(True) for n in present}
        out = fn(**{**operands, **leaves})
        if not out.requires_grad and not collective:
            return [torch.zeros_like(leaves[n]) for n in present]
        grads = torch.autograd.grad(out, [leaves[n] for n in present], grad_out, allow_unused=True)
    return [torch.zeros_like(leaves[n]) if g is None else g for n, g in zip(present, grads)]


@torch.library.impl(_LIB, "moe_backward", "CompositeExplicitAutograd")
def _moe_backward_impl(grad_out, hidden, router_logits, score_bias, w1, w3, w2, b1, b3, b2, spec):
    from moe_compiler import reference

    operands = dict(hidden=hidden, router_logits=router_logits, score_bias=score_bias, w1=w1, w3=w3, w2=w2,
                    b1=b1, b3=b3, b2=b2)

    def forward(hidden, router_logits, score_bias, w1, w3, w2, b1, b3, b2):
        return reference.moe_forward(hidden, router_logits, score_bias, w1, w3, w2, b1, b3, b2, _spec(spec))

    return grads_by_recompute(forward, operands, differentiable(spec), grad_out)


@torch.library.register_fake("moe_compiler::moe_backward")
def _moe_backward_fake(grad_out, hidden, router_logits, score_bias, w1, w3, w2, b1, b3, b2, spec):
    operands = dict(hidden=hidden, router_logits=router_logits, score_bias=score_bias, w1=w1, w3=w3, w2=w2,
                    b1=b1, b3=b3, b2=b2)
    return [torch.empty_like(operands[n]) for n in differentiable(spec) if operands[n] is not None]


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*[t for t in inputs[:-1] if t is not None])
    ctx.present = [t is not None for t in inputs[:-1]]
    ctx.spec = inputs[-1]


def operand_grads(operands: list, grads, differentiable, names=OPERANDS) -> tuple:
    """An autograd formula's result: one entry per operand (named ``names``), taking the next of
    ``grads`` for each present differentiable operand, None elsewhere; plus None for the spec."""
    grads = iter(grads)
    return (*[next(grads) if n in differentiable and t is not None else None for n, t in zip(names, operands)],
            None)


def _backward(ctx, grad_out):
    saved = iter(ctx.saved_tensors)
    operands = [next(saved) if p else None for p in ctx.present]
    return operand_grads(operands, torch.ops.moe_compiler.moe_backward(grad_out, *operands, ctx.spec),
                         differentiable(ctx.spec))


torch.library.register_autograd("moe_compiler::moe", _backward, setup_context=_setup_context)


def _spec(spec: "str | MoESpec") -> MoESpec:
    return spec if isinstance(spec, MoESpec) else _spec_cached(spec)


_SPEC_CACHE: dict = {}


def _spec_cached(text: str) -> MoESpec:
    s = _SPEC_CACHE.get(text)
    if s is None:
        s = _SPEC_CACHE[text] = MoESpec.from_json(text)
    return s


def moe(hidden, router_logits, w1, w2, spec: MoESpec, *, score_bias=None, w3=None, b1=None, b3=None, b2=None):
    """Python entry to the op with keyword operands (see the module docstring for shapes)."""
    return torch.ops.moe_compiler.moe(hidden, router_logits, score_bias, w1, w3, w2, b1, b3, b2, spec.to_json())


MOE_OP = torch.ops.moe_compiler.moe.default
MOE_BACKWARD_OP = torch.ops.moe_compiler.moe_backward.default
