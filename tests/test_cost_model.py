"""Cost model: monotonicity, symbolic == numeric, profile schema errors, calibration fits, and the
cost_decisions pass on a compiled MoELayer."""
from __future__ import annotations

import ast
import json
import pathlib

import pytest
import sympy
import torch
from hypothesis import given
from hypothesis import strategies as st

import moe_compiler
from moe_compiler.cost_model import LayerShape, ProfileError, T, evaluate, load_profile
from moe_compiler.cost_model import collectives as C
from moe_compiler.cost_model import compute as CM
from moe_compiler.cost_model import decisions as D
from moe_compiler.cost_model import memory as M
from moe_compiler.cost_model.calibrate import fit_alpha_beta, fit_gemm, GEMM_K, GEMM_N
from moe_compiler.cost_model.profiles import bundled_names, validate

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROFILES = ("h100", "h200", "a100", "cpu_generic")


@st.composite
def layer_shapes(draw):
    """Generates: LayerShape with 1..64 experts, top-k <= E, hidden/ffn 8..2048, gated or not, fp32/bf16."""
    e = draw(st.integers(1, 64))
    return LayerShape(num_experts=e, top_k=draw(st.integers(1, min(e, 8))), hidden=draw(st.integers(8, 2048)),
                      ffn=draw(st.integers(8, 2048)), gated=draw(st.booleans()),
                      shared_ffn=draw(st.sampled_from([0, 64, 512])), dtype=draw(st.sampled_from(["fp32", "bf16"])))


def _scaled(profile, f: float):
    """The profile with every bandwidth multiplied by f."""
    link = lambda l: type(l)(l.bandwidth * f, l.latency)  # noqa: E731
    pf = None if profile.page_fault_bandwidth is None else profile.page_fault_bandwidth * f
    return profile.with_changes(mem_bandwidth=profile.mem_bandwidth * f, page_fault_bandwidth=pf,
                                host_link=link(profile.host_link),
                                intra_node=link(profile.intra_node), inter_node=link(profile.inter_node))


def _all_costs(layer, profile, ranks=16):
    """Every cost this package builds for a layer, as sympy expressions in T."""
    fwd, bwd = CM.moe_layer_time(layer, profile), CM.moe_layer_time(layer, profile, training=True)
    out = {f"fwd.{k}": v for k, v in fwd.items()}
    out.update({f"train.{k}": v for k, v in bwd.items()})
    out["dense"] = CM.dense_bound_time(layer, profile)
    out.update({f"ep.{k}": v for k, v in D.ep_costs(layer, profile, ranks, num_layers=4).items()})
    out.update({f"move.{k}": v for k, v in D.movement_costs(layer, profile, ranks, window=0.0).items()})
    return out


@given(layer_shapes(), st.sampled_from(PROFILES), st.integers(1, 1 << 15), st.integers(1, 1 << 15))
def test_more_tokens_never_cheaper(layer, name, t1, t2):
    lo, hi = sorted((t1, t2))
    profile = load_profile(name)
    for what, expr in _all_costs(layer, profile).items():
        a, b = evaluate(expr, T=lo) if expr.free_symbols else evaluate(expr), \
            evaluate(expr, T=hi) if expr.free_symbols else evaluate(expr)
        assert a <= b * (1 + 1e-9) + 1e-15, (what, lo, hi, a, b)
    fp_lo, fp_hi = (M.footprint_per_rank(layer, 8, t, training=True)["total"] for t in (lo, hi))
    assert float(fp_lo) <= float(fp_hi)


@given(layer_shapes(), st.sampled_from(PROFILES), st.integers(1, 1 << 14), st.floats(1.0, 100.0))
def test_more_bandwidth_never_slower(layer, name, tokens, factor):
    slow = load_profile(name)
    fast = _scaled(slow, factor)
    a, b = _all_costs(layer, slow), _all_costs(layer, fast)
    for what in a:
        va = evaluate(a[what], T=tokens) if a[what].free_symbols else evaluate(a[what])
        vb = evaluate(b[what], T=tokens) if b[what].free_symbols else evaluate(b[what])
        assert vb <= va * (1 + 1e-9) + 1e-15, (what, va, vb)


@given(st.integers(1, 1 << 30), st.sampled_from([2, 8, 16, 64]), st.sampled_from(PROFILES))
def test_collectives_monotone_in_bytes_and_hierarchy_helps_latency(nbytes, ranks, name):
    p = load_profile(name)
    for f in (C.all_to_all, C.all_to_all_hierarchical, C.all_gather, C.reduce_scatter):
        assert evaluate(f(nbytes, ranks, p)) <= evaluate(f(2 * nbytes, ranks, p))
    assert evaluate(C.sparse_all_gather(1e6, 64, 0.25, ranks, p)) <= evaluate(C.sparse_all_gather(1e6, 64, 0.5, ranks, p))
    # Hecate: the sparse gather of a fraction of the chunks never moves more than a full all-gather
    full = C.all_gather(64 * 1e6 / ranks, ranks, p)
    assert evaluate(C.sparse_all_gather(1e6, 64, 0.0, ranks, p)) <= evaluate(full)


@given(layer_shapes(), st.sampled_from(PROFILES), st.integers(1, 1 << 16), st.booleans())
def test_symbolic_equals_numeric(layer, name, tokens, training):
    p = load_profile(name)
    sym = CM.moe_layer_time(layer, p, training=training)
    num = CM.moe_layer_time(layer, p, tokens=tokens, training=training)
    for k in sym:
        by_lambdify = evaluate(sym[k], T=tokens) if sym[k].free_symbols else evaluate(sym[k])
        by_subs = float(sym[k].subs(T, tokens).evalf()) if sym[k].free_symbols else float(sym[k])
        direct = float(sympy.N(num[k]))
        assert by_lambdify == pytest.approx(direct, rel=1e-9, abs=1e-15), k
        assert by_subs == pytest.approx(direct, rel=1e-9, abs=1e-15), k


def test_evaluate_takes_arrays_and_names_missing_sizes():
    p = load_profile("h200")
    expr = CM.moe_layer_time(LayerShape(8, 2, 512, 1792), p)["total"]
    vals = evaluate(expr, T=[1, 64, 4096])
    assert vals.shape == (3,) and vals[0] < vals[1] < vals[2]
    with pytest.raises(ValueError, match=r"needs values for \['T'\]"):
        evaluate(expr)


def test_bundled_profiles_validate_and_cite_sources():
    assert set(PROFILES) <= set(bundled_names())
    for name in PROFILES:
        p = load_profile(name)
        assert p.source and p.flops("fp32") > 0 and p.mem_bandwidth > 0
    h200 = load_profile("h200")
    assert h200.flops("bf16") == pytest.approx(989e12) and h200.mem_bandwidth == pytest.approx(4.8e12)
    assert "datasheet" in h200.source


def _good() -> dict:
    return json.loads((ROOT / "cost_model" / "profiles" / "h200.json").read_text())


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("mem_bandwidth"), "missing field 'mem_bandwidth'"),
    (lambda d: d.update(mem_bandwidth="fast"), "'mem_bandwidth' must be a finite number"),
    (lambda d: d.update(mem_bandwidth=-1.0), "'mem_bandwidth' must be > 0"),
    (lambda d: d.update(gemm_efficiency=1.5), "'gemm_efficiency' must be <= 1.0"),
    (lambda d: d.update(kind="tpu"), "'kind' must be 'gpu' or 'cpu'"),
    (lambda d: d.update(peak_flops={"bf16": 1e15}), "'peak_flops' must be an object with at least 'fp32'"),
    (lambda d: d.update(intra_node=5), "'intra_node' must be an object"),
    (lambda d: d["inter_node"].pop("latency"), "inter_node: missing field 'latency'"),
    (lambda d: d.update(ranks_per_node=0), "'ranks_per_node' must be an integer >= 1"),
    (lambda d: d.update(bandwith=1.0), "unknown fields ['bandwith']"),
    (lambda d: d.update(source=""), "'source' must be a non-empty string"),
    (lambda d: d.update(large_alloc_bytes=1e6), "'large_alloc_bytes' and 'page_fault_bandwidth' go together"),
])
def test_profile_schema_errors_are_clear(change, message, tmp_path):
    d = _good()
    change(d)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ProfileError) as e:
        load_profile(str(path))
    assert message in str(e.value) and str(path) in str(e.value)


def test_profile_file_errors(tmp_path, monkeypatch):
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    with pytest.raises(ProfileError, match="not valid JSON"):
        load_profile(str(bad))
    with pytest.raises(ProfileError, match="cannot read profile"):
        load_profile(str(tmp_path / "missing.json"))
    with pytest.raises(ProfileError, match="unknown hardware profile 'tpu9'"):
        load_profile("tpu9")
    # no calibrated CPU profile cached: the bundled generic one, and nothing is written
    monkeypatch.setenv("MOE_COMPILER_CPU_PROFILE", str(tmp_path / "none" / "cpu.json"))
    assert load_profile("cpu").name == "cpu_generic"
    assert not (tmp_path / "none").exists()


def test_calibration_fits_recover_parameters():
    peak, m_half, ovh = 150e9, 12.0, 5e-6
    times = {(n, k, m): ovh + 2 * n * k * (m + m_half) / peak
             for n, k in ((GEMM_N, GEMM_K), (512, 256)) for m in (1, 4, 16, 64, 256, 1024)}
    f = fit_gemm(times)
    assert f["peak"] == pytest.approx(peak, rel=1e-6) and f["small_m_rows"] == pytest.approx(m_half, rel=1e-6)
    assert f["gemm_overhead_s"] == pytest.approx(ovh, rel=1e-6)
    assert fit_gemm(times, ovh)["peak"] == pytest.approx(peak, rel=1e-6)
    alpha, beta = 100e-6, 2e9
    ab = fit_alpha_beta({n: alpha + n / 2 / beta for n in (1 << 10, 1 << 16, 1 << 22)})
    assert ab["latency"] == pytest.approx(alpha, rel=1e-6) and ab["bandwidth"] == pytest.approx(beta, rel=1e-6)


def test_calibration_charges_a_variant_its_extra_cost_per_call(monkeypatch):
    """A variant's overhead is plain's fitted one plus what its call costs beyond plain's on a GEMM too
    small to cost anything else; its peak and m_half are fitted with that overhead fixed."""
    from moe_compiler.cost_model import calibrate as C

    def synthetic(peak, m_half, ovh):
        return {(n, k, m): ovh + 2 * n * k * (m + m_half) / peak for n, k in C.GEMM_SHAPES for m in C.GEMM_ROWS}

    # fitted freely on these shapes the prepacked call would look cheaper than plain's (20 vs 25 us)
    monkeypatch.setattr(C, "measure_gemms", lambda: {"plain": synthetic(100e9, 20.0, 25e-6),
                                                     "prepacked": synthetic(120e9, 12.0, 20e-6)})
    monkeypatch.setattr(C, "measure_gemm_overhead", lambda: {"plain": 3e-6, "prepacked": 15e-6})
    monkeypatch.setattr(C, "measure_memory", lambda: {"page_fault_bandwidth": 3e9, "copy_bandwidth": 30e9,
                                                      "mem_bandwidth": 30e9, "op_overhead_s": 2e-6,
                                                      "tiny_gemm_s": 3e-6})
    prof = C.calibrate(all_to_all=False, log=lambda _s: None)
    assert prof["gemm_overhead_s"] == pytest.approx(25e-6, rel=1e-6)
    assert prof["gemm_variants"]["prepacked"]["gemm_overhead_s"] == pytest.approx(37e-6, rel=1e-6)
    assert prof["calibration"]["gemm_overhead_seconds"] == {"plain": 3e-6, "prepacked": 15e-6}
    cpu = validate(prof)
    assert D.decide_cpu_gemm(LayerShape(16, 2, 64, 64), cpu, 64).choice == "plain"
    assert D.decide_cpu_gemm(LayerShape(8, 2, 512, 1792), cpu, 64).choice == "prepacked"


def test_calibrated_profile_round_trips(tmp_path, monkeypatch):
    from moe_compiler.cost_model.calibrate import write_profile

    d = json.loads((ROOT / "cost_model" / "profiles" / "cpu_generic.json").read_text())
    d.update(name="cpu", calibration={"seconds": 1.0})
    path = write_profile(validate(d).to_dict(), str(tmp_path / "cpu_profile.json"))
    monkeypatch.setenv("MOE_COMPILER_CPU_PROFILE", path)
    p = load_profile("cpu")
    assert p.name == "cpu" and p.gemm("prepacked").small_m_rows == 12 and p.calibration == {"seconds": 1.0}


def test_decisions_follow_the_trade_offs():
    h = load_profile("h100")
    layer = LayerShape(64, 6, 2048, 1408, dtype="bf16")
    # decode-sized batch: few routed tokens, many experts needed -> move tokens
    assert D.decide_movement(layer, h, 16, 8, window=0.0).choice == "tokens (EP)"
    # large batch with a long attention window: the needed experts hide behind it -> move weights
    assert D.decide_movement(layer, h, 16, 65536, window=0.05).choice == "weights (FSSDP)"
    # many ranks over nodes, small messages: latency-bound -> hierarchical all-to-all
    assert D.decide_ep_mode(layer, h, 64, 16, training=True).choice == "hierarchical"
    # training never picks the inference-only single all-to-all
    assert "single_all_to_all" not in D.decide_ep_mode(layer, h, 8, 4096, training=True).costs
    cpu = load_profile("cpu_generic")
    assert D.decide_cpu_gemm(LayerShape(8, 2, 512, 1792), cpu, 64).choice == "prepacked"
    assert D.decide_cpu_gemm(LayerShape(8, 2, 512, 1792), cpu, 64, training=True).choice == "plain"
    # the reference model's 48 KiB experts: a oneDNN prepacked call costs more than the GEMM itself
    # ([1, 64] x [64, 128]: ~3 us plain, ~15 us prepacked), at decode and at prefill sizes
    for tokens in (1, 64, 1024):
        assert D.decide_cpu_gemm(LayerShape(16, 2, 64, 64), cpu, tokens).choice == "plain"
    small, big = D.decide_cuda_tile(layer, h, 16), D.decide_cuda_tile(layer, h, 65536)
    assert int(small.choice.split("=")[1]) < int(big.choice.split("=")[1])
    assert all(d.why for d in (small, big))


@given(layer_shapes(), st.sampled_from(PROFILES), st.sampled_from([2, 4, 16, 64]), st.booleans(),
       st.integers(1, 1 << 17), st.integers(1, 1 << 17))
def test_decisions_every_rank_takes_alike_do_not_follow_the_token_count(layer, name, ranks, training, t1, t2):
    """Ranks of one EP group compile for their own token counts; every_rank decisions must agree anyway,
    and the ep_mode / movement choice is the alternative with the least worst ratio to the cheapest."""
    p = load_profile(name)
    for decide in (D.decide_ep_mode, D.decide_movement):
        a, b = (decide(layer, p, ranks, t, training=training, num_layers=4, every_rank=True) for t in (t1, t2))
        assert a.choice == b.choice and "alike on every rank" in a.why
        names, vals = D._over_grid(a.exprs)
        worst = ((vals + 1e-12) / (vals.min(axis=0) + 1e-12)).max(axis=1)
        assert worst[names.index(a.choice)] == pytest.approx(worst.min())
    r1, r2 = (D.decide_replicas(layer, p, ranks, t, every_rank=True) for t in (t1, t2))
    assert r1.choice == r2.choice


@given(layer_shapes(), st.sampled_from([2, 8, 64]), st.integers(1, 1 << 17))
def test_overlap_degree_pays_only_where_communication_runs_beside_compute(layer, ranks, tokens):
    # CPU: gloo's copies use the cores that compute, so chunks only add latency and smaller GEMMs
    cpu = D.decide_overlap_degree(layer, load_profile("cpu_generic"), ranks, tokens)
    assert cpu.choice == "1" and all(cpu.costs["1"] <= v * (1 + 1e-9) for v in cpu.costs.values())
    # GPU: c chunks pipeline; the cost never exceeds one chunk's plus the extra chunks' own costs
    h = load_profile("h200")
    gpu = D.overlap_costs(layer, h, ranks)
    one = float(evaluate(gpu["1"], T=tokens))
    serial = D.overlap_costs(layer, h.with_changes(kind="cpu"), ranks)
    for c in D.OVERLAP_DEGREES:
        assert float(evaluate(gpu[str(c)], T=tokens)) <= float(evaluate(serial[str(c)], T=tokens)) * (1 + 1e-9)
    assert float(evaluate(serial["1"], T=tokens)) == pytest.approx(one)


def test_overlap_degree_chunks_a_communication_bound_layer_on_a_gpu():
    slow_links = load_profile("h200").with_changes(
        intra_node=load_profile("h200").intra_node.__class__(2e9, 3e-6))   # 2 GB/s: comm ~ the experts
    layer = LayerShape(64, 6, 2048, 1408, dtype="bf16")
    big = D.decide_overlap_degree(layer, slow_links, 8, 65536)
    assert int(big.choice) > 1, big.why
    assert D.decide_overlap_degree(layer, slow_links, 8, 1).choice == "1"   # one token: latency only
    alike = {D.decide_overlap_degree(layer, slow_links, 8, t, every_rank=True).choice for t in (1, 65536)}
    assert len(alike) == 1


def test_least_worst_ratio_prefers_the_alternative_that_is_never_far_off():
    # a is best for small T and 10x off for large T; b is never more than 2x off; c is dominated
    exprs = {"a": 1 + T / 100, "b": 2 + T / 1000, "c": 3 + T / 10}
    assert D.least_worst_ratio(exprs)[0] == "b"
    assert D.least_worst_ratio({"only": T})[0] == "only"
    assert D.least_worst_ratio({"zero": sympy.Integer(0), "x": T}) == ("zero", 1.0)


def test_cost_model_is_pure():
    """cost_model imports nothing from passes/codegen and no torch at module level (calibrate: lazily)."""
    for path in (ROOT / "cost_model").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for n in names:
                assert not n.startswith(("torch", "moe_compiler.passes", "moe_compiler.codegen")), (path.name, n)


def test_pass_annotates_compiled_layer(tmp_path):
    torch.manual_seed(0)
    layer = moe_compiler.MoELayer(32, 64, 8, 2)
    x = torch.randn(16, 32)
    compiled = torch.compile(layer, backend="moe", options={"inner_backend": "eager", "dump_dir": str(tmp_path),
                                                            "strict": True})
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x))
    text = "\n".join(p.read_text() for p in tmp_path.rglob("*rewrite_dispatch.after.py"))
    for name in ("ep_mode", "overlap_degree", "movement", "replicas", "prefetch_depth", "cpu_gemm"):
        assert f"decision:{name}" in text, name
    summary = next(tmp_path.rglob("summary.txt")).read_text()
    assert "decisions: ep_mode=" in summary


def test_pass_profile_override_in_explain():
    layer = moe_compiler.MoELayer(32, 64, 8, 2)
    report = moe_compiler.explain(layer, torch.randn(16, 32), inner_backend="eager", strict=True,
                                  pass_options={"cost_decisions": {"profile": "h200", "ranks": 16}})
    (m,) = report.moe_layers
    names = [n for n, _, _ in m.decisions]
    assert names == ["ep_mode", "overlap_degree", "movement", "replicas", "prefetch_depth", "cuda_tile"]
    assert "[profile h200, 16 ranks]" in m.decisions_text() and "decisions: ep_mode=" in m.one_line()


def test_pass_unknown_profile_is_a_clear_error():
    layer = moe_compiler.MoELayer(32, 64, 4, 1)
    compiled = torch.compile(layer, backend="moe", options={"inner_backend": "eager", "strict": True,
                                                            "pass_options": {"cost_decisions": {"profile": "tpu9"}}})
    with pytest.raises(Exception, match="unknown hardware profile 'tpu9'"):
        compiled(torch.randn(8, 32))


def test_calibrate_subcommand_parses(tmp_path, capsys):
    import argparse

    from moe_compiler.cost_model.calibrate import add_calibrate_subcommand

    parser = argparse.ArgumentParser(prog="moe-compiler")
    add_calibrate_subcommand(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["calibrate", "--print", "-o", str(tmp_path / "none.json")])
    assert args.func(args) == 1 and "no calibrated CPU profile" in capsys.readouterr().out


def test_pass_survives_a_broken_cpu_cache(tmp_path, monkeypatch):
    bad = tmp_path / "cpu_profile.json"
    bad.write_text('{"name": "cpu"}')
    monkeypatch.setenv("MOE_COMPILER_CPU_PROFILE", str(bad))
    layer = moe_compiler.MoELayer(32, 64, 4, 2)
    report = moe_compiler.explain(layer, torch.randn(8, 32), inner_backend="eager", strict=True)
    (m,) = report.moe_layers
    assert "[profile cpu_generic," in m.decisions_text()


def test_training_pays_page_faults_only_for_large_fresh_buffers_on_cpu():
    mixtral = LayerShape(8, 2, 512, 1792)   # stacked w1 gradient 58.7 MB > 32 MiB
    small = LayerShape(8, 2, 64, 128)
    cpu, gpu = load_profile("cpu_generic"), load_profile("h200")
    assert float(CM.moe_layer_time(mixtral, cpu, training=True)["fresh_buffers"]) > 0
    assert float(CM.moe_layer_time(small, cpu, training=True)["fresh_buffers"]) == 0
    assert float(CM.moe_layer_time(mixtral, gpu, training=True)["fresh_buffers"]) == 0
