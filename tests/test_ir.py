"""The moe op: reference semantics, edge cases, autograd, fake kernel, dynamic shapes."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import moe_compiler
from moe_compiler.ir import ExpertSpec, MoESpec, RouterSpec, moe
from moe_compiler.reference import route
from moe_compiler.testing import routings


def _layer_inputs(t, h=8, i=6, e=4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g).to(dtype)
    w1 = (torch.randn(e, 2 * i, h, generator=g) * 0.3).to(dtype)
    w2 = (torch.randn(e, h, i, generator=g) * 0.3).to(dtype)
    return x, w1, w2


def _dense_moe(x, logits, w1, w2, k, renorm=True):
    """Every expert on every token, masked: an independent check of the reference."""
    probs = logits.float().softmax(-1)
    vals, ids = probs.topk(k, dim=-1)
    if renorm:
        vals = vals / vals.sum(-1, keepdim=True)
    out = torch.zeros(x.shape, dtype=torch.float32)
    for e in range(w1.shape[0]):
        g, u = (x @ w1[e].t()).chunk(2, -1)
        y = (torch.nn.functional.silu(g) * u) @ w2[e].t()
        out += (vals * (ids == e)).sum(-1, keepdim=True) * y.float()
    return out.to(x.dtype)


def _spec(e=4, k=2, h=8, i=6, **router):
    return MoESpec(RouterSpec(num_experts=e, top_k=k, renormalize=True, **router), ExpertSpec(hidden_size=h, ffn_size=i))


@given(t=st.integers(0, 50), data=st.data())
@settings(max_examples=10)
def test_op_equals_dense_masked_computation(t, data):
    x, w1, w2 = _layer_inputs(t)
    logits = data.draw(routings(t, 4, kinds=("random", "one_expert", "skewed", "empty_experts", "ties")))
    got = moe(x, logits, w1, w2, _spec())
    torch.testing.assert_close(got, _dense_moe(x, logits, w1, w2, 2), rtol=1e-5, atol=1e-5)


def test_zero_tokens_and_all_to_one_expert():
    x, w1, w2 = _layer_inputs(0)
    assert moe(x, torch.zeros(0, 4), w1, w2, _spec()).shape == (0, 8)
    x, w1, w2 = _layer_inputs(9)
    logits = torch.zeros(9, 4)
    logits[:, 3] = 20.0
    torch.testing.assert_close(moe(x, logits, w1, w2, _spec()), _dense_moe(x, logits, w1, w2, 2))


def test_ties_break_like_torch_topk():
    logits = torch.zeros(5, 6)
    ids, _ = route(logits, None, RouterSpec(num_experts=6, top_k=3))
    assert torch.equal(ids, torch.topk(logits.softmax(-1), 3).indices)


def test_nonfinite_logits_propagate_like_eager():
    x, w1, w2 = _layer_inputs(4)
    logits = torch.randn(4, 4)
    logits[1, 2] = float("nan")
    logits[2, 0] = float("inf")
    got = moe(x, logits, w1, w2, _spec())
    want = _dense_moe(x, logits, w1, w2, 2)
    torch.testing.assert_close(got, want, equal_nan=True)
    assert torch.isnan(got[1]).all() and torch.isfinite(got[0]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes(dtype):
    x, w1, w2 = _layer_inputs(13, dtype=dtype)
    logits = torch.randn(13, 4).to(dtype)
    got = moe(x, logits, w1, w2, _spec())
    assert got.dtype == dtype
    want = _dense_moe(x.float(), logits.float(), w1.float(), w2.float(), 2)
    torch.testing.assert_close(got.float(), want, rtol=3e-2, atol=3e-2)


def test_gradients_match_autograd_through_reference():
    x, w1, w2 = _layer_inputs(11)
    logits = torch.randn(11, 4)
    leaves = [t.clone().requires_grad_(True) for t in (x, logits, w1, w2)]
    moe(leaves[0], leaves[1], leaves[2], leaves[3], _spec()).pow(2).sum().backward()
    leaves2 = [t.clone().requires_grad_(True) for t in (x, logits, w1, w2)]
    _dense_moe(leaves2[0], leaves2[1], leaves2[2], leaves2[3], 2).pow(2).sum().backward()
    for a, b in zip(leaves, leaves2):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


def test_opcheck():
    x, w1, w2 = _layer_inputs(6)
    args = (x, torch.randn(6, 4), None, w1, None, w2, None, None, None, _spec().to_json())
    torch.library.opcheck(torch.ops.moe_compiler.moe.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_spec_validation_errors():
    with pytest.raises(ValueError, match="top_k must be in"):
        RouterSpec(num_experts=4, top_k=5)
    with pytest.raises(ValueError, match="activation must be one of"):
        ExpertSpec(hidden_size=4, ffn_size=4, activation="tanh")
    s = _spec(n_group=2, topk_group=1, score_func="sigmoid", has_score_bias=True)
    assert MoESpec.from_json(s.to_json()) == s


def test_dynamic_token_counts_do_not_recompile_per_batch():
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    layer = moe_compiler.MoELayer(16, 24, 4, 2)
    c = torch.compile(layer, backend="moe", options={"inner_backend": "eager"})
    counters.clear()
    for t in (3, 5, 8, 13, 21, 34, 2, 89, 55, 7):
        x = torch.randn(t, 16)
        torch.testing.assert_close(c(x), layer(x))
    assert counters["stats"]["unique_graphs"] <= 3  # at most 2 recompiles: static first size, then dynamic
    for t in (0, 1):  # dynamo specialises sizes 0 and 1 (one graph each); they must still be right
        x = torch.randn(t, 16)
        torch.testing.assert_close(c(x), layer(x))
