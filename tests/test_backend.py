"""The backend spine: registration, options, Inductor parity, training, dumps, pass manager."""
import json
import operator
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn
from hypothesis import given, strategies as st

import moe_compiler
from moe_compiler.config import ConfigError, make_config
from moe_compiler.pipeline import PassContext, PassError, PassManager, PassResult, DumpWriter, counters


class MLP(nn.Module):
    def __init__(self, h=16):
        super().__init__()
        self.a = nn.Linear(h, 2 * h)
        self.b = nn.Linear(2 * h, h)

    def forward(self, x):
        return self.b(torch.relu(self.a(x))).softmax(-1)


def test_entry_point_registers_backend_without_import():
    code = ("import torch, sys\n"
            "assert 'moe' in torch._dynamo.list_backends(), torch._dynamo.list_backends()\n"
            "assert 'moe_compiler' not in sys.modules\n"
            "f = torch.compile(lambda x: (x.sin() * 2).sum(), backend='moe')\n"
            "x = torch.randn(5)\n"
            "torch.testing.assert_close(f(x), (x.sin() * 2).sum())\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ok" in out.stdout


def test_unknown_option_names_valid_keys():
    with pytest.raises(ConfigError, match="valid options are.*dump_dir"):
        make_config({"dumpdir": "/tmp/x"})


@pytest.mark.parametrize("key,value,accepted", [("verify", "maybe", "bool"), ("inner_backend", "tvm", "inductor"),
                                                ("disable_passes", 3, "list of strings"), ("dump_dir", 5, "string")])
def test_bad_option_value_names_key_and_accepted(key, value, accepted):
    with pytest.raises(ConfigError, match=f"{key}.*{accepted}"):
        make_config({key: value})


def test_bad_option_through_torch_compile():
    f = torch.compile(MLP(), backend="moe", options={"no_such_option": 1})
    with pytest.raises(Exception, match="no_such_option"):
        f(torch.randn(2, 16))


def test_environment_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("MOE_COMPILER_DUMP_DIR", str(tmp_path))
    monkeypatch.setenv("MOE_COMPILER_VERIFY", "0")
    cfg = make_config({})
    assert cfg.dump_dir == str(tmp_path) and cfg.verify is False
    assert make_config({"verify": True}).verify is True  # options win over the environment


def test_unknown_pass_names_are_errors():
    from moe_compiler.passes import build_pipeline

    with pytest.raises(ConfigError, match="detect_moe"):
        build_pipeline(make_config({"disable_passes": ["nope"]}))
    with pytest.raises(ConfigError, match="valid keys"):
        build_pipeline(make_config({"pass_options": {"detect_moe": {"bogus": 1}}}))


@pytest.mark.parametrize("mode", [None, "default", "max-autotune-no-cudagraphs"])
def test_non_moe_model_equals_inductor(mode):
    torch.manual_seed(0)
    m, x = MLP(), torch.randn(4, 16)
    ref = torch.compile(m, backend="inductor")(x)
    torch._dynamo.reset()
    got = torch.compile(m, backend="moe", mode=mode, fullgraph=True)(x)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(got, m(x))


def test_training_step_equals_eager():
    torch.manual_seed(0)
    m1 = MLP()
    m2 = MLP()
    m2.load_state_dict(m1.state_dict())
    x = torch.randn(8, 16)
    c = torch.compile(m2, backend="moe")
    for model in (m1, c):
        loss = model(x).pow(2).sum()
        loss.backward()
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p2.grad, p1.grad)


def test_inductor_caches_are_keyed_by_the_package_sources(monkeypatch, tmp_path):
    """Forward and backward compile with this package's source fingerprint in Inductor's cache key (a
    graph cached before an op's registration changed must not be served again), after the user's tag."""
    import torch._inductor.compile_fx as inductor
    from moe_compiler import _compat

    tags, real = [], inductor.compile_fx_inner

    def recording(*args, **kwargs):
        tags.append((bool(kwargs.get("is_backward")), torch.compiler.config.cache_key_tag))
        return real(*args, **kwargs)

    monkeypatch.setattr(inductor, "compile_fx_inner", recording)
    torch._dynamo.reset()
    model = torch.compile(MLP(), backend="moe")
    outside = torch.compiler.config.cache_key_tag
    user = f"user-{os.getpid()}-{time.time_ns()}"   # a key no earlier run cached
    with torch.compiler.config.patch(cache_key_tag=user):
        model(torch.randn(8, 16, requires_grad=True)).sum().backward()
    ours = _compat._package_cache_tag()
    assert ours.startswith("moe_compiler-") and sorted(tags) == [(False, f"{user}+{ours}"), (True, f"{user}+{ours}")]
    assert torch.compiler.config.cache_key_tag == outside

    # a checkout keeps the ops in codegen/, beside moe_compiler/: every source folder counts
    first, second = tmp_path / "moe_compiler", tmp_path / "codegen"
    for folder in (first, second):
        folder.mkdir()
        (folder / "a.py").write_text("x = 1\n")
    before = _compat.source_fingerprint(str(first), str(second))
    (second / "a.py").write_text("x = 2\n")
    assert _compat.source_fingerprint(str(first), str(second)) != before


def test_dumps_written(tmp_path):
    layer = moe_compiler.MoELayer(16, 24, 4, 2)
    x = torch.randn(6, 16)
    torch.compile(layer, backend="moe", options={"dump_dir": str(tmp_path)})(x)
    graphs = os.listdir(tmp_path)
    assert len(graphs) == 1
    files = set(os.listdir(tmp_path / graphs[0]))
    assert {"00_detect_moe.before.py", "00_detect_moe.after.py", "summary.txt", "summary.json",
            "dynamo_graph.py"} <= files
    assert any(f.startswith("aot_") for f in files)
    summary = json.loads((tmp_path / graphs[0] / "summary.json").read_text())
    assert summary["passes"][0]["name"] == "detect_moe"
    assert summary["moe_ops"] == 1
    assert "moe_compiler.moe" in (tmp_path / graphs[0] / "00_detect_moe.after.py").read_text()


def test_torch_compile_debug_dumps_under_debug_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(moe_compiler._compat, "debug_dir", lambda: str(tmp_path))
    monkeypatch.setenv("TORCH_COMPILE_DEBUG", "1")
    from moe_compiler.backend import _dump_root

    assert _dump_root(make_config({})) == str(tmp_path / "moe_compiler")


class _Boom:
    name = "boom"

    def call(self, gm, ctx):
        raise ValueError("kaboom")


class _Noop:
    name = "noop"

    def call(self, gm, ctx):
        return PassResult(gm, False, {"looked": 1})


def test_pass_manager_wraps_errors_and_counts():
    gm = torch.fx.symbolic_trace(MLP())
    ctx = PassContext(config=make_config({}), example_inputs=[], placeholder_paths=[], graph_id="g")
    counters.clear()
    PassManager([_Noop()]).run(gm, ctx, DumpWriter(None, "g"))
    assert counters["noop"]["looked"] == 1 and counters["noop"]["runs"] == 1
    with pytest.raises(PassError, match=r"'boom' failed on graph g \(passes that ran before it: noop\).*kaboom"):
        PassManager([_Noop(), _Boom()]).run(gm, ctx, DumpWriter(None, "g"))


def test_failing_pass_falls_back_to_inductor(monkeypatch):
    import moe_compiler.passes as passes

    monkeypatch.setattr(passes, "build_pipeline", lambda config: [_Boom()])
    layer = moe_compiler.MoELayer(8, 8, 2, 1)
    x = torch.randn(3, 8)
    torch.testing.assert_close(torch.compile(layer, backend="moe")(x), layer(x))
    torch._dynamo.reset()
    with pytest.raises(Exception, match="kaboom"):
        torch.compile(layer, backend="moe", options={"strict": True})(x)


UNARY = [torch.relu, torch.tanh, torch.sigmoid, torch.sin, lambda t: t * 2.0, lambda t: t.softmax(-1),
         lambda t: t.topk(1, dim=-1).values.expand_as(t)]


@given(st.lists(st.integers(0, len(UNARY) - 1), min_size=1, max_size=6), st.integers(1, 9), st.integers(1, 9))
def test_random_non_moe_graphs_unchanged(ops, rows, cols):
    """Random small graphs (top-k included, so the MoE path runs) compile to the same values, no MoE op."""
    from moe_compiler.explain import collect_records

    def f(x):
        for i in ops:
            x = UNARY[i](x) + x
        return x

    torch._dynamo.reset()
    x = torch.randn(rows, cols)
    with collect_records() as records:
        got = torch.compile(f, backend="moe", options={"inner_backend": "eager"})(x)
    torch.testing.assert_close(got, f(x))
    assert sum(r.moe_op_count for r in records) == 0
    assert all(not r.fallback_reason for r in records)


def test_explain_report_is_readable():
    layer = moe_compiler.MoELayer(16, 24, 4, 2)
    rep = moe_compiler.explain(layer, torch.randn(5, 16))
    assert rep.graph_count == 1 and rep.graph_break_count == 0
    assert [(m.num_experts, m.top_k, m.rewritten) for m in rep.moe_layers] == [(4, 2, True)]
    text = str(rep)
    assert "1 found, 1 raised" in text and "detect_moe" in text


def test_cli_lists_passes_and_options():
    out = subprocess.run([sys.executable, "-m", "moe_compiler.cli", "passes"], capture_output=True, text=True)
    assert out.returncode == 0 and "detect_moe" in out.stdout and "verify" in out.stdout
    out = subprocess.run([sys.executable, "-m", "moe_compiler.cli", "options"], capture_output=True, text=True)
    assert "dump_dir" in out.stdout and "MOE_COMPILER_DUMP_DIR" in out.stdout
    out = subprocess.run([sys.executable, "-m", "moe_compiler.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "passes" in out.stdout


def test_training_export_keeps_the_attention_logsumexp():
    """The no-grad export asks CUDA's efficient attention not to compute the logsumexp; a graph that
    will be differentiated gets it back (its backward needs it: "LSE is not correctly aligned")."""
    from moe_compiler import _compat

    op = torch.ops.aten._scaled_dot_product_efficient_attention.default
    for training in (False, True):
        g = torch.fx.Graph()
        q, k, v = (g.placeholder(n) for n in "qkv")
        attn = g.call_function(op, (q, k, v, None, False, 0.0, True))
        g.output(g.call_function(operator.getitem, (attn, 0)))
        gm = torch.fx.GraphModule({}, g)
        out = _compat._inference_choices_undone(gm) if training else gm
        assert attn.args[4] is training and attn.args[5:] == (0.0, True)
        assert "True, 0.0, True" in out.code if training else "False, 0.0, True" in out.code
