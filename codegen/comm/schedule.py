"""The collective schedule IR: what an expert-parallel MoE layer exchanges, planned at compile time.

One ``LayerSchedule`` per MoE op of a compiled graph; a graph's ``Schedule`` is dumped as
``comm_schedule.rank<R>.json`` next to the pass dumps. ep.py executes the same plan with executor.py: per
token chunk (``overlap_degree`` of them) it runs these steps in this order, under these names
(``executor.record_traffic`` logs the all-to-all steps by name; the tests compare them):

    step  kind             group          splits from            buffer
    0     exchange_counts  world          fixed [G] int64        send/recv counts [G]
    1     all_to_all       world          counts of step 0       rows [S_send, H] -> [S_recv, H]
    2     all_to_all       world          counts of step 0       (expert, destination) [S_send, 2] int64
          (hierarchical: intra_node step then inter_node step, each with its own counts exchange;
          with several chunks the forward exchanges the first hop's counts of every chunk at once,
          [G, chunks]: the ep_moe op's and functional.py's)
    ...   local experts on the received rows (overlapping the next chunk's dispatch and the
          previous chunk's combine: ep.py's forward and functional.py pipeline the chunks)
    n     all_to_all       world          reverse of step 1      rows [S_recv, H] fp32 -> [S_send, H]

S_send = tokens * top_k slots of this rank, S_recv = slots other ranks route to this rank's experts.

FSSDP layers (mode "fssdp", codegen/comm/fssdp.py) move expert chunks instead of tokens:

    0     all_gather       world          fixed [G, E] int64     per-expert slot counts ("exchange_loads")
    1     all_to_all       world          need (from step 0)     chunks [M_send, C] -> [M_recv, C] ("sparse_all_gather")
          ("sparse" materialisation: then dispatch / dispatch_meta / combine of the slots whose expert
          was not gathered, to its owner, as above)
    backward: sparse_all_gather again when rematerializing, then
    n     all_to_all       world          reverse of step 1      gradient chunks -> owners ("sparse_reduce_scatter")

Coherent chains (mode "coherent", codegen/comm/coherent.py), per layer of the chain (with overlap_degree
chunks, the whole chain once per token chunk; the forward issues each exchange for every chunk in turn):

    0     exchange_counts  world          fixed [G] int64        dispatch_counts
    1     all_to_all       world          counts of step 0       state rows [C_send, *feat] ("dispatch")
    2     all_to_all       world          counts of step 0       [C_send, k + 4] int64 ("dispatch_meta")
    3     all_to_all       world          counts of step 0       [C_send, k] fp32 expert weights ("dispatch")
    4-6   combine_counts, combine [P_send, H] fp32 partials to the anchor, combine_meta
    last layer only: home_counts, home [T, *feat] (rows back to their rank), home_meta
C_send = one row per (token, distinct rank of its experts), P_send = rows whose anchor is elsewhere.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

MODES = ("all_to_all", "hierarchical")
COHERENT_MODE = "coherent"
FSSDP_MODE = "fssdp"


@dataclass(frozen=True)
class CommStep:
    """One collective of a layer."""

    # "exchange_counts" | "all_to_all"
    kind: str
    # what it moves: "dispatch_counts", "dispatch", "dispatch_meta", "combine", ...
    name: str
    # process group: "world" (the EP group), "intra_node" or "inter_node"
    group: str
    # where the split sizes come from: "fixed" or "counts:<step name>" or "reverse:<step name>"
    splits: str
    # buffer description with symbolic row counts, e.g. "[S_send, H] hidden dtype"
    buffer: str
    # compute this collective may overlap (planned, e.g. "local_experts(chunk i-1)")
    overlaps: tuple = ()


@dataclass(frozen=True)
class LayerSchedule:
    """The collectives of one expert-parallel MoE layer."""

    layer: str
    mode: str
    group_size: int
    ranks_per_node: int
    # the expert ids each group rank computes (index = rank in the EP group)
    experts_per_rank: tuple
    # Tutel's overlap degree: token chunks whose dispatch overlaps the previous chunk's experts
    overlap_degree: int
    steps: tuple = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Schedule:
    graph_id: str
    layers: list = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps({"graph_id": self.graph_id, "layers": [l.to_dict() for l in self.layers]}, indent=2)


def plan_layer(layer: str, mode: str, group_size: int, ranks_per_node: int, experts_per_rank, overlap_degree: int
               ) -> LayerSchedule:
    """The steps of one layer for a mode (see the module docstring)."""
    if mode not in MODES:
        raise ValueError(f"schedule mode must be one of {MODES}, got {mode!r}")
    ov = ("local_experts(previous chunk)",) if overlap_degree > 1 else ()
    if mode == "all_to_all":
        hops = [("world", "")]
    else:
        hops = [("intra_node", "_intra_node"), ("inter_node", "_inter_node")]
    steps = []
    for group, suf in hops:
        steps += [
            CommStep("exchange_counts", f"dispatch{suf}_counts", group, "fixed", "[G] int64"),
            CommStep("all_to_all", f"dispatch{suf}", group, f"counts:dispatch{suf}_counts", "[S_send, H] hidden dtype",
                     ov),
            CommStep("all_to_all", f"dispatch{suf}_meta", group, f"counts:dispatch{suf}_counts",
                     "[S_send, 2] int64 (expert, destination rank)"),
        ]
    for group, suf in reversed(hops):
        steps.append(CommStep("all_to_all", f"combine{suf}", group, f"reverse:dispatch{suf}",
                              "[S_recv, H] fp32", ov))
    return LayerSchedule(layer, mode, group_size, ranks_per_node, tuple(tuple(e) for e in experts_per_rank),
                         overlap_degree, tuple(steps))


def plan_fssdp_layer(layer: str, group_size: int, owned_per_rank, materialize: str, rematerialize: bool
                     ) -> LayerSchedule:
    """The steps of one FSSDP layer (see the module docstring); experts_per_rank = each rank's owned experts."""
    steps = [CommStep("all_gather", "exchange_loads", "world", "fixed", "[G, E] int64 slot counts"),
             CommStep("all_to_all", "sparse_all_gather", "world", "need:exchange_loads",
                      "[M_send, C] weight dtype (one chunk = one expert's parameters)",
                      ("non-MoE compute before the layer (planned)",))]
    if materialize == "sparse":
        steps += [CommStep("exchange_counts", "dispatch_counts", "world", "fixed", "[G] int64"),
                  CommStep("all_to_all", "dispatch", "world", "counts:dispatch_counts", "[S_send, H] hidden dtype"),
                  CommStep("all_to_all", "dispatch_meta", "world", "counts:dispatch_counts", "[S_send] int64 expert"),
                  CommStep("all_to_all", "combine", "world", "reverse:dispatch", "[S_recv, H] fp32")]
    if rematerialize:
        steps.append(CommStep("all_to_all", "sparse_all_gather(backward)", "world", "need:exchange_loads",
                              "[M_send, C] weight dtype (re-materialised for backward)"))
    steps.append(CommStep("all_to_all", "sparse_reduce_scatter(backward)", "world", "reverse:sparse_all_gather",
                          "[M_recv, C] gradient chunks to their owners (summed there)"))
    return LayerSchedule(layer, FSSDP_MODE + ("/sparse" if materialize == "sparse" else ""), group_size, 0,
                         tuple(tuple(e) for e in owned_per_rank), 1, tuple(steps))


def plan_coherent_layer(layer: str, group_size: int, experts_per_rank, last: bool, overlap_degree: int = 1,
                        first_in_context_chain: bool = False, context: str | None = None) -> LayerSchedule:
    """The steps of one layer of a coherent chain (see the module docstring); `last` adds the way home.
    With overlap_degree chunks, the whole chain runs once per token chunk (chunk i's dispatch planned to
    overlap chunk i-1's experts). A chain that crosses attention first all-gathers every rank's token
    sizes and per-token context operands (first_in_context_chain); `context` describes the region after
    this layer, whose keys/values cut (or state) is all-gathered."""
    ov = ("local_experts(previous chunk)",) if overlap_degree > 1 else ()
    steps = []
    if first_in_context_chain:
        steps += [CommStep("all_gather", "context_shapes", "world", "fixed", "[G, token dims] int64"),
                  CommStep("all_gather", "context_operands", "world", "fixed",
                           "[G, numel] per context operand (rotary tables, masks), once per chain")]
    steps += [CommStep("exchange_counts", "dispatch_counts", "world", "fixed", "[G] int64"),
             CommStep("all_to_all", "dispatch", "world", "counts:dispatch_counts",
                      "[C_send, *feat] state dtype (one row per token and distinct expert rank)", ov),
             CommStep("all_to_all", "dispatch_meta", "world", "counts:dispatch_counts",
                      "[C_send, k + 4] int64 (expert ids, anchor, is_anchor, home rank, home index)"),
             CommStep("all_to_all", "dispatch", "world", "counts:dispatch_counts", "[C_send, k] fp32 weights"),
             CommStep("exchange_counts", "combine_counts", "world", "fixed", "[G] int64"),
             CommStep("all_to_all", "combine", "world", "counts:combine_counts", "[P_send, H] fp32 partial sums"),
             CommStep("all_to_all", "combine_meta", "world", "counts:combine_counts", "[P_send, k + 4] int64")]
    if context:
        steps += [CommStep("all_gather", "context", "world", "rows held",
                           f"[n, cut] rows held here to every rank, with [n, 2] int64 home meta ({context})")]
    if last:
        steps += [CommStep("exchange_counts", "home_counts", "world", "fixed", "[G] int64"),
                  CommStep("all_to_all", "home", "world", "counts:home_counts", "[T, *feat] rows back to their rank"),
                  CommStep("all_to_all", "home_meta", "world", "counts:home_counts", "[T, 2] int64")]
    return LayerSchedule(layer, COHERENT_MODE, group_size, 0, tuple(tuple(e) for e in experts_per_rank),
                         overlap_degree, tuple(steps))
