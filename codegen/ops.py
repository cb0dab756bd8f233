"""Lowered custom ops that the single-device passes rewrite moe_compiler.moe into.

    fuse_gating:        moe(x, L, bias, w...)  ->  ids, w = gating(L, bias)        [T, k] int64 / fp32
                                                   y = routed_experts(x, ids, w, w...)
    rewrite_dispatch:   routed_experts         ->  grouped_experts (inference)
                                               or  grouped_experts_fwd (training; saves xs, h, up, a, ys,
                                                   the permutation and counts for grouped_experts_bwd)

``routed_experts`` is the reference (codegen-free) form; ``grouped_experts*`` run the sorted-token
grouped GEMMs of codegen/torch_experts.py on CPU, and the Triton kernels of codegen/triton on CUDA
for inference when the layout allows.
"""
from __future__ import annotations

import torch

from moe_compiler import recording, reference
from moe_compiler.codegen import torch_experts
from moe_compiler.ir import _spec, grads_by_recompute

_LIB = torch.library.Library("moe_compiler", "FRAGMENT")
_W = "Tensor w1, Tensor? w3, Tensor w2, Tensor? b1, Tensor? b3, Tensor? b2"
_LIB.define("gating(Tensor router_logits, Tensor? score_bias, str spec) -> (Tensor, Tensor)")
_LIB.define("gating_backward(Tensor grad_weights, Tensor router_logits, Tensor ids, str spec) -> Tensor")
_LIB.define(f"routed_experts(Tensor hidden, Tensor ids, Tensor weights, {_W}, str spec) -> Tensor")
_LIB.define(f"routed_experts_backward(Tensor grad_out, Tensor hidden, Tensor ids, Tensor weights, {_W}, str spec) -> Tensor[]")
_LIB.define(f"grouped_experts(Tensor hidden, Tensor ids, Tensor weights, {_W}, str spec) -> Tensor")
_LIB.define(f"grouped_experts_fwd(Tensor hidden, Tensor ids, Tensor weights, {_W}, str spec) "
            "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
_LIB.define(f"grouped_experts_bwd(Tensor grad_out, Tensor hidden, Tensor weights, {_W}, Tensor xs, Tensor h, "
            "Tensor up, Tensor a, Tensor ys, Tensor order, Tensor token, Tensor counts, str spec) -> Tensor[]")

_WEIGHTS = ("w1", "w3", "w2", "b1", "b3", "b2")


def _impl(name):
    return torch.library.impl(_LIB, name, "CompositeExplicitAutograd")


# ------------------------------------------------------------------ gating
@_impl("gating")
def _gating(router_logits, score_bias, spec):
    s = _spec(spec)
    ids, w = reference.route(router_logits.reshape(-1, s.router.num_experts), score_bias, s.router)
    recording.observe(s.path, ids, w)
    return ids, w


@torch.library.register_fake("moe_compiler::gating")
def _gating_fake(router_logits, score_bias, spec):
    s = _spec(spec)
    t = router_logits.numel() // s.router.num_experts
    return (router_logits.new_empty((t, s.router.top_k), dtype=torch.int64),
            router_logits.new_empty((t, s.router.top_k), dtype=torch.float32))


def gating_weights(router_logits, ids, spec):
    """Routing weights as a differentiable function of the logits, for chosen ids (no top-k)."""
    r = spec.router
    logits = router_logits.reshape(-1, r.num_experts).float()
    if r.topk_before_score:
        w = reference.score(logits.gather(-1, ids), r.score_func)
    else:
        w = reference.score(logits, r.score_func).gather(-1, ids)
    if r.renormalize:
        w = w / (w.sum(-1, keepdim=True) + r.renorm_eps)
    return w * r.scaling_factor if r.scaling_factor != 1.0 else w


@_impl("gating_backward")
def _gating_backward(grad_weights, router_logits, ids, spec):
    with torch.enable_grad():
        leaf = router_logits.detach().requires_grad_(True)
        w = gating_weights(leaf, ids, _spec(spec))
        (g,) = torch.autograd.grad(w, leaf, grad_weights)
    return g


@torch.library.register_fake("moe_compiler::gating_backward")
def _gating_backward_fake(grad_weights, router_logits, ids, spec):
    return torch.empty_like(router_logits)


def _gating_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], output[0])
    ctx.spec = inputs[2]


def _gating_bwd(ctx, grad_ids, grad_weights):
    logits, ids = ctx.saved_tensors
    if grad_weights is None:
        return None, None, None
    return torch.ops.moe_compiler.gating_backward(grad_weights, logits, ids, ctx.spec), None, None


torch.library.register_autograd("moe_compiler::gating", _gating_bwd, setup_context=_gating_setup)


# ------------------------------------------------------------------ routed_experts (reference form)
@_impl("routed_experts")
def _routed(hidden, ids, weights, w1, w3, w2, b1, b3, b2, spec):
    s = _spec(spec)
    x = hidden.reshape(-1, hidden.shape[-1])
    y = reference.experts_forward(x, ids, weights, w1, w3, w2, b1, b3, b2, s.experts)
    return y.to(hidden.dtype).reshape(hidden.shape)


@torch.library.register_fake("moe_compiler::routed_experts")
def _routed_fake(hidden, ids, weights, w1, w3, w2, b1, b3, b2, spec):
    return hidden.new_empty(hidden.shape)


_ROUTED_DIFF = ("hidden", "weights") + _WEIGHTS


@_impl("routed_experts_backward")
def _routed_backward(grad_out, hidden, ids, weights, w1, w3, w2, b1, b3, b2, spec):
    named = dict(hidden=hidden, weights=weights, w1=w1, w3=w3, w2=w2, b1=b1, b3=b3, b2=b2)

    def forward(hidden, weights, w1, w3, w2, b1, b3, b2):
        return _routed(hidden, ids, weights, w1, w3, w2, b1, b3, b2, spec)

    return grads_by_recompute(forward, named, _ROUTED_DIFF, grad_out)


@torch.library.register_fake("moe_compiler::routed_experts_backward")
def _routed_backward_fake(grad_out, hidden, ids, weights, w1, w3, w2, b1, b3, b2, spec):
    named = dict(hidden=hidden, weights=weights, w1=w1, w3=w3, w2=w2, b1=b1, b3=b3, b2=b2)
    return [torch.empty_like(named[n]) for n in _ROUTED_DIFF if named[n] is not None]


def _routed_setup(ctx, inputs, output):
    ctx.present = [t is not None for t in inputs[:-1]]
    ctx.save_for_backward(*[t for t in inputs[:-1] if t is not None])
    ctx.spec = inputs[-1]


def _unpack_present(ctx):
    saved = iter(ctx.saved_tensors)
    return [next(saved) if p else None for p in ctx.present]


def _routed_bwd(ctx, grad_out):
    hidden, ids, weights, *ws = _unpack_present(ctx)
    grads = iter(torch.ops.moe_compiler.routed_experts_backward(grad_out, hidden, ids, weights, *ws, ctx.spec))
    named = dict(zip(("hidden", "ids", "weights") + _WEIGHTS, [hidden, ids, weights, *ws]))
    return (*[next(grads) if n in _ROUTED_DIFF and named[n] is not None else None for n in named], None)


torch.library.register_autograd("moe_compiler::routed_experts", _routed_bwd, setup_context=_routed_setup)


# ------------------------------------------------------------------ grouped_experts (lowered)
def _triton_ok(hidden, s) -> bool:
    if not hidden.is_cuda or s.experts.layout == "separate" or s.experts.activation == "swiglu_softcap":
        return False  # (the Triton activation kernel has no soft-capped SwiGLU: the torch path runs it)
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_grouped_experts(x, ids, weights, w1, w2, b1, b2, spec, config=None, config_experts=None):
    """The CUDA inference path: codegen.triton's fused MoE kernels (layouts other than "separate");
    config: the tile config planned at compile time (None: choose_config at run time, asked for
    ``config_experts`` experts, default w1's count)."""
    from moe_compiler.codegen.triton.moe import triton_moe_forward

    return triton_moe_forward(x, ids, weights, w1, w2, b_gate_up=b1, b_down=b2, activation=spec.activation,
                              gated=spec.layout != "ungated", interleaved=spec.layout == "interleaved",
                              transposed=spec.transposed, alpha=spec.swiglu_alpha, limit=spec.swiglu_limit,
                              config=config, config_experts=config_experts)


@_impl("grouped_experts")
def _grouped(hidden, ids, weights, w1, w3, w2, b1, b3, b2, spec):
    s = _spec(spec)
    x = hidden.reshape(-1, hidden.shape[-1])
    if _triton_ok(hidden, s):
        planned = s.note("cuda_up_gemm_config")  # chosen by rewrite_dispatch (cost model's BLOCK_M)
        y = triton_grouped_experts(x, ids, weights, w1, w2, b1, b2, s.experts,
                                   config=dict(planned) if planned else None)
    else:
        # the cost model's choice (cost_decisions pass) between oneDNN-prepacked and plain GEMMs
        prepack = s.note("decision:cpu_gemm", "prepacked") != "plain"
        y, _ = torch_experts.experts_forward(x, ids, weights, w1, w3, w2, b1, b3, b2, s.experts, prepack=prepack)
    return y.to(hidden.dtype).reshape(hidden.shape)


@torch.library.register_fake("moe_compiler::grouped_experts")
def _grouped_fake(hidden, ids, weights, w1, w3, w2, b1, b3, b2, spec):
    return hidden.new_empty(hidden.shape)


def _dims(hidden, ids, w1, w3, w2, spec):
    e = _spec(spec).experts
    s_ = ids.numel()
    n1 = w1.shape[-1] if e.transposed else w1.shape[-2]
    n_up = (w3.shape[-1] if e.transposed else w3.shape[-2]) if w3 is not None else 0
    i = w2.shape[-2] if e.transposed else w2.shape[-1]
    return s_, hidden.shape[-1], n1, n_up, i


@_impl("grouped_experts_fwd")
def _grouped_fwd(hidden, ids, weights, w1, w3, w2, b1, b3, b2, spec):
    s = _spec(spec)
    x = hidden.reshape(-1, hidden.shape[-1])
    y, saved = torch_experts.experts_forward(x, ids, weights, w1, w3, w2, b1, b3, b2, s.experts, keep=True)
    p = saved["perm"]
    up = saved["up"] if saved["up"] is not None else x.new_empty((ids.numel(), 0), dtype=w1.dtype)
    counts = torch.tensor(p.counts, dtype=torch.int64, device=hidden.device)
    return (y.to(hidden.dtype).reshape(hidden.shape), saved["xs"], saved["h"], up, saved["a"], saved["ys"],
            p.order, p.token, counts)


@torch.library.register_fake("moe_compiler::grouped_experts_fwd")
def _grouped_fwd_fake(hidden, ids, weights, w1, w3, w2, b1, b3, b2, spec):
    s_, h, n1, n_up, i = _dims(hidden, ids, w1, w3, w2, spec)
    dt = w1.dtype
    new = hidden.new_empty
    return (new(hidden.shape), new((s_, h), dtype=dt), new((s_, n1), dtype=dt), new((s_, n_up), dtype=dt),
            new((s_, i), dtype=dt), new((s_, h), dtype=dt), new((s_,), dtype=torch.int64),
            new((s_,), dtype=torch.int64), new((w1.shape[0],), dtype=torch.int64))


@_impl("grouped_experts_bwd")
def _grouped_bwd_impl(grad_out, hidden, weights, w1, w3, w2, b1, b3, b2, xs, h, up, a, ys, order, token, counts,
                      spec):
    s = _spec(spec)
    x = hidden.reshape(-1, hidden.shape[-1])
    perm = torch_experts.Permutation.__new__(torch_experts.Permutation)
    perm.order, perm.token, perm.counts = order, token, counts.tolist()
    perm.top_k = weights.shape[-1]
    saved = dict(perm=perm, xs=xs, h=h, up=up if w3 is not None else None, a=a, ys=ys,
                 w_sorted=weights.reshape(-1).index_select(0, order).float())
    g = torch_experts.experts_backward(grad_out.reshape(x.shape), saved, x, weights, w1, w3, w2, b1, b3, b2,
                                       s.experts)
    grads = [g[0].reshape(hidden.shape), g[1]] + [gw for gw, w in zip(g[2:], (w1, w3, w2, b1, b3, b2)) if w is not None]
    return grads


@torch.library.register_fake("moe_compiler::grouped_experts_bwd")
def _grouped_bwd_fake(grad_out, hidden, weights, w1, w3, w2, b1, b3, b2, xs, h, up, a, ys, order, token, counts,
                      spec):
    return [torch.empty_like(hidden), torch.empty_like(weights)] + [torch.empty_like(w) for w in
                                                                   (w1, w3, w2, b1, b3, b2) if w is not None]


def _grouped_fwd_setup(ctx, inputs, output):
    hidden, ids, weights, w1, w3, w2, b1, b3, b2, spec = inputs
    ctx.present = [t is not None for t in (w1, w3, w2, b1, b3, b2)]
    ctx.save_for_backward(hidden, weights, *[t for t in (w1, w3, w2, b1, b3, b2) if t is not None], *output[1:])
    ctx.spec = spec


def _grouped_fwd_bwd(ctx, grad_out, *unused):
    saved = list(ctx.saved_tensors)
    hidden, weights = saved[:2]
    n = sum(ctx.present)
    present_ws, rest = saved[2:2 + n], saved[2 + n:]
    it = iter(present_ws)
    ws = [next(it) if p else None for p in ctx.present]
    grads = iter(torch.ops.moe_compiler.grouped_experts_bwd(grad_out, hidden, weights, *ws, *rest, ctx.spec))
    g_hidden, g_weights = next(grads), next(grads)
    g_ws = [next(grads) if p else None for p in ctx.present]
    return (g_hidden, None, g_weights, *g_ws, None)


torch.library.register_autograd("moe_compiler::grouped_experts_fwd", _grouped_fwd_bwd, setup_context=_grouped_fwd_setup)

GATING_OP = torch.ops.moe_compiler.gating.default
ROUTED_EXPERTS_OP = torch.ops.moe_compiler.routed_experts.default
GROUPED_EXPERTS_OP = torch.ops.moe_compiler.grouped_experts.default
GROUPED_EXPERTS_FWD_OP = torch.ops.moe_compiler.grouped_experts_fwd.default
