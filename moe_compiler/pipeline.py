"""Pass manager: runs an ordered list of graph passes with one interface, lints, counts and dumps.

A pass is a frozen dataclass with typed option fields, a class attribute ``name`` and

    def call(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult

returning the (possibly new) graph module, whether it changed, and counters of what it did.
The manager lints the graph after each pass, wraps a failing pass's error with its name and the
passes before it, accumulates ``counters[pass_name][key]``, and, when dumps are on, writes
``NN_<pass>.before.py`` / ``NN_<pass>.after.py`` and a ``summary.txt`` per compiled graph. The same
code goes to structured trace artifacts (TORCH_TRACE + tlparse) and to DEBUG logging.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
import torch.fx

from moe_compiler import _compat

log = logging.getLogger(__name__)

# counters[pass_name][key] -> int, accumulated over every compile in this process (like
# torch._dynamo.utils.counters); tests clear it with counters.clear().
counters: collections.defaultdict = collections.defaultdict(collections.Counter)


@dataclass
class PassResult:
    graph_module: torch.fx.GraphModule
    changed: bool
    counters: dict = field(default_factory=dict)


@dataclass
class PassContext:
    """What a pass may read besides the graph: config, example inputs, and what earlier passes found."""

    config: Any
    example_inputs: list
    # module path of each placeholder (e.g. "model.layers.0.mlp.gate.weight") or None for activations
    placeholder_paths: list
    graph_id: str = ""
    # gradients will be taken through this graph (grad mode on and some input requires grad)
    training: bool = False
    # MoE layer reports found so far (moe_compiler.explain.MoELayerReport)
    moe_layers: list = field(default_factory=list)
    # callables run once the graph is compiled (e.g. offload_experts frees the weights it moved to disk)
    after_compile: list = field(default_factory=list)
    # per placeholder: a module attribute dynamo lifted to an input (a float under dynamic=True), the same
    # on every rank like the parameters (_compat.module_constant_placeholders)
    constant_placeholders: list = field(default_factory=list)


class GraphPass(Protocol):
    name: ClassVar[str]

    def call(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult: ...


class PassError(RuntimeError):
    """A pass failed; the message names it and the passes that ran before it."""


@dataclass
class PassRecord:
    index: int
    name: str
    changed: bool
    counters: dict
    seconds: float


@dataclass
class PipelineRun:
    graph_id: str
    records: list = field(default_factory=list)
    dump_dir: str | None = None


def graph_code(gm: torch.fx.GraphModule) -> str:
    """Readable, stable code of a graph module (names are the graph's node names)."""
    return gm.print_readable(print_output=False, include_stride=False, include_device=False)


class DumpWriter:
    """Writes one compiled graph's pass dumps into its own folder."""

    def __init__(self, root: str | None, graph_id: str):
        self.dir = os.path.join(root, graph_id) if root else None
        self.graph_id = graph_id
        if self.dir:
            os.makedirs(self.dir, exist_ok=True)

    def write(self, filename: str, text: str) -> None:
        name = f"moe_compiler_{self.graph_id}_{filename}"
        _compat.trace_artifact(name, text)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s:\n%s", name, text)
        if self.dir:
            with open(os.path.join(self.dir, filename), "w") as f:
                f.write(text)


class PassManager:
    def __init__(self, passes: list):
        self.passes = list(passes)

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext, dumps: DumpWriter) -> tuple[torch.fx.GraphModule, PipelineRun]:
        run = PipelineRun(graph_id=ctx.graph_id, dump_dir=dumps.dir)
        done: list[str] = []
        for i, p in enumerate(self.passes):
            dumps.write(f"{i:02d}_{p.name}.before.py", graph_code(gm))
            t0 = time.perf_counter()
            try:
                result = p.call(gm, ctx)
                gm = result.graph_module
                lint(gm)
            except Exception as e:
                log.debug("pass %s failed", p.name, exc_info=True)
                before = ", ".join(done) if done else "none"
                raise PassError(
                    f"moe_compiler pass {p.name!r} failed on graph {ctx.graph_id} "
                    f"(passes that ran before it: {before}): {type(e).__name__}: {e}"
                ) from e
            seconds = time.perf_counter() - t0
            rec = PassRecord(i, p.name, result.changed, dict(result.counters), seconds)
            run.records.append(rec)
            for k, v in result.counters.items():
                counters[p.name][k] += v
            counters[p.name]["runs"] += 1
            if result.changed:
                counters[p.name]["changed"] += 1
            dumps.write(f"{i:02d}_{p.name}.after.py", graph_code(gm))
            log.info("pass %s on %s: changed=%s %s (%.3fs)", p.name, ctx.graph_id, result.changed,
                     dict(result.counters), seconds)
            done.append(p.name)
        return gm, run


def lint(gm: torch.fx.GraphModule) -> None:
    """Graph invariants after every pass: fx lint, and every call node carries meta['val']."""
    gm.graph.lint()
    for n in gm.graph.nodes:
        if n.op == "call_function" and "val" not in n.meta and n.meta.get("moe_compiler_pass"):
            raise AssertionError(f"node {n.name} added by {n.meta['moe_compiler_pass']} has no meta['val']")


def write_summary(dumps: DumpWriter, run: PipelineRun, moe_layers: list, extra: dict | None = None) -> None:
    lines = [f"graph {run.graph_id}", "", "passes (index, name, changed, seconds, counters):"]
    for r in run.records:
        lines.append(f"  {r.index:02d} {r.name:<20} changed={str(r.changed):<5} {r.seconds:8.4f}s  {json.dumps(r.counters, sort_keys=True)}")
    lines += ["", f"MoE layers ({len(moe_layers)}):"]
    for layer in moe_layers:
        lines.append("  " + layer.one_line())
    for k, v in (extra or {}).items():
        lines.append(f"{k}: {v}")
    dumps.write("summary.txt", "\n".join(lines) + "\n")
    summary = {
        "graph_id": run.graph_id,
        "passes": [dataclasses.asdict(r) for r in run.records],
        "moe_layers": [layer.to_dict() for layer in moe_layers],
        **(extra or {}),
    }
    dumps.write("summary.json", json.dumps(summary, indent=2, default=str))
