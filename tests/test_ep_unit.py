"""Expert parallelism without processes: options, placements, slot destinations, schedules, reports."""
from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import moe_compiler
from moe_compiler.codegen.comm.ep import EPPlan, slot_destinations
from moe_compiler.codegen.comm.schedule import plan_layer
from moe_compiler.config import ConfigError, make_config
from moe_compiler.pipeline import counters
from moe_compiler.runtime.expert_parallel import contiguous_rows, expert_bytes_per_rank


@pytest.mark.parametrize("value, match", [
    ({"mode": "single"}, r"expert_parallel\['mode'\] must be one of \['all_to_all', 'hierarchical', 'coherent', "
                         r"'auto'\]"),
    ({"modes": "all_to_all"}, r"unknown keys \['modes'\]; accepted keys are"),
    ({"mode": "hierarchical"}, r"ranks_per_node'\] must be a positive int"),
    ({"ranks_per_node": 2}, r"only accepted with mode 'hierarchical'"),
    ({"overlap_degree": 0}, r"overlap_degree'\] must be an int >= 1 or 'auto'"),
    ({"overlap_degree": "max"}, r"overlap_degree'\] must be an int >= 1 or 'auto', got 'max'"),
    ({"placement": 3}, r"placement'\] must be a placement file path"),
    ({"collectives": "graph"}, r"collectives'\] must be one of \['functional', 'op'\]"),
    ("yes please", r"option 'expert_parallel' must be True/False or a dict"),
])
def test_bad_options_name_the_key_and_accepted_values(value, match):
    with pytest.raises(ConfigError, match=match):
        make_config({"expert_parallel": value})


def test_option_from_environment():
    assert make_config(environ={"MOE_COMPILER_EXPERT_PARALLEL": "1"}).expert_parallel is True
    cfg = make_config(environ={"MOE_COMPILER_EXPERT_PARALLEL": '{"mode": "hierarchical", "ranks_per_node": 2}'})
    assert cfg.expert_parallel["ranks_per_node"] == 2


def test_contiguous_rows_cover_uneven_and_small_expert_counts():
    assert contiguous_rows(6, 4) == ((0,), (0,), (1,), (2,), (2,), (3,))
    assert contiguous_rows(2, 4) == ((0,), (2,))  # ranks 1 and 3 hold no expert


def test_slot_destinations_spread_replicas_round_robin():
    plan = EPPlan("world", "all_to_all", ((0,), (1, 2, 3)))
    ids = torch.tensor([1, 0, 1, 1, 1, 1, 0])
    assert slot_destinations(ids, plan, rank=0).tolist() == [1, 0, 2, 3, 1, 2, 0]
    assert slot_destinations(ids, plan, rank=1).tolist() == [2, 0, 3, 1, 2, 3, 0]


def test_schedule_lists_steps_per_mode():
    flat = plan_layer("l0", "all_to_all", 4, 4, [[0], [1], [2], [3]], 1)
    assert [s.name for s in flat.steps] == ["dispatch_counts", "dispatch", "dispatch_meta", "combine"]
    hier = plan_layer("l0", "hierarchical", 4, 2, [[0], [1], [2], [3]], 2)
    assert [s.group for s in hier.steps if s.kind == "all_to_all"] == ["intra_node"] * 2 + ["inter_node"] * 2 + [
        "inter_node", "intra_node"]
    assert hier.steps[1].overlaps  # overlap degree 2: dispatch overlaps the previous chunk's experts
    json.loads(json.dumps(hier.to_dict()))


def test_a_failing_collective_in_flight_raises_comm_error_naming_its_step():
    """An all-to-all left in flight (a pipelined chunk) that fails when waited for raises CommError with
    the step, the group and the peer's error; one that succeeds hands over its result once."""
    from moe_compiler.codegen.comm.executor import CommError, Hop, InFlight

    class Work:
        def __init__(self, error=None):
            self.error, self.waited = error, 0

        def wait(self):
            self.waited += 1
            if self.error:
                raise self.error

    hop = Hop("world", None, 2, 0)
    done = Work()
    assert InFlight([(done, hop, "l0:dispatch")], lambda: "rows").finish() == "rows" and done.waited == 1
    failing = InFlight([(Work(), hop, "l0:dispatch"), (Work(RuntimeError("Connection closed by peer")), hop,
                                                       "l0:dispatch")], lambda: "rows")
    with pytest.raises(CommError, match=r"all_to_all 'l0:dispatch' on group world failed on group rank 0 of 2 "
                                        r".*RuntimeError: Connection closed by peer"):
        failing.finish()


def test_without_process_group_the_pass_skips_and_logs(caplog):
    counters.clear()
    layer = moe_compiler.MoELayer(16, 12, 4, 2)
    x = torch.randn(5, 16)
    with caplog.at_level(logging.WARNING):
        y = torch.compile(layer, backend="moe", options={"expert_parallel": True, "inner_backend": "eager"})(x)
    torch.testing.assert_close(y, layer(x))
    assert counters["sparse_collectives"]["skipped_no_process_group"] == 1
    assert "torch.distributed is not initialised" in caplog.text


def test_default_pipeline_does_not_touch_the_graph():
    counters.clear()
    layer = moe_compiler.MoELayer(16, 12, 4, 2)
    torch.compile(layer, backend="moe", options={"inner_backend": "eager"})(torch.randn(3, 16))
    assert counters["sparse_collectives"]["skipped"] == 1
    assert counters["sparse_collectives"]["changed"] == 0


def test_expert_bytes_per_rank_and_explain(tmp_path):
    from moe_compiler.passes.placement import Placement

    model = torch.nn.Sequential(moe_compiler.MoELayer(16, 12, 4, 2), moe_compiler.MoELayer(16, 12, 4, 2))
    row = (24 * 16 + 16 * 12) * 4
    assert expert_bytes_per_rank(model, None, 2) == [4 * row, 4 * row]
    path = tmp_path / "p.json"
    Placement(2, [[[0], [0], [0], [0, 1]], [[1], [1], [1], [1]]]).save(path)
    assert expert_bytes_per_rank(model, str(path)) == [4 * row, 5 * row]
    report = moe_compiler.explain(model, torch.randn(3, 16), expert_parallel={"placement": str(path)},
                                  inner_backend="eager")
    assert report.expert_bytes_per_rank == [4 * row, 5 * row]
    assert "expert bytes per rank: rank 0:" in str(report)
    # no process group: EP is off (logged), so nothing is released and this process holds every expert
    assert report.expert_bytes_held == 8 * row
    assert f"expert bytes held by this rank after the compile: {8 * row / 2**20:.2f} MiB" in str(report)


def test_auto_mode_follows_the_cost_model_decision():
    from moe_compiler.ir import ExpertSpec, MoESpec, RouterSpec
    from moe_compiler.passes.sparse_collectives import _mode_from_cost_model
    from moe_compiler.runtime.expert_parallel import normalize_options

    assert normalize_options({"mode": "auto", "ranks_per_node": 2})["mode"] == "auto"
    base = MoESpec(RouterSpec(num_experts=4, top_k=2), ExpertSpec(hidden_size=8, ffn_size=8))

    def with_choice(c):
        return base.replace(notes=(("decision:ep_mode", c, "why"),))

    assert _mode_from_cost_model(with_choice("hierarchical"), "world", 4, 2) == "hierarchical"
    assert _mode_from_cost_model(with_choice("hierarchical"), "world", 4, 0) == "all_to_all"  # no node size given
    assert _mode_from_cost_model(with_choice("hierarchical"), "grp", 4, 2) == "all_to_all"  # not the world group
    assert _mode_from_cost_model(with_choice("two_all_to_all"), "world", 4, 2) == "all_to_all"
    assert _mode_from_cost_model(with_choice("single_all_to_all"), "world", 4, 2) == "all_to_all"
    assert _mode_from_cost_model(base, "world", 4, 2) == "all_to_all"  # cost_decisions did not run


def test_overlap_degree_auto_reads_the_decision():
    from moe_compiler.ir import ExpertSpec, MoESpec, RouterSpec
    from moe_compiler.passes.sparse_collectives import _overlap_degree
    from moe_compiler.runtime.expert_parallel import normalize_options

    assert normalize_options({"overlap_degree": "auto"})["overlap_degree"] == "auto"
    assert normalize_options({})["overlap_degree"] == 1
    base = MoESpec(RouterSpec(num_experts=4, top_k=2), ExpertSpec(hidden_size=8, ffn_size=8))
    assert _overlap_degree(base.replace(notes=(("decision:overlap_degree", "4", "why"),)), "auto") == 4
    assert _overlap_degree(base.replace(notes=(("decision:overlap_degree", "4", "why"),)), 2) == 2  # the option wins
    assert _overlap_degree(base, "auto") == 1   # cost_decisions did not run


# ------------------------------------------------------------------ row programs (coherent mode)
def _traced(fn, *args):
    from torch.fx.experimental.proxy_tensor import make_fx

    return make_fx(fn, tracing_mode="fake")(*args)


def _program_of(gm, token_dims, activations=("x_1",)):
    from moe_compiler.codegen.comm.row_program import extract

    nodes = list(gm.graph.nodes)
    x = next(n for n in nodes if n.op == "placeholder")
    out = next(n for n in nodes if n.op == "output").args[0][0]
    return extract([out], [x], token_dims, lambda n: n.op in ("placeholder", "get_attr") and n.name not in activations
                   or (n.op == "call_function" and all(a.name not in activations for a in n.all_input_nodes))), x, out


_ROW_OPS = {
    "layer_norm": lambda x, w: F.layer_norm(x, x.shape[-1:]),
    "rms": lambda x, w: w * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype),
    "linear": lambda x, w: F.linear(x, w[None, :].expand(x.shape[-1], -1) * 0.1),
    "gelu": lambda x, w: F.gelu(x),
    "softmax": lambda x, w: torch.softmax(x, dim=-1),
    "unflatten": lambda x, w: x.reshape(*x.shape[:-1], 2, x.shape[-1] // 2).transpose(-1, -2).reshape(x.shape),
    "cat_split": lambda x, w: torch.cat([x, x * 2], dim=-1)[..., : x.shape[-1]] + x.sum(-1, keepdim=True),
    "bias": lambda x, w: x + w,
    # transpose two feature dims by positive index (both must be renumbered)
    "transpose_pos": lambda x, w: x.reshape(*x.shape[:-1], 2, 2, x.shape[-1] // 4)
    .transpose(x.dim() - 1, x.dim() + 1).reshape(x.shape),
}


@settings(max_examples=25, deadline=None)
@given(ops=st.lists(st.sampled_from(sorted(_ROW_OPS)), min_size=1, max_size=5),
       token_dims=st.sampled_from([(6,), (2, 3), (3, 1, 2)]), seed=st.integers(0, 1000))
def test_row_program_runs_on_any_row_subset(ops, token_dims, seed):
    """Generates: chains of per-token ops (norms, linear, activations, views/transposes of feature dims,
    cat/slice, broadcast parameters) over inputs with 1-3 token dims; the extracted row program on a
    random subset of the rows, in random order, equals the graph's output on those rows."""
    H = 8
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(*token_dims, H, generator=g), torch.randn(H, generator=g)

    def fn(x, w):
        for op in ops:
            x = _ROW_OPS[op](x, w)
        return (x,)

    gm = _traced(fn, x, w)
    prog, _, _ = _program_of(gm, token_dims)
    rows = x.reshape(-1, H)
    pick = torch.randperm(rows.shape[0], generator=g)[: max(1, rows.shape[0] - 2)]
    values = {}

    class Record(torch.fx.Interpreter):
        def run_node(self, n):
            values[n] = super().run_node(n)
            return values[n]

    Record(gm).run(x, w)
    free = [values[n] for n in prog.free]
    got = prog([rows[pick]], free)[0]
    want = fn(x, w)[0].reshape(-1, H)[pick]
    torch.testing.assert_close(got, want)
    empty = prog([rows[:0]], free)[0]
    assert empty.shape == (0, H)


@pytest.mark.parametrize("fn, what", [
    (lambda x, w: torch.softmax(x @ x.transpose(-1, -2), -1) @ x, "transpose|bmm"),  # attention
    (lambda x, w: x.cumsum(1), "cumsum"),                                          # running sum over the sequence
    (lambda x, w: x - x.mean(1, keepdim=True), "mean"),              # reduction over tokens
    (lambda x, w: x + w, "per-token data"),                                       # w is an activation here
    (lambda x, w: torch.softmax(x, -2), "dim -2, a token dim"),                   # negative index of a token dim
    (lambda x, w: F.layer_norm(x, x.shape[-2:]), "normalizes over a token dim"),
])
def test_row_program_refuses_token_mixing_with_the_op_named(fn, what):
    from moe_compiler.codegen.comm.row_program import NotRowWise

    x, w = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    gm = _traced(lambda x, w: (fn(x, w),), x, w)
    with pytest.raises(NotRowWise, match=what):
        _program_of(gm, (2, 3), activations=("x_1", "w_1"))


def _attention_block(mix_residual: bool, B=2, S=5, H=16, heads=4, kv_heads=2):
    """A pre-norm-free attention block as an ATen graph: out = s + attention(s) with GQA, s = 2 x (the
    region's state); mix_residual adds a running sum over the sequence to the residual."""
    from torch.fx.experimental.proxy_tensor import make_fx

    d = H // heads

    def block(x, wq, wk, wv):
        s = x * 2
        q = (s @ wq).view(B, S, heads, d).transpose(1, 2)
        k = (s @ wk).view(B, S, kv_heads, d).transpose(1, 2).repeat_interleave(heads // kv_heads, 1)
        v = (s @ wv).view(B, S, kv_heads, d).transpose(1, 2).repeat_interleave(heads // kv_heads, 1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return (s.cumsum(1) if mix_residual else s) + a.transpose(1, 2).reshape(B, S, H)

    g = torch.Generator().manual_seed(0)
    args = [torch.randn(B, S, H, generator=g), torch.randn(H, H, generator=g),
            torch.randn(H, kv_heads * d, generator=g), torch.randn(H, kv_heads * d, generator=g)]
    return make_fx(block)(*args), args


@pytest.mark.parametrize("mix_residual", [False, True])
def test_context_region_gathers_the_narrow_keys_values_cut_only_when_it_is_proven(mix_residual):
    """Attention between two MoE layers: the region all-gathers the keys/values projections (before GQA
    repeats them) when the held rows of its output depend only on their own state row and that cut; a
    residual that mixes tokens (a running sum) fails that proof, and the whole state is gathered."""
    from moe_compiler.codegen.comm import context_region
    from moe_compiler.passes.detect_moe import capture_values

    gm, args = _attention_block(mix_residual)
    x, *weights = [n for n in gm.graph.nodes if n.op == "placeholder"]

    def is_param(n):
        return n in weights or (n.op == "call_function" and all(is_param(a) for a in n.all_input_nodes))

    state = next(n for n in gm.graph.nodes if n.op == "call_function")
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    link = context_region.link(state, out, x, (2, 5), is_param, lambda nodes: capture_values(gm, args, set(nodes)))
    assert link.mixing and "attention" in link.mixing[0]
    if mix_residual:
        assert link.cuts == [] and link.per_token_values((2, 5)) == 16, link.cut_nodes
    else:
        assert len(link.cuts) == 2 and link.per_token_values((2, 5)) == 2 * 2 * 4, link.cut_nodes
        assert "keys/values cut" in link.describe((2, 5))
    # without example values nothing can be proven: the state is gathered
    assert context_region.link(state, out, x, (2, 5), is_param).cuts == []


def test_coherent_destinations_prefer_the_local_then_the_shared_copy():
    from moe_compiler.codegen.comm.coherent import anchor_slot, coherent_destinations

    # expert 0 on ranks 0 and 2, expert 1 on rank 2, expert 2 on rank 1, expert 3 on ranks 1 and 3
    plan = EPPlan("world", "coherent", ((0, 2), (2,), (1,), (1, 3)))
    ids = torch.tensor([[0, 2], [0, 1], [3, 2], [3, 1], [1, 2]])
    on0 = coherent_destinations(ids, plan, rank=0)
    # tie -> local copy; the copy beside expert 1 (one rank instead of two); beside expert 2
    assert on0[[0, 1, 2, 4]].tolist() == [[0, 1], [2, 2], [1, 1], [2, 1]]
    assert int(on0[3, 0]) in (1, 3) and int(on0[3, 1]) == 2
    on3 = coherent_destinations(ids, plan, rank=3)
    assert on3[2].tolist() == [1, 1] and on3[3].tolist() == [3, 2]    # rank 3's own copy of expert 3
    # one copy per expert: the plain placement
    flat = EPPlan("world", "coherent", ((0,), (1,), (1,), (0,)))
    assert coherent_destinations(ids, flat, rank=1).tolist() == slot_destinations(ids.reshape(-1), flat, 1).view(5, 2).tolist()
    # the anchor follows the predicted next-layer experts' ranks when given
    dest = torch.tensor([[0, 2], [0, 2]])
    prefer = torch.tensor([[0, 0, 2, 0], [0, 0, 0, 0]])
    assert anchor_slot(dest, rank=0, prefer=prefer).tolist() == [1, 0]


def test_ranks_compare_context_operands_and_cuts_by_a_signature():
    """Ranks run one another's attention region only with equal signatures: the same number, shapes and dtypes
    of context operands and the same gathered values per token (else the rows go home)."""
    from types import SimpleNamespace

    from moe_compiler.codegen.comm.context_region import _signature

    mask, rope = torch.ones(2, 8, dtype=torch.bool), torch.zeros(1, 8, 16)
    narrow, whole = SimpleNamespace(cut_layout="[[32], [32]]"), SimpleNamespace(cut_layout="[[64]]")
    assert _signature([mask, rope], [narrow]) == _signature([mask.clone(), rope + 1], [narrow])   # values aside
    others = [_signature([mask], [narrow]), _signature([mask, rope.double()], [narrow]),
              _signature([mask[:, :7], rope], [narrow]), _signature([mask, rope], [whole]), _signature([], [narrow])]
    assert len({_signature([mask, rope], [narrow]), *others}) == 1 + len(others)
