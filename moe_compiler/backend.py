"""The ``moe`` torch.compile backend.

    dynamo graph --(no top-k anywhere)------------------------------------------> Inductor, unchanged
        |
        +-- functionalize (ATen, no autograd) -> pass pipeline (detect_moe, ...) -> Inductor
                                                 (aot_autograd: forward + backward graphs, dumped too)

Anything that fails on the MoE path falls back to Inductor on the original graph with a logged
reason (or raises, with options={"strict": True}). Registered through the
``torch_dynamo_backends`` entry point (pyproject.toml), never at import time.
"""
from __future__ import annotations

import itertools
import logging
import os

import torch
import torch.fx

from moe_compiler import _compat
from moe_compiler.config import BackendConfig, make_config
from moe_compiler.explain import CompileRecord, known_tensor_names, publish
from moe_compiler.pipeline import DumpWriter, PassContext, PassManager, graph_code, write_summary

log = logging.getLogger(__name__)
_GRAPH_COUNTER = itertools.count()


def moe_backend(gm: torch.fx.GraphModule, example_inputs, *, options: dict | None = None, mode: str | None = None,
                **unused):
    """torch.compile backend entry: ``torch.compile(model, backend="moe", options={...}, mode=...)``."""
    if unused:
        from moe_compiler.config import ConfigError

        raise ConfigError(f"unexpected backend arguments {sorted(unused)}; the moe backend takes options= and mode=")
    config = make_config(options, mode=mode)
    return compile_graph(gm, list(example_inputs), config)


def _dump_root(config: BackendConfig) -> str | None:
    if config.dump_dir:
        return config.dump_dir
    if os.environ.get("TORCH_COMPILE_DEBUG", "0") not in ("", "0"):
        return os.path.join(_compat.debug_dir(), "moe_compiler")
    return None


def _has_candidate(gm: torch.fx.GraphModule) -> bool:
    """Cheap pre-check: MoE routing needs a top-k (or an existing moe op)."""
    for n in gm.graph.nodes:
        if n.op in ("call_function", "call_method"):
            name = getattr(n.target, "__name__", str(n.target))
            if "topk" in name or "moe_compiler" in str(n.target):
                return True
    return False


def compile_graph(gm: torch.fx.GraphModule, example_inputs: list, config: BackendConfig):
    graph_id = f"graph_{next(_GRAPH_COUNTER):03d}"
    name = _compat.current_graph_name()
    if name:
        graph_id += f"_{name}"
    record = CompileRecord(graph_id=graph_id)
    dumps = DumpWriter(_dump_root(config), graph_id)
    record.dump_dir = dumps.dir
    publish(record)

    if not config.detect or not _has_candidate(gm):
        reason = "detection disabled" if not config.detect else "no top-k in the graph: no MoE layer"
        log.debug("graph %s: %s; handing the graph to %s unchanged", graph_id, reason, config.inner_backend)
        if config.detect:  # expert weights without a router here still say why their layer runs unchanged
            from moe_compiler.passes.unrecognised_experts import unrecognised_expert_layers

            record.moe_layers = unrecognised_expert_layers(
                _compat.placeholder_paths(gm, known_tensor_names()),
                [tuple(t.shape) if isinstance(t, torch.Tensor) else None for t in example_inputs], [], [], graph_id,
                has_topk=False)
        dumps.write("dynamo_graph.py", graph_code(gm))
        write_summary(dumps, _empty_run(graph_id), record.moe_layers, {"path": reason})
        _check_released_inputs(gm, example_inputs)
        return _inner(gm, example_inputs, config, dumps)

    from moe_compiler.runtime import ep_weights, offload

    # weights an earlier compile released come back for this compile: offloaded ones from disk,
    # expert-parallel ones as this rank's kept rows (runtime/ep_weights.py)
    with offload.restored(example_inputs), ep_weights.restored(example_inputs):
        return _compile_moe(gm, example_inputs, config, graph_id, record, dumps)


def _check_released_inputs(gm, example_inputs, paths=None) -> None:
    """A graph about to be compiled must not compute with expert weights that expert parallelism
    released (ReleasedWeightsError names the tensor), except in the ops given kept rows.
    paths: the placeholders' parameter names (default: read from gm, a dynamo graph)."""
    from moe_compiler.passes.sparse_collectives import reads_kept_rows
    from moe_compiler.runtime import ep_weights

    if paths is None:
        paths = _compat.placeholder_paths(gm, known_tensor_names())
    ep_weights.check_graph(gm, example_inputs, reads_kept_rows, paths)


def _compile_moe(gm, example_inputs, config: BackendConfig, graph_id: str, record: CompileRecord, dumps: DumpWriter):
    training = torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs)
    try:
        aten_gm = _compat.functionalize(gm, example_inputs, training=training)
    except Exception as e:
        if config.strict:
            raise
        record.fallback_reason = f"could not functionalize the graph ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
        log.warning("moe_compiler: %s: %s; falling back to Inductor", graph_id, record.fallback_reason)
        write_summary(dumps, _empty_run(graph_id), [], {"fallback": record.fallback_reason})
        _check_released_inputs(gm, example_inputs)
        return _inner(gm, example_inputs, config, dumps)

    from moe_compiler.passes import build_pipeline

    ctx = PassContext(config=config, example_inputs=example_inputs,
                      placeholder_paths=_compat.placeholder_paths(gm, known_tensor_names()), graph_id=graph_id,
                      training=training, constant_placeholders=_compat.module_constant_placeholders(gm))
    dumps.write("dynamo_graph.py", graph_code(gm))
    try:
        new_gm, run = PassManager(build_pipeline(config)).run(aten_gm, ctx, dumps)
    except Exception as e:
        from moe_compiler.runtime.ep_weights import ReleasedWeightsError

        if config.strict or isinstance(e, ReleasedWeightsError):  # no fallback can compute without the weights
            raise
        record.fallback_reason = str(e).splitlines()[0][:400]
        log.warning("moe_compiler: %s; falling back to Inductor on the original graph", record.fallback_reason)
        write_summary(dumps, _empty_run(graph_id), ctx.moe_layers, {"fallback": record.fallback_reason})
        _check_released_inputs(gm, example_inputs)
        return _inner(gm, example_inputs, config, dumps)
    record.passes = run.records
    record.moe_layers = ctx.moe_layers
    final = new_gm if any(r.changed for r in run.records) or _count_moe_ops(new_gm) else gm
    record.moe_op_count = _count_moe_ops(final) if final is new_gm else 0
    write_summary(dumps, run, ctx.moe_layers, {"moe_ops": record.moe_op_count})
    _check_released_inputs(final, example_inputs, ctx.placeholder_paths)
    functional = _has_functional_collectives(final)
    if functional:
        _compat.allow_data_dependent_scalars(final)
    compiled = _inner(final, example_inputs, config, dumps)
    if final is new_gm:
        for hook in ctx.after_compile:
            hook()
    if functional:
        from moe_compiler.codegen.comm.functional import name_collective_failures

        compiled = name_collective_failures(compiled)
    return compiled


def _has_functional_collectives(gm) -> bool:
    """Does the graph hold expert-parallel layers as functional collectives (their splits are SymInts
    read from tensors when aot_autograd traces it)?"""
    from moe_compiler.codegen.comm.functional import ep_layer

    return any(n.op == "call_function" and n.target is ep_layer for n in gm.graph.nodes)


def _count_moe_ops(gm) -> int:
    from moe_compiler.testing import count_moe_ops

    return count_moe_ops(gm)


def _empty_run(graph_id):
    from moe_compiler.pipeline import PipelineRun

    return PipelineRun(graph_id=graph_id)


def _inner(gm, example_inputs, config: BackendConfig, dumps: DumpWriter):
    """Compile with aot_autograd + Inductor (or eager), dumping the forward/backward ATen graphs
    (after moving each all-to-all's wait to the first use of its result: functional.sink_waits)."""

    def overlap_and_dump(g, kind):
        from moe_compiler.codegen.comm.functional import sink_waits

        sink_waits(g)
        dumps.write(f"aot_{kind}.py", graph_code(g))

    if config.inner_backend == "eager":
        return _compat.compile_eager_aot(gm, example_inputs, fw_hook=overlap_and_dump)

    def inner_compile(g, inputs, **kwargs):
        kind = "backward" if kwargs.get("is_backward") else "inference" if kwargs.get("is_inference") else "forward"
        overlap_and_dump(g, kind)
        return _compat.compile_fx_inner(g, inputs, **kwargs)

    return _compat.compile_inductor(gm, example_inputs, mode=config.mode, inner_compile=inner_compile)
