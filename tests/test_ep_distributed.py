"""Expert parallelism on 2 and 4 gloo processes: EP output == single-process eager, forward and backward.

Each test spawns ONE process group (spawning is slow) and runs many hypothesis-drawn cases in it.
Worker functions (``*_worker``) run inside the spawned ranks via moe_compiler.runtime.launch.
"""
from __future__ import annotations

import copy
import json
import os
import pathlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from drawn import Case
from moe_compiler.runtime.launch import run_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(400)]
HERE = os.path.dirname(os.path.abspath(__file__))


# ------------------------------------------------------------------ strategies
def ep_cases(world: int, modes=("all_to_all",)):
    """Generates: dicts describing one EP layer case for `world` ranks: experts E in 1..9 (divisible
    by the ranks or not, fewer than the ranks too), top-k 1..min(4, E), hidden 4..16, ffn 2..8,
    tokens per rank 0..12 (ranks with no tokens), routing "random" | "skewed" (a few experts take
    most slots) | "one_rank" (everything to rank 0's experts: other ranks receive nothing),
    placement "contiguous" | "random" (one copy each) | "replicated" (extra copies), overlap
    degree 1..3, softmax or sigmoid scores, the mode, a router that scales the experts' input
    (Llama 4), weights the chosen experts by a per-expert [E] operand (Gemma 4), both or neither, and
    the inner backend of the functional-collectives compile (Inductor merges equal expressions, e.g.
    equal empty chunks: their collectives must stay distinct)."""

    @st.composite
    def build(draw):
        E = draw(st.integers(1, 9))
        k = draw(st.integers(1, min(4, E)))
        return Case(
            E=E, k=k, H=draw(st.integers(4, 16)), I=draw(st.integers(2, 8)),
            tokens=draw(st.lists(st.integers(0, 12), min_size=world, max_size=world)),
            routing=draw(st.sampled_from(["random", "skewed", "one_rank"])),
            placement=draw(st.sampled_from(["contiguous", "random", "replicated"])),
            overlap=draw(st.integers(1, 3)), score=draw(st.sampled_from(["softmax", "sigmoid"])),
            renorm=draw(st.booleans()), mode=draw(st.sampled_from(modes)), seed=draw(st.integers(0, 10_000)),
            scaling=draw(st.sampled_from(["none", "input", "weight", "both"])),
            inner=draw(st.sampled_from(["eager", "eager", "eager", "inductor"])))

    return build()


# ------------------------------------------------------------------ workers (run inside the ranks)
def _placement_rows(case, world, gen):
    from moe_compiler.runtime.expert_parallel import contiguous_rows

    E = case["E"]
    if case["placement"] == "contiguous":
        return contiguous_rows(E, world)
    rows = []
    for e in range(E):
        first = int(torch.randint(world, (1,), generator=gen))
        ranks = {first}
        if case["placement"] == "replicated":
            ranks |= {int(r) for r in torch.randint(world, (int(torch.randint(3, (1,), generator=gen)),),
                                                      generator=gen)}
        rows.append(tuple(sorted(ranks)))
    return tuple(rows)


def _case_tensors(case, world):
    """Identical on every rank: weights, every rank's tokens and loss weights, the routing skew, the
    per-expert weight scale (None unless the case has one)."""
    from moe_compiler.ir import ExpertSpec, MoESpec, RouterSpec

    gen = torch.Generator().manual_seed(case["seed"])
    E, k, H, I = case["E"], case["k"], case["H"], case["I"]
    scaling = case.get("scaling", "none")
    spec = MoESpec(RouterSpec(E, k, score_func=case["score"], renormalize=case["renorm"],
                              scales_input=scaling in ("input", "both"), weight_scale=scaling in ("weight", "both")),
                   ExpertSpec(H, I), path="layer")
    router = torch.randn(E, H, generator=gen) * 0.5
    w1 = torch.randn(E, 2 * I, H, generator=gen) * H ** -0.5
    w2 = torch.randn(E, H, I, generator=gen) * I ** -0.5
    xs = [torch.randn(t, H, generator=gen) for t in case["tokens"]]
    gs = [torch.randn(t, H, generator=gen) for t in case["tokens"]]
    rows = _placement_rows(case, world, gen)
    skew = torch.zeros(E)
    if case["routing"] == "skewed":
        skew[torch.randperm(E, generator=gen)[: max(1, E // 3)]] = 3.0
    elif case["routing"] == "one_rank":
        skew[[e for e, r in enumerate(rows) if 0 in r]] = 8.0
    scale = torch.rand(E, generator=gen) + 0.5 if spec.router.weight_scale else None
    return spec, router, w1, w2, xs, gs, rows, skew, scale


def _reference(spec, router, w1, w2, x, g, skew, scale):
    """Single-process eager (the moe op's reference) on tokens x: output and the gradients of x,
    router, w1, w2 and the scale (None without one)."""
    p = [t.clone().requires_grad_() for t in (x, router, w1, w2)]
    s = None if scale is None else scale.clone().requires_grad_()
    y = torch.ops.moe_compiler.moe(p[0], F.linear(p[0], p[1]) + skew, s, p[2], None, p[3], None, None, None,
                                   spec.to_json())
    (y * g).sum().backward()
    return y.detach(), [t.grad for t in p] + [None if s is None else s.grad]


def ep_cases_worker(rank, world, cases, functional_every=1):
    import torch.distributed as dist

    from moe_compiler.codegen.comm import executor
    from moe_compiler.codegen.comm.ep import NOTE, EPPlan, slot_destinations
    from moe_compiler.reference import route

    report = []
    for index, case in enumerate(cases):
        spec, router, w1, w2, xs, gs, rows, skew, scale = _case_tensors(case, world)
        plan = EPPlan("world", case["mode"], rows, 2 if case["mode"] == "hierarchical" else 0, case["overlap"])
        ep_spec = spec.replace(notes=((NOTE, plan.to_json()),)).to_json()
        x, g = xs[rank], gs[rank]
        p = [t.clone().requires_grad_() for t in (x, router, w1, w2)]
        sc = None if scale is None else scale.clone().requires_grad_()
        with executor.record_traffic() as traffic:
            y = torch.ops.moe_compiler.ep_moe(p[0], F.linear(p[0], p[1]) + skew, sc, p[2], None, p[3], None, None,
                                              None, ep_spec)
        (y * g).sum().backward()
        y_ref, (gx, grouter, _, _, _) = _reference(spec, router, w1, w2, x, g, skew, scale)
        # expert weight (and scale) gradients: all tokens of all ranks; EP keeps them on the experts' ranks
        _, (_, _, gw1_all, gw2_all, gs_all) = _reference(spec, router, w1, w2, torch.cat(xs), torch.cat(gs), skew,
                                                         scale)
        local = plan.local_experts(rank)
        nonlocal_rows = [e for e in range(spec.num_experts) if e not in local]
        stays = all(float(t.grad[nonlocal_rows].abs().max()) == 0.0 for t in p[2:]) if nonlocal_rows else True
        gw = [t.grad.clone() for t in p[2:]] + ([] if sc is None else [sc.grad.clone()])
        for t in gw:
            dist.all_reduce(t)
        # delivery: slots this rank should receive, from every rank's routing
        expected = 0
        for s, xs_s in enumerate(xs):
            ids, _ = route(F.linear(xs_s, router) + skew, scale, spec.router)
            expected += int((slot_destinations(ids.reshape(-1), plan, s) == rank).sum())
        final = "dispatch" if case["mode"] == "all_to_all" else "dispatch_inter_node"
        got = sum(t["rows_received"] for t in traffic if t["step"] == final)
        sent = sum(t["rows_sent"] for t in traffic if t["step"] == ("dispatch" if case["mode"] == "all_to_all"
                                                                   else "dispatch_intra_node"))
        totals = torch.tensor([got, sent])
        dist.all_reduce(totals)
        err = dict(y=_rel(y, y_ref), gx=_rel(p[0].grad, gx), grouter=_rel(p[1].grad, grouter),
                   gw1=_rel(gw[0], gw1_all), gw2=_rel(gw[1], gw2_all))
        if sc is not None:
            err["gscale"] = _rel(gw[2], gs_all)
        if index % functional_every == 0:   # the same layer compiled with functional collectives (a compile per case)
            from moe_compiler.passes.placement import Placement

            def layer(x, router, w1, w2, scale, spec=spec.to_json(), skew=skew):
                return torch.ops.moe_compiler.moe(x, F.linear(x, router) + skew, scale, w1, None, w2, None, None, None,
                                                  spec)

            torch._dynamo.reset()
            ep = {"collectives": "functional", "placement": Placement(world, [rows]), "mode": case["mode"],
                  "overlap_degree": case["overlap"]}
            if case["mode"] == "hierarchical":
                ep["ranks_per_node"] = 2
            opts = {"expert_parallel": ep, "inner_backend": case.get("inner", "eager"), "strict": True}
            q = [t.clone().requires_grad_() for t in (x, router, w1, w2)]
            qs = None if scale is None else scale.clone().requires_grad_()
            yf = torch.compile(layer, backend="moe", options=opts, dynamic=False)(*q, qs)
            (yf * g).sum().backward()
            gwf = [t.grad.clone() for t in q[2:]] + ([] if qs is None else [qs.grad.clone()])
            for t in gwf:
                dist.all_reduce(t)
            err.update(fy=_rel(yf, y_ref), fgx=_rel(q[0].grad, gx), fgrouter=_rel(q[1].grad, grouter),
                       fgw1=_rel(gwf[0], gw1_all), fgw2=_rel(gwf[1], gw2_all))
            if qs is not None:
                err["fgscale"] = _rel(gwf[2], gs_all)
        issued = [t["step"] for t in traffic]
        report.append(dict(case=case, err=err, grads_stay=stays, received=got, expected=expected,
                           sent=sent, slots=x.shape[0] * spec.top_k, totals=totals.tolist(),
                           pipelined=issued == _pipelined_issue_order(case["mode"], case["overlap"])))
    return report


def _pipelined_issue_order(mode: str, chunks: int) -> list:
    """The order in which the ep_moe forward issues its all-to-alls with `chunks` token chunks: chunk
    c+1's dispatch goes out before chunk c's experts run, each chunk's combine right after its experts
    (hierarchical: a hop is issued once the hop before it has arrived; the intra-node combines last)."""
    if mode == "all_to_all":
        first, second, back_first, back_second = ["dispatch", "dispatch_meta"], [], ["combine"], []
    else:
        first = ["dispatch_intra_node", "dispatch_intra_node_meta"]
        second = ["dispatch_inter_node", "dispatch_inter_node_meta"]
        back_first, back_second = ["combine_inter_node"], ["combine_intra_node"]
    order = list(first)
    for c in range(chunks):
        if c + 1 < chunks:
            order += first
        order += second + back_first
    return order + back_second * chunks


def _rel(a, b):
    """max |a - b| / (1 + max |b|): 0 for empty tensors."""
    if b.numel() == 0:
        return 0.0
    return float((a.float() - b.float()).abs().max() / (1 + b.float().abs().max()))


def _check_report(reports, world):
    total = sum(sum(c["tokens"]) * c["k"] for c in [r["case"] for r in reports[0]])
    for rank, report in enumerate(reports):
        for r in report:
            where = f"rank {rank} case {r['case']}"
            assert all(v < 1e-5 for v in r["err"].values()), f"{where}: {r['err']}"
            assert r["grads_stay"], f"{where}: expert gradients on non-local rows"
            assert r["received"] == r["expected"], f"{where}: received {r['received']} slots, expected {r['expected']}"
            assert r["sent"] == r["slots"], f"{where}: sent {r['sent']} of {r['slots']} slots"
            assert r["totals"][0] == r["totals"][1], \
                f"{where}: slots sent {r['totals'][1]} != received {r['totals'][0]}"
            assert r["pipelined"], f"{where}: the forward did not issue its all-to-alls in the pipelined order"
    assert total >= 0


@settings(max_examples=2, deadline=None, phases=(Phase.explicit, Phase.generate), database=None)  # no shrinking (spawns are slow); example 1 is the minimal one, example 2 random
@given(cases=st.lists(ep_cases(2), min_size=12, max_size=12))
def test_ep_two_ranks_equals_single_process(cases):
    reports = run_ranks("test_ep_distributed:ep_cases_worker", 2, {"cases": cases}, timeout=480, pg_timeout=60,
                        python_path=(HERE,))
    _check_report(reports, 2)


@settings(max_examples=2, deadline=None, phases=(Phase.explicit, Phase.generate), database=None)  # no shrinking (spawns are slow); example 1 is the minimal one, example 2 random
@given(cases=st.lists(ep_cases(4, modes=("all_to_all", "hierarchical")), min_size=12, max_size=12))
def test_ep_four_ranks_flat_and_hierarchical(cases):
    reports = run_ranks("test_ep_distributed:ep_cases_worker", 4, {"cases": cases, "functional_every": 4}, timeout=480,
                        pg_timeout=60, python_path=(HERE,))
    _check_report(reports, 4)


# ------------------------------------------------------------------ the compiled path
from torch_moe_styles import ResidualMoEStack as _Stack  # noqa: E402


def compiled_worker(rank, world, dump_dir, placement_path, modes):
    import torch.distributed as dist

    from moe_compiler.pipeline import counters
    from moe_compiler.runtime.expert_parallel import expert_bytes_per_rank, shard_experts

    out = {}
    halves = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates both, in order
    for mode, inner, shard, collectives in modes:
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        model = _Stack()
        ref = copy.deepcopy(model)
        x = torch.randn(2 + rank, 5, 16, generator=torch.Generator().manual_seed(rank))
        opts = {"mode": mode, "collectives": collectives}
        if mode in ("hierarchical", "auto"):  # auto: the cost model's ep_mode decision per layer
            opts["ranks_per_node"] = 2
        if mode == "subgroup":  # two independent EP groups of 2 ranks, contiguous placement
            opts = {"group": halves[rank // 2], "collectives": collectives}
        elif placement_path:
            opts["placement"] = placement_path
        full_bytes = expert_bytes_per_rank(model, placement_path, world)
        kept = shard_experts(model, placement_path) if shard else None
        cm = torch.compile(model, backend="moe", options={"expert_parallel": opts, "inner_backend": inner,
                                                            "strict": True, "dump_dir": dump_dir})
        xa = x.clone().requires_grad_()
        y = cm(xa)
        y.square().sum().backward()
        xb = x.clone().requires_grad_()
        y_ref = ref(xb)
        y_ref.square().sum().backward()
        layers_ep = counters["sparse_collectives"].get("layers_expert_parallel", 0)
        # the executed all-to-alls are the schedule's, in order (no_grad: a second compile, same plan)
        from moe_compiler.codegen.comm.executor import record_traffic
        from moe_compiler.codegen.comm.schedule import plan_layer

        with torch.no_grad(), record_traffic() as traffic:
            cm(x)
        def planned(m):
            return [s.name for s in plan_layer("l", m, world, 2, [[]] * world, 1).steps if s.kind == "all_to_all"]

        executed = [t["step"] for t in traffic]
        if collectives == "functional":   # Inductor runs the collectives: nothing goes through the executor
            steps_match = executed in ([], _expected_coherent_steps(2) if mode == "auto" else [])
        elif mode == "auto":
            steps_match = executed in (planned("all_to_all") * 2, planned("hierarchical") * 2,
                                       _expected_coherent_steps(2))   # cost model chose single_all_to_all
        else:
            steps_match = executed == planned("all_to_all" if mode == "subgroup" else mode) * 2
        # weight grads: EP keeps the owner's rows; the sum over ranks equals the single-process sum
        gw_ref = ref.layers[0].gate_up_proj.grad.clone()
        dist.all_reduce(gw_ref)
        local = list(getattr(model.layers[0], "_moe_compiler_local_experts", range(6)))
        gw = torch.zeros_like(gw_ref)
        gw[local] = model.layers[0].gate_up_proj.grad  # replicas hold partial sums: add them up
        dist.all_reduce(gw)
        out[f"{mode}/{inner}/{shard}/{collectives}"] = dict(
            y=_rel(y, y_ref), gx=_rel(xa.grad, xb.grad),
            gw=_rel(gw, gw_ref),
            layers=layers_ep,
            kept=kept, full_bytes=full_bytes, w_rows=model.layers[0].gate_up_proj.shape[0], steps_match=steps_match)
    return out


def test_compiled_ep_four_ranks(tmp_path):
    from moe_compiler.passes.placement import Placement

    # expert e of layer l on rank (e + l) % 4; expert 5 of layer 0 replicated on ranks 1 and 3
    layers = [[[(e + l) % 4] for e in range(6)] for l in range(2)]
    layers[0][5] = [1, 3]
    path = str(tmp_path / "placement.json")
    Placement(4, layers).save(path)
    # the ep_moe op (its executed all-to-alls are checked against the schedule) and functional
    # collectives (the default), sharded weights, 2 "nodes" of 2 ranks, a subgroup, the cost model
    modes = [("all_to_all", "eager", True, "op"), ("hierarchical", "eager", False, "op"),
             ("hierarchical", "eager", False, "functional"), ("subgroup", "eager", False, "functional"),
             ("all_to_all", "inductor", True, "functional"), ("auto", "eager", False, "functional")]
    results = run_ranks("test_ep_distributed:compiled_worker", 4,
                        {"dump_dir": str(tmp_path / "dumps"), "placement_path": path, "modes": modes},
                        timeout=480, pg_timeout=90, python_path=(HERE,))
    for rank, res in enumerate(results):
        for key, r in res.items():
            assert r["layers"] == 2, (rank, key, r)
            assert r["y"] < 1e-5 and r["gx"] < 1e-5, (rank, key, r)
            assert r["gw"] < 1e-5, (rank, key, r)
            assert r["steps_match"], (rank, key, r)
        sharded = res["all_to_all/eager/True/op"]
        held = sum(1 for e in range(6) if rank in layers[0][e])
        assert sharded["w_rows"] == held
        row = 24 * 16 * 4 + 16 * 12 * 4  # gate_up [24, 16] + down [16, 12] fp32 per expert
        assert sharded["full_bytes"][rank] == row * (held + sum(1 for e in range(6) if rank in layers[1][e]))
        assert sharded["kept"] == sharded["full_bytes"][rank]
    schedules = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "dumps") for f in fs
                 if f.startswith("comm_schedule")]
    assert schedules, "no comm_schedule dump"
    sched = json.load(open(schedules[0]))
    assert [s["name"] for s in sched["layers"][0]["steps"]][-1].startswith("combine")


def functional_worker(rank, world, dump_dir, placement_path):
    """collectives "functional": the layers' all-to-alls are functional collectives in the traced graph."""
    import torch.distributed as dist

    import moe_compiler
    from moe_compiler.explain import collect_records
    from moe_compiler.pipeline import counters

    out = {}
    # training with Inductor: forward and backward through the functional collectives
    # (the eager inner backend: test_compiled_ep_four_ranks)
    inner = "inductor"
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = _Stack()
    ref = copy.deepcopy(model)
    opts = {"expert_parallel": {"collectives": "functional", "placement": placement_path}, "inner_backend": inner,
            "strict": True, "dump_dir": os.path.join(dump_dir, inner)}
    cm = torch.compile(model, backend="moe", options=opts)
    res = {}
    for n in (5, 7 + rank):   # a second length: a recompile with a symbolic length, still equal
        x = torch.randn(2 + rank, n, 16, generator=torch.Generator().manual_seed(rank + n))
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        model.zero_grad()
        ref.zero_grad()
        y = cm(xa)
        y.square().sum().backward()
        y_ref = ref(xb)
        y_ref.square().sum().backward()
        gw_ref = ref.layers[0].gate_up_proj.grad.clone()
        dist.all_reduce(gw_ref)
        gw = model.layers[0].gate_up_proj.grad.clone()   # full-size rows: other ranks' experts get 0 here
        dist.all_reduce(gw)
        res[n] = max(_rel(y, y_ref), _rel(xa.grad, xb.grad), _rel(gw, gw_ref))
    graphs = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(dump_dir, inner)) for f in fs]
    text = {os.path.basename(f): open(f).read() for f in graphs if f.endswith(".py")}
    out[inner] = dict(err=max(res.values()), layers=counters["sparse_collectives"].get("layers_expert_parallel", 0),
                      in_pass_dump=any("ep_layer" in t for n, t in text.items() if "sparse_collectives" in n),
                      fwd_a2a=sum(t.count("all_to_all_single") for n, t in text.items() if n == "aot_forward.py"),
                      bwd_a2a=sum(t.count("all_to_all_single") for n, t in text.items() if n == "aot_backward.py"),
                      no_op=not any("ep_moe" in t for t in text.values()))

    # token chunks and hierarchical mode (2 "nodes" of 1 rank) as functional collectives too, forward and backward
    for extra in ({"overlap_degree": 2}, {"mode": "hierarchical", "ranks_per_node": 1, "overlap_degree": 3}):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = _Stack()
        ref = copy.deepcopy(model)
        x = torch.randn(2 + rank, 5, 16, generator=torch.Generator().manual_seed(rank))
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        chunk_dumps = os.path.join(dump_dir, "chunks", str(len(out)))
        cm = torch.compile(model, backend="moe", options={"expert_parallel": {"collectives": "functional", **extra},
                                                          "inner_backend": "eager", "strict": True,
                                                          "dump_dir": chunk_dumps})
        with collect_records() as records:
            y = cm(xa)
        y.square().sum().backward()
        y_ref = ref(xb)
        y_ref.square().sum().backward()
        forward = [os.path.join(d, f) for d, _, fs in os.walk(chunk_dumps) for f in fs if f == "aot_forward.py"]
        out[json.dumps(extra)] = dict(err=max(_rel(y, y_ref), _rel(xa.grad, xb.grad)),
                                      strategy=[m.strategy for rec in records for m in rec.moe_layers],
                                      in_flight=_in_flight_at_first_experts(open(forward[0]).read()))
    # coherent chains keep their op, and say so
    torch._dynamo.reset()
    from torch_moe_styles import ChainedMoEStack

    report = moe_compiler.explain(ChainedMoEStack(2, 16, 4, 5, 2, "rms", True), torch.randn(2, 3, 16),
                                  expert_parallel={"collectives": "functional", "mode": "coherent"})
    out["coherent"] = [r.strategy for r in report.moe_layers]
    return out


def _in_flight_at_first_experts(graph_code: str) -> int:
    """All-to-alls issued and not yet waited for when a dumped ATen graph first runs experts."""
    issued = waited = 0
    for line in graph_code.splitlines():
        if "routed_experts.default(" in line or "grouped_experts.default(" in line:
            return issued - waited
        issued += "_c10d_functional.all_to_all_single.default(" in line
        waited += "_c10d_functional.wait_tensor.default(" in line
    raise AssertionError("no expert call in the graph")


def test_functional_collectives_in_the_graph(tmp_path):
    """Option collectives "functional" (the default): forward and backward through all_to_all_single in the
    traced graph equal single-process eager, replicas, a recompile for a new length, token chunks and
    hierarchical mode included; coherent chains keep their op and say so. (Inference with released weights
    through the functional layer: test_inference_compile_keeps_only_this_ranks_experts.)"""
    from moe_compiler.passes.placement import Placement

    layers = [[[e % 2] for e in range(6)] for _ in range(2)]
    layers[0][5] = [0, 1]
    path = str(tmp_path / "placement.json")
    Placement(2, layers).save(path)
    results = run_ranks("test_ep_distributed:functional_worker", 2,
                        {"dump_dir": str(tmp_path / "dumps"), "placement_path": path},
                        timeout=300, pg_timeout=120, python_path=(HERE,))
    for rank, r in enumerate(results):
        f = r["inductor"]
        assert f["err"] < 1e-5 and f["layers"] == 4, (rank, f)   # 2 layers, 2 graphs (new length)
        assert f["in_pass_dump"] and f["no_op"], (rank, f)
        assert f["fwd_a2a"] >= 6 and f["bwd_a2a"] >= 4, (rank, f)   # counts, rows, ids; rows back
        for extra in ('{"overlap_degree": 2}', '{"mode": "hierarchical", "ranks_per_node": 1, "overlap_degree": 3}'):
            assert r[extra]["err"] < 1e-5, (rank, extra, r[extra])
            # the later chunks' dispatch (rows and meta of each hop still to wait for) is in flight while the
            # first chunk's experts run: the waits were moved to the first use (functional.sink_waits)
            assert r[extra]["in_flight"] >= 2, (rank, extra, r[extra]["in_flight"])
            assert all("functional collectives in the graph" in s for s in r[extra]["strategy"]), r[extra]
            chunks = json.loads(extra)["overlap_degree"]
            assert all(f"{chunks} token chunks, pipelined" in s for s in r[extra]["strategy"]), r[extra]
        assert all("in the coherent_moe_chain op" in s for s in r["coherent"]), r["coherent"]


# ------------------------------------------------------------------ failures
def failure_worker(rank, world, how):
    from dist_failures import fail_last_rank

    from moe_compiler.codegen.comm.ep import NOTE, EPPlan
    from moe_compiler.ir import ExpertSpec, MoESpec, RouterSpec
    from moe_compiler.runtime.expert_parallel import contiguous_rows

    spec = MoESpec(RouterSpec(4, 2), ExpertSpec(8, 4), path="layer")
    spec = spec.replace(notes=((NOTE, EPPlan("world", "all_to_all", contiguous_rows(4, world)).to_json()),))
    return fail_last_rank(rank, world, how, lambda: torch.ops.moe_compiler.ep_moe(
        torch.randn(5, 8), torch.randn(5, 4), None, torch.randn(4, 8, 8), None, torch.randn(4, 8, 4), None, None, None,
        spec.to_json()))


def compiled_failure_worker(rank, world, how):
    """The default path: a model compiled with expert_parallel=True (functional collectives in the graph)."""
    from dist_failures import fail_last_rank

    torch.manual_seed(0)
    cm = torch.compile(_Stack(), backend="moe", options={"expert_parallel": True, "inner_backend": "eager",
                                                          "strict": True})
    return fail_last_rank(rank, world, how, lambda: cm(torch.randn(5, 16)))


@pytest.mark.parametrize("how", ["die", "hang"])
@pytest.mark.parametrize("path", ["op", "compiled"])
def test_dead_or_stuck_rank_fails_the_others_in_bounded_time(how, path):
    from dist_failures import assert_others_fail_in_bounded_time

    worker = "failure_worker" if path == "op" else "compiled_failure_worker"
    assert_others_fail_in_bounded_time(f"test_ep_distributed:{worker}", how, "expert parallelism")


# ------------------------------------------------------------------ a rank without tokens
EMPTY_BATCH_STRATEGIES = {"functional": {}, "op": {"collectives": "op"}, "coherent": {"mode": "coherent"},
                          "fssdp": {"movement": "weights"},
                          # token chunks: an empty batch's chunks are equal expressions (Inductor's CSE merged
                          # their collectives until the counts of all chunks went in one exchange)
                          "functional_chunks": {"overlap_degree": 3},
                          "op_chunks": {"collectives": "op", "overlap_degree": 3},
                          "coherent_chunks": {"mode": "coherent", "overlap_degree": 3}}


def empty_batch_worker(rank, world, strategies):
    """Each rank passes no tokens in some steps while the other passes some (Inductor, training): the
    compiled graph of an empty batch must still run every collective of the step."""
    from torch_moe_styles import ChainedMoEStack

    out = {}
    for name in strategies:
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = ChainedMoEStack() if name.startswith("coherent") else _Stack()
        ref = copy.deepcopy(model)
        opts = {"expert_parallel": {**EMPTY_BATCH_STRATEGIES[name], "release_parameters": False}, "strict": True}
        cm = torch.compile(model, backend="moe", options=opts)
        errs = []
        for T in ([5, 0] if rank == 0 else [0, 4]):
            x = torch.randn(T, 16, generator=torch.Generator().manual_seed(10 * rank + T), requires_grad=True)
            xr = x.detach().clone().requires_grad_()
            y, yr = cm(x), ref(xr)
            y.square().sum().backward()
            yr.square().sum().backward()
            errs.append(max(_rel(y, yr), _rel(x.grad, xr.grad)) if T else float(y.shape != (0, 16)))
        out[name] = max(errs)
    return out


def test_a_rank_without_tokens_still_joins_every_collective():
    """Inductor drops a read of a zero-element buffer; the ops that run collectives are marked
    side-effecting, and the functional layer's splits sum to its rows, so an empty batch compiles and
    runs its collectives (before, the other rank hung or received another layer's rows)."""
    results = run_ranks("test_ep_distributed:empty_batch_worker", 2, {"strategies": list(EMPTY_BATCH_STRATEGIES)},
                        timeout=300, pg_timeout=60, python_path=(HERE,))
    for rank, res in enumerate(results):
        assert set(res) == set(EMPTY_BATCH_STRATEGIES), (rank, res)
        assert all(err < 1e-5 for err in res.values()), (rank, res)


def ragged_auto_worker(rank, world, tokens):
    """Mode and movement "auto" where the cost model's choice depends on the token count (cpu_generic, 2
    ranks, E=8, H=64: tokens move for 4..128 tokens, weights from 256): rank r compiles for tokens[r]."""
    from moe_compiler.pipeline import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = _Stack(layers=2, hidden=64, ffn=128, experts=8, top_k=2)
    ref = copy.deepcopy(model)
    x = torch.randn(tokens[rank], 64, generator=torch.Generator().manual_seed(rank))
    opts = {"expert_parallel": {"mode": "auto", "movement": "auto", "release_parameters": False}, "strict": True,
            "pass_options": {"cost_decisions": {"profile": "cpu_generic"}}}
    cm = torch.compile(model, backend="moe", options=opts)
    with torch.no_grad():
        err = _rel(cm(x), ref(x))
    c = counters["sparse_collectives"]
    return {"err": err, "layers": (c.get("layers_expert_parallel", 0), c.get("layers_fssdp", 0),
                                   c.get("layers_coherent", 0))}


def test_ranks_with_different_token_counts_make_the_same_ep_decisions():
    """Each rank compiles for its own batch. The EP decisions fix the collectives, so they may not follow
    one rank's token count: before, the rank with 8 tokens moved tokens and the one with 300 moved weights,
    and the two ran different collectives."""
    results = run_ranks("test_ep_distributed:ragged_auto_worker", 2, {"tokens": [8, 300]}, timeout=300,
                        pg_timeout=60, python_path=(HERE,))
    assert results[0]["layers"] == results[1]["layers"], results
    assert sum(results[0]["layers"][:2]) == 2, results
    assert all(r["err"] < 1e-5 for r in results), results


def overlap_auto_worker(rank, world, profile_path, variants):
    """overlap_degree "auto": each layer's chunks come from the cost model's overlap_degree decision (a GPU
    profile whose links and GEMMs make pipelining pay at the given token count); training step vs eager."""
    from moe_compiler.codegen.comm.executor import record_traffic
    from moe_compiler.explain import collect_records

    out = {}
    for name, tokens, collectives, extra in variants:
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = _Stack()
        ref = copy.deepcopy(model)
        cost = {"profile": profile_path, **({"tokens": tokens} if tokens else {})}
        cm = torch.compile(model, backend="moe", options={
            "expert_parallel": {"overlap_degree": "auto", "collectives": collectives, "release_parameters": False,
                                **extra},
            "strict": True, "pass_options": {"cost_decisions": cost}})
        x = torch.randn(3 + rank, 5, 16, generator=torch.Generator().manual_seed(rank), requires_grad=True)
        xr = x.detach().clone().requires_grad_()
        with collect_records() as records, record_traffic() as traffic:
            y = cm(x)
        yr = ref(xr)
        y.square().sum().backward()
        yr.square().sum().backward()
        layers = [m for rec in records for m in rec.moe_layers]
        out[name] = dict(err=max(_rel(y, yr), _rel(x.grad, xr.grad)), strategies=[m.strategy for m in layers],
                         chosen=[dict((n, c) for n, c, _ in m.decisions).get("overlap_degree") for m in layers],
                         dispatches=sum(1 for t in traffic if t["step"] == "dispatch"))
    return out


def test_overlap_degree_auto_follows_the_cost_model(tmp_path):
    """The decision sets each layer's token chunks: 4 at 4096 tokens per rank on a profile where pipelining
    pays, alike on both ranks although they hold 15 and 20 tokens; 1 where every rank decides alike
    without a token count (small batches would pay every chunk's latency). Hierarchical layers are priced
    with two-level all-to-alls: their slow inter-node hop (1 ms latency) makes each chunk dearer, so 2."""
    from moe_compiler.cost_model import profiles

    prof = json.loads((pathlib.Path(profiles.__file__).parent / "profiles" / "h200.json").read_text())
    prof.update(name="slow_h200", peak_flops={"fp32": 1e9, "bf16": 1e9}, gemm_overhead_s=0.0, op_overhead_s=0.0,
                intra_node={"bandwidth": 1e8, "latency": 1e-9}, inter_node={"bandwidth": 1e8, "latency": 1e-3})
    path = tmp_path / "slow_h200.json"
    path.write_text(json.dumps(prof))
    hierarchical = {"mode": "hierarchical", "ranks_per_node": 1}   # 2 "nodes" of 1 rank
    variants = [("op_4096", 4096, "op", {}), ("functional_4096", 4096, "functional", {}),
                ("op_every_rank", 0, "op", {}), ("hierarchical_4096", 4096, "functional", hierarchical)]
    results = run_ranks("test_ep_distributed:overlap_auto_worker", 2, {"profile_path": str(path),
                                                                       "variants": variants},
                        timeout=300, pg_timeout=60, python_path=(HERE,))
    for rank, res in enumerate(results):
        for name, r in res.items():
            assert r["err"] < 1e-5, (rank, name, r)
        assert res["op_4096"]["chosen"] == ["4", "4"], res["op_4096"]
        assert all("4 token chunks, pipelined" in s for s in res["op_4096"]["strategies"]), res["op_4096"]
        assert res["op_4096"]["dispatches"] == 2 * 4, res["op_4096"]   # 2 layers x 4 chunks, through the op
        assert all("4 token chunks" in s for s in res["functional_4096"]["strategies"]), res["functional_4096"]
        assert res["op_every_rank"]["chosen"] == ["1", "1"] and res["op_every_rank"]["dispatches"] == 2, \
            res["op_every_rank"]
        hier = res["hierarchical_4096"]
        assert hier["chosen"] == ["2", "2"] and all("2 token chunks" in s for s in hier["strategies"]), hier
        assert all("mode hierarchical" in s for s in hier["strategies"]), hier


def generate_worker(rank, world):
    """Greedy generation with a KV cache (prefill, then decode graphs with a growing cache) under the
    default expert parallelism; each rank its own prompts, batch 1 and 2. First every rank makes six
    new tokens; then rank 0 meets its end-of-sequence token after two, and ``synced_gpus=True`` keeps
    it calling the model (its collectives) until rank 1 is done."""
    from hf_models import make_model

    model = make_model("mixtral")
    ids = torch.randint(0, 96, (1 + rank, 5), generator=torch.Generator().manual_seed(rank))
    fixed = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(ids, **fixed)
        # rank 0 stops at its second new token; rank 1 at a token it never makes
        eos = int(ref[0, 6]) if rank == 0 else next(t for t in range(95, 0, -1) if t not in ref)
        early = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=eos)
        ref_early = model.generate(ids, **early)
        compiled = copy.deepcopy(model)
        compiled.forward = torch.compile(compiled.forward, backend="moe",
                                         options={"expert_parallel": True, "strict": True})
        got = compiled.generate(ids, **fixed)
        got_early = compiled.generate(ids, synced_gpus=True, **early)
    return dict(equal=bool(torch.equal(ref, got)), shape=list(got.shape),
                equal_early=bool(torch.equal(ref_early, got_early)), shape_early=list(got_early.shape))


def test_greedy_generation_under_expert_parallelism_equals_eager():
    results = run_ranks("test_ep_distributed:generate_worker", 2, {}, timeout=300, pg_timeout=120,
                        python_path=(HERE,))
    for rank, r in enumerate(results):
        assert r["equal"] and r["shape"] == [1 + rank, 11], (rank, r)
        assert r["equal_early"] and r["shape_early"] == [1 + rank, 7 if rank == 0 else 11], (rank, r)


def test_a_failed_rendezvous_is_run_again_on_a_new_store(monkeypatch):
    """The first store points at a port nobody serves: both ranks fail to join, the run starts again."""
    import torch.distributed as dist

    from moe_compiler.runtime import launch

    real, made = dist.TCPStore, []

    def store(*args, **kwargs):
        made.append(args)
        if len(made) == 1:
            return type("Unserved", (), {"port": 1})()
        return real(*args, **kwargs)

    monkeypatch.setattr(dist, "TCPStore", store)
    assert launch.run_ranks("operator:add", 2, timeout=60, pg_timeout=2) == [2, 3]
    assert len(made) == 2


# ------------------------------------------------------------------ context-coherent executor
def coherent_worker(rank, world, cases):
    from moe_compiler import reference
    from moe_compiler.codegen.comm import executor
    from moe_compiler.codegen.comm.coherent import coherent_stack_forward
    from moe_compiler.codegen.comm.ep import EPPlan, ep_experts
    from moe_compiler.ir import ExpertSpec, MoESpec, RouterSpec

    out = []
    for case in cases:
        E, k, L, H, T = case["E"], case["k"], case["layers"], 8, case["tokens"]
        g = torch.Generator().manual_seed(case["seed"])
        spec = MoESpec(RouterSpec(E, k), ExpertSpec(H, 6))
        w1 = [torch.randn(E, 12, H, generator=g) * 0.3 for _ in range(L)]
        w2 = [torch.randn(E, H, 6, generator=g) * 0.3 for _ in range(L)]
        ids = torch.stack([torch.rand(world * T, E, generator=g).argsort(1)[:, :k] for _ in range(L)], 1)  # [wT, L, k]
        wts = torch.rand(world * T, L, k, generator=g)
        xs = torch.randn(world * T, H, generator=g)
        plans = [EPPlan("world", "all_to_all", tuple(_placement_rows(case, world, g))) for _ in range(L)]
        mine = slice(rank * T, (rank + 1) * T)
        x = xs[mine]
        ref = x.clone()
        for l in range(L):
            ref = ref + reference.experts_forward(ref, ids[mine, l], wts[mine, l], w1[l], None, w2[l], None, None,
                                                  None, spec.experts)
        a2a = x.clone()
        with torch.no_grad(), executor.record_traffic() as t_a2a:
            for l in range(L):
                local = plans[l].local_experts(rank)
                ys = ep_experts(a2a, ids[mine, l], (w1[l][local], None, w2[l][local], None, None, None), spec, plans[l])
                a2a = a2a + (ys.view(T, k, H) * wts[mine, l].unsqueeze(-1)).sum(1)

        def route(l, meta):
            gi = meta[:, 0] * T + meta[:, 1]
            return ids[gi, l], wts[gi, l]

        def experts(l, rows, e):
            return reference.experts_forward(rows, e[:, None], torch.ones(rows.shape[0], 1), w1[l], None, w2[l],
                                             None, None, None, spec.experts)

        with torch.no_grad(), executor.record_traffic() as t_coh:
            coh = coherent_stack_forward(x, route, experts, plans)
        out.append(dict(coh=_rel(coh, ref), a2a=_rel(a2a, ref), coh_vs_a2a=_rel(coh, a2a),
                        steps_a2a=sum(t["step"] in ("dispatch", "combine") for t in t_a2a),
                        steps_coh=sum(t["step"] in ("dispatch", "combine", "home") for t in t_coh)))
    return out


@settings(max_examples=2, deadline=None, phases=(Phase.explicit, Phase.generate), database=None)  # no shrinking (spawns are slow); example 1 is the minimal one, example 2 random
@given(cases=st.lists(st.fixed_dictionaries(dict(
    E=st.integers(2, 9), k=st.integers(1, 2), layers=st.integers(1, 4), tokens=st.integers(0, 10),
    placement=st.sampled_from(["contiguous", "random", "replicated"]), seed=st.integers(0, 10_000))).map(Case),
    min_size=6, max_size=6))
def test_coherent_executor_equals_two_all_to_alls(cases):
    """Generates: coherent-stack cases (2-9 experts, top-1/2, 1-4 layers, 0-10 tokens per rank, placements
    with and without replicas) run on 4 ranks; the coherent output equals the two-all-to-all output."""
    results = run_ranks("test_ep_distributed:coherent_worker", 4, {"cases": cases}, timeout=480, pg_timeout=60,
                        python_path=(HERE,))
    for rank, res in enumerate(results):
        for case, r in zip(cases, res):
            assert r["coh"] < 1e-5 and r["a2a"] < 1e-5 and r["coh_vs_a2a"] < 1e-5, (rank, case, r)


# ------------------------------------------------------------------ coherent mode, compiled
def coherent_compiled_worker(rank, world, cases, dump_dir):
    """Per case: compile a ChainedMoEStack with mode "coherent", run forward + backward on this rank's
    tokens, compare with single-process eager; report the chained layer count, the executed steps and
    each layer's strategy."""
    import torch.distributed as dist

    from moe_compiler.codegen.comm.executor import record_traffic
    from moe_compiler.explain import collect_records
    from moe_compiler.pipeline import counters
    from torch_moe_styles import ChainedMoEStack

    out = []
    for case in cases:
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(case["seed"])
        dtype = getattr(torch, case.get("dtype", "float32"))
        model = ChainedMoEStack(case["layers"], case["H"], 6, case["E"], case["k"], case["norm"], case["shared"],
                                case.get("mix", False), case.get("tap")).to(dtype)
        ref = copy.deepcopy(model)
        gen = torch.Generator().manual_seed(case["seed"] + 1)
        xs = [torch.randn(b, 3, case["H"], generator=gen).to(dtype) for b in case["batch"]]
        opts = {"mode": "coherent", "overlap_degree": case.get("overlap", 1)}
        if case["placement"] != "contiguous":
            opts["placement"] = _chain_placement(case, world, gen)
        cm = torch.compile(model, backend="moe", options={"expert_parallel": opts, "inner_backend": case["inner"],
                                                            "strict": True, "dump_dir": dump_dir},
                           dynamic=case.get("dynamic", None))
        xa = xs[rank].clone().requires_grad_()
        with record_traffic() as traffic, collect_records() as records:
            y = cm(xa)
        (y * 0.5).square().sum().backward()
        xb = xs[rank].clone().requires_grad_()
        y_ref = ref(xb)
        (y_ref * 0.5).square().sum().backward()
        grads, grads_ref = [], []
        for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            g_ref = q.grad if q.grad is not None else torch.zeros_like(q)
            dist.all_reduce(g)       # expert rows: on their ranks; dense params: per-rank parts
            dist.all_reduce(g_ref)
            grads.append(float((g - g_ref).abs().max()) if g.numel() else 0.0)
            grads_ref.append(float(g_ref.abs().max()) if g.numel() else 0.0)
        # relative to the largest gradient: fp32 rounding in backprop scales with the largest values in
        # it, so a gradient that is ~0 (k=1 router weights are exactly 1) next to 1e10 expert gradients
        # (norm "none" stacks grow fast) carries rounding noise far above its own size
        grads = [d / (1 + max(grads_ref)) for d in grads]
        strategies = [layer.strategy for rec in records for layer in rec.moe_layers]
        out.append(dict(y=_rel(y, y_ref), gx=_rel(xa.grad, xb.grad), gparams=max(grads),
                        chained=counters["sparse_collectives"].get("layers_coherent", 0),
                        steps=[t["step"] for t in traffic], strategies=strategies))
    return out


def _chain_placement(case, world, gen):
    from moe_compiler.passes.placement import Placement

    return Placement(world, [[list(r) for r in _placement_rows(case, world, gen)] for _ in range(case["layers"])])


def _expected_coherent_steps(layers: int, chunks: int = 1) -> list:
    """The all-to-alls a coherent chain's forward issues: per layer a dispatch (state, meta, weights) and
    a combine (partials, meta), then home. Chunks are pipelined in lockstep: each exchange is issued for
    every chunk before any chunk issues its next one."""
    exchanges = [["dispatch", "dispatch_meta", "dispatch"], ["combine", "combine_meta"]] * layers
    return [step for exchange in exchanges + [["home", "home_meta"]] for step in exchange * chunks]


@settings(max_examples=2, deadline=None, phases=(Phase.explicit, Phase.generate), database=None)  # no shrinking (spawns are slow); example 1 is the minimal one, example 2 random
@given(cases=st.lists(st.fixed_dictionaries(dict(
    layers=st.integers(2, 4), E=st.integers(2, 8), k=st.integers(1, 2), H=st.sampled_from([8, 12, 16]),
    batch=st.lists(st.integers(0, 3), min_size=2, max_size=2), norm=st.sampled_from(["layer_norm", "rms", "none"]),
    shared=st.booleans(), placement=st.sampled_from(["contiguous", "random", "replicated"]),
    inner=st.sampled_from(["eager", "eager", "inductor"]), overlap=st.integers(1, 3), seed=st.integers(0, 10_000))).map(Case),
    min_size=3, max_size=3))
def test_compiled_coherent_two_ranks_equals_single_process(cases, tmp_path_factory):
    """Generates: residual MoE stacks (2-4 layers, 2-8 experts, top-1/2, layer/RMS/no norm, with and without
    a shared expert, contiguous/random/replicated placements, 0-3 sequences per rank, eager or inductor,
    1-3 token chunks)
    compiled with mode "coherent" on 2 ranks: one chain over every layer, outputs and all parameter and
    input gradients equal single-process eager, and the executed collectives are the schedule's."""
    dump = str(tmp_path_factory.mktemp("coherent"))
    results = run_ranks("test_ep_distributed:coherent_compiled_worker", 2, {"cases": cases, "dump_dir": dump},
                        timeout=300, pg_timeout=120, python_path=(HERE,))
    for rank, res in enumerate(results):
        for case, r in zip(cases, res):
            where = (rank, case, {k: v for k, v in r.items() if k != "steps"})
            assert r["chained"] == case["layers"], where
            assert r["y"] < 1e-5 and r["gx"] < 1e-5 and r["gparams"] < 1e-5, where
            assert r["steps"] == _expected_coherent_steps(case["layers"], case["overlap"]), (where, r["steps"])
    assert any(f.startswith("coherent_chain") for _, _, fs in os.walk(dump) for f in fs), "no chain program dump"


def test_compiled_coherent_four_ranks_and_where_it_does_not_apply(tmp_path):
    """4 ranks: a 3-layer chain with RMSNorm + shared expert in two pipelined token chunks equals eager;
    a model that mixes tokens (cumsum over the sequence) after its first layer is not chained there:
    those layers run two all-to-alls and explain() says why; a bf16 stack compiled with dynamic shapes
    (a rank with no tokens) still chains; a state read outside the chain splits it in two, the second
    starting at the first's output."""
    cases = [dict(layers=3, E=7, k=2, H=16, batch=[2, 0, 1, 3], norm="rms", shared=True, placement="random",
                  inner="inductor", seed=3, overlap=2),
             dict(layers=3, E=5, k=2, H=8, batch=[1, 2, 1, 1], norm="layer_norm", shared=False, mix=True,
                  placement="contiguous", inner="eager", seed=4),
             dict(layers=2, E=6, k=2, H=16, batch=[3, 1, 0, 2], norm="rms", shared=False, placement="replicated",
                  inner="inductor", seed=5, dynamic=True, dtype="bfloat16"),
             dict(layers=4, E=4, k=2, H=8, batch=[1, 1, 2, 1], norm="layer_norm", shared=False, placement="random",
                  inner="eager", seed=6, tap=1)]
    results = run_ranks("test_ep_distributed:coherent_compiled_worker", 4, {"cases": cases,
                                                                             "dump_dir": str(tmp_path)},
                        timeout=300, pg_timeout=120, python_path=(HERE,))
    for rank, (chained, mixed, dynamic_bf16, tapped) in enumerate(results):
        # the state after layer 1 is read outside: two chains, the second starting where the first ends
        assert tapped["chained"] == 4 and tapped["steps"].count("home") == 2, (rank, tapped)
        assert tapped["y"] < 1e-5 and tapped["gx"] < 1e-5 and tapped["gparams"] < 1e-5, (rank, tapped)
        # two token chunks, pipelined: each exchange for both chunks before the next
        assert chained["chained"] == 3 and chained["steps"] == _expected_coherent_steps(3, 2), (rank, chained)
        # dynamic batch (symbolic token dims) still chains; bf16 within a few bf16 ulps of eager
        assert dynamic_bf16["chained"] == 2, (rank, dynamic_bf16)
        assert max(dynamic_bf16[k] for k in ("y", "gx", "gparams")) < 3e-2, (rank, dynamic_bf16)
        assert mixed["chained"] == 2, (rank, mixed)   # layers 1 and 2; layer 0 -> 1 crosses the cumsum
        assert "coherent mode does not apply" in mixed["strategies"][0] and "cumsum" in mixed["strategies"][0], \
            mixed["strategies"]
        assert all("context-coherent" in s for s in mixed["strategies"][1:]), mixed["strategies"]
        for r in (chained, mixed):
            assert r["y"] < 1e-5 and r["gx"] < 1e-5 and r["gparams"] < 1e-5, (rank, r)


def attention_chain_worker(rank, world):
    """Coherent chains across attention in transformers models, each rank its own tokens. Cases: Mixtral
    inference with a padding mask (a per-rank context operand), Qwen3-MoE training (q/k norms; gradients
    all-reduced), ranks with different sequence lengths (the rows go home for the region), the default
    use_cache=True (the keys/values escape as the cache: no chain) and mode "auto" (the cost model counts
    the context all-gather)."""
    import torch.distributed as dist

    from hf_models import make_model
    from moe_compiler.codegen.comm.executor import record_traffic
    from moe_compiler.explain import collect_records
    from moe_compiler.pipeline import counters

    out = {}
    cases = {"mixtral_mask": ("mixtral", "coherent", False, 8, True, False),
             "qwen3_train": ("qwen3_moe", "coherent", True, 8, False, False),
             "unequal": ("mixtral", "coherent", False, 6 + 3 * rank, False, False),
             "cache": ("mixtral", "coherent", False, 8, False, True),
             "auto": ("mixtral", "auto", False, 8, False, False)}
    for name, (family, mode, train, seq, mask, cache) in cases.items():
        torch._dynamo.reset()
        counters.clear()
        model = make_model(family).train(train)
        ref = copy.deepcopy(model)
        ids = torch.randint(0, 96, (2, seq), generator=torch.Generator().manual_seed(10 + rank))
        kw = {"use_cache": cache}
        if mask:
            kw["attention_mask"] = torch.ones(2, seq, dtype=torch.long)
            kw["attention_mask"][1, :1 + 2 * rank] = 0
        cm = torch.compile(model, backend="moe", options={
            "expert_parallel": {"mode": mode, "collectives": "op"}, "inner_backend": "eager", "strict": True,
            "pass_options": {"cost_decisions": {"profile": "cpu_generic"}}})
        with torch.set_grad_enabled(train), collect_records() as records, record_traffic() as traffic:
            y = cm(ids, **kw).logits
            y_ref = ref(ids, **kw).logits
        res = dict(y=_rel(y, y_ref), chained=counters["sparse_collectives"].get("layers_coherent", 0),
                   steps=sorted({t["step"] for t in traffic}),
                   strategies=[layer.strategy for rec in records for layer in rec.moe_layers])
        if train:
            y.square().mean().backward()
            y_ref.square().mean().backward()
            worst = 0.0
            for p, q in zip(model.parameters(), ref.parameters()):
                g, g_ref = (t.grad if t.grad is not None else torch.zeros_like(t) for t in (p, q))
                dist.all_reduce(g)
                dist.all_reduce(g_ref)
                worst = max(worst, _rel(g, g_ref))
            res["g"] = worst
        out[name] = res
    return out


def recompile_worker(rank, world):
    """Coherent chains across attention when ranks recompile at different steps: a new sequence length
    makes dynamo recompile with a dynamic dim on that rank only; its chain must still cross attention (the
    region reads its sizes from its input at run time), or the ranks would run different collectives."""
    from hf_models import make_model
    from moe_compiler.pipeline import counters

    out = {}
    for dynamic in (None, True):   # True: module floats (norm epsilons) are lifted to graph inputs
        torch._dynamo.reset()
        model = make_model("mixtral").eval()
        ref = copy.deepcopy(model)
        cm = torch.compile(model, backend="moe", dynamic=dynamic, options={
            "expert_parallel": {"mode": "coherent", "collectives": "op", "release_parameters": False},
            "inner_backend": "eager", "strict": True})
        steps = out[str(dynamic)] = []
        for seqs in ((8, 8), (11, 8), (6, 6)):   # dynamic=None: step 2, rank 0 recompiles; step 3, rank 1 does
            counters.clear()
            ids = torch.randint(0, 96, (2, seqs[rank]), generator=torch.Generator().manual_seed(sum(seqs) + rank))
            with torch.no_grad():
                y, y_ref = cm(ids, use_cache=False).logits, ref(ids, use_cache=False).logits
            steps.append(dict(err=_rel(y, y_ref), compiled=counters["sparse_collectives"].get("runs", 0),
                              chained=counters["sparse_collectives"].get("layers_coherent", 0)))
    return out


def test_coherent_chains_cross_attention_in_transformers_models():
    """2 ranks: the chain crosses attention by all-gathering the keys/values cut and equals eager, forward
    and backward; where it cannot (a KV cache returned) or does not pay (mode auto), explain() says why."""
    results = run_ranks("test_ep_distributed:attention_chain_worker", 2, {}, timeout=360, pg_timeout=120,
                        python_path=(HERE,))
    for rank, r in enumerate(results):
        for name in ("mixtral_mask", "qwen3_train", "unequal"):
            assert r[name]["chained"] == 2 and r[name]["y"] < 1e-5, (rank, name, r[name])
            assert "context made coherent" in r[name]["strategies"][0], r[name]["strategies"]
            assert "keys/values cut" in r[name]["strategies"][0], r[name]["strategies"]
        assert r["qwen3_train"]["g"] < 1e-5, (rank, r["qwen3_train"])
        # one dispatch per layer, the cut all-gathered between them; the mask is per-rank context
        assert {"context", "context_operands", "dispatch", "combine", "home"} <= set(r["mixtral_mask"]["steps"]), \
            r["mixtral_mask"]["steps"]
        assert "context_operands" not in r["qwen3_train"]["steps"]   # no mask: nothing per-rank to gather
        # different sequence lengths per rank: the region runs at home instead
        assert "context_home" in r["unequal"]["steps"] and "context" not in r["unequal"]["steps"], r["unequal"]
        assert r["cache"]["chained"] == 0 and r["cache"]["y"] < 1e-5, r["cache"]
        assert "KV cache" in r["cache"]["strategies"][0], r["cache"]["strategies"]
        assert r["auto"]["y"] < 1e-5
        assert r["auto"]["chained"] == 2 or "context all-gather" in r["auto"]["strategies"][0], r["auto"]


def test_a_rank_that_recompiles_alone_keeps_its_chain_across_attention():
    """dynamic=None: each rank recompiles with a dynamic length when its own length changes (rank 0 in step
    2, rank 1 in step 3); dynamic=True: one compile, norm epsilons as graph inputs. Every compiled graph
    chains across attention and equals eager."""
    results = run_ranks("test_ep_distributed:recompile_worker", 2, {}, timeout=300, pg_timeout=90,
                        python_path=(HERE,))
    for rank, res in enumerate(results):
        for dynamic, steps in res.items():
            assert all(s["err"] < 1e-5 for s in steps), (rank, dynamic, steps)
            compiled = [s for s in steps if s["compiled"]]
            assert len(compiled) == (2 if dynamic == "None" else 1), (rank, dynamic, steps)
            assert all(s["chained"] >= 2 for s in compiled), (rank, dynamic, steps)
    assert results[0]["None"][1]["compiled"] and not results[1]["None"][1]["compiled"], results  # rank 0 alone


def drawn_attention_worker(rank, world, cases):
    """Per drawn case: a transformers Mixtral from the case's config, compiled with mode "coherent"; this
    rank's batch (its own tokens and padding) against eager; the layers chained."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from moe_compiler.pipeline import counters

    out = []
    for case in cases:
        torch._dynamo.reset()
        counters.clear()
        cfg = MixtralConfig(vocab_size=64, hidden_size=case["heads"] * case["head_dim"], intermediate_size=24,
                            num_hidden_layers=case["layers"], num_attention_heads=case["heads"],
                            num_key_value_heads=case["kv_heads"], head_dim=case["head_dim"],
                            num_local_experts=case["experts"], num_experts_per_tok=case["k"],
                            max_position_embeddings=64)
        torch.manual_seed(case["seed"])
        model = MixtralForCausalLM(cfg).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" not in name:
                    p.normal_(0, 0.2 if p.dim() > 1 else 0.05)
        gen = torch.Generator().manual_seed(case["seed"] + 7 * rank)
        ids = torch.randint(0, 64, (case["batch"], case["seq"]), generator=gen)
        mask = torch.ones_like(ids)
        mask[-1, :min(case["pad"] * rank, case["seq"] - 1)] = 0   # each rank pads its own way
        with torch.no_grad():
            ref = model(ids, attention_mask=mask, use_cache=False).logits
            cm = torch.compile(model, backend="moe", options={"expert_parallel": {"mode": "coherent"},
                                                              "inner_backend": "eager", "strict": True})
            y = cm(ids, attention_mask=mask, use_cache=False).logits
        out.append(dict(y=_rel(y, ref), chained=counters["sparse_collectives"].get("layers_coherent", 0)))
    return out


@settings(max_examples=1, deadline=None, phases=(Phase.explicit, Phase.generate), database=None)
@given(cases=st.lists(st.fixed_dictionaries(dict(
    layers=st.integers(2, 3), heads=st.sampled_from([2, 4]), kv_heads=st.sampled_from([1, 2]),
    head_dim=st.sampled_from([8, 12]), experts=st.integers(2, 6), k=st.integers(1, 2),
    batch=st.integers(1, 3), seq=st.integers(1, 9), pad=st.integers(0, 1), seed=st.integers(0, 99))),
    min_size=3, max_size=3))
def test_coherent_chains_across_attention_drawn_configs(cases):
    """Generates: Mixtral configs (2-3 layers, MQA/GQA/MHA, 2-6 experts, top-1/2), 1-3 sequences of 1-9
    tokens per rank with rank-dependent padding; every layer is chained across attention and the logits
    equal eager on both ranks."""
    results = run_ranks("test_ep_distributed:drawn_attention_worker", 2, {"cases": cases}, timeout=300,
                        pg_timeout=120, python_path=(HERE,))
    for rank, per_case in enumerate(results):
        for case, r in zip(cases, per_case):
            assert r["chained"] == case["layers"] and r["y"] < 1e-5, (rank, case, r)


# ------------------------------------------------------------------ released expert weights (inference)
def release_worker(rank, world):
    from hf_models import make_model
    from torch_moe_styles import ChainedMoEStack

    from moe_compiler.pipeline import counters
    from moe_compiler.runtime import ep_weights
    from moe_compiler.runtime.expert_parallel import EXPERT_PARAM_NAMES, expert_bytes_held, expert_modules

    def expert_tensors(model):
        return [p for _, m in expert_modules(model) for n, p in m.named_parameters(recurse=False)
                if n in EXPERT_PARAM_NAMES]

    def compiled(model, **ep):
        torch._dynamo.reset()
        return torch.compile(model, backend="moe", dynamic=False, options={
            "expert_parallel": ep, "inner_backend": "eager", "strict": True})

    out = {}
    model = make_model("mixtral", seed=1)   # 4 experts per layer: 2 on each of the 2 ranks
    whole = expert_bytes_held(model)
    ids = {n: torch.randint(0, 96, (1, n), generator=torch.Generator().manual_seed(10 * rank + n)) for n in (7, 12)}
    with torch.no_grad():
        refs = {n: model(i).logits for n, i in ids.items()}
    cm = compiled(model)
    with torch.no_grad():
        out["y7"] = _rel(cm(ids[7]).logits, refs[7])
        out["released"] = [ep_weights.is_released(p) for p in expert_tensors(model)]
        out["held"], out["whole"] = expert_bytes_held(model), whole
        out["y12"] = _rel(cm(ids[12]).logits, refs[12])   # a recompile (new length) on the released tensors
        out["y7_again"] = _rel(cm(ids[7]).logits, refs[7])
    out["still_released"] = all(ep_weights.is_released(p) for p in expert_tensors(model))
    try:   # grad mode: a training graph needs the whole tensors; it must say so, not compute with garbage
        cm(ids[7])
        out["train_error"] = ""
    except Exception as e:
        out["train_error"] = str(e)

    for materialize in ("needed", "sparse"):   # FSSDP keeps the experts this rank owns; it gathers the rest
        model = make_model("mixtral", seed=1)
        cm = compiled(model, movement="weights", materialize=materialize, replicate=1)
        with torch.no_grad():
            y7 = _rel(cm(ids[7]).logits, refs[7])
            y12 = _rel(cm(ids[12]).logits, refs[12])
        out[f"fssdp_{materialize}"] = dict(y=max(y7, y12), held=expert_bytes_held(model),
                                           released=all(ep_weights.is_released(p) for p in expert_tensors(model)))

    model = make_model("mixtral", seed=1)
    cm = compiled(model, release_parameters=False)
    with torch.no_grad():
        out["kept_whole_y"] = _rel(cm(ids[7]).logits, refs[7])
    out["kept_whole"] = (expert_bytes_held(model), any(ep_weights.is_released(p) for p in expert_tensors(model)))

    torch.manual_seed(3)   # coherent chains read kept rows too
    stack = ChainedMoEStack(3, 16, 6, 5, 2, "rms", True)
    x = torch.randn(2 + rank, 3, 16, generator=torch.Generator().manual_seed(rank))
    x2 = torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(10 + rank))
    with torch.no_grad():
        ref, ref2 = stack(x), stack(x2)
        counters.clear()
        cm = compiled(stack, mode="coherent")
        y = cm(x)
        y2 = cm(x2)   # a recompile (new shape)
    out["coherent"] = dict(y=max(_rel(y, ref), _rel(y2, ref2)),
                           chained=counters["sparse_collectives"].get("layers_coherent", 0),
                           released=all(ep_weights.is_released(p) for p in expert_tensors(stack)),
                           held=expert_bytes_held(stack))
    try:   # the layer called eagerly on released weights says why it cannot run
        with torch.no_grad():
            stack(x)
        out["eager_error"] = ""
    except Exception as e:
        out["eager_error"] = str(e)
    return out


def test_inference_compile_keeps_only_this_ranks_experts():
    """Memory is the point of EP: an inference compile of a transformers Mixtral keeps this rank's
    expert rows and releases the module's whole tensors; outputs equal eager, a recompile for a new
    length still does, a training graph on the released tensors fails with a clear error, and
    release_parameters False keeps them whole. Coherent chains and FSSDP (its owned experts) read the
    kept rows too."""
    results = run_ranks("test_ep_distributed:release_worker", 2, {}, timeout=300, pg_timeout=120,
                        python_path=(HERE,))
    for rank, r in enumerate(results):
        assert r["y7"] < 1e-5 and r["y12"] < 1e-5 and r["y7_again"] < 1e-5, (rank, r)
        assert r["released"] and all(r["released"]) and r["still_released"], (rank, r)
        assert r["held"] * 2 == r["whole"], (rank, r)   # contiguous placement: 2 of 4 experts per layer
        assert "release_parameters" in r["train_error"] and "released" in r["train_error"], (rank, r["train_error"])
        assert r["kept_whole_y"] < 1e-5 and r["kept_whole"] == (r["whole"], False), (rank, r)
        for m in ("needed", "sparse"):
            f = r[f"fssdp_{m}"]
            assert f["y"] < 1e-5 and f["released"] and f["held"] * 2 == r["whole"], (rank, m, f)
        c = r["coherent"]
        assert c["chained"] == 6 and c["released"] and c["y"] < 1e-5, (rank, c)   # 3 layers, two compiles
        assert "called eagerly" in r["eager_error"] and "release_parameters" in r["eager_error"], r["eager_error"]
    # 5 experts on 2 ranks: contiguous rows 3 + 2
    assert results[0]["coherent"]["held"] * 2 == results[1]["coherent"]["held"] * 3


# ------------------------------------------------------------------ routers with scaled inputs or weights
def scaled_router_worker(rank, world, families):
    """Llama 4 (each chosen weight scales its expert's input) and Gemma 4 (per-expert weight scale)
    under EP (the ep_moe op, functional collectives) and FSSDP: logits on this rank's tokens, and every
    gradient summed over ranks, against single-process eager."""
    import torch.distributed as dist

    from hf_models import make_generic, randomize_router_scales

    import moe_compiler

    out = {}
    for family, overrides, collectives in families:
        torch._dynamo.reset()
        model = randomize_router_scales(make_generic(family, **overrides))
        ep_model = copy.deepcopy(model)
        ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(rank))
        ep = {"mode": "all_to_all", "movement": "weights"} if collectives == "fssdp" else \
            {"mode": "all_to_all", "collectives": collectives}
        opts = {"expert_parallel": ep, "inner_backend": "eager", "strict": True}
        ref = model(ids).logits
        ref.float().pow(2).mean().backward()
        got = torch.compile(ep_model, backend="moe", options=opts)(ids).logits
        got.float().pow(2).mean().backward()
        grad_diff = 0.0
        for a, b in zip(model.parameters(), ep_model.parameters()):
            if a.grad is None:
                continue
            ga, gb = a.grad.clone(), b.grad.clone() if b.grad is not None else torch.zeros_like(a)
            dist.all_reduce(ga)
            dist.all_reduce(gb)
            grad_diff = max(grad_diff, float((ga - gb).abs().max() / ga.abs().max().clamp_min(1e-12)))
        # the ep_moe op's runs: what mode "coherent" says of these layers; the others: their strategy
        ep = {"mode": "coherent"} if collectives == "op" else ep
        report = moe_compiler.explain(copy.deepcopy(model), ids, expert_parallel=ep, inner_backend="eager")
        out[family, collectives] = dict(logits=float((got - ref).abs().max()), grads=grad_diff,
                                        strategies=[m.strategy for m in report.moe_layers])
    return out


def test_scaled_routers_expert_parallel_two_ranks():
    # (every router kind through the op, functional collectives and FSSDP is drawn at the op level:
    # ep_cases, fssdp_cases; here two whole models)
    families = [("llama4_text", {"num_experts_per_tok": 2}, "op"),
                ("gemma4_text", {"enable_moe_block": True, "top_k_experts": 2}, "fssdp")]
    results = run_ranks("test_ep_distributed:scaled_router_worker", 2, {"families": families}, timeout=300,
                        pg_timeout=120, python_path=(HERE,))
    for rank, res in enumerate(results):
        for (family, collectives), r in res.items():
            assert r["logits"] < 1e-4 and r["grads"] < 1e-4, (rank, family, collectives, r)
            # coherent chains do not take these layers: they run two all-to-alls
            expected = {"op": "tokens move to the experts (mode all_to_all; coherent mode does not apply",
                        "functional": "functional collectives in the graph", "fssdp": "FSSDP over 2 ranks"}[collectives]
            assert all(expected in s for s in r["strategies"]), (rank, family, collectives, r["strategies"])
