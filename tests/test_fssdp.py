"""FSSDP (Hecate) on 2 and 4 gloo processes: equal to single-process training, bytes = materialised chunks.

Each test spawns ONE process group and runs many cases in it (spawning is slow). Workers
(``*_worker``) run inside the ranks via moe_compiler.runtime.launch.
"""
from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from drawn import Case
from moe_compiler.config import ConfigError
from moe_compiler.runtime.launch import run_ranks

HERE = os.path.dirname(os.path.abspath(__file__))
distributed = [pytest.mark.distributed, pytest.mark.timeout(400)]


def fssdp_cases(world: int):
    """Generates: one FSSDP layer case: experts 1..9 (fewer than ranks too), top-k 1..min(4, E), tokens per
    rank 0..12, routing random / skewed / every slot to expert 0, owners contiguous or random (ranks
    that own nothing), materialise "needed" or "sparse" with 0..E replicated experts, rematerialise
    or not, fp32 / bf16 weights, a router that scales the experts' input (Llama 4), weights the chosen
    experts by a per-expert [E] operand (Gemma 4), both or neither."""

    @st.composite
    def build(draw):
        E = draw(st.integers(1, 9))
        return Case(E=E, k=draw(st.integers(1, min(4, E))), H=draw(st.integers(4, 12)), I=draw(st.integers(2, 6)),
                    tokens=draw(st.lists(st.integers(0, 12), min_size=world, max_size=world)),
                    routing=draw(st.sampled_from(["random", "skewed", "one_expert"])),
                    owners=draw(st.sampled_from(["contiguous", "random"])),
                    materialize=draw(st.sampled_from(["needed", "sparse"])), replicate=draw(st.integers(0, E)),
                    remat=draw(st.booleans()), dtype=draw(st.sampled_from(["float32", "float32", "bfloat16"])),
                    seed=draw(st.integers(0, 10_000)), scaling=draw(st.sampled_from(["none", "input", "weight", "both"])))

    return build()


# ------------------------------------------------------------------ op-level worker
def _case(case, world):
    from moe_compiler.codegen.comm.fssdp import NOTE, FSSDPPlan
    from moe_compiler.ir import ExpertSpec, MoESpec, RouterSpec

    gen = torch.Generator().manual_seed(case["seed"])
    E, k, H, I = case["E"], case["k"], case["H"], case["I"]
    owners = tuple(e * world // E for e in range(E)) if case["owners"] == "contiguous" else \
        tuple(int(o) for o in torch.randint(world, (E,), generator=gen))
    plan = FSSDPPlan("world", owners, case["materialize"], case["replicate"], case["remat"], 3, f"case{case['seed']}")
    scaling = case.get("scaling", "none")
    router = RouterSpec(E, k, scales_input=scaling in ("input", "both"), weight_scale=scaling in ("weight", "both"))
    spec = MoESpec(router, ExpertSpec(H, I), path=plan.layer).replace(notes=((NOTE, plan.to_json()),))
    dt = getattr(torch, case["dtype"])
    w1 = (torch.randn(E, 2 * I, H, generator=gen) * H ** -0.5).to(dt)
    w2 = (torch.randn(E, H, I, generator=gen) * I ** -0.5).to(dt)
    skew = torch.zeros(E)
    if case["routing"] == "skewed":
        skew[torch.randperm(E, generator=gen)[: max(1, E // 3)]] = 3.0
    elif case["routing"] == "one_expert":
        skew[0] = 50.0
    xs = [torch.randn(t, H, generator=gen).to(dt) for t in case["tokens"]]
    ls = [torch.randn(t, E, generator=gen) + skew for t in case["tokens"]]
    gs = [torch.randn(t, H, generator=gen).to(dt) for t in case["tokens"]]
    scale = torch.rand(E, generator=gen) + 0.5 if router.weight_scale else None
    return spec, plan, w1, w2, xs, ls, gs, scale


def op_cases_worker(rank, world, cases):
    import torch.distributed as dist

    from moe_compiler.codegen.comm.executor import record_traffic

    out = []
    for case in cases:
        spec, plan, w1, w2, xs, ls, gs, scale = _case(case, world)
        owned = plan.owned(rank)
        p = [xs[rank].clone().requires_grad_(), ls[rank].clone().requires_grad_(),
             w1[owned].clone().requires_grad_(), w2[owned].clone().requires_grad_()]
        ps = None if scale is None else scale.clone().requires_grad_()
        with record_traffic() as traffic:
            y, need, _ = torch.ops.moe_compiler.fssdp_moe(p[0], p[1], ps, p[2], None, p[3], None, None, None,
                                                          spec.to_json())
            (y.float() * gs[rank].float()).sum().backward()
        # the single-process reference on this rank's tokens; expert (and scale) grads summed over every
        # rank's tokens
        q = [xs[rank].clone().requires_grad_(), ls[rank].clone().requires_grad_(), w1.clone().requires_grad_(),
             w2.clone().requires_grad_()]
        qs = None if scale is None else scale.clone().requires_grad_()
        y_ref = torch.ops.moe_compiler.moe(q[0], q[1], qs, q[2], None, q[3], None, None, None, spec.to_json())
        (y_ref.float() * gs[rank].float()).sum().backward()
        gw1, gw2 = q[2].grad.float(), q[3].grad.float()
        dist.all_reduce(gw1)
        dist.all_reduce(gw2)
        scale_err = {}
        if scale is not None:   # a replicated operand: each rank's gradient from its tokens, summed
            g_ep, g_ref = ps.grad.float().clone(), qs.grad.float().clone()
            dist.all_reduce(g_ep)
            dist.all_reduce(g_ref)
            scale_err["gscale"] = _rel(g_ep, g_ref)
        chunk_bytes = (w1[0].numel() + w2[0].numel()) * w1.element_size()
        gathered = [t["bytes_remote"] for t in traffic if t["step"] == "sparse_all_gather"]
        out.append(dict(
            y=_rel(y, y_ref), gx=_rel(p[0].grad, q[0].grad), gl=_rel(p[1].grad, q[1].grad),
            gw1=_rel(p[2].grad, gw1[owned]), gw2=_rel(p[3].grad, gw2[owned]),
            need=need.tolist(), used=[int(u) for u in (torch.zeros(case["E"]).index_add_(
                0, torch.topk(ls[rank], case["k"], -1).indices.reshape(-1), torch.ones(ls[rank].shape[0] * case["k"]))
                > 0)],
            sent=sum(gathered), gathers=len(gathered), chunk_bytes=chunk_bytes, dtype=case["dtype"], **scale_err))
    return out


def _rel(a, b) -> float:
    a, b = a.detach().float(), b.detach().float()
    if a.numel() == 0:
        return 0.0
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()


def _check_op_reports(reports, cases, world):
    for i, case in enumerate(cases):
        rows = [reports[r][i] for r in range(world)]
        tol = 2e-2 if case["dtype"] == "bfloat16" else 1e-5
        for r, rep in enumerate(rows):
            for key in ("y", "gx", "gl", "gw1", "gw2") + (("gscale",) if "gscale" in rep else ()):
                assert rep[key] < tol, (case, r, key, rep[key])
        need = rows[0]["need"]
        assert all(rep["need"] == need for rep in rows), "every rank must build the same placement"
        owners = [e * world // case["E"] for e in range(case["E"])] if case["owners"] == "contiguous" else None
        for r, rep in enumerate(rows):
            for e, used in enumerate(rep["used"]):
                if need[r][e]:
                    assert used, (case, r, e, "gathered an expert no token of the rank uses")
                if case["materialize"] == "needed" and owners is not None and used and owners[e] != r:
                    assert need[r][e], (case, r, e, "a used remote expert was not gathered")
        # bytes moved by the gathers = materialised remote chunks x chunk size (per iteration, over the group)
        gathers_per_iteration = 2 if case["remat"] else 1
        assert all(rep["gathers"] == gathers_per_iteration for rep in rows)
        total = sum(rep["sent"] for rep in rows)
        assert total == gathers_per_iteration * sum(map(sum, need)) * rows[0]["chunk_bytes"], (case, total)


@pytest.mark.distributed
@pytest.mark.timeout(400)
@settings(max_examples=2, deadline=None, phases=[Phase.generate], database=None)  # the first example is the minimal one
@given(st.lists(fssdp_cases(2), min_size=14, max_size=14), st.lists(fssdp_cases(4), min_size=10, max_size=10))
def test_fssdp_op_equals_single_process_on_2_and_4_ranks(cases2, cases4):
    for world, cases in ((2, cases2), (4, cases4)):
        reports = run_ranks("test_fssdp:op_cases_worker", world, {"cases": cases}, timeout=480, pg_timeout=60,
                            python_path=(HERE,))
        _check_op_reports(reports, cases, world)


# ------------------------------------------------------------------ compiled training
from torch_moe_styles import ResidualMoEStack as _Stack  # noqa: E402


def _train_step(cm, model, opt, ref, ref_opt, xs, rank, step):
    """One step on this rank's tokens (non-expert gradients all-reduced: data parallel) and one
    single-process step of the reference on every rank's tokens."""
    import torch.distributed as dist

    from moe_compiler.runtime.expert_parallel import EXPERT_PARAM_NAMES

    cm(xs[rank] * (1 + step)).square().sum().backward()
    for n, p in model.named_parameters():
        if n.rsplit(".", 1)[-1] not in EXPERT_PARAM_NAMES:
            dist.all_reduce(p.grad)
    opt.step()
    opt.zero_grad()
    sum(ref(x * (1 + step)).square().sum() for x in xs).backward()
    ref_opt.step()
    ref_opt.zero_grad()


def training_worker(rank, world, variants, steps):
    """Adam steps of a sharded 2-layer MoE stack with FSSDP vs one process on the global batch."""
    import torch.distributed as dist

    from moe_compiler.codegen.comm import fssdp
    from moe_compiler.pipeline import counters
    from moe_compiler.runtime.expert_parallel import EXPERT_PARAM_NAMES, shard_experts

    out = {}
    for name, opts, inner in variants:
        torch._dynamo.reset()
        counters.clear()
        fssdp.kept_stats.clear()
        torch.manual_seed(0)
        model = _Stack()
        ref = copy.deepcopy(model)
        shard_experts(model)  # contiguous owners: one copy of each expert and of its optimizer state
        xs = [torch.randn(2 + r, 5, 16, generator=torch.Generator().manual_seed(100 + r)) for r in range(world)]
        cm = torch.compile(model, backend="moe", options={"expert_parallel": opts, "inner_backend": inner,
                                                            "strict": True})
        opt, ref_opt = torch.optim.Adam(model.parameters(), lr=1e-2), torch.optim.Adam(ref.parameters(), lr=1e-2)
        for step in range(steps):
            _train_step(cm, model, opt, ref, ref_opt, xs, rank, step)
        err = 0.0
        for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
            if p.shape != q.shape:  # an expert shard: compare with the owned rows
                q = q.detach()[list(model.get_submodule(n.rsplit(".", 1)[0])._moe_compiler_local_experts)]
            err = max(err, _rel(p, q))
        state_rows = sum(s["exp_avg"].shape[0] for p, s in opt.state.items() if p.dim() == 3)
        out[name] = dict(err=err, layers=counters["sparse_collectives"].get("layers_fssdp", 0),
                         kept=dict(fssdp.kept_stats), state_rows=state_rows)
    import moe_compiler

    for movement in ("weights", "auto"):
        report = moe_compiler.explain(_Stack(), torch.randn(4, 5, 16), expert_parallel={"movement": movement})
        out[f"explain/{movement}"] = [m.one_line() for m in report.moe_layers]
    return out


@pytest.mark.distributed
@pytest.mark.timeout(400)
@pytest.mark.parametrize("world", [2, 4])
def test_fssdp_training_equals_single_process(world):
    variants = [("needed/inductor", {"movement": "weights"}, "inductor"),
                ("remat/eager", {"movement": "weights", "rematerialize": True}, "eager"),
                ("sparse/eager", {"movement": "weights", "materialize": "sparse", "replicate": 2, "load_window": 2},
                 "eager")]
    if world == 4:
        variants = variants[1:]
    steps = 3
    results = run_ranks("test_fssdp:training_worker", world, {"variants": variants, "steps": steps}, timeout=300,
                        pg_timeout=90, python_path=(HERE,))
    for rank, res in enumerate(results):
        lines = res.pop("explain/weights")
        assert len(lines) == 2 and all("FSSDP over" in l and "option movement 'weights'" in l for l in lines), lines
        lines = res.pop("explain/auto")  # the cost model decides per layer; explain says which and why
        assert all("cost model chose" in l and ("FSSDP over" in l or "expert parallel over" in l) for l in lines), lines
        for name, r in res.items():
            assert r["layers"] == 2, (rank, name, r)
            assert r["err"] < 1e-4, (rank, name, r)
            # each rank keeps Adam state only for the experts it owns (6 experts, 2 stacked weights, 2 layers)
            owned = sum(1 for e in range(6) if e * world // 6 == rank)
            assert r["state_rows"] == 2 * 2 * owned, (rank, name, r)
        assert res["remat/eager"]["kept"].get("kept", 0) == 0
        assert res["remat/eager"]["kept"]["regathered"] == 2 * steps
        if "needed/inductor" in res:  # kept from forward and reused: no second gather
            assert res["needed/inductor"]["kept"]["reused"] == 2 * steps, res["needed/inductor"]


def reshard_worker(rank, world):
    """2 Adam steps, re-own the experts (Hecate heterogeneous sharding from the observed loads, then a
    forced swap), 2 more steps: parameters and Adam state still equal one process on the global batch."""
    import torch.distributed as dist

    from moe_compiler.passes.placement import Placement
    from moe_compiler.runtime import fssdp as rt
    from moe_compiler.runtime.expert_parallel import EXPERT_PARAM_NAMES, shard_experts

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _Stack()
    ref = copy.deepcopy(model)
    shard_experts(model)
    xs = [torch.randn(3 + r, 5, 16, generator=torch.Generator().manual_seed(100 + r)) for r in range(world)]
    cm = torch.compile(model, backend="moe", options={"expert_parallel": {"movement": "weights"}, "strict": True,
                                                        "inner_backend": "eager"})
    opt, ref_opt = torch.optim.Adam(model.parameters(), lr=1e-2), torch.optim.Adam(ref.parameters(), lr=1e-2)
    moved = []

    def train(step):
        _train_step(cm, model, opt, ref, ref_opt, xs, rank, step)

    for step in range(2):
        train(step)
    loads = rt.layer_loads()
    planned = rt.plan_owners(np.stack([loads[k] for k in sorted(loads)]), world, top_t=1)
    moved.append(rt.reshard(model, opt, planned))
    for step in range(2, 3):
        train(step)
    swap = Placement(world, [[((e * world // 6 + 1) % world,) for e in range(6)] for _ in range(2)])
    moved.append(rt.reshard(model, opt, swap))
    for step in range(3, 5):
        train(step)
    err = 0.0
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        if p.shape != q.shape:
            rows = list(model.get_submodule(n.rsplit(".", 1)[0])._moe_compiler_local_experts)
            err = max(err, _rel(p, q.detach()[rows]), _rel(opt.state[p]["exp_avg"], ref_opt.state[q]["exp_avg"][rows]))
        else:
            err = max(err, _rel(p, q))
    rt.clear_owners()
    return dict(err=err, moved=moved, local=list(model.layers[0]._moe_compiler_local_experts),
                loads_layers=sorted(loads))


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_reshard_moves_parameters_and_optimizer_state():
    results = run_ranks("test_fssdp:reshard_worker", 2, {}, timeout=280, pg_timeout=90, python_path=(HERE,))
    for rank, r in enumerate(results):
        assert r["err"] < 1e-4, (rank, r)
        assert len(r["loads_layers"]) == 2, r
        assert sum(r["moved"][1].values()) > 0, r  # the swap moved experts
        assert r["local"] == [e for e in range(6) if (e * 2 // 6 + 1) % 2 == rank]


def test_plan_owners_hecate_heterogeneous_sharding():
    from moe_compiler.runtime.fssdp import plan_owners

    loads = np.array([[100, 1, 1, 1, 50, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 80]], dtype=float)
    p = plan_owners(loads, 4, ranks_per_node=2, top_t=1)
    for layer in p.layers:
        owners = [r[0] for r in layer]
        assert sorted(owners.count(r) for r in range(4)) == [2, 2, 2, 2]  # ceil(8 / 4) slots each
    l0 = [r[0] for r in p.layers[0]]
    assert l0[0] // 2 != l0[4] // 2  # the two heavy experts on different nodes
    assert p.metadata["method"] == "hecate_heterogeneous_sharding"
    odd = plan_owners(np.ones((1, 5)), 2)
    assert sorted(r[0] for r in odd.layers[0]).count(0) in (2, 3)
    with pytest.raises(ValueError, match="layers, experts"):
        plan_owners(np.ones(4), 2)
    with pytest.raises(ValueError, match="ranks_per_node"):
        plan_owners(np.ones((1, 4)), 4, ranks_per_node=3)
    with pytest.raises(ValueError, match="non-negative"):
        plan_owners(-np.ones((1, 4)), 2)


# ------------------------------------------------------------------ failures
def failure_worker(rank, world, how):
    from dist_failures import fail_last_rank

    from moe_compiler.codegen.comm.fssdp import NOTE, FSSDPPlan
    from moe_compiler.ir import ExpertSpec, MoESpec, RouterSpec

    # the last rank owns experts 2 and 3
    plan = FSSDPPlan("world", (0, 0, 1, 1), "needed", 0, False, 5, "layer")
    spec = MoESpec(RouterSpec(4, 2), ExpertSpec(8, 4), path="layer").replace(notes=((NOTE, plan.to_json()),))
    return fail_last_rank(rank, world, how, lambda: torch.ops.moe_compiler.fssdp_moe(
        torch.randn(5, 8), torch.randn(5, 4), None, torch.randn(2, 8, 8), None, torch.randn(2, 8, 4), None, None, None,
        spec.to_json()))


@pytest.mark.distributed
@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["die", "hang"])
def test_failed_owner_fails_the_others_in_bounded_time(how):
    from dist_failures import assert_others_fail_in_bounded_time

    assert_others_fail_in_bounded_time("test_fssdp:failure_worker", how, "exchange_loads")


# ------------------------------------------------------------------ single-process units
def test_options_accept_and_reject():
    from moe_compiler.runtime.expert_parallel import normalize_options

    o = normalize_options({"movement": "weights", "materialize": "sparse", "replicate": 3, "rematerialize": True})
    assert (o["movement"], o["materialize"], o["replicate"], o["rematerialize"], o["load_window"]) == \
        ("weights", "sparse", 3, True, 5)
    assert normalize_options(True)["movement"] == "tokens"
    for bad, words in [({"movement": "experts"}, "movement"), ({"rematerialize": True}, "need movement"),
                       ({"movement": "weights", "materialize": "all"}, "materialize"),
                       ({"movement": "auto", "replicate": -1}, "replicate"),
                       ({"movement": "weights", "load_window": 0}, "load_window"),
                       ({"movement": "weights", "rematerialize": "yes"}, "rematerialize")]:
        with pytest.raises(ConfigError, match=words):
            normalize_options(bad)


def test_replicated_experts_from_the_cost_model_choice():
    from moe_compiler.passes.sparse_collectives import _replicated_experts

    assert _replicated_experts("4*2,1*6", 8, 4) == 2
    assert _replicated_experts("1*8", 8, 4) == 0
    assert _replicated_experts("3*1,1*2,2*5", 8, 4) == 6
    assert _replicated_experts(None, 8, 4) == 2


def test_chunks_roundtrip_and_gather_order():
    from moe_compiler.codegen.comm.fssdp import FSSDPPlan, chunk_layout, gathered_experts, shard_chunks, unchunk

    w = dict(w1=torch.randn(5, 6, 4), w3=None, w2=torch.randn(5, 4, 3), b1=torch.randn(5, 6), b3=None, b2=None)
    owned = [1, 3]
    chunks = shard_chunks(w, owned, 5)
    assert chunks.shape == (2, 6 * 4 + 4 * 3 + 6)
    back = unchunk(chunks, chunk_layout(w))
    assert torch.equal(back[0], w["w1"][owned]) and torch.equal(back[2], w["w2"][owned])
    assert torch.equal(back[3], w["b1"][owned]) and back[1] is None
    shards = {k: (v[owned] if v is not None else None) for k, v in w.items()}
    assert torch.equal(shard_chunks(shards, owned, 5), chunks)
    with pytest.raises(ValueError, match="rows"):
        shard_chunks(dict(w, w1=w["w1"][:3]), owned, 5)
    with pytest.raises(ValueError, match="one dtype"):
        shard_chunks(dict(w, b1=w["b1"].double()), owned, 5)
    plan = FSSDPPlan("world", (1, 0, 1, 0, 0), "needed")
    need = torch.tensor([[0, 0, 1, 0, 0], [0, 1, 0, 0, 1]])
    assert gathered_experts(need, plan, 1) == [1, 4]  # by owner rank, then expert id
    assert gathered_experts(need, plan, 0) == [2]


def test_kept_owned_rows_replace_released_weights():
    """An inference compile keeps the rows of the experts a rank owns (ep_weights) and releases the whole
    tensors: the op reads the kept rows, and says so clearly when reshard has moved the owners since."""
    from moe_compiler.codegen.comm.fssdp import layer_owned_weights
    from moe_compiler.ir import ExpertSpec, MoESpec, RouterSpec
    from moe_compiler.runtime import ep_weights

    w = dict(w1=torch.randn(5, 6, 4), w3=None, w2=torch.randn(5, 4, 3), b1=None, b3=None, b2=None)
    spec = MoESpec(RouterSpec(5, 2), ExpertSpec(4, 3), path="layer")
    key = ep_weights.keep(tuple(w[n] for n in ep_weights.WEIGHT_NAMES), (1, 3))
    kept = spec.replace(notes=((ep_weights.NOTE, key),))
    expect = {n: w[n][[1, 3]] for n in ("w1", "w2")}
    for t in (w["w1"], w["w2"]):
        ep_weights.release(t)
    got = layer_owned_weights(w, [1, 3], kept)
    assert got.keys() == expect.keys() and all(torch.equal(got[n], expect[n]) for n in got)
    with pytest.raises(ep_weights.ReleasedWeightsError, match=r"owns experts \[1, 4\].*kept only experts \[1, 3\]"):
        layer_owned_weights(w, [1, 4], kept)
    with pytest.raises(ep_weights.ReleasedWeightsError, match="released"):
        layer_owned_weights(w, [1, 3], spec)   # no kept rows: the whole tensors are gone


def test_schedule_of_an_fssdp_layer():
    from moe_compiler.codegen.comm.schedule import plan_fssdp_layer

    s = plan_fssdp_layer("l0", 4, [[0], [1], [2], [3]], "needed", True)
    assert [c.name for c in s.steps] == ["exchange_loads", "sparse_all_gather", "sparse_all_gather(backward)",
                                         "sparse_reduce_scatter(backward)"]
    s = plan_fssdp_layer("l0", 2, [[0, 1], [2]], "sparse", False)
    assert "dispatch" in [c.name for c in s.steps] and s.mode == "fssdp/sparse"


def test_mixed_dtype_experts_stay_expert_parallel():
    from moe_compiler.passes.sparse_collectives import _chunkable

    g = torch.fx.Graph()
    args = []
    for name, dt in (("x", torch.float32), ("l", torch.float32), ("w1", torch.bfloat16), ("w2", torch.bfloat16),
                     ("b1", torch.float32)):
        n = g.placeholder(name)
        n.meta["val"] = torch.empty(2, 2, dtype=dt)
        args.append(n)
    x, l, w1, w2, b1 = args
    node = g.call_function(torch.add, (x, l, None, w1, None, w2, None, None, None, "{}"))
    assert _chunkable(node) is True
    node.args = (x, l, None, w1, None, w2, b1, None, None, "{}")
    assert "one dtype" in _chunkable(node)
