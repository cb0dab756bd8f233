"""Property-test the rewritten graphs of your own models.

    from hypothesis import given
    from moe_compiler.testing import moe_configs, assert_rewrite_equivalent

    @given(moe_configs())
    def test_my_layer(cfg):
        layer = cfg.build()                          # a moe_compiler.MoELayer
        x = cfg.example_input()
        assert_rewrite_equivalent(layer, x, expected_moe_ops=1, backward=True)

``assert_rewrite_equivalent`` compiles with backend "moe", checks how many moe_compiler.moe ops the
rewritten graphs hold, and compares forward outputs and (optionally) gradients with eager.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils import _pytree as pytree

try:  # hypothesis is a test dependency, not a runtime one
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    st = None

DTYPE_TOLERANCES = {
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.float64: dict(rtol=1e-7, atol=1e-9),
    torch.float16: dict(rtol=2e-2, atol=2e-2),
    torch.bfloat16: dict(rtol=5e-2, atol=5e-2),
}


@dataclass(frozen=True)
class MoEConfigSample:
    """One generated MoE configuration (see moe_configs)."""

    hidden_size: int
    ffn_size: int
    num_experts: int
    top_k: int
    score_func: str
    renormalize: bool
    shared_ffn_size: int
    shared_gate: bool
    num_tokens: int
    seed: int

    def build(self, dtype=torch.float32):
        from moe_compiler.modules import MoELayer

        torch.manual_seed(self.seed)
        return MoELayer(self.hidden_size, self.ffn_size, self.num_experts, self.top_k, score_func=self.score_func,
                        renormalize=self.renormalize, shared_ffn_size=self.shared_ffn_size,
                        shared_gate=self.shared_gate).to(dtype)

    def example_input(self, dtype=torch.float32, batch: int | None = None):
        g = torch.Generator().manual_seed(self.seed + 1)
        shape = (self.num_tokens, self.hidden_size) if batch is None else (batch, self.num_tokens, self.hidden_size)
        return torch.randn(shape, generator=g).to(dtype)


def moe_configs(max_experts: int = 64, max_top_k: int = 8, max_tokens: int = 300, max_hidden: int = 96):
    """Generates: MoEConfigSample with experts 1..max_experts, top-k 1..min(max_top_k, experts),
    hidden and ffn sizes 1..max_hidden (odd ones included), softmax, sigmoid or sqrt-softplus routers, renormalisation
    on/off, shared experts off/plain/gated, and 0..max_tokens tokens."""
    _need_hypothesis()

    @st.composite
    def build(draw):
        e = draw(st.integers(1, max_experts))
        k = draw(st.integers(1, min(max_top_k, e)))
        shared = draw(st.sampled_from([0, 0, draw(st.integers(1, 48))]))
        return MoEConfigSample(
            hidden_size=draw(st.integers(1, max_hidden)), ffn_size=draw(st.integers(1, max_hidden)),
            num_experts=e, top_k=k, score_func=draw(st.sampled_from(["softmax", "sigmoid", "sqrtsoftplus"])),
            renormalize=draw(st.booleans()), shared_ffn_size=shared, shared_gate=bool(shared) and draw(st.booleans()),
            num_tokens=draw(st.integers(0, max_tokens)), seed=draw(st.integers(0, 2**16)))

    return build()


ROUTING_KINDS = ("random", "one_expert", "skewed", "empty_experts", "ties", "nonfinite")


def routings(num_tokens: int, num_experts: int, kinds=ROUTING_KINDS):
    """Generates: router logits [num_tokens, num_experts] (fp32) that produce a chosen kind of routing:
    random; every token to one expert; Zipf-skewed; half the experts never chosen; exact ties;
    NaN/+-inf entries."""
    _need_hypothesis()

    @st.composite
    def build(draw):
        kind = draw(st.sampled_from(list(kinds)))
        seed = draw(st.integers(0, 2**16))
        g = torch.Generator().manual_seed(seed)
        logits = torch.randn(num_tokens, num_experts, generator=g)
        if kind == "one_expert" and num_experts > 0:
            logits[:, draw(st.integers(0, num_experts - 1))] += 50.0
        elif kind == "skewed":
            ranks = torch.arange(1, num_experts + 1, dtype=torch.float32)
            logits = logits + 3.0 * torch.log(1.0 / ranks)
        elif kind == "empty_experts":
            logits[:, num_experts // 2:] -= 100.0
        elif kind == "ties":
            logits = torch.round(logits)  # many exact ties between experts
        elif kind == "nonfinite" and num_tokens > 0:
            logits[0, 0] = float("nan")
            if num_experts > 1:
                logits[-1, -1] = float("inf")
        return logits

    return build()


def count_moe_ops(gm: torch.fx.GraphModule) -> int:
    """MoE layers in a graph: moe_compiler.moe ops and their lowered experts ops (one per layer)."""
    from moe_compiler.codegen.comm.ep import EP_MOE_OP
    from moe_compiler.codegen.comm.fssdp import FSSDP_MOE_OP
    from moe_compiler.codegen.comm.functional import ep_layer
    from moe_compiler.codegen.offload_ops import OFFLOADED_EXPERTS_OP
    from moe_compiler.codegen.ops import GROUPED_EXPERTS_FWD_OP, GROUPED_EXPERTS_OP, ROUTED_EXPERTS_OP
    from moe_compiler.ir import MOE_OP

    layer_ops = {MOE_OP, ROUTED_EXPERTS_OP, GROUPED_EXPERTS_OP, GROUPED_EXPERTS_FWD_OP, OFFLOADED_EXPERTS_OP, EP_MOE_OP,
                 FSSDP_MOE_OP, ep_layer}
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in layer_ops)


def _tensors(tree):
    return [t for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _loss(outputs, seed=0):
    """A fixed random projection of every floating output: exercises every output's gradient."""
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for t in _tensors(outputs):
        w = torch.randn(t.shape, generator=g).to(t.dtype)
        total = total + (t.float() * w.float()).nan_to_num(0.0, 0.0, 0.0).sum()
    return total


def assert_rewrite_equivalent(model, *inputs, backward: bool = False, expected_moe_ops: int | None = None,
                              options: dict | None = None, rtol: float | None = None, atol: float | None = None,
                              dynamic=None):
    """Compile `model` with backend "moe" and check it against eager.

    - expected_moe_ops: how many moe_compiler.moe ops the rewritten graphs must hold in total
      (None = don't check);
    - backward: also compare gradients of every parameter and floating input that requires grad.
    Returns the compiled callable.
    """
    from moe_compiler.explain import collect_records

    options = dict(options or {})
    params = [p for p in (model.parameters() if isinstance(model, torch.nn.Module) else []) if p.requires_grad]

    def run(fn):
        args = [a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in inputs]
        for p in params:
            p.grad = None
        with torch.set_grad_enabled(backward):
            out = fn(*args)
            grads = []
            if backward:
                loss = _loss(out)
                if isinstance(loss, torch.Tensor) and loss.requires_grad:
                    loss.backward()
                grads = [p.grad for p in params] + [a.grad for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        return out, grads

    expected_out, expected_grads = run(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="moe", options=options, dynamic=dynamic)
    with collect_records() as records:
        got_out, got_grads = run(compiled)
    if expected_moe_ops is not None:
        found = sum(r.moe_op_count for r in records)
        assert found == expected_moe_ops, (
            f"expected {expected_moe_ops} moe_compiler.moe op(s) in the rewritten graphs, found {found}; layers: "
            + "; ".join(m.one_line() for r in records for m in r.moe_layers))
    _assert_all_close(expected_out, got_out, rtol, atol, "output")
    if backward:
        for i, (e, g) in enumerate(zip(expected_grads, got_grads)):
            if e is None and g is None:
                continue
            assert e is not None and g is not None, f"gradient {i}: one side is None (eager {e is None}, compiled {g is None})"
            _assert_all_close(e, g, rtol, atol, f"gradient {i}")
    return compiled


def _assert_all_close(expected, got, rtol, atol, what):
    exp, act = _tensors(expected), _tensors(got)
    assert len(exp) == len(act), f"{what}: eager gave {len(exp)} tensors, compiled {len(act)}"
    for i, (e, a) in enumerate(zip(exp, act)):
        tol = dict(DTYPE_TOLERANCES.get(e.dtype, DTYPE_TOLERANCES[torch.float32]))
        scale = float(e.detach().float().abs().nan_to_num(0, 0, 0).max()) if e.numel() else 1.0
        tol["atol"] = tol["atol"] * max(1.0, scale)
        if rtol is not None:
            tol["rtol"] = rtol
        if atol is not None:
            tol["atol"] = atol
        torch.testing.assert_close(a.detach(), e.detach(), equal_nan=True, **tol,
                                   msg=lambda m: f"{what} tensor {i}: {m}")


def _need_hypothesis():
    if st is None:  # pragma: no cover
        raise ImportError("moe_compiler.testing strategies need hypothesis: pip install hypothesis")
