"""Expert placement planner: budgets, metrics against a plain recount, ILP guarantees,
determinism, the JSON format and the ``moe-compiler plan`` command."""
import argparse
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moe_compiler.passes.placement import (
    METHODS, ObjectiveWeights, Placement, Topology, check_budget, evaluate, objective, plan,
    slot_bounds,
)
from moe_compiler.routing_trace import synthetic_trace


# ====================================================================== strategies
@st.composite
def problems(draw, max_layers=4, max_experts=12, max_ranks=6):
    """Generates: (trace, topology, replica_slots) -- a RoutingTrace of 1..60 tokens,
    1..max_layers layers, 2..max_experts experts, top_k 1..3 (Markov affinity and Zipf skew
    drawn at random); a Topology with 1..min(experts, max_ranks) ranks, ranks_per_node a
    divisor of that, intra cost 1 and inter cost in [1, 3]; replica_slots in 0..2."""
    experts = draw(st.integers(2, max_experts))
    trace = synthetic_trace(
        draw(st.integers(1, 60)), draw(st.integers(1, max_layers)), experts,
        draw(st.integers(1, min(3, experts))), zipf=draw(st.sampled_from([0.0, 1.0, 1.5])),
        affinity=draw(st.sampled_from([0.0, 0.6, 0.95])), collisions=0.2,
        seed=draw(st.integers(0, 10_000)))
    ranks = draw(st.integers(1, min(experts, max_ranks)))
    per_node = draw(st.sampled_from([d for d in range(1, ranks + 1) if ranks % d == 0]))
    topo = Topology(ranks, per_node, 1.0, draw(st.sampled_from([1.0, 2.0, 3.0])))
    return trace, topo, draw(st.integers(0, 2))


@st.composite
def placements(draw, trace, ranks):
    """Generates: a random Placement for ``trace`` on ``ranks`` ranks: every expert of every
    layer on a random non-empty set of distinct ranks (replicas included), no budget."""
    layers = []
    for _ in range(trace.num_layers):
        layer = []
        for _ in range(trace.num_experts):
            layer.append(draw(st.lists(st.integers(0, ranks - 1), min_size=1, max_size=ranks,
                                       unique=True)))
        layers.append(layer)
    return Placement(ranks, layers)


# ====================================================================== plain recount
def brute_force(trace, placement, topo, w=ObjectiveWeights()):
    """The metrics, recounted token by token with plain loops (definitions in the module
    docstring of moe_compiler.passes.placement)."""
    ids = trace.expert_ids
    T, L, K = ids.shape
    R = topo.num_ranks
    node = [r // topo.ranks_per_node for r in range(R)]
    load = np.zeros((L, R))
    for t in range(T):
        for l in range(L):
            for e in ids[t, l]:
                ranks = placement.layers[l][e]
                for r in ranks:
                    load[l, r] += 1.0 / len(ranks)
    cross = xnode = 0.0
    per_pair_cost = np.zeros(max(L - 1, 0))
    traffic = np.zeros((max(L - 1, 0), R, R))
    for t in range(T):
        for l in range(L - 1):
            for a in ids[t, l]:
                for b in ids[t, l + 1]:
                    ra, rb = placement.layers[l][a], placement.layers[l + 1][b]
                    for src in ra:  # the token sits on each copy of a equally often
                        p = 1.0 / len(ra) / K / K
                        if src not in rb:
                            cross += p
                            per_pair_cost[l] += p * topo.intra_node_cost
                            for dst in rb:
                                traffic[l, src, dst] += p / len(rb)
                        if node[src] not in {node[r] for r in rb}:
                            xnode += p
                            per_pair_cost[l] += p * (topo.inter_node_cost
                                                     - topo.intra_node_cost)
    rows = 0.0  # context-coherent EP's dispatch and partial-sum rows
    for t in range(T):
        prev = None
        for l in range(L):
            experts = list(ids[t, l])
            holding = {r: sum(r in placement.layers[l][e] for e in experts) for r in range(R)}
            chosen = {min(placement.layers[l][e], key=lambda r: (-holding[r], r)) for e in experts}
            at_anchor = len(chosen) / R if prev is None else float(bool(prev & chosen))
            rows += 2 * len(chosen) - 1 - at_anchor
            prev = chosen
    mean = load.sum(1) / R
    ratios = [load[l].max() / mean[l] for l in range(L)]
    obj = 0.0
    for l in range(L):
        mx = load[l].max()
        obj += w.load * (mx - mean[l]) + w.load_excess * max(0.0, mx - w.load_tolerance
                                                             * mean[l])
    for l in range(L - 1):
        obj += w.transitions * per_pair_cost[l] + w.pair * traffic[l].max()
    obj += w.coherent * rows
    return {"load_max_over_mean": max(ratios), "load_max_over_mean_avg": float(np.mean(ratios)),
            "transitions_per_token": cross / T, "cross_node_per_token": xnode / T,
            "max_pair_traffic": traffic.max() if L > 1 else 0.0, "objective": obj / T,
            "replica_copies": sum(len(r) - 1 for layer in placement.layers for r in layer),
            "coherent_rows_per_token": rows / T}


def assert_budget_plainly(placement, trace, replica_slots):
    e, r = trace.num_experts, placement.num_ranks
    assert placement.num_layers == trace.num_layers
    for layer in placement.layers:
        assert len(layer) == e                       # every expert placed ...
        assert all(len(ranks) >= 1 for ranks in layer)  # ... somewhere
        per_rank = [sum(rank in ranks for ranks in layer) for rank in range(r)]
        assert min(per_rank) >= e // r
        assert max(per_rank) <= -(-e // r) + replica_slots
        assert sum(per_rank) <= e + r * replica_slots


# ====================================================================== properties
@given(problems(), st.data())
def test_evaluate_equals_plain_recount(problem, data):
    trace, topo, _ = problem
    placement = data.draw(placements(trace, topo.num_ranks))
    m = evaluate(trace, placement, topo)
    ref = brute_force(trace, placement, topo)
    for key, want in ref.items():
        assert getattr(m, key) == pytest.approx(want, rel=1e-9, abs=1e-9), key
    assert m.objective == pytest.approx(objective(trace, placement, topo), rel=1e-12)
    w = ObjectiveWeights(coherent=2.5, transitions=0.5)
    assert objective(trace, placement, topo, w) == pytest.approx(brute_force(trace, placement, topo, w)["objective"],
                                                               rel=1e-9, abs=1e-9)


@given(problems())
def test_every_method_places_every_expert_within_budget(problem):
    trace, topo, s = problem
    for method in METHODS:
        res = plan(trace, topo, method, replica_slots=s, time_limit=20, progress=False)
        used = s if method in ("eplb", "ilp") else 0
        assert_budget_plainly(res.placement, trace, used)
        check_budget(res.placement, used, trace.num_experts)
        if method in ("contiguous", "round_robin", "sequential"):
            assert res.placement.replica_copies() == 0
        assert res.method == method and res.metrics.solve_seconds == res.solve_seconds


@given(problems(max_layers=3, max_experts=10))
def test_ilp_never_worse_than_its_greedy_start(problem):
    trace, topo, s = problem
    res = plan(trace, topo, "ilp", replica_slots=s, time_limit=20, progress=False)
    d = res.details
    assert d["final_objective"] <= d["start_objective"] + 1e-12
    assert d["start_objective"] == min(d["start_scores"].values())
    got = objective(trace, res.placement, topo)
    assert got == pytest.approx(d["final_objective"], rel=1e-9)
    others = ["eplb"] if s else ["contiguous", "round_robin", "sequential", "eplb"]
    for m in others:
        base = plan(trace, topo, m, replica_slots=s, progress=False)
        assert got <= objective(trace, base.placement, topo) + 1e-9


@given(problems(max_layers=3, max_experts=10))
def test_ilp_with_a_coherent_weight_keeps_the_budget_and_never_loses_to_its_start(problem):
    trace, topo, s = problem
    w = ObjectiveWeights(coherent=3.0)
    res = plan(trace, topo, "ilp", replica_slots=s, time_limit=20, progress=False, weights=w)
    assert_budget_plainly(res.placement, trace, s)
    d = res.details
    assert d["final_objective"] <= d["start_objective"] + 1e-12
    assert objective(trace, res.placement, topo, w) == pytest.approx(d["final_objective"], rel=1e-9)
    if trace.top_k > 1 and not s:
        assert "coactivated" in d["start_scores"]


def test_coherent_weight_keeps_experts_chosen_together_on_one_rank():
    """Tokens often choose experts in groups of 4 (coactivation 0.6): weighing coherent rows keeps more
    of a token's experts on one rank, so context-coherent EP sends fewer rows (6.24 -> 5.58 per token
    when written), at some cost in load balance (1.04 -> 1.09)."""
    trace = synthetic_trace(1200, 4, 16, 2, zipf=0.3, affinity=0.3, coactivation=0.6, group_size=4, seed=2)
    topo = Topology(4)
    plain = plan(trace, topo, "ilp", time_limit=30, progress=False)
    coh = plan(trace, topo, "ilp", time_limit=30, progress=False, weights=ObjectiveWeights(coherent=10.0))
    assert coh.metrics.coherent_rows_per_token < 0.93 * plain.metrics.coherent_rows_per_token
    assert "improving swaps" in coh.notes[-1]
    check_budget(coh.placement, 0, 16)
    with pytest.raises(ValueError, match="coherent must be a finite number"):
        ObjectiveWeights(coherent=-1.0)


def test_planner_is_deterministic_for_a_seed():
    trace = synthetic_trace(400, 4, 16, 2, zipf=1.0, affinity=0.9, collisions=0.2,
                            coactivation=0.5, group_size=4, seed=3)
    topo = Topology(4, 2)
    for s in (0, 1):
        a = plan(trace, topo, "ilp", replica_slots=s, seed=5, progress=False)
        b = plan(trace, topo, "ilp", replica_slots=s, seed=5, progress=False)
        assert a.placement.layers == b.placement.layers
        assert not a.details["timed_out"]
    for m in ("sequential", "eplb"):
        assert plan(trace, topo, m, replica_slots=1, progress=False).placement.layers == \
            plan(trace, topo, m, replica_slots=1, progress=False).placement.layers


def test_ilp_beats_baselines_on_strong_affinity():
    trace = synthetic_trace(1500, 6, 16, 2, zipf=0.5, affinity=0.9, collisions=0.05,
                            coactivation=0.8, group_size=4, seed=1)
    topo = Topology(4)
    rr = plan(trace, topo, "round_robin", progress=False).metrics
    ilp = plan(trace, topo, "ilp", progress=False).metrics
    assert ilp.transitions_per_token < 0.7 * rr.transitions_per_token
    assert ilp.load_max_over_mean_avg < 1.15


def test_eplb_balances_zipf_load_with_one_replica_slot():
    trace = synthetic_trace(3000, 3, 32, 2, zipf=1.0, seed=4)
    for topo in (Topology(8), Topology(8, 4)):
        m = plan(trace, topo, "eplb", replica_slots=1, progress=False).metrics
        assert m.load_max_over_mean <= 1.03
        assert m.replica_copies == 3 * 8


def test_scipy_solver_fallback_and_time_limit_warning():
    trace = synthetic_trace(300, 3, 8, 2, affinity=0.8, seed=2)
    topo = Topology(4, 2)
    res = plan(trace, topo, "ilp", progress=False, solver="scipy")
    assert res.details["solver"] == "scipy.milp"
    assert res.details["final_objective"] <= res.details["start_objective"]
    big = synthetic_trace(2000, 12, 64, 2, affinity=0.9, seed=2)
    with pytest.warns(RuntimeWarning, match="time limit"):
        cut = plan(big, Topology(8), "ilp", time_limit=0.3, progress=False)
    check_budget(cut.placement, 0, 64)
    assert cut.details["final_objective"] <= cut.details["start_objective"]


def test_rank_blocks_for_large_layers():
    # a tiny block budget forces the rank-subset decomposition (large-neighbourhood search)
    trace = synthetic_trace(500, 3, 16, 2, affinity=0.9, collisions=0.1, seed=6)
    topo = Topology(8, 4)
    res = plan(trace, topo, "ilp", replica_slots=1, progress=False, max_block_vars=16)
    assert res.details["ranks_per_block"] < 8
    check_budget(res.placement, 1, 16)
    assert res.details["final_objective"] <= res.details["start_objective"]


# ====================================================================== validation
def test_plan_argument_errors():
    trace = synthetic_trace(10, 2, 8, 2, seed=0)
    with pytest.raises(ValueError, match="unknown placement method 'x'"):
        plan(trace, Topology(2), "x")
    with pytest.raises(ValueError, match="replica_slots"):
        plan(trace, Topology(2), "eplb", replica_slots=-1)
    with pytest.raises(ValueError, match="time_limit"):
        plan(trace, Topology(2), "ilp", time_limit=0)
    with pytest.raises(ValueError, match="placement is for"):
        evaluate(synthetic_trace(10, 3, 8, 2), plan(trace, Topology(2), "contiguous").placement,
                 Topology(2))


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_ranks=0), "positive int"),
    (dict(num_ranks=6, ranks_per_node=4), "dividing num_ranks=6"),
    (dict(num_ranks=4, intra_node_cost=3.0, inter_node_cost=2.0), "intra_node_cost <="),
])
def test_topology_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Topology(**kwargs)


def test_slot_bounds_and_check_budget():
    assert slot_bounds(10, 4, 1) == (2, 4, 14)
    with pytest.raises(ValueError, match="outside"):
        check_budget(Placement(2, [[[0], [0], [0], [1]]]))
    check_budget(Placement(2, [[[0, 1], [0], [1], [1]]]), replica_slots=1)


# ====================================================================== JSON format
@given(problems())
def test_json_round_trip(tmp_path_factory, problem):
    trace, topo, s = problem
    res = plan(trace, topo, "eplb", replica_slots=s, progress=False)
    obj = res.placement.to_json()
    assert set(obj) == {"num_ranks", "layers", "metadata"}
    assert obj["num_ranks"] == topo.num_ranks
    assert all(isinstance(r, list) for layer in obj["layers"] for r in layer)
    assert Placement.from_json(json.loads(json.dumps(obj))) == res.placement
    path = tmp_path_factory.mktemp("pl") / "placement.json"
    res.placement.save(path)
    back = Placement.load(path)
    assert back == res.placement and back.metadata["method"] == "eplb"
    assert back.metadata["metrics"]["transitions_per_token"] == pytest.approx(
        res.metrics.transitions_per_token)


@pytest.mark.parametrize("obj, match", [
    ([], "must be an object"),
    ({"layers": [[[0]]]}, r"missing \['num_ranks'\]"),
    ({"num_ranks": 2}, r"missing \['layers'\]"),
    ({"num_ranks": 0, "layers": [[[0]]]}, "positive int"),
    ({"num_ranks": 2, "layers": []}, "non-empty list"),
    ({"num_ranks": 2, "layers": [[[0], []]]}, "expert 1: expected a non-empty list"),
    ({"num_ranks": 2, "layers": [[[0], [2]]]}, r"rank 2 is not an int in \[0, num_ranks=2\)"),
    ({"num_ranks": 2, "layers": [[[0], ["1"]]]}, "rank '1'"),
    ({"num_ranks": 2, "layers": [[[0], [1, 1]]]}, "duplicate ranks"),
    ({"num_ranks": 2, "layers": [[[0], [1]], [[0]]]}, "layer 1 has 1 experts but layer 0 has 2"),
    ({"num_ranks": 2, "layers": [[[0]]], "metadata": {"version": 7}}, "version 7"),
])
def test_malformed_placement_json_raises_clear_errors(tmp_path, obj, match):
    with pytest.raises(ValueError, match=match):
        Placement.from_json(obj)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(obj))
    with pytest.raises(ValueError, match="p.json"):
        Placement.load(path)


def test_placement_file_not_json(tmp_path):
    path = tmp_path / "p.json"
    path.write_text("{nope")
    with pytest.raises(ValueError, match="not valid JSON"):
        Placement.load(path)


# ====================================================================== CLI
def _plan_args(tmp_path, **over):
    from moe_compiler.plan_cli import add_plan_subcommand

    parser = argparse.ArgumentParser()
    add_plan_subcommand(parser.add_subparsers(dest="command"))
    argv = ["plan", str(tmp_path / "trace.npz"), "--ranks", "4", "--no-progress",
            "-o", str(tmp_path / "out" / "placement.json")]
    for k, v in over.items():
        argv += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return parser.parse_args(argv)


def test_plan_cli_compares_methods_writes_placement_and_plots(tmp_path, capsys):
    from moe_compiler.plan_cli import run_plan

    trace = synthetic_trace(500, 4, 16, 2, zipf=1.0, affinity=0.9, collisions=0.1, seed=1)
    trace.save(tmp_path / "trace.npz")
    args = _plan_args(tmp_path, ranks_per_node=2, replicas=1, plot=tmp_path / "plots",
                      time_limit=20)
    assert args.func is run_plan
    assert run_plan(args) == 0
    out = capsys.readouterr().out
    for m in METHODS:
        assert m in out
    assert "wrote" in out and "fewest cross-rank transitions" in out and "coh rows" in out
    placement = Placement.load(tmp_path / "out" / "placement.json")
    check_budget(placement, 1, 16)
    for name in ("placement.png", "load.png", "affinity.png"):
        assert (tmp_path / "plots" / name).stat().st_size > 1000


def test_plan_cli_single_method_and_bad_trace(tmp_path, capsys):
    from moe_compiler.plan_cli import run_plan

    np.savez(tmp_path / "trace.npz", expert_ids=np.array([[[0, 1]], [[2, 3]]]))
    assert run_plan(_plan_args(tmp_path, method="round_robin")) == 0
    out = capsys.readouterr().out
    assert "requested with --method" in out and "ilp" not in out.split("wrote")[0]
    assert Placement.load(tmp_path / "out" / "placement.json").metadata["method"] == \
        "round_robin"
    (tmp_path / "trace.npz").write_text("junk")
    assert run_plan(_plan_args(tmp_path)) == 2
    assert "error" in capsys.readouterr().err
