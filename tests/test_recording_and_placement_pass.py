"""record_routing, the trained reference model's data, and the plan_placement pass."""
import json
import os

import numpy as np
import pytest
import torch

import moe_compiler
from moe_compiler.config import ConfigError
from moe_compiler.pipeline import counters
from moe_compiler.routing_trace import RoutingTrace

DATA = os.path.join(os.path.dirname(__file__), "data", "reference_lm")


class TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = moe_compiler.MoELayer(16, 12, 6, 2)
        self.b = moe_compiler.MoELayer(16, 12, 6, 2)

    def forward(self, x):
        return self.b(x + self.a(x))


def test_record_routing_matches_the_router():
    model = TwoLayers()
    batches = [torch.randn(5, 16), torch.randn(7, 16)]
    trace = moe_compiler.record_routing(model, batches)
    assert trace.expert_ids.shape == (12, 2, 2) and trace.num_experts == 6
    assert trace.layer_names == ("a", "b")
    want = torch.topk(torch.nn.functional.linear(batches[0], model.a.router).softmax(-1), 2).indices
    assert np.array_equal(trace.expert_ids[:5, 0], want.numpy())


def test_record_routing_without_moe_layers_is_a_clear_error():
    with pytest.raises(RuntimeError, match="no routing was recorded.*explain"):
        moe_compiler.record_routing(torch.nn.Linear(4, 4), [torch.randn(2, 4)])


def test_record_routing_from_a_transformers_model():
    from hf_models import make_model

    model = make_model("qwen3_moe")
    trace = moe_compiler.record_routing(model, [torch.randint(0, 96, (2, 6))])
    assert trace.expert_ids.shape == (12, 2, 3)
    assert trace.layer_names == ("model.layers.0.mlp", "model.layers.1.mlp")


@pytest.mark.skipif(not os.path.exists(os.path.join(DATA, "model.safetensors")), reason="reference model not trained")
def test_reference_model_checkpoint_and_trace():
    from moe_compiler.reference_lm import ReferenceLM

    model = ReferenceLM.load(DATA)
    trace = RoutingTrace.load(os.path.join(DATA, "routing_heldout.npz"))
    assert trace.num_layers == model.config.layers and trace.num_experts == model.config.experts
    # the committed trace is what this checkpoint routes: re-record the first 128 held-out bytes
    from moe_compiler.reference_lm import corpus_bytes, corpus_files

    files = corpus_files()
    held = corpus_bytes(files[int(len(files) * 0.95):])[:128].view(1, -1)
    again = moe_compiler.record_routing(model, [held], num_experts=model.config.experts)
    same = (np.sort(again.expert_ids, -1) == np.sort(trace.expert_ids[:128], -1)).mean()
    assert same > 0.99
    report = json.load(open(os.path.join(DATA, "affinity.json")))
    assert report["mean"]["mean_max_conditional"] > 2 * report["uniform_max_conditional"]


def test_plan_placement_pass_annotates_layers(tmp_path):
    from moe_compiler.passes.placement import Topology, plan
    from moe_compiler.routing_trace import synthetic_trace

    trace = synthetic_trace(400, 2, 6, top_k=2, seed=0)
    trace = RoutingTrace(expert_ids=trace.expert_ids, weights=trace.weights, num_experts=6, layer_names=("a", "b"))
    path = tmp_path / "t.npz"
    trace.save(path)
    model, x = TwoLayers(), torch.randn(5, 16)
    counters.clear()
    opts = {"placement": {"trace": str(path), "ranks": 2, "method": "eplb"}, "dump_dir": str(tmp_path / "d")}
    with torch.no_grad():
        out = torch.compile(model, backend="moe", options=opts)(x)
    torch.testing.assert_close(out, model(x))
    assert counters["plan_placement"]["layers_placed"] == 2
    (graph,) = list((tmp_path / "d").iterdir())
    (after_file,) = graph.glob("*_plan_placement.after.py")
    text = after_file.read_text()
    expected = plan(trace, Topology(2), method="eplb", progress=False).placement.layers[0]
    assert json.dumps([list(r) for r in expected]).replace(" ", "") in text.replace(" ", "")


def test_plan_placement_bad_options():
    with pytest.raises(ConfigError, match="accepted keys"):
        from moe_compiler.passes.plan_placement import load_or_plan

        load_or_plan({"trace": "x.npz", "rank": 2})


def test_plan_placement_weighs_coherent_rows_for_coherent_mode(tmp_path):
    """A placement planned now for expert_parallel mode "coherent" weighs the rows coherent EP sends
    (COHERENT_WEIGHT) unless the options say otherwise; other modes plan for two all-to-alls."""
    from types import SimpleNamespace

    from moe_compiler.passes.plan_placement import COHERENT_WEIGHT, _with_mode_defaults, load_or_plan
    from moe_compiler.routing_trace import synthetic_trace

    path = tmp_path / "t.npz"
    synthetic_trace(300, 2, 8, top_k=2, coactivation=0.6, group_size=4, seed=1).save(path)
    opts = {"trace": str(path), "ranks": 2, "method": "ilp", "time_limit": 10}

    def config(mode):
        return SimpleNamespace(expert_parallel={"mode": mode})

    assert _with_mode_defaults(dict(opts), config("coherent"))["coherent_weight"] == COHERENT_WEIGHT
    assert "coherent_weight" not in _with_mode_defaults(dict(opts), config("all_to_all"))
    assert _with_mode_defaults({**opts, "coherent_weight": 0}, config("coherent"))["coherent_weight"] == 0
    assert "coherent_weight" not in _with_mode_defaults({"file": "p.json"}, config("coherent"))
    _, _, plain = load_or_plan(dict(opts))
    _, _, coh = load_or_plan(_with_mode_defaults(dict(opts), config("coherent")))
    assert plain["coherent_weight"] == 0 and coh["coherent_weight"] == COHERENT_WEIGHT
    assert coh["coherent_rows_per_token"] <= plain["coherent_rows_per_token"]
    assert "coherent_weight" not in _with_mode_defaults({**opts, "method": "eplb"}, config("coherent"))
    with pytest.raises(ConfigError, match="coherent_weight"):
        load_or_plan({**opts, "coherent_weight": -2})
    with pytest.raises(ConfigError, match="method 'eplb' has none"):
        load_or_plan({**opts, "method": "eplb", "coherent_weight": 5})
