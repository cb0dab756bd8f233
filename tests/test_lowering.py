"""Single-device lowering: fused gating, grouped experts (forward and backward), training."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import moe_compiler
from moe_compiler.explain import collect_records
from moe_compiler.ir import ExpertSpec, MoESpec, RouterSpec
from moe_compiler.pipeline import counters
from moe_compiler.testing import assert_rewrite_equivalent, routings

ops = torch.ops.moe_compiler


@st.composite
def expert_cases(draw):
    """Generates: (spec, tensors) for grouped experts: experts 1-9, top-k 1-4, odd hidden/ffn sizes,
    every layout (concat, interleaved, separate, ungated), every activation the layout takes (soft caps
    drawn), transposed or not, biases on/off, 0-40 tokens, routings skewed / one-expert / empty experts."""
    e = draw(st.integers(1, 9))
    k = draw(st.integers(1, min(4, e)))
    h, i, t = draw(st.integers(1, 17)), draw(st.integers(1, 13)), draw(st.integers(0, 40))
    layout = draw(st.sampled_from(["concat", "interleaved", "separate", "ungated"]))
    acts = ["silu", "gelu_tanh", "relu", "relu2"] + (["swiglu_oai", "swiglu_softcap"] if layout != "ungated" else [])
    act = draw(st.sampled_from(acts))
    transposed, bias = draw(st.booleans()), draw(st.booleans())
    caps = draw(st.tuples(st.sampled_from([0.5, 1.0, 10.0]), st.sampled_from([0.5, 1.0, 10.0])))
    spec = MoESpec(RouterSpec(num_experts=e, top_k=k, renormalize=draw(st.booleans())),
                   ExpertSpec(hidden_size=h, ffn_size=i, activation=act, layout=layout, transposed=transposed,
                              has_bias=bias, gate_softcap=caps[0], up_softcap=caps[1]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 999)))
    n1 = 2 * i if layout in ("concat", "interleaved") else i

    def w(out, inp):
        shape = (e, inp, out) if transposed else (e, out, inp)
        return torch.randn(shape, generator=g) * inp ** -0.5

    tensors = dict(hidden=torch.randn(t, h, generator=g), logits=draw(routings(t, e, kinds=("random", "one_expert",
                                                                                             "skewed", "empty_experts"))),
                   w1=w(n1, h), w3=w(i, h) if layout == "separate" else None, w2=w(h, i),
                   b1=torch.randn(e, n1, generator=g) if bias else None,
                   b3=torch.randn(e, i, generator=g) if bias and layout == "separate" else None,
                   b2=torch.randn(e, h, generator=g) if bias else None)
    return spec, tensors


def _grads(fn, tensors, names):
    leaves = {n: (t.clone().requires_grad_(t.is_floating_point()) if t is not None else None) for n, t in tensors.items()}
    out = fn(leaves)
    g = torch.Generator().manual_seed(0)
    (out * torch.randn(out.shape, generator=g)).sum().backward()
    return out.detach(), [leaves[n].grad for n in names if leaves[n] is not None]


NAMES = ["hidden", "logits", "w1", "w3", "w2", "b1", "b3", "b2"]


def _reference(spec):
    s = spec.to_json()
    return lambda a: ops.moe(a["hidden"], a["logits"], None, a["w1"], a["w3"], a["w2"], a["b1"], a["b3"], a["b2"], s)


def _lowered(spec, training):
    s = spec.to_json()

    def f(a):
        ids, w = ops.gating(a["logits"], None, s)
        args = (a["hidden"], ids, w, a["w1"], a["w3"], a["w2"], a["b1"], a["b3"], a["b2"], s)
        return ops.grouped_experts_fwd(*args)[0] if training else ops.grouped_experts(*args)

    return f


@given(expert_cases())
@settings(max_examples=25)
def test_lowered_equals_reference_forward_and_backward(case):
    spec, tensors = case
    ref_out, ref_grads = _grads(_reference(spec), tensors, NAMES)
    out, grads = _grads(_lowered(spec, training=True), tensors, NAMES)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    for name, a, b in zip([n for n in NAMES if tensors[n] is not None], grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m: f"grad {name}: {m}")
    with torch.no_grad():
        torch.testing.assert_close(_lowered(spec, training=False)(tensors), ref_out, rtol=1e-4, atol=1e-5)


def test_gating_ties_and_groups_match_eager_topk():
    logits = torch.zeros(6, 8)  # all tied
    spec = RouterSpec(num_experts=8, top_k=3)
    ids, w = ops.gating(logits, None, MoESpec(spec, ExpertSpec(hidden_size=1, ffn_size=1)).to_json())
    assert torch.equal(ids, torch.topk(logits.softmax(-1), 3).indices)
    torch.testing.assert_close(w, torch.full((6, 3), 1 / 8))


def test_pipeline_lowers_inference_and_training_graphs():
    torch.manual_seed(0)
    layer = moe_compiler.MoELayer(16, 24, 4, 2)
    x = torch.randn(7, 16)
    counters.clear()
    with torch.no_grad():
        torch.compile(layer, backend="moe")(x)
    assert counters["fuse_gating"]["gating_fused"] == 1
    assert counters["rewrite_dispatch"]["layers_lowered"] == 1
    assert counters["rewrite_dispatch"]["training_variant"] == 0
    torch._dynamo.reset()
    counters.clear()
    assert_rewrite_equivalent(layer, x, backward=True, expected_moe_ops=1)
    assert counters["rewrite_dispatch"]["training_variant"] == 1


def test_dispatch_choice_in_dumps(tmp_path):
    layer = moe_compiler.MoELayer(16, 24, 4, 2)
    with torch.no_grad():
        torch.compile(layer, backend="moe", options={"dump_dir": str(tmp_path)})(torch.randn(5, 16))
    (graph,) = list(tmp_path.iterdir())
    (after_file,) = graph.glob("*_rewrite_dispatch.after.py")
    after = after_file.read_text()
    assert "moe_compiler.grouped_experts.default" in after and "dropless" in after
    assert "cuda_up_gemm_config" in after  # the Triton tile plan chosen for this layer


@pytest.mark.parametrize("tokens", [0, 1, 5])
def test_edge_token_counts_through_compiled_path(tokens):
    layer = moe_compiler.MoELayer(12, 10, 5, 2)
    x = torch.randn(tokens, 12)
    assert_rewrite_equivalent(layer, x, backward=True, expected_moe_ops=1)


def test_tiny_mixtral_training_tracks_eager():
    from hf_models import make_model

    torch.manual_seed(0)
    eager = make_model("mixtral")
    compiled_model = make_model("mixtral")
    eager.train()
    compiled_model.train()
    compiled = torch.compile(compiled_model, backend="moe")
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (eager, compiled_model)]
    g = torch.Generator().manual_seed(0)
    for step in range(4):
        ids = torch.randint(0, 96, (2, 8), generator=g)
        losses = []
        for model, opt in zip((eager, compiled), opts):
            opt.zero_grad()
            loss = model(ids, labels=ids).loss
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) < 1e-3 * max(1.0, abs(losses[0])), (step, losses)
    for a, b in zip(eager.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


class _ScaledRouting(torch.nn.Module):
    """A layer whose top-1 weight scales the expert's input (Llama 4) and/or whose chosen weights are
    multiplied by a per-expert scale (Gemma 4; the [E] operand in the score_bias slot)."""

    def __init__(self, spec: MoESpec, g: torch.Generator):
        super().__init__()
        e, h, i = spec.num_experts, spec.experts.hidden_size, spec.experts.ffn_size
        self.spec = spec.to_json()
        self.router = torch.nn.Parameter(torch.randn(e, h, generator=g))
        self.w1 = torch.nn.Parameter(torch.randn(e, 2 * i, h, generator=g) * h ** -0.5)
        self.w2 = torch.nn.Parameter(torch.randn(e, h, i, generator=g) * i ** -0.5)
        self.scale = torch.nn.Parameter(torch.rand(e, generator=g) + 0.5) if spec.router.weight_scale else None

    def forward(self, x):
        logits = torch.nn.functional.linear(x.reshape(-1, x.shape[-1]), self.router)
        return ops.moe(x, logits, self.scale, self.w1, None, self.w2, None, None, None, self.spec)


@given(e=st.integers(1, 6), h=st.integers(1, 9), i=st.integers(1, 7), t=st.integers(0, 9), batched=st.booleans(),
       score=st.sampled_from(["softmax", "sigmoid", "sqrtsoftplus"]), before=st.booleans(),
       kind=st.sampled_from(["input", "weight", "both"]), k=st.integers(1, 3), seed=st.integers(0, 99))
@settings(max_examples=8, deadline=None)
def test_scaled_routing_lowers_forward_and_backward(e, h, i, t, batched, score, before, kind, k, seed):
    """RouterSpec.scales_input / weight_scale: fuse_gating gives the experts one row x * w_j per slot
    (unit weights, the k row outputs summed) and multiplies the chosen weights by the per-expert
    scale; compiled forward and gradients (x, router, expert weights, scale) equal the op's reference."""
    k = min(k, e)
    spec = MoESpec(RouterSpec(num_experts=e, top_k=k, score_func=score, topk_before_score=before,
                              scales_input=kind != "weight", weight_scale=kind != "input"),
                   ExpertSpec(hidden_size=h, ffn_size=i))
    g = torch.Generator().manual_seed(seed)
    layer = _ScaledRouting(spec, g)
    x = torch.randn((2, t, h) if batched else (t, h), generator=g)
    torch._dynamo.reset()
    counters.clear()
    assert_rewrite_equivalent(layer, x, backward=True, expected_moe_ops=1, options={"inner_backend": "eager"})
    assert counters["fuse_gating"]["gating_fused"] == 1


def test_one_per_expert_operand():
    with pytest.raises(ValueError, match="at most one may be set"):
        RouterSpec(num_experts=4, top_k=2, weight_scale=True, has_score_bias=True)
