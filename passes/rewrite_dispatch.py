"""rewrite_dispatch: lower routed_experts to dropless grouped GEMMs, specialised per layer.

Before:
    y = moe_compiler.routed_experts(x, ids, w, w1, w3, w2, b1, b3, b2, spec)         # [T, H]
After (inference graph):
    y = moe_compiler.grouped_experts(x, ids, w, w1, w3, w2, b1, b3, b2, spec')       # [T, H]
After (training graph):
    r = moe_compiler.grouped_experts_fwd(x, ids, w, w1, w3, w2, b1, b3, b2, spec')
    y = r[0]                                                                          # [T, H]
    # r[1:] = xs [S, H], h [S, N1], up [S, I|0], a [S, I], ys [S, H], order [S], token [S], counts [E]
    # are saved for grouped_experts_bwd (no GEMM is recomputed in backward)

Dispatch is dropless: slots sorted by expert (stable argsort), per-expert counts, one GEMM per
expert with tokens, weighted fp32 combine; no capacity factor. spec' records the choice in its
notes (shown in the dumps): the implementation per device and, for CUDA, the Triton tile config
(BLOCK_N/BLOCK_K/warps from codegen.triton.grouped_gemm.choose_config, BLOCK_M from the cost
model's cuda_tile decision when the cost_decisions pass ran); the CUDA kernels run with it.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import ClassVar

import torch

from moe_compiler import _compat
from moe_compiler.codegen.ops import GROUPED_EXPERTS_FWD_OP, GROUPED_EXPERTS_OP, ROUTED_EXPERTS_OP
from moe_compiler.ir import MoESpec
from moe_compiler.pipeline import PassContext, PassResult


def _tile_note(spec: MoESpec, tokens_hint: int, dtype) -> tuple:
    try:
        from moe_compiler.codegen.triton.grouped_gemm import choose_config
    except Exception:  # triton missing: no GPU plan to record
        return ()
    e = spec.experts
    n1 = 2 * e.ffn_size if e.layout in ("concat", "interleaved") else e.ffn_size
    up = choose_config(tokens_hint, n1, e.hidden_size, spec.num_experts, spec.top_k, dtype)
    down = choose_config(tokens_hint, e.hidden_size, e.ffn_size, spec.num_experts, spec.top_k, dtype)
    tile = spec.note("decision:cuda_tile")  # the cost model's BLOCK_M, e.g. "BLOCK_M=64"
    if isinstance(tile, str) and tile.startswith("BLOCK_M="):
        up["BLOCK_M"] = down["BLOCK_M"] = int(tile.split("=", 1)[1])
    return (("cuda_up_gemm_config", tuple(sorted(up.items()))), ("cuda_down_gemm_config", tuple(sorted(down.items()))))


@dataclass(frozen=True)
class RewriteDispatch:
    """Lower routed_experts to grouped GEMMs on sorted tokens (CPU torch / CUDA Triton)."""

    name: ClassVar[str] = "rewrite_dispatch"
    # "auto": the saving training variant when gradients are needed, else the inference op
    variant: str = "auto"

    def call(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        if self.variant not in ("auto", "inference", "training"):
            raise ValueError(f"rewrite_dispatch variant must be 'auto', 'inference' or 'training', got {self.variant!r}")
        graph = gm.graph
        fake_mode = _compat.fake_mode_of(gm)
        training = ctx.training if self.variant == "auto" else self.variant == "training"
        n_done = 0
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target is not ROUTED_EXPERTS_OP:
                continue
            args = list(node.args)
            spec = MoESpec.from_json(args[-1])
            x_val = args[0].meta["val"]
            tokens = _compat.size_hint(x_val.numel() // max(1, spec.experts.hidden_size))
            impl = "torch grouped mm on sorted tokens (CPU, CUDA training)"
            notes = (("dispatch", "dropless: stable argsort by expert, per-expert GEMMs, fp32 weighted combine"),
                     ("implementation", impl + ("; Triton fused_moe on CUDA inference" if spec.experts.layout != "separate" else "")),
                     ("variant", "training (saves activations)" if training else "inference"),
                     ) + _tile_note(spec, tokens, x_val.dtype)
            spec = spec.replace(notes=spec.notes + notes)
            args[-1] = spec.to_json()
            with graph.inserting_before(node):
                if training:
                    r = graph.call_function(GROUPED_EXPERTS_FWD_OP, tuple(args))
                    y = graph.call_function(operator.getitem, (r, 0))
                    with fake_mode:
                        r.meta["val"] = GROUPED_EXPERTS_FWD_OP(*[a.meta["val"] if isinstance(a, torch.fx.Node) else a
                                                                 for a in args])
                    y.meta["val"] = r.meta["val"][0]
                    r.meta["moe_compiler_pass"] = self.name
                else:
                    y = graph.call_function(GROUPED_EXPERTS_OP, tuple(args))
                    y.meta["val"] = node.meta["val"]
            y.meta["moe_compiler_pass"] = self.name
            y.meta["moe_spec"] = spec
            node.replace_all_uses_with(y)
            graph.erase_node(node)
            n_done += 1
        if n_done:
            gm.recompile()
        return PassResult(gm, bool(n_done), {"layers_lowered": n_done, "training_variant": n_done if training else 0})
