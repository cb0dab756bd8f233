"""Detection on real transformers 5 families (tiny configs, random weights): fp32 and bf16."""
import pytest
import torch

import moe_compiler
from moe_compiler.testing import assert_rewrite_equivalent

from hf_models import FAMILIES, expected_layers, make_model

pytest.importorskip("transformers")
EAGER = {"inner_backend": "eager"}


def _ids(seed=0, batch=2, seq=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 96, (batch, seq), generator=g)


def _check_layers(model, report):
    want = sorted(expected_layers(model))
    got = sorted((m.path, m.num_experts, m.top_k) for m in report.moe_layers)
    assert got == want, f"explain found {got}, model has {want}"
    assert all(m.rewritten for m in report.moe_layers), [m.one_line() for m in report.moe_layers]


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_family_grouped_mm(family, dtype):
    model = make_model(family, dtype=dtype)
    ids = _ids()
    report = moe_compiler.explain(model, ids, **EAGER)
    _check_layers(model, report)
    with torch.no_grad():
        assert_rewrite_equivalent(model, ids, expected_moe_ops=len(expected_layers(model)), options=EAGER)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_family_batched_mm(family):
    model = make_model(family, experts_implementation="batched_mm")
    ids = _ids(1)
    report = moe_compiler.explain(model, ids, **EAGER)
    _check_layers(model, report)
    assert {m.pattern for m in report.moe_layers} == {"batched_mm"}


def test_shared_experts_reported():
    rep = moe_compiler.explain(make_model("qwen2_moe"), _ids(), **EAGER)
    assert {m.shared_expert for m in rep.moe_layers} == {"gated"}
    rep = moe_compiler.explain(make_model("deepseek_v3"), _ids(), **EAGER)
    assert {m.shared_expert for m in rep.moe_layers} == {"plain"}
    spec = rep.moe_layers[0].spec
    assert spec.router.score_func == "sigmoid" and spec.router.n_group == 4 and spec.router.topk_group == 2
    assert spec.router.has_score_bias and spec.router.scaling_factor == pytest.approx(2.5)


def test_eager_experts_loop_reports_graph_break_and_stays_correct():
    model = make_model("mixtral", experts_implementation="eager")
    ids = _ids()
    report = moe_compiler.explain(model, ids, **EAGER)
    assert report.graph_break_count > 0
    assert report.moe_layers and not any(m.rewritten for m in report.moe_layers)
    assert all("set_experts_implementation('grouped_mm')" in m.reason for m in report.moe_layers)
    assert report.moe_layers[0].path == "model.layers.0.mlp"
    with torch.no_grad():
        assert_rewrite_equivalent(model, ids, expected_moe_ops=0, options=EAGER)


def test_mixtral_inductor_dynamic_batch_and_backward():
    """The default inner backend (Inductor), training graphs, and new sequence lengths."""
    model = make_model("mixtral")
    model.train()
    assert_rewrite_equivalent(model, _ids(2), backward=True, expected_moe_ops=2)
    c = torch.compile(model, backend="moe")
    with torch.no_grad():
        for seq in (5, 9, 12):
            ids = _ids(seq, seq=seq)
            torch.testing.assert_close(c(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


# three distinct layouts (softmax top-2, DeepSeek-V3's group-limited sigmoid, GPT-OSS's transposed
# interleaved experts with biases); the other families share these graphs' dynamic-shape paths
@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss", "mixtral"])
def test_dynamic_shape_graphs_are_rewritten_too(family):
    """torch.compile's default (dynamic=None) recompiles for a new length with a symbolic size, and for a new
    batch size with two: every graph's MoE layers are raised, not left to the fallback (equal outputs alone
    could not tell: the fallback is correct too)."""
    from moe_compiler.pipeline import counters

    torch._dynamo.reset()
    counters.clear()
    model = make_model(family, seed=1)
    layers = len(expected_layers(model))
    c = torch.compile(model, backend="moe", options=EAGER)
    with torch.no_grad():
        for batch, seq in ((1, 7), (1, 12), (2, 5)):
            ids = _ids(seq, batch=batch, seq=seq)
            torch.testing.assert_close(c(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
    assert counters["detect_moe"]["runs"] == 3
    assert counters["detect_moe"]["layers_raised"] == 3 * layers, counters["detect_moe"]


MORE_FAMILIES = {"deepseek_v2": {}, "ernie4_5_moe": {}, "minimax": {}, "granitemoe": {}, "glm4_moe": {},
                 "nemotron_h": {}, "beam": {"mlp_layer_types": ["sparse", "sparse"]}, "inkling2_text": {}}


@pytest.mark.parametrize("family", sorted(MORE_FAMILIES))
def test_more_families(family):
    """Families no issue names: group-limited max routing (DeepSeek-V2), a [1, E] correction bias
    (Ernie 4.5), a layer output the model rescales (MiniMax), other expert modules, ungated squared-ReLU
    experts in a hybrid Mamba model (Nemotron-H), a layer output normed and scaled after the experts
    (Beam: more later nodes of the hidden shape than the first candidates), a soft-capped SwiGLU
    (Inkling 2: the caps read from the graph)."""
    from hf_models import make_generic

    model = make_generic(family, **MORE_FAMILIES[family])
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    report = moe_compiler.explain(model, ids, **EAGER)
    _check_layers(model, report)
    with torch.no_grad():
        assert_rewrite_equivalent(model, ids, expected_moe_ops=len(expected_layers(model)), options=EAGER)


@pytest.mark.parametrize("family,overrides,why", [
    ("phimoe", {}, "no top-k"),   # sparsemixer routing: max/argmax, no top-k in the graph at all
])
def test_expert_weights_without_a_recognised_router_are_reported(family, overrides, why):
    """A family detect_moe cannot raise still says why each expert block runs unchanged (explain and the
    log), instead of passing silently; its outputs stay the model's."""
    from hf_models import make_generic

    model = make_generic(family, **overrides)
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    report = moe_compiler.explain(model, ids, **EAGER)
    layers = {m.path: m for m in report.moe_layers}
    assert sorted(layers) == ["model.layers.0" + (".mlp" if family == "phimoe" else ""),
                              "model.layers.1" + (".mlp" if family == "phimoe" else "")], report.moe_layers
    for m in layers.values():
        assert not m.rewritten and m.num_experts == 8 and m.top_k == 0 and why in m.reason, m.one_line()
        assert "top-?" in m.one_line()
    with torch.no_grad():
        c = torch.compile(model, backend="moe", options=EAGER)
        torch.testing.assert_close(c(ids).logits, model(ids).logits)


def test_llama4_router_scaling_the_expert_input():
    """Llama 4 scatters its top-k logits into a [T, E] tensor of -inf, scores them with a sigmoid and
    multiplies the experts' *input* by the scores, then runs every expert densely. Its layers are
    raised with top-1 (the config's) and top-2 (each slot's expert sees x * w_j, the experts run
    sparsely), forward and backward equal to eager."""
    from hf_models import make_generic

    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    for k in (1, 2):
        torch._dynamo.reset()
        model = make_generic("llama4_text", num_experts_per_tok=k)
        report = moe_compiler.explain(model, ids, **EAGER)
        _check_layers(model, report)
        assert all(m.spec.router.scales_input and m.spec.top_k == k and "scales input" in m.one_line()
                   for m in report.moe_layers)
        torch._dynamo.reset()
        assert_rewrite_equivalent(model, ids, backward=True, expected_moe_ops=2, options=EAGER)


def test_gemma4_router_norm_and_per_expert_scale():
    """Gemma 4: the router reads its own norm of the residual, the experts another norm of it, and
    the chosen weights are multiplied by a per-expert scale. Raised with the experts' own input as the
    op's hidden and the scale as a weight_scale operand; forward and backward (the scale's gradient
    included) equal eager."""
    from hf_models import make_generic, randomize_router_scales

    model = randomize_router_scales(make_generic("gemma4_text", enable_moe_block=True, top_k_experts=2))
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    report = moe_compiler.explain(model, ids, **EAGER)
    assert [(m.path, m.rewritten) for m in report.moe_layers] == [("model.layers.0", True), ("model.layers.1", True)]
    assert all(m.spec.router.weight_scale and "per-expert scale" in m.one_line() for m in report.moe_layers)
    assert_rewrite_equivalent(model, ids, backward=True, expected_moe_ops=2, options=EAGER)


@pytest.mark.parametrize("family,overrides", [("llama4_text", {"num_experts_per_tok": 2}),
                                              ("gemma4_text", {"enable_moe_block": True, "top_k_experts": 2})])
def test_scaled_routers_offload_with_prefetch(tmp_path, family, overrides):
    """Offloaded with Fate prefetch (hoist_prefetch finds the router's input behind the experts' own:
    Llama 4's scaled input, Gemma 4's second norm), logits bit-equal to the resident compiled model."""
    import copy

    from hf_models import make_generic, randomize_router_scales

    model = randomize_router_scales(make_generic(family, **overrides))
    offloaded = copy.deepcopy(model)
    ids = [torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    opts = {"offload": {"budget": 0.5, "dir": str(tmp_path), "prefetch": True}}
    report = moe_compiler.explain(copy.deepcopy(model), ids[0], **opts)
    (hoist,) = [p["counters"] for p in report.passes if p["name"] == "hoist_prefetch"]
    assert hoist["layers_predicted"] == 2 and hoist["not_predicted"] == 0, hoist
    with torch.no_grad():
        resident = torch.compile(model, backend="moe")
        compiled = torch.compile(offloaded, backend="moe", options=opts)
        for x in ids:
            assert torch.equal(compiled(x).logits, resident(x).logits)


def test_expert_groups_and_claims():
    from moe_compiler.passes.unrecognised_experts import expert_groups, unrecognised_expert_layers

    paths = ["m.l0.mlp.experts.gate_up_proj", "m.l0.mlp.experts.down_proj", "m.l0.mlp.shared_experts.up.weight",
             "m.l1.moe.experts.0.w1.weight", "m.l1.moe.experts.3.w1.weight", "m.l2.ffn.experts.mlp.w1", None,
             "m.l3.mlp.router.weight"]
    shapes = [(4, 12, 8), (4, 8, 6), (6, 8), (6, 8), (6, 8), (32, 8), (2, 8), (4, 8)]
    assert expert_groups(paths, shapes) == {"m.l0.mlp.experts": 4, "m.l1.moe.experts": 2}
    reports = unrecognised_expert_layers(paths, shapes, ["m.l0.mlp"], [("m.l1.moe.gate.weight", "why not")], "g")
    assert [(r.path, r.num_experts, r.rewritten) for r in reports] == [("m.l1.moe", 2, False)]
    assert "m.l1.moe.gate was not taken" in reports[0].reason and "why not" in reports[0].reason
    assert unrecognised_expert_layers(paths, shapes, ["m.l0.mlp", "m.l1"], [], "g") == []
    assert "no top-k" in unrecognised_expert_layers(paths, shapes, [], [], "g", has_topk=False)[0].reason


def test_sqrt_softplus_router_is_raised_and_hash_routing_is_reported():
    """DeepSeek-V4: its top-k layers score with sqrt(softplus(x)) (plus a correction bias, renorm and
    scale) and are raised; its hash-routed layers pick experts by token id, with no top-k, and say so."""
    from hf_models import make_generic

    model = make_generic("deepseek_v4", q_lora_rank=16, mlp_layer_types=["hash_moe", "moe"])
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    report = moe_compiler.explain(model, ids, **EAGER)
    layers = {m.path: m for m in report.moe_layers}
    assert sorted(layers) == ["model.layers.0.mlp", "model.layers.1.mlp"], [m.one_line() for m in layers.values()]
    hashed, routed = layers["model.layers.0.mlp"], layers["model.layers.1.mlp"]
    assert routed.rewritten and routed.spec.router.score_func == "sqrtsoftplus", routed.one_line()
    assert routed.spec.router.has_score_bias and routed.spec.router.renormalize, routed.one_line()
    assert not hashed.rewritten and "hash routing" in hashed.reason, hashed.one_line()
    with torch.no_grad():
        assert_rewrite_equivalent(model, ids, expected_moe_ops=1, options=EAGER)
