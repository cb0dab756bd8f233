"""Every Triton kernel of moe_compiler.codegen.triton under the Triton interpreter, against its
plain-torch reference (fp32 and fp16; bf16 only where no tl.dot is involved).

How the interpreter is switched on: Triton reads TRITON_INTERPRET when ``@triton.jit`` decorates
a function, and its own standard library (tl.max, tl.sum, tl.cumsum, ...) is decorated at the
first ``import triton`` of the process; setting the variable later has no effect (Triton 3.7.1).
A pytest process that did not start with TRITON_INTERPRET=1 therefore runs this file again in a
subprocess with the variable set (``test_interpreter_suite_in_subprocess``) and skips the
in-process copies; ``TRITON_INTERPRET=1 pytest tests/test_triton_kernels.py`` runs them directly.
Never set the variable inside a shared pytest process: a triton imported in interpreter mode
cannot compile GPU kernels for the rest of that process.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

_ENV_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _process_is_interpreted() -> bool:
    if not _ENV_INTERPRET:
        return False
    import triton.language as tl

    return type(tl.max).__name__ == "InterpretedFunction"


IN_INTERPRETER = _process_is_interpreted()

# NaN / inf test inputs make numpy (inside the interpreter) warn; the results are what is tested
pytestmark = [pytest.mark.interpreter, pytest.mark.filterwarnings("ignore::RuntimeWarning")]
in_process = pytest.mark.skipif(
    not IN_INTERPRETER,
    reason="needs TRITON_INTERPRET=1 from process start; "
           "run by test_interpreter_suite_in_subprocess")


# ------------------------------------------------------------------------------------------------
# driver: the whole file in an interpreter subprocess
# ------------------------------------------------------------------------------------------------
@pytest.mark.skipif(IN_INTERPRETER, reason="already running under the interpreter")
def test_interpreter_suite_in_subprocess(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q", "-p",
           "no:cacheprovider", "--rootdir", str(repo), "-W", "ignore::RuntimeWarning"]
    # cwd outside the repo: `python -m pytest` puts the cwd first on sys.path, which would shadow
    # the installed package layout (moe_compiler.codegen lives in codegen/).
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"interpreter suite failed:\n{r.stdout[-12000:]}\n{r.stderr[-4000:]}"


def test_cpu_launch_without_interpreter_raises():
    if IN_INTERPRETER:
        pytest.skip("interpreted process")
    from moe_compiler.codegen.triton.combine import combine

    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        combine(torch.zeros(2, 4), None, 2, 1)


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _tol(dtype):
    """fp32: accumulation order only; fp16/bf16: one rounding of an fp32 value may land one ulp
    apart when the two fp32 values straddle a rounding boundary."""
    return {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
            torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}[dtype]


def _routing(T: int, k: int, E: int, seed: int, mode: str = "random") -> torch.Tensor:
    """topk_ids [T, k] int64: distinct experts per row ("random"), or all on expert 0 (k=1),
    or restricted to a subset so that some experts get no tokens ("sparse")."""
    g = _gen(seed)
    if T == 0:
        return torch.empty(0, k, dtype=torch.int64)
    if mode == "one_expert":
        assert k == 1
        return torch.full((T, 1), E - 1, dtype=torch.int64)
    if mode == "sparse":  # only even experts get tokens
        pool = torch.arange(0, E, 2)
        assert k <= len(pool)
        return torch.stack([pool[torch.randperm(len(pool), generator=g)[:k]] for _ in range(T)])
    return torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])


# ------------------------------------------------------------------------------------------------
# gating
# ------------------------------------------------------------------------------------------------
def _gating_mod():
    from moe_compiler.codegen.triton import gating

    return gating


def _gp(*args, **kwargs):
    return _gating_mod().GatingParams(*args, **kwargs)


def _check_gating(logits, bias, params):
    gm = _gating_mod()
    ids, w = gm.gating(logits, bias, params)
    rids, rw = gm.gating_reference(logits, bias, params)
    assert ids.dtype == torch.int64 and w.dtype == torch.float32
    assert ids.shape == rids.shape == (logits.shape[0], params.top_k)
    assert torch.equal(ids, rids), f"{ids}\n!=\n{rids}"
    torch.testing.assert_close(w, rw, rtol=2e-6, atol=1e-7, equal_nan=True)
    return ids, w


GATING_CASES = {
    "mixtral_softmax_k2_renorm": (8, dict(score_func="softmax", top_k=2, renormalize=True), False),
    "qwen_softmax_k4": (5, dict(score_func="softmax", top_k=4, renormalize=False), False),
    "softmax_k1_E3": (3, dict(score_func="softmax", top_k=1, renormalize=False), False),
    "softmax_k_eq_E5": (5, dict(score_func="softmax", top_k=5, renormalize=True), False),
    "sigmoid_bias_k_eq_E3": (3, dict(score_func="sigmoid", top_k=3, renormalize=True), True),
    "deepseek_grouped_E16": (16, dict(score_func="sigmoid", top_k=4, renormalize=True, n_group=4,
                                      topk_group=2, renorm_eps=1e-20, scaling_factor=2.5), True),
    "deepseek_v3_E256": (256, dict(score_func="sigmoid", top_k=8, renormalize=True, n_group=8,
                                   topk_group=4, renorm_eps=1e-20, scaling_factor=2.5), True),
    "gpt_oss_topk_then_softmax": (32, dict(score_func="softmax", top_k=4, renormalize=False,
                                           topk_before_score=True), False),
    "topk_then_sigmoid_bias_E5": (5, dict(score_func="sigmoid", top_k=2, renormalize=True,
                                          topk_before_score=True, scaling_factor=0.5), True),
}


@in_process
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", list(GATING_CASES))
def test_gating_matches_reference(case, dtype):
    E, kw, has_bias = GATING_CASES[case]
    g = _gen(sum(map(ord, case)))
    logits = (torch.randn(21, E, generator=g) * 2).to(dtype)
    bias = torch.randn(E, generator=g) * 0.1 if has_bias else None
    _check_gating(logits, bias, _gp(**kw))


@in_process
@pytest.mark.parametrize("case", ["mixtral_softmax_k2_renorm", "deepseek_grouped_E16",
                                  "gpt_oss_topk_then_softmax", "softmax_k_eq_E5"])
def test_gating_ties_break_by_lowest_index(case):
    E, kw, has_bias = GATING_CASES[case]
    T = 6
    logits = torch.zeros(T, E)
    logits[1] = 1.0  # all equal, non-zero
    logits[2, ::2] = 0.5  # pairs of equal values
    logits[3] = torch.arange(E).remainder(3).float()  # many 3-way ties
    logits[4] = -torch.arange(E).remainder(2).float()
    logits[5, -1] = 2.0
    bias = torch.zeros(E) if has_bias else None
    ids, _ = _check_gating(logits, bias, _gp(**kw))
    if not kw.get("n_group", 1) > 1:
        assert ids[0].tolist() == list(range(kw["top_k"]))  # all-equal row -> experts 0..k-1


@in_process
def test_gating_reference_equals_torch_topk_without_ties():
    gm = _gating_mod()
    g = _gen(3)
    logits = torch.randn(64, 64, generator=g)
    p = _gp("softmax", 8, renormalize=False)
    ids, w = gm.gating_reference(logits, None, p)
    tw, tids = torch.topk(torch.softmax(logits, -1), 8, dim=-1)
    assert torch.equal(ids, tids)
    torch.testing.assert_close(w, tw)


@in_process
@pytest.mark.parametrize("score_func,before", [("softmax", False), ("sigmoid", False),
                                               ("softmax", True)])
def test_gating_nan_inf(score_func, before):
    nan, inf = float("nan"), float("inf")
    x = torch.randn(8, 8, generator=_gen(5))
    x[0, 3] = nan
    x[1, 2] = inf
    x[2, :] = -inf
    x[3, 1] = -inf
    x[4, 5] = nan
    x[4, 6] = -nan
    x[5, 0] = -0.0
    x[6, :] = inf
    x[7, :] = nan
    _check_gating(x, None, _gp(score_func, 3, renormalize=True, topk_before_score=before))


@in_process
def test_gating_empty_and_noncontiguous():
    gm = _gating_mod()
    p = _gp("softmax", 2, renormalize=True)
    ids, w = gm.gating(torch.empty(0, 8), None, p)
    assert ids.shape == (0, 2) and w.shape == (0, 2)
    base = torch.randn(8, 40, generator=_gen(1))
    _check_gating(base[:, ::5], None, p)  # [8, 8] with stride 5
    _check_gating(base.t()[:8, :], None, p)  # column-major


def test_gating_params_validation():
    GP = _gating_mod().GatingParams
    with pytest.raises(ValueError):
        GP("relu", 2, renormalize=True)
    with pytest.raises(ValueError):
        GP("softmax", 2, renormalize=True, n_group=4, topk_group=5)
    with pytest.raises(ValueError):
        GP("softmax", 4, renormalize=True).check(3)
    with pytest.raises(ValueError):
        GP("sigmoid", 9, renormalize=True, n_group=8, topk_group=1).check(64)  # 9 > 1 group x 8


@in_process
@given(st.data())
def test_gating_property(data):
    """Generates: E in 1..40, k in 1..E, T in 0..9, softmax/sigmoid, topk-before-score, optional
    bias, logits drawn from a small set of values (many exact ties) scaled by a random factor."""
    E = data.draw(st.integers(1, 40), label="E")
    k = data.draw(st.integers(1, E), label="k")
    T = data.draw(st.integers(0, 9), label="T")
    vals = data.draw(st.lists(st.sampled_from([-2.0, -0.5, 0.0, 0.5, 1.0, 3.0]), min_size=T * E,
                              max_size=T * E), label="logits")
    scale = data.draw(st.sampled_from([1.0, 0.1, 7.0]))
    params = _gp(data.draw(st.sampled_from(["softmax", "sigmoid"])), k,
                 renormalize=data.draw(st.booleans()),
                 topk_before_score=data.draw(st.booleans()))
    bias = torch.tensor(data.draw(st.lists(st.sampled_from([0.0, 0.25]), min_size=E,
                                           max_size=E))) if data.draw(st.booleans()) else None
    _check_gating(torch.tensor(vals).view(T, E) * scale, bias, params)


# ------------------------------------------------------------------------------------------------
# permute (moe_align_block_size)
# ------------------------------------------------------------------------------------------------
def _check_align(topk_ids, E, block_m):
    from moe_compiler.codegen.triton.permute import (moe_align_block_size,
                                                     moe_align_block_size_reference)

    a = moe_align_block_size(topk_ids, E, block_m)
    r = moe_align_block_size_reference(topk_ids, E, block_m)
    for name in ("sorted_token_ids", "expert_ids", "num_tokens_post_padded"):
        x, y = getattr(a, name), getattr(r, name)
        assert x.dtype == torch.int32 and torch.equal(x, y), f"{name}: {x} != {y}"
    # invariants: every slot exactly once, segments aligned
    n = topk_ids.numel()
    s = a.sorted_token_ids
    assert sorted(s[s < n].tolist()) == list(range(n))
    assert int(a.num_tokens_post_padded) % block_m == 0
    return a


@in_process
@pytest.mark.parametrize("T,k,E,block_m,mode", [
    (37, 2, 8, 16, "random"),
    (33, 3, 5, 16, "random"),
    (40, 1, 3, 16, "one_expert"),
    (25, 2, 8, 4, "sparse"),
    (7, 5, 5, 4, "random"),  # k == E
    (3, 1, 64, 16, "random"),  # fewer slots than experts
    (50, 8, 256, 64, "random"),
    (200, 2, 8, 1, "random"),
    (0, 2, 8, 16, "random"),
])
def test_align_matches_reference(T, k, E, block_m, mode):
    ids = _routing(T, k, E, seed=T * 31 + E, mode=mode)
    _check_align(ids, E, block_m)
    if T:
        _check_align(ids.to(torch.int32), E, block_m)


@in_process
@given(st.data())
def test_align_property(data):
    """Generates: E in 1..20, k in 1..min(E, 4), T in 0..60, block_m in {1, 2, 16, 64}, ids drawn
    with replacement from a random subset of experts (empty experts, hot experts)."""
    E = data.draw(st.integers(1, 20), label="E")
    k = data.draw(st.integers(1, min(E, 4)), label="k")
    T = data.draw(st.integers(0, 60), label="T")
    subset = data.draw(st.lists(st.integers(0, E - 1), min_size=1, max_size=E, unique=True))
    ids = data.draw(st.lists(st.sampled_from(subset), min_size=T * k, max_size=T * k))
    block_m = data.draw(st.sampled_from([1, 2, 16, 64]))
    _check_align(torch.tensor(ids, dtype=torch.int64).view(T, k), E, block_m)


# ------------------------------------------------------------------------------------------------
# grouped GEMM
# ------------------------------------------------------------------------------------------------
GEMM_CFG = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=2)


def _check_gemm(T, k, E, N, K, dtype, *, mode="random", b_transposed=False, bias=False,
                mul=False, slots=False, cfg=None, seed=0, device="cpu"):
    from moe_compiler.codegen.triton.grouped_gemm import fused_moe_gemm, grouped_gemm_reference
    from moe_compiler.codegen.triton.permute import moe_align_block_size

    g = _gen(seed)
    ids = _routing(T, k, E, seed, mode).to(device)
    a = torch.randn(T * k if slots else T, K, generator=g).to(device, dtype)
    shape = (E, K, N) if b_transposed else (E, N, K)
    b = (torch.randn(*shape, generator=g) / K**0.5).to(device, dtype)
    bi = torch.randn(E, N, generator=g).to(device, dtype) if bias else None
    w = torch.rand(T, k, generator=g).to(device)
    cfg = dict(cfg or GEMM_CFG)
    align = moe_align_block_size(ids, E, cfg["BLOCK_M"])
    kw = dict(b_transposed=b_transposed, bias=bi, topk_weights=w, mul_routed_weight=mul)
    c = fused_moe_gemm(a, b, align, config=cfg, **kw)
    r = grouped_gemm_reference(a, b, ids, **kw)
    assert c.shape == (T * k, N) and c.dtype == dtype
    torch.testing.assert_close(c, r, **_tol(dtype))


@in_process
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", [
    dict(T=13, k=2, E=4, N=34, K=33),
    dict(T=13, k=2, E=4, N=34, K=33, b_transposed=True, bias=True, mul=True),
    dict(T=9, k=3, E=5, N=17, K=64, slots=True, mul=True),  # A already [T*k, K]
    dict(T=20, k=1, E=3, N=40, K=16, mode="one_expert", bias=True),
    dict(T=11, k=2, E=8, N=33, K=20, mode="sparse", b_transposed=True),
    dict(T=6, k=5, E=5, N=16, K=48, mul=True),  # k == E
    dict(T=0, k=2, E=4, N=16, K=16),
    dict(T=40, k=2, E=3, N=70, K=40, cfg=dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, GROUP_M=3,
                                             num_warps=4, num_stages=2)),
], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items() if k != "cfg"))
def test_grouped_gemm_matches_reference(case, dtype):
    _check_gemm(dtype=dtype, seed=len(case), **case)


@in_process
def test_grouped_gemm_default_config_and_expert_minus_one():
    from moe_compiler.codegen.triton.grouped_gemm import fused_moe_gemm
    from moe_compiler.codegen.triton.permute import moe_align_block_size

    _check_gemm(T=10, k=2, E=4, N=24, K=40, dtype=torch.float32, cfg=None, seed=7)
    # a block whose expert id is -1 (expert-parallel "not local") writes zeros
    ids = _routing(5, 1, 2, 1)
    align = moe_align_block_size(ids, 2, 16)
    align.expert_ids[:] = -1
    c = fused_moe_gemm(torch.randn(5, 16), torch.randn(2, 16, 16), align, config=dict(GEMM_CFG))
    assert torch.equal(c, torch.zeros(5, 16))


def test_choose_config_rules():
    from moe_compiler.codegen.triton.grouped_gemm import choose_config

    for T in (1, 16, 128, 4096, 65536):
        for dt in (torch.float32, torch.bfloat16):
            c = choose_config(T, 4096, 7168, 256, 8, dt)
            assert set(c) == {"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps",
                              "num_stages"}
            assert all(c[x] >= 16 for x in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
            smem = (c["BLOCK_M"] + c["BLOCK_N"]) * c["BLOCK_K"] * dt.itemsize * c["num_stages"]
            assert smem <= 160 * 1024
    assert choose_config(4, 17, 9, 8, 2, torch.float16)["BLOCK_N"] == 32
    assert choose_config(4, 17, 9, 8, 2, torch.float16)["BLOCK_K"] == 16
    # BLOCK_M depends only on tokens / experts / top_k: both GEMMs of a layer share it
    assert (choose_config(300, 64, 4096, 8, 2, torch.bfloat16)["BLOCK_M"]
            == choose_config(300, 4096, 32, 8, 2, torch.bfloat16)["BLOCK_M"])


# ------------------------------------------------------------------------------------------------
# activation
# ------------------------------------------------------------------------------------------------
def _act_cases():
    from moe_compiler.codegen.triton.activation import ACTIVATIONS

    for act in ACTIVATIONS:
        for gated, inter in [(True, False), (True, True), (False, False)]:
            if act == "swiglu_oai" and not gated:
                continue
            yield act, gated, inter


@in_process
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act,gated,interleaved", list(_act_cases()))
def test_activation_matches_reference(act, gated, interleaved, dtype):
    from moe_compiler.codegen.triton.activation import activation, activation_reference

    I = 17
    x = (torch.randn(19, 2 * I if gated else I, generator=_gen(2)) * 4).to(dtype)
    x[0, 0], x[1, 1], x[2, 2], x[3, 3] = float("nan"), 100.0, -100.0, 8.0
    kw = dict(gated=gated, interleaved=interleaved, alpha=1.702, limit=7.0)
    y = activation(x, act, **kw)
    r = activation_reference(x, act, **kw)
    assert y.shape == (19, I) and y.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(y, r, equal_nan=True, **tol)
    # non-contiguous input rows and an fp32 output
    xs = torch.cat([x, x], dim=1)[:, : x.shape[1]]
    torch.testing.assert_close(activation(xs, act, out_dtype=torch.float32, **kw),
                               activation_reference(xs, act, out_dtype=torch.float32, **kw),
                               equal_nan=True, **tol)


@in_process
def test_activation_empty():
    from moe_compiler.codegen.triton.activation import activation

    assert activation(torch.empty(0, 10), "silu").shape == (0, 5)


# ------------------------------------------------------------------------------------------------
# combine
# ------------------------------------------------------------------------------------------------
@in_process
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,k,H,weighted", [(15, 3, 33, True), (15, 3, 33, False),
                                            (9, 1, 8, True), (0, 2, 16, True), (4, 8, 130, True)])
def test_combine_matches_reference(T, k, H, weighted, dtype):
    from moe_compiler.codegen.triton.combine import combine, combine_reference

    g = _gen(T + k)
    y = torch.randn(T * k, H, generator=g).to(dtype)
    w = torch.rand(T, k, generator=g) if weighted else None
    out = combine(y, w, T, k)
    assert out.shape == (T, H) and out.dtype == dtype
    torch.testing.assert_close(out, combine_reference(y, w, T, k), **_tol(dtype))
    if T:
        torch.testing.assert_close(combine(y, w, T, k, out_dtype=torch.float32),
                                   combine_reference(y, w, T, k, out_dtype=torch.float32))


# ------------------------------------------------------------------------------------------------
# composed MoE forward
# ------------------------------------------------------------------------------------------------
MOE_CASES = {
    "mixtral_silu": dict(T=11, H=33, I=17, E=5, k=2, activation="silu"),
    "gpt_oss_swiglu_interleaved_transposed_bias": dict(
        T=11, H=33, I=17, E=5, k=2, activation="swiglu_oai", interleaved=True, transposed=True,
        bias=True),
    "up_only_gelu_bias": dict(T=9, H=24, I=17, E=3, k=1, activation="gelu", gated=False,
                              bias=True),
    "gelu_tanh_k_eq_E": dict(T=7, H=16, I=16, E=3, k=3, activation="gelu_tanh"),
    "all_on_one_expert": dict(T=12, H=33, I=17, E=4, k=1, activation="silu", mode="one_expert"),
    "sparse_experts": dict(T=10, H=20, I=24, E=8, k=2, activation="silu", mode="sparse"),
    "empty": dict(T=0, H=16, I=16, E=4, k=2, activation="silu"),
}


def _check_moe(case: str, dtype, device="cpu", cfg=None):
    """triton_moe_forward on MOE_CASES[case] against moe_forward_reference (inputs drawn on the CPU)."""
    from moe_compiler.codegen.triton.moe import moe_forward_reference, triton_moe_forward

    c = dict(MOE_CASES[case])
    T, H, I, E, k = (c.pop(x) for x in ("T", "H", "I", "E", "k"))
    mode, bias = c.pop("mode", "random"), c.pop("bias", False)
    gated, transposed = c.get("gated", True), c.get("transposed", False)
    g = _gen(len(case))
    n1 = 2 * I if gated else I
    hidden = torch.randn(T, H, generator=g).to(device, dtype)
    w1 = (torch.randn(E, H, n1, generator=g) if transposed else torch.randn(E, n1, H, generator=g))
    w2 = (torch.randn(E, I, H, generator=g) if transposed else torch.randn(E, H, I, generator=g))
    w1, w2 = (w1 / H**0.5).to(device, dtype), (w2 / I**0.5).to(device, dtype)
    if bias:
        c.update(b_gate_up=torch.randn(E, n1, generator=g).to(device, dtype),
                 b_down=torch.randn(E, H, generator=g).to(device, dtype))
    ids = _routing(T, k, E, seed=3, mode=mode).to(device)
    w = torch.softmax(torch.randn(T, k, generator=g), dim=-1).to(device)
    out = triton_moe_forward(hidden, ids, w, w1, w2, config=cfg, **c)
    ref = moe_forward_reference(hidden, ids, w, w1, w2, **c)
    assert out.shape == (T, H) and out.dtype == dtype and out.device == hidden.device
    torch.testing.assert_close(out, ref, **_tol(dtype))


@in_process
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(MOE_CASES))
def test_moe_forward_matches_reference(case, dtype):
    _check_moe(case, dtype)


@in_process
def test_moe_forward_with_fused_gating_end_to_end():
    """gating -> triton_moe_forward equals an eager per-token loop (fp32)."""
    from moe_compiler.codegen.triton.gating import GatingParams, gating
    from moe_compiler.codegen.triton.moe import triton_moe_forward

    g = _gen(11)
    T, H, I, E, k = 9, 16, 8, 4, 2
    x = torch.randn(T, H, generator=g)
    logits = torch.randn(T, E, generator=g)
    w1 = torch.randn(E, 2 * I, H, generator=g) / 4
    w2 = torch.randn(E, H, I, generator=g) / 3
    ids, w = gating(logits, None, GatingParams("softmax", k, renormalize=True))
    out = triton_moe_forward(x, ids, w, w1, w2)
    p = torch.softmax(logits, -1)
    tw, ti = torch.topk(p, k)
    tw = tw / tw.sum(-1, keepdim=True)
    ref = torch.zeros(T, H)
    for t in range(T):
        for j in range(k):
            gu = w1[ti[t, j]] @ x[t]
            ref[t] += tw[t, j] * (w2[ti[t, j]] @ (torch.nn.functional.silu(gu[:I]) * gu[I:]))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# the glue the grouped_experts op uses on CUDA, against the CPU lowering
# ------------------------------------------------------------------------------------------------
@in_process
@pytest.mark.parametrize("layout,transposed,bias,act", [("concat", False, False, "silu"),
                                                        ("interleaved", True, True, "swiglu_oai"),
                                                        ("ungated", False, True, "gelu_tanh")])
def test_grouped_experts_triton_glue(layout, transposed, bias, act):
    from moe_compiler.codegen import torch_experts
    from moe_compiler.codegen.ops import triton_grouped_experts
    from moe_compiler.ir import ExpertSpec

    g = torch.Generator().manual_seed(0)
    e, h, i, t, k = 4, 16, 8, 9, 2
    spec = ExpertSpec(hidden_size=h, ffn_size=i, activation=act, layout=layout, transposed=transposed, has_bias=bias)
    n1 = i if layout == "ungated" else 2 * i
    w1 = torch.randn((e, h, n1) if transposed else (e, n1, h), generator=g) * 0.3
    w2 = torch.randn((e, i, h) if transposed else (e, h, i), generator=g) * 0.3
    b1 = torch.randn(e, n1, generator=g) if bias else None
    b2 = torch.randn(e, h, generator=g) if bias else None
    x = torch.randn(t, h, generator=g)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    w = torch.rand(t, k, generator=g)
    want, _ = torch_experts.experts_forward(x, ids, w, w1, None, w2, b1, None, b2, spec)
    got = triton_grouped_experts(x, ids, w, w1, w2, b1, b2, spec)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    planned = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=1, num_warps=4, num_stages=2)  # a dumped plan
    got = triton_grouped_experts(x, ids, w, w1, w2, b1, b2, spec, config=planned)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# the offloaded op's CUDA path (the used experts stacked into a workspace), here on CPU tensors
# ------------------------------------------------------------------------------------------------
@in_process
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T", [0, 1, 9, 40])
def test_offloaded_triton_path_equals_resident_kernels(tmp_path, monkeypatch, T, dtype):
    """Bit-equal to the resident layer's Triton path, with a budget smaller than the experts a
    step uses (they are pinned one at a time) and a hot expert."""
    from moe_compiler.codegen import offload_ops, ops
    from moe_compiler.ir import _spec
    from moe_compiler.modules import MoELayer
    from moe_compiler.runtime import offload

    monkeypatch.setattr(offload_ops, "_triton_ok", lambda hidden, s: True)  # CPU tensors stand for CUDA
    torch.manual_seed(T)
    layer = MoELayer(16, 24, 6, 2, dtype=dtype)
    spec = layer.spec.to_json()
    sid, store = offload.store_for(offload.normalize_options({"dir": str(tmp_path), "budget": 0.4}))
    try:
        store.add_layer("l", {"w1": layer.gate_up_proj.detach(), "w2": layer.down_proj.detach()},
                        transposed=False)
        x = torch.randn(T, 16, generator=_gen(T)).to(dtype)
        ids = _routing(T, 2, 6, seed=T)
        ids[:, 0] = 3 if T == 40 else ids[:, 0]
        w = torch.rand(T, 2, generator=_gen(T + 1))
        y = offload_ops.OFFLOADED_EXPERTS_OP(x, ids, w, None, sid, 0, spec)
        want = ops.triton_grouped_experts(x, ids, w, layer.gate_up_proj.detach(), layer.down_proj.detach(),
                                          None, None, _spec(spec).experts)
        assert y.dtype == dtype and torch.equal(y, want.to(dtype))
        assert store.peak_bytes <= store.budget
    finally:
        offload.forget_stores()
