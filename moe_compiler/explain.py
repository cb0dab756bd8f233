"""``moe_compiler.explain(model, *inputs, **options)``: compile once and report what happened.

The report's names are stable (other tools rely on them):
  report.graphs, report.graph_count, report.graph_break_count, report.break_reasons  (from dynamo)
  report.passes      [{"graph_id", "name", "changed", "counters", "seconds"}]
  report.moe_layers  [MoELayerReport(path, num_experts, top_k, rewritten, reason, ...)]
  report.dump_dirs   folders holding the pass dumps (when dumps were on)
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field

import torch


@dataclass
class MoELayerReport:
    path: str
    num_experts: int
    top_k: int            # 0: unknown (expert weights no detected router leads to)
    rewritten: bool
    reason: str = ""
    graph_id: str = ""
    pattern: str = ""
    shared_expert: str = "none"
    spec: object = None  # moe_compiler.ir.MoESpec when rewritten
    # [(name, choice, why)] from the cost_decisions pass (also in the spec's "decision:<name>" notes)
    decisions: list = field(default_factory=list)
    # with option expert_parallel: how the layer runs across ranks and why (sparse_collectives)
    strategy: str = ""

    @staticmethod
    def from_spec(spec, rewritten: bool, reason: str, graph_id: str) -> "MoELayerReport":
        return MoELayerReport(path=spec.path, num_experts=spec.num_experts, top_k=spec.top_k, rewritten=rewritten,
                              reason=reason, graph_id=graph_id, pattern=spec.pattern,
                              shared_expert=spec.shared_expert, spec=spec)

    def one_line(self) -> str:
        state = "raised" if self.rewritten else "NOT rewritten"
        extra = ""
        if self.spec is not None:
            r, e = self.spec.router, self.spec.experts
            extra = (f" [{self.pattern}; {r.score_func}{' group-limited' if r.n_group > 1 else ''}"
                     f"{' renorm' if r.renormalize else ''}{' scales input' if r.scales_input else ''}"
                     f"{' per-expert scale' if r.weight_scale else ''}; {e.activation}/{e.layout}"
                     f"{'; shared expert ' + self.shared_expert if self.shared_expert != 'none' else ''}]")
        why = f": {self.reason}" if self.reason else ""
        chosen = ""
        if self.decisions:
            chosen = " {decisions: " + ", ".join(f"{n}={c}" for n, c, _ in self.decisions) + "}"
        how = f" <{self.strategy}>" if self.strategy else ""
        return (f"{self.path or '<root>'}: {self.num_experts} experts, top-{self.top_k or '?'}, {state}{extra}{how}"
                f"{chosen}{why}")

    def decisions_text(self) -> str:
        """One line per cost-model decision with its reason (empty when the pass did not run)."""
        return "\n".join(f"{n} = {c}: {w}" for n, c, w in self.decisions)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["spec"] = None if self.spec is None else self.spec.to_json()
        return d


@dataclass
class CompileRecord:
    """What the backend did with one dynamo graph."""

    graph_id: str
    passes: list = field(default_factory=list)
    moe_layers: list = field(default_factory=list)
    dump_dir: str | None = None
    fallback_reason: str = ""
    # moe_compiler.moe ops in the graph handed to Inductor
    moe_op_count: int = 0


@dataclass
class ExplainReport:
    graphs: list
    graph_count: int
    graph_break_count: int
    break_reasons: list
    passes: list
    moe_layers: list
    dump_dirs: list
    fallbacks: list
    # with options expert_parallel: bytes of expert weights each rank of the EP group holds ([] otherwise)
    expert_bytes_per_rank: list = field(default_factory=list)
    # with options expert_parallel: expert weight bytes this rank holds after the compile (inference
    # graphs keep only the placement's rows and release the whole tensors), -1 otherwise
    expert_bytes_held: int = -1
    # with option offload: the expert store's counters after the example run (ExpertStore.stats():
    # hit_rate (resident or in flight), ready_rate (already loaded), prediction_recall, token_recall,
    # bytes_loaded, stall_s, read_by_caller and prefetches_read_by_caller (loads the model's own thread
    # read: no loader had started them), peak_bytes, per layer)
    offload: dict = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"moe_compiler report: {self.graph_count} graph(s), {self.graph_break_count} graph break(s)"]
        for i, br in enumerate(self.break_reasons):
            text = str(getattr(br, "reason", br)).strip().splitlines()
            lines.append(f"  break {i}: {' '.join(text[:2])}".rstrip())
        lines.append(f"MoE layers: {len(self.moe_layers)} found, "
                     f"{sum(m.rewritten for m in self.moe_layers)} raised to moe_compiler.moe")
        for m in self.moe_layers:
            lines.append("  " + m.one_line())
        lines.append("passes:")
        for p in self.passes:
            lines.append(f"  [{p['graph_id']}] {p['name']}: changed={p['changed']} {p['counters']} ({p['seconds']:.3f}s)")
        for f in self.fallbacks:
            lines.append(f"fallback to Inductor: {f}")
        if self.dump_dirs:
            lines.append("pass dumps: " + ", ".join(self.dump_dirs))
        if self.offload:
            o = self.offload
            pct = (lambda v: "n/a" if v is None else f"{100 * v:.1f}%")
            quantized = f", {o['quantize']} copies: results differ from resident" if o.get("quantize") else ""
            lines.append(f"offload ({o['policy']}{quantized}, budget {o['budget_bytes'] / 2**20:.2f} of "
                         f"{o['expert_bytes_total'] / 2**20:.2f} MiB): hit rate {pct(o['hit_rate'])} "
                         f"(already loaded {pct(o['ready_rate'])}), prediction recall {pct(o['prediction_recall'])}, "
                         f"token recall {pct(o['token_recall'])}, "
                         f"{o['bytes_loaded'] / 2**20:.2f} MiB loaded, stall {1e3 * o['stall_s']:.2f} ms, "
                         f"{o['read_by_caller']} loads read by the model's thread ({o['prefetches_read_by_caller']} "
                         f"of them predicted), peak {o['peak_bytes'] / 2**20:.2f} MiB")
            for layer in o["layers"]:
                lines.append(f"  {layer['name']}: hit rate {pct(layer['hit_rate'])} "
                             f"(loaded {pct(layer['ready_rate'])}), "
                             f"recall {pct(layer['prediction_recall'])}, {layer['bytes_loaded'] / 2**10:.0f} KiB loaded, "
                             f"stall {1e3 * layer['stall_s']:.2f} ms")
        if self.expert_bytes_per_rank:
            lines.append("expert bytes per rank: " + ", ".join(
                f"rank {r}: {b / 2**20:.2f} MiB" for r, b in enumerate(self.expert_bytes_per_rank)))
        if self.expert_bytes_held >= 0:
            lines.append(f"expert bytes held by this rank after the compile: {self.expert_bytes_held / 2**20:.2f} MiB")
        return "\n".join(lines)

    __repr__ = __str__


_COLLECTORS: list = []
_KNOWN_NAMES: list = []  # stack of {id(tensor): "model.layers.0.mlp.gate.weight"} while explaining


def known_tensor_names() -> dict:
    return _KNOWN_NAMES[-1] if _KNOWN_NAMES else {}


@contextlib.contextmanager
def known_tensor_names_for(model):
    """While active, the backend names parameters by the model's own names (absolute paths)."""
    names = {}
    if isinstance(model, torch.nn.Module):
        names = {id(t): n for n, t in list(model.named_parameters()) + list(model.named_buffers())}
    _KNOWN_NAMES.append(names)
    try:
        yield
    finally:
        _KNOWN_NAMES.pop()


@contextlib.contextmanager
def collect_records():
    """Collect the CompileRecords the backend produces while the block runs."""
    records: list = []
    _COLLECTORS.append(records)
    try:
        yield records
    finally:
        _COLLECTORS.remove(records)


def publish(record: CompileRecord) -> None:
    for c in _COLLECTORS:
        c.append(record)


def explain(model, *example_inputs, **options) -> ExplainReport:
    """Compile `model` (a module or function) once with backend "moe" and report what happened.

    Keyword options are backend options (see moe_compiler.config.BackendConfig), e.g. dump_dir=...
    """
    from torch._dynamo.backends.debugging import ExplainWithBackend

    from moe_compiler.backend import moe_backend
    from moe_compiler.runtime import offload

    torch._dynamo.reset()
    store = None
    if offload.normalize_options(options.get("offload")) is not None:
        given = options["offload"] if isinstance(options["offload"], dict) else {}
        # explaining must not free the caller's weights unless asked to
        options = dict(options, offload={"release_parameters": False, **given})
        _, store = offload.store_for(offload.normalize_options(options["offload"]))
        store.reset_stats()

    def backend(gm, inputs):
        return moe_backend(gm, inputs, options=options)

    eb = ExplainWithBackend(backend)
    with known_tensor_names_for(model), collect_records() as records, torch.no_grad():
        torch.compile(model, backend=eb)(*example_inputs)
    out = eb.output()
    torch._dynamo.reset()
    passes = [dict(graph_id=r.graph_id, name=p.name, changed=p.changed, counters=p.counters, seconds=p.seconds)
              for r in records for p in r.passes]
    return ExplainReport(
        graphs=list(out.graphs),
        graph_count=out.graph_count,
        graph_break_count=out.graph_break_count,
        break_reasons=list(out.break_reasons),
        passes=passes,
        moe_layers=[m for r in records for m in r.moe_layers],
        dump_dirs=[r.dump_dir for r in records if r.dump_dir],
        fallbacks=[f"{r.graph_id}: {r.fallback_reason}" for r in records if r.fallback_reason],
        expert_bytes_per_rank=_expert_bytes(model, options),
        expert_bytes_held=_held_bytes(model, options),
        offload=store.stats() if store is not None else {},
    )


def _held_bytes(model, options: dict) -> int:
    from moe_compiler.runtime.expert_parallel import expert_bytes_held, normalize_options

    if normalize_options(options.get("expert_parallel")) is None or not isinstance(model, torch.nn.Module):
        return -1
    return expert_bytes_held(model)


def _expert_bytes(model, options: dict) -> list:
    """Per-rank expert weight bytes under the expert_parallel option's placement ([] when EP is off)."""
    from moe_compiler.runtime.expert_parallel import expert_bytes_per_rank, load_placement, normalize_options

    opts = normalize_options(options.get("expert_parallel"))
    if opts is None or not isinstance(model, torch.nn.Module):
        return []
    placement = load_placement(opts["placement"])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        group = opts["group"]
        if isinstance(group, str):
            from moe_compiler.codegen.comm.executor import resolve_group

            group = resolve_group(group)
        ranks = torch.distributed.get_world_size(group)
    else:
        ranks = placement.num_ranks if placement is not None else 1
    return expert_bytes_per_rank(model, placement, ranks)
