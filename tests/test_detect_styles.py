"""Detection of hand-written MoE styles, the reference module, and near misses."""
import pytest
import torch
import torch.nn as nn
from hypothesis import example, given, settings, strategies as st

import moe_compiler
from moe_compiler.testing import assert_rewrite_equivalent, moe_configs

from torch_moe_styles import MaskedLoopMoE, NearMissTopK, TorchTitanMoE

EAGER = {"inner_backend": "eager"}


def _layers(model, x):
    return moe_compiler.explain(model, x, **EAGER).moe_layers


@given(cfg=moe_configs(max_experts=64, max_top_k=8, max_tokens=300))
@settings(max_examples=8)
def test_reference_module_property(cfg):
    """Hypothesis-drawn configs of moe_compiler.MoELayer: one op, equal to eager forward and backward."""
    layer = cfg.build()
    x = cfg.example_input()
    torch._dynamo.reset()
    assert_rewrite_equivalent(layer, x, backward=True, expected_moe_ops=1, options=EAGER)


@given(e=st.integers(1, 9), k=st.integers(1, 4), h=st.integers(1, 24), i=st.integers(1, 20),
       tokens=st.integers(1, 40), score=st.sampled_from(["softmax", "sigmoid"]), renorm=st.booleans(),
       seed=st.integers(0, 1000))
@settings(max_examples=6)
@example(e=2, k=1, h=1, i=2, tokens=1, score="softmax", renorm=False, seed=0)  # per-expert [E, H] weights
@example(e=1, k=1, h=3, i=5, tokens=4, score="sigmoid", renorm=True, seed=1)
def test_masked_loop_property(e, k, h, i, tokens, score, renorm, seed):
    """Hand-written masked loops with per-expert nn.Linear weights are detected and stay exact."""
    k = min(k, e)
    torch.manual_seed(seed)
    model = MaskedLoopMoE(h, i, e, k, score, renorm)
    x = torch.randn(tokens, h)
    layers = _layers(model, x)
    assert [(m.num_experts, m.top_k, m.rewritten) for m in layers] == [(e, k, True)], [m.one_line() for m in layers]
    torch._dynamo.reset()
    assert_rewrite_equivalent(model, x, backward=True, expected_moe_ops=1, options=EAGER)


def test_torchtitan_grouped_mm_style_bf16():
    torch.manual_seed(0)
    model = TorchTitanMoE(16, 32, 4, 2).to(torch.bfloat16)
    x = torch.randn(2, 6, 16, dtype=torch.bfloat16)
    layers = _layers(model, x)
    assert [(m.num_experts, m.top_k, m.rewritten, m.pattern) for m in layers] == [(4, 2, True, "grouped_mm")]
    assert layers[0].spec.experts.layout == "separate" and layers[0].spec.router.score_func == "sigmoid"
    torch._dynamo.reset()
    assert_rewrite_equivalent(model, x, backward=True, expected_moe_ops=1, options=EAGER)


@pytest.mark.parametrize("k", [1, 2])
def test_torchtitan_scores_before_experts(k):
    """torchtitan's score_before_experts (its Llama 4): the gathered tokens are scaled by their
    scores before the grouped GEMMs. Raised as an input-scaling router, top-1 and top-2."""
    torch.manual_seed(0)
    model = TorchTitanMoE(16, 32, 4, k, score_before_experts=True).to(torch.bfloat16)  # _grouped_mm: bf16
    x = torch.randn(2, 6, 16, dtype=torch.bfloat16)
    (layer,) = _layers(model, x)
    assert layer.rewritten and layer.spec.router.scales_input and layer.spec.top_k == k, layer.one_line()
    torch._dynamo.reset()
    assert_rewrite_equivalent(model, x, backward=True, expected_moe_ops=1, options=EAGER)


def test_near_miss_softmax_topk_is_not_matched():
    torch.manual_seed(0)
    model = NearMissTopK(16, 8, 2)
    x = torch.randn(5, 16)
    assert _layers(model, x) == []
    assert_rewrite_equivalent(model, x, expected_moe_ops=0, options=EAGER)


def test_attention_block_is_not_matched():
    attn = nn.MultiheadAttention(16, 4, batch_first=True)
    x = torch.randn(2, 5, 16)

    def f(x):
        out, _ = attn(x, x, x)
        return out + out.topk(2, dim=-1).values.sum(-1, keepdim=True)

    assert moe_compiler.explain(f, x, **EAGER).moe_layers == []


def test_wrong_spec_is_rejected_by_the_proof(monkeypatch):
    """If the structure is misread, the numerical proof refuses the rewrite (nothing is changed)."""
    import moe_compiler.reference as ref

    real = ref.activation
    monkeypatch.setattr(ref, "activation", lambda h, spec, up=None: real(h, spec, up) * 1.01)
    torch.manual_seed(0)
    model = MaskedLoopMoE(8, 12, 3, 2)
    x = torch.randn(6, 8)
    layers = _layers(model, x)
    assert len(layers) == 1 and not layers[0].rewritten
    assert "numerically" in layers[0].reason
    monkeypatch.undo()
    assert_rewrite_equivalent(model, x, expected_moe_ops=0, options={**EAGER, "disable_passes": ["detect_moe"]})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_module_low_precision(dtype):
    torch.manual_seed(0)
    layer = moe_compiler.MoELayer(32, 48, 8, 2, shared_ffn_size=16).to(dtype)
    x = torch.randn(2, 9, 32, dtype=dtype)
    assert_rewrite_equivalent(layer, x, backward=True, expected_moe_ops=1, options=EAGER)
