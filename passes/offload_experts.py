"""offload_experts: serve each layer's experts from a budgeted expert store (option ``offload``).

Before (inference graph, after rewrite_dispatch):
    y = moe_compiler.grouped_experts(x, ids, w, w1, w3, w2, b1, b3, b2, spec)            # [T, H]
After:
    y = moe_compiler.offloaded_experts(x, ids, w, None, store, layer, spec')               # [T, H]

The layer's expert weights are written to the store's disk tier (one checked safetensors file per
expert) and, with ``release_parameters``, the module's copies are freed once the graph is compiled,
so resident memory is the store's budget plus the non-expert weights. The prediction argument is
filled in by hoist_prefetch. spec' notes the store, its policy and budget.

Training graphs are left resident (gradients and optimizer state need the weights every step);
the reason is logged and counted.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch

from moe_compiler.codegen.offload_ops import NAMES, OFFLOADED_EXPERTS_OP
from moe_compiler.codegen.ops import GROUPED_EXPERTS_OP
from moe_compiler.ir import MoESpec
from moe_compiler.pipeline import PassContext, PassResult

log = logging.getLogger(__name__)


def _prepacked(spec: MoESpec, device: torch.device, dtype: torch.dtype, names) -> tuple:
    """Weights the store keeps oneDNN-packed: as grouped_experts would use them (cost model's cpu_gemm)."""
    from moe_compiler.codegen.torch_experts import PackedWeights

    if device.type != "cpu" or spec.note("decision:cpu_gemm", "prepacked") == "plain":
        return ()
    if not PackedWeights.available(torch.empty(0, dtype=dtype)):
        return ()
    return tuple(n for n in ("w1", "w3", "w2") if n in names)


@dataclass(frozen=True)
class OffloadExperts:
    """Rewrite grouped_experts into offloaded_experts reading from an expert store."""

    name: ClassVar[str] = "offload_experts"

    def call(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        from moe_compiler.runtime import offload

        options = offload.normalize_options(getattr(ctx.config, "offload", None))
        nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is GROUPED_EXPERTS_OP]
        if options is None or not nodes:
            return PassResult(gm, False, {})
        if ctx.training:
            log.info("offload_experts: %s is a training graph; experts stay resident (offload serves inference)",
                     ctx.graph_id)
            return PassResult(gm, False, {"skipped_training_layers": len(nodes)})
        store_id, store = offload.store_for(options)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        position = {n: i for i, n in enumerate(placeholders)}
        needed = {a for node in nodes for a in node.args[3:9] if isinstance(a, torch.fx.Node) and a not in position}
        values = {}
        if needed:
            from moe_compiler.passes.detect_moe import capture_values

            values = capture_values(gm, ctx.example_inputs, needed)
        releases = []
        for node in nodes:
            x, ids, w, *ws, spec_json = node.args
            spec = MoESpec.from_json(spec_json)
            stacked, sources = {}, {}
            for name, a in zip(NAMES, ws):
                if a is None:
                    continue
                if a in position:
                    stacked[name] = ctx.example_inputs[position[a]]
                    if ctx.placeholder_paths[position[a]] is not None:
                        sources[name] = stacked[name]
                else:
                    stacked[name] = values[a]
            any_w = stacked["w1"]
            layer = store.add_layer(spec.path or node.name, stacked, transposed=spec.experts.transposed,
                                    prepack=_prepacked(spec, any_w.device, any_w.dtype, stacked),
                                    source=sources.get("w1"))
            if options["release_parameters"]:
                releases += [(t, store_id, layer, name) for name, t in sources.items()]
            notes = (("offload", f"experts served by the store at {store_id} (layer {layer}): policy "
                                 f"{options['policy']}, budget {options['budget']!r} (of all registered experts' bytes when a "
                                 f"fraction), prefetch {'on' if options['prefetch'] else 'off'}, loader {options['loader']}"
                                 + (f", quantize {options['quantize']} (cached copies: results differ from the "
                                    "resident model)" if options["quantize"] else "")),)
            spec = spec.replace(notes=spec.notes + notes)
            with gm.graph.inserting_before(node):
                y = gm.graph.call_function(OFFLOADED_EXPERTS_OP, (x, ids, w, None, store_id, layer, spec.to_json()))
            y.meta.update(node.meta)
            y.meta["moe_spec"] = spec
            y.meta["moe_compiler_pass"] = self.name
            node.replace_all_uses_with(y)
            gm.graph.erase_node(node)
        store.check_budget()
        gm.graph.eliminate_dead_code()
        gm.recompile()
        ctx.after_compile.append(lambda: [offload.release(*r) for r in releases])
        return PassResult(gm, True, {"layers_offloaded": len(nodes), "budget_bytes": store.budget,
                                     "expert_bytes": store.total_expert_bytes,
                                     "weights_released": len(releases)})
