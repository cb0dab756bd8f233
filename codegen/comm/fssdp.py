"""Fully sharded sparse data parallelism (Hecate): move expert weights to the tokens, not tokens to experts.

Every expert of a layer has one owner rank in the group (its parameters, gradients and optimizer
state live there only). A chunk is one expert's parameters flattened: [w1[e], w3[e], w2[e], b1[e],
b3[e], b2[e]] -> C elements. Per iteration, on every rank of the group:

    ids [T, k]      = top-k routing of this rank's tokens, locally
    counts [G, E]   = all_gather(per-expert slot counts)                      "exchange_loads"
    need [G, E]     = materialisation placement P1 minus the owners (int64 0/1, the same on every rank)
                      "needed": every expert a rank's tokens use            (tokens never move)
                      "sparse": Hecate's sparse materialisation: only the top-`replicate` experts by
                                load (sliding window over `load_window` iterations) are gathered to the
                                ranks that use them; other slots go to the expert's owner by all-to-all
    gathered [M, C] = sparse_all_gather(shard [E_own, C], need)              one all_to_all_single with
                      splits from need (no counts exchange): owner o sends chunk e to each r with need[r, e]
    y [T, H]        = local grouped experts on owned + gathered experts (+ routed slots in "sparse"),
                      fp32 weighted combine, like the single-process op

Backward: the gather's backward is ``sparse_reduce_scatter`` (each owner receives the sum of its
chunk's gradient copies, added to its own), both torch.library ops paired by register_autograd.
With ``rematerialize`` the gathered chunks are dropped after forward and gathered again for
backward (the saved ``need`` replays the same placement); otherwise they are saved.

Bytes moved by one gather = sum(need) * chunk bytes over the group (recorded per step by
``executor.record_traffic`` as "sparse_all_gather" / "sparse_reduce_scatter").
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import math
import weakref
from dataclasses import dataclass

import torch

from moe_compiler import recording
from moe_compiler.codegen.comm import executor
from moe_compiler.ir import MoESpec, _spec, differentiable, grads_by_recompute, operand_grads
from moe_compiler.runtime import ep_weights

NOTE = "fssdp"
_WEIGHTS = ("w1", "w3", "w2", "b1", "b3", "b2")
_OPERANDS = ("hidden", "router_logits", "score_bias") + _WEIGHTS


@dataclass(frozen=True)
class FSSDPPlan:
    """One layer's FSSDP plan, as the spec note stores it."""

    group: str                   # process group name ("world" = default group)
    owners: tuple                # per expert: its owner's rank in the group
    materialize: str = "needed"  # "needed" | "sparse"
    replicate: int = 0           # "sparse": experts gathered per iteration (top by windowed load)
    rematerialize: bool = False  # free gathered experts after forward, gather again for backward
    load_window: int = 5         # "sparse": iterations in the sliding load average
    layer: str = ""              # key of the layer's load window

    def to_json(self) -> str:
        return json.dumps({"group": self.group, "owners": list(self.owners), "materialize": self.materialize,
                           "replicate": self.replicate, "rematerialize": self.rematerialize,
                           "load_window": self.load_window, "layer": self.layer}, sort_keys=True)

    @staticmethod
    def from_json(text: str) -> "FSSDPPlan":
        d = json.loads(text)
        return FSSDPPlan(d["group"], tuple(int(o) for o in d["owners"]), d["materialize"], int(d["replicate"]),
                         bool(d["rematerialize"]), int(d["load_window"]), d.get("layer", ""))

    def owned(self, rank: int) -> list:
        return [e for e, o in enumerate(self.owners) if o == rank]


_PLANS: dict = {}


def plan_of(spec_or_text) -> FSSDPPlan:
    """The FSSDP plan of a spec (its ("fssdp", json) note) or of the note's JSON text."""
    if isinstance(spec_or_text, str):
        text = spec_or_text
    else:
        text = spec_or_text.note(NOTE)
        if text is None:
            raise ValueError(f"fssdp_moe: spec of {spec_or_text.path or 'the layer'} has no {NOTE!r} note")
    p = _PLANS.get(text)
    if p is None:
        p = _PLANS[text] = FSSDPPlan.from_json(text)
    return p


def with_current_owners(plan: FSSDPPlan) -> FSSDPPlan:
    """The plan with the owners moe_compiler.runtime.fssdp.reshard() last gave its layer, if any."""
    from moe_compiler.runtime.fssdp import owners_override

    owners = owners_override(plan.layer)
    if owners is None or tuple(owners) == plan.owners:
        return plan
    return dataclasses.replace(plan, owners=tuple(owners))


def _hop(plan: FSSDPPlan) -> executor.Hop:
    return executor.world_hop(executor.resolve_group(plan.group))


# ------------------------------------------------------------------ chunks
def chunk_layout(weights: dict) -> list:
    """[(name, row shape, numel)] of the present expert operands, in chunk order."""
    return [(n, tuple(weights[n].shape[1:]), math.prod(weights[n].shape[1:])) for n in _WEIGHTS
            if weights[n] is not None]


def owned_weights(weights: dict, owned: list, num_experts: int) -> dict:
    """Each present weight's owned rows [E_own, ...] (the weight itself when it is this rank's shard).

    Each weight is either all experts [E, ...] (owned rows are selected) or this rank's shard
    [E_own, ...] in ascending expert order (what ``shard_experts`` leaves)."""
    present = {n: weights[n] for n in _WEIGHTS if weights[n] is not None}
    if len({w.dtype for w in present.values()}) > 1:
        raise ValueError(f"fssdp: expert weights must share one dtype to form chunks, got "
                         f"{ {n: str(w.dtype) for n, w in present.items()} }")
    out = {}
    for n, w in present.items():
        ep_weights.check_not_released(w, f"fssdp weight {n}")
        if w.shape[0] == num_experts and len(owned) != num_experts:
            w = w.index_select(0, torch.tensor(owned, dtype=torch.int64, device=w.device))
        elif w.shape[0] != len(owned):
            raise ValueError(f"fssdp: expert weight {n} has {w.shape[0]} rows; expected {num_experts} (all experts) "
                             f"or {len(owned)} (this rank's owned experts {owned})")
        out[n] = w
    return out


def layer_owned_weights(weights: dict, owned: list, spec: MoESpec) -> dict:
    """owned_weights, or the rows an inference compile kept on this rank (spec note ("ep_weights", key);
    the module's whole tensors are then released)."""
    key = spec.note(ep_weights.NOTE)
    if key is None:
        return owned_weights(weights, owned, spec.num_experts)
    kept = list(ep_weights.experts_of(key))
    if kept != list(owned):
        raise ep_weights.ReleasedWeightsError(
            f"fssdp: {spec.path or 'a layer'} owns experts {owned} on this rank now, but its inference compile kept "
            f"only experts {kept} here and released the rest (runtime.fssdp.reshard moved the owners since). "
            "Compile with expert_parallel release_parameters False to reshard in inference")
    return {n: r for n, r in zip(ep_weights.WEIGHT_NAMES, ep_weights.rows(key)) if weights[n] is not None}


def chunks_of(rows: dict) -> torch.Tensor:
    """{name: [n, ...]} in chunk order -> [n, C] (a copy; differentiable in the rows)."""
    return torch.cat([w.reshape(w.shape[0], math.prod(w.shape[1:])) for w in rows.values()], 1)


def shard_chunks(weights: dict, owned: list, num_experts: int) -> torch.Tensor:
    """The owned experts' parameters as chunks [E_own, C] (differentiable in the weights)."""
    return chunks_of(owned_weights(weights, owned, num_experts))


class ExpertRows:
    """Per-expert weights that index like a stacked [n, ...] weight, without stacking them (no copy).

    experts_forward reads ``w[e]``, ``shape``, ``dtype``, ``device`` and ``unbind(0)``."""

    _version = 0  # a fresh object per call: the prepacking cache never packs it

    def __init__(self, rows: list, row_shape, dtype, device):
        self.rows = rows
        self.shape = torch.Size((len(rows),) + tuple(row_shape))
        self.dtype, self.device = dtype, device

    def __getitem__(self, e):
        return self.rows[e]

    def unbind(self, dim: int = 0):
        return tuple(self.rows)


def local_expert_weights(owned_rows: dict, gathered: torch.Tensor, layout: list) -> list:
    """The six operands over this rank's local experts (owned, then gathered) as ExpertRows (None where absent)."""
    got = dict(zip(_WEIGHTS, unchunk(gathered, layout)))
    out = []
    for n in _WEIGHTS:
        w = owned_rows.get(n)
        if w is None:
            out.append(None)
            continue
        out.append(ExpertRows(list(w.unbind(0)) + list(got[n].unbind(0)), w.shape[1:], w.dtype, w.device))
    return out


def unchunk(rows: torch.Tensor, layout: list) -> list:
    """Chunks [n, C] -> the six expert operands [n, *shape] (None where absent)."""
    out, start = {}, 0
    for name, shape, numel in layout:
        out[name] = rows[:, start:start + numel].reshape((rows.shape[0],) + shape)
        start += numel
    return [out.get(n) for n in _WEIGHTS]


def gathered_experts(need: torch.Tensor, plan: FSSDPPlan, rank: int) -> list:
    """Experts this rank receives, in the gather's row order (by owner rank, then expert id)."""
    mine = need[rank].tolist()
    return [e for o in range(need.shape[0]) for e in plan.owned(o) if mine[e]]


def _gather_splits(need: torch.Tensor, plan: FSSDPPlan, rank: int):
    """(send row indices into the shard, send splits [G], recv splits [G]) of one sparse all-gather."""
    G = need.shape[0]
    rows = need.tolist()
    owned = plan.owned(rank)
    send_idx, send_splits = [], []
    for r in range(G):
        picked = [i for i, e in enumerate(owned) if rows[r][e]]
        send_idx += picked
        send_splits.append(len(picked))
    recv_splits = [sum(rows[rank][e] for e in plan.owned(o)) for o in range(G)]
    return send_idx, send_splits, recv_splits


# ------------------------------------------------------------------ SparseAllGather / SparseReduceScatter
def sparse_all_gather_impl(shard: torch.Tensor, need: torch.Tensor, plan: FSSDPPlan) -> torch.Tensor:
    hop = _hop(plan)
    send_idx, send_splits, recv_splits = _gather_splits(need, plan, hop.rank)
    send = shard.index_select(0, torch.tensor(send_idx, dtype=torch.int64, device=shard.device))
    out = shard.new_empty((sum(recv_splits), shard.shape[1]))
    executor._a2a(out, send, recv_splits, send_splits, hop, f"{plan.layer}:sparse_all_gather")
    executor.note_traffic(plan.layer, "sparse_all_gather", hop, send_splits, recv_splits, executor._row_bytes(shard))
    return out


def sparse_reduce_scatter_impl(grad: torch.Tensor, need: torch.Tensor, plan: FSSDPPlan) -> torch.Tensor:
    hop = _hop(plan)
    send_idx, send_splits, recv_splits = _gather_splits(need, plan, hop.rank)
    back = grad.new_empty((sum(send_splits), grad.shape[1]))
    executor._a2a(back, grad.contiguous(), send_splits, recv_splits, hop, f"{plan.layer}:sparse_reduce_scatter")
    executor.note_traffic(plan.layer, "sparse_reduce_scatter", hop, recv_splits, send_splits, executor._row_bytes(grad))
    out = grad.new_zeros((len(plan.owned(hop.rank)), grad.shape[1]))
    # accumulate in fp32: an owner sums up to G-1 copies
    acc = out.float().index_add_(0, torch.tensor(send_idx, dtype=torch.int64, device=grad.device), back.float())
    return acc.to(grad.dtype)


_LIB = torch.library.Library("moe_compiler", "FRAGMENT")
_LIB.define("sparse_all_gather(Tensor shard, Tensor need, str plan) -> Tensor")
_LIB.define("sparse_reduce_scatter(Tensor grad, Tensor need, str plan) -> Tensor")


@torch.library.impl(_LIB, "sparse_all_gather", "CompositeExplicitAutograd")
def _sparse_all_gather(shard, need, plan):
    return sparse_all_gather_impl(shard, need, plan_of(plan))


@torch.library.impl(_LIB, "sparse_reduce_scatter", "CompositeExplicitAutograd")
def _sparse_reduce_scatter(grad, need, plan):
    return sparse_reduce_scatter_impl(grad, need, plan_of(plan))


@torch.library.register_fake("moe_compiler::sparse_all_gather")
def _sparse_all_gather_fake(shard, need, plan):
    return shard.new_empty((torch.library.get_ctx().new_dynamic_size(), shard.shape[1]))


@torch.library.register_fake("moe_compiler::sparse_reduce_scatter")
def _sparse_reduce_scatter_fake(grad, need, plan):
    p = plan_of(plan)
    return grad.new_empty((len(p.owned(_hop(p).rank)), grad.shape[1]))


def _save_need(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])
    ctx.plan = inputs[2]


def _gather_backward(ctx, grad):
    (need,) = ctx.saved_tensors
    return torch.ops.moe_compiler.sparse_reduce_scatter(grad.contiguous(), need, ctx.plan), None, None


def _reduce_scatter_backward(ctx, grad):
    (need,) = ctx.saved_tensors
    return torch.ops.moe_compiler.sparse_all_gather(grad.contiguous(), need, ctx.plan), None, None


torch.library.register_autograd("moe_compiler::sparse_all_gather", _gather_backward, setup_context=_save_need)
torch.library.register_autograd("moe_compiler::sparse_reduce_scatter", _reduce_scatter_backward,
                                setup_context=_save_need)


class _SavedGather(torch.autograd.Function):
    """Chunks gathered in forward, reused in backward (no re-materialisation): the backward is still the
    sparse reduce-scatter to the owners."""

    @staticmethod
    def forward(ctx, shard, gathered, need, plan_json):
        ctx.save_for_backward(need)
        ctx.plan = plan_json
        return gathered.view_as(gathered)  # kept from a no_grad forward: a leaf without grad

    @staticmethod
    def backward(ctx, grad):
        (need,) = ctx.saved_tensors
        return torch.ops.moe_compiler.sparse_reduce_scatter(grad.contiguous(), need, ctx.plan), None, None, None


# ------------------------------------------------------------------ materialisation
class LoadWindow:
    """Sliding average of a layer's global per-expert loads over the last ``size`` iterations."""

    def __init__(self, size: int):
        self.loads = collections.deque(maxlen=max(1, int(size)))

    def update(self, load: torch.Tensor) -> torch.Tensor:
        self.loads.append(load.double())
        return torch.stack(list(self.loads)).mean(0)


_WINDOWS: dict = {}


def windowed_loads() -> dict:
    """{layer key: [E] float64 sliding-average global loads, or None before the first iteration}."""
    return {key[1]: (torch.stack(list(w.loads)).mean(0).numpy() if w.loads else None) for key, w in _WINDOWS.items()}


def load_window(plan: FSSDPPlan) -> LoadWindow:
    key = (plan.group, plan.layer, plan.load_window, len(plan.owners))  # layers may share a path across models
    w = _WINDOWS.get(key)
    if w is None:
        w = _WINDOWS[key] = LoadWindow(plan.load_window)
    return w



def materialisation(ids: torch.Tensor, plan: FSSDPPlan, hop: executor.Hop) -> torch.Tensor:
    """need [G, E] int64 for this iteration (identical on every rank: built from all-gathered counts)."""
    E, G = len(plan.owners), hop.size
    counts = torch.zeros(E, dtype=torch.int64, device=ids.device).scatter_add_(
        0, ids.reshape(-1), torch.ones(ids.numel(), dtype=torch.int64, device=ids.device))
    everyone = executor.all_gather_rows(counts.unsqueeze(0), hop, f"{plan.layer}:exchange_loads")  # [G, E]
    need = everyone > 0
    loads = load_window(plan).update(everyone.sum(0))  # also what heterogeneous sharding re-owns by
    if plan.materialize == "sparse":
        top = torch.argsort(-loads, stable=True)[:plan.replicate]
        chosen = torch.zeros(E, dtype=torch.bool, device=ids.device)
        chosen[top] = True
        need &= chosen.unsqueeze(0)
    owners = torch.tensor(plan.owners, dtype=torch.int64, device=ids.device)
    need &= owners.unsqueeze(0) != torch.arange(G, device=ids.device).unsqueeze(1)
    return need.to(torch.int64)


# ------------------------------------------------------------------ the layer
def fssdp_forward(hidden, router_logits, score_bias, weights: dict, spec: MoESpec, plan: FSSDPPlan, *,
                  need=None, gathered=None):
    """(out [T, H] hidden's dtype, need [G, E], gathered [M, C]) on this rank's tokens.

    need=None: decide the materialisation (collective); gathered=None: gather it (collective, via the
    autograd-paired op); a given gathered tensor is reused (its backward still reduce-scatters)."""
    from moe_compiler.codegen.comm.ep import _run_experts, combine, expert_rows, route_tokens

    E = spec.num_experts
    plan = with_current_owners(plan)
    if len(plan.owners) != E:
        raise ValueError(f"fssdp: the plan has owners for {len(plan.owners)} experts, the layer has {E}")
    x, ids, gate_w = route_tokens(hidden, router_logits, score_bias, spec)
    hop = _hop(plan)
    owned = plan.owned(hop.rank)
    owned_rows = layer_owned_weights(weights, owned, spec)
    shard = chunks_of(owned_rows)
    if need is None:
        with torch.no_grad():
            need = materialisation(ids, plan, hop)
    plan_json = plan.to_json()
    if gathered is None:
        gathered = torch.ops.moe_compiler.sparse_all_gather(shard, need, plan_json)
    else:
        gathered = _SavedGather.apply(shard, gathered, need, plan_json)
    layout = chunk_layout(weights)
    local = owned + gathered_experts(need, plan, hop.rank)
    local_w = local_expert_weights(owned_rows, gathered, layout)
    local_index = torch.full((E,), -1, dtype=torch.int64, device=x.device)
    local_index[local] = torch.arange(len(local), dtype=torch.int64, device=x.device)
    rows, row_ids, gate_w = expert_rows(x, ids, gate_w, spec)   # Llama 4: a row x * w_j per slot
    flat = row_ids.reshape(-1)
    per_row = row_ids.shape[1]
    xs = rows if per_row == 1 else rows.index_select(
        0, torch.div(torch.arange(flat.numel(), device=x.device), per_row, rounding_mode="floor"))
    if plan.materialize == "needed":  # every used expert is here: tokens never move
        ys = _run_experts(xs, flat, local_w, local_index, spec)
    else:  # slots of experts not gathered here go to the owner and back (owners always hold theirs)
        owners = torch.tensor(plan.owners, dtype=torch.int64, device=x.device)
        dest = torch.where(local_index[flat] >= 0, torch.full_like(flat, hop.rank), owners[flat])
        (xr, er), route = executor.route_rows([xs, flat], dest, hop, layer=plan.layer, name="dispatch")
        yr = _run_experts(xr, er, local_w, local_index, spec)
        ys = executor.reverse_rows(yr, route, name="combine")
    out = combine(ys, gate_w, hidden)
    if torch.is_grad_enabled():  # a rank whose tokens use no expert still joins the backward reduce-scatter
        out = out + gathered.narrow(0, 0, 0).sum()
    return out, need, gathered


# ------------------------------------------------------------------ the op
# Gathered chunks kept from forward for backward (no re-materialisation), by handle. An entry goes
# when backward takes it or when the handle tensor dies (forward without backward); a missing entry
# only costs a second gather, so results never depend on it.
_KEPT: dict = {}
_NEXT_HANDLE = itertools.count()
kept_stats = collections.Counter()  # "kept", "reused", "regathered"

_LIB.define("fssdp_moe(Tensor hidden, Tensor router_logits, Tensor? score_bias, Tensor w1, Tensor? w3, Tensor w2, "
            "Tensor? b1, Tensor? b3, Tensor? b2, str spec) -> (Tensor, Tensor, Tensor)")
_LIB.define("fssdp_moe_backward(Tensor grad_out, Tensor hidden, Tensor router_logits, Tensor? score_bias, Tensor w1, "
            "Tensor? w3, Tensor w2, Tensor? b1, Tensor? b3, Tensor? b2, Tensor need, Tensor handle, str spec) "
            "-> Tensor[]")


def _weights(w1, w3, w2, b1, b3, b2) -> dict:
    return dict(zip(_WEIGHTS, (w1, w3, w2, b1, b3, b2)))


@torch.library.impl(_LIB, "fssdp_moe", "CompositeExplicitAutograd")
def _fssdp_moe(hidden, router_logits, score_bias, w1, w3, w2, b1, b3, b2, spec):
    """-> (out like hidden, need [G, E] int64, handle [1] int64 of the kept gathered chunks or -1)."""
    s = _spec(spec)
    plan = plan_of(s)
    recording.observe_logits(s, router_logits, score_bias)
    with torch.no_grad():
        out, need, gathered = fssdp_forward(hidden, router_logits, score_bias, _weights(w1, w3, w2, b1, b3, b2), s,
                                            plan)
    if plan.rematerialize:  # dropped now, gathered again in backward
        return out, need, torch.full((1,), -1, dtype=torch.int64)
    key = next(_NEXT_HANDLE)
    handle = torch.full((1,), key, dtype=torch.int64)
    _KEPT[key] = gathered
    weakref.finalize(handle, _KEPT.pop, key, None)
    kept_stats["kept"] += 1
    return out, need, handle


@torch.library.register_fake("moe_compiler::fssdp_moe")
def _fssdp_moe_fake(hidden, router_logits, score_bias, w1, w3, w2, b1, b3, b2, spec):
    s = _spec(spec)
    G = executor.dist.get_world_size(executor.resolve_group(plan_of(s).group))
    return (hidden.new_empty(hidden.shape), hidden.new_empty((G, s.num_experts), dtype=torch.int64),
            hidden.new_empty((1,), dtype=torch.int64))


@torch.library.impl(_LIB, "fssdp_moe_backward", "CompositeExplicitAutograd")
def _fssdp_moe_backward(grad_out, hidden, router_logits, score_bias, w1, w3, w2, b1, b3, b2, need, handle, spec):
    s = _spec(spec)
    plan = plan_of(s)
    key = int(handle.reshape(-1)[0])
    saved = _KEPT.pop(key, None) if key >= 0 else None
    kept_stats["reused" if saved is not None else "regathered"] += 1
    operands = dict(hidden=hidden, router_logits=router_logits, score_bias=score_bias, w1=w1, w3=w3, w2=w2, b1=b1,
                    b3=b3, b2=b2)

    def forward(hidden, router_logits, score_bias, w1, w3, w2, b1, b3, b2):
        return fssdp_forward(hidden, router_logits, score_bias, _weights(w1, w3, w2, b1, b3, b2), s, plan,
                             need=need, gathered=saved)[0]

    grads = grads_by_recompute(forward, operands, differentiable(s), grad_out, collective=True)
    # weight grads arrive as column slices of the chunk gradient: give them the operands' layout
    present = [operands[n] for n in differentiable(s) if operands[n] is not None]
    return [g if g.stride() == t.stride() else torch.empty_like(t).copy_(g) for g, t in zip(grads, present)]


@torch.library.register_fake("moe_compiler::fssdp_moe_backward")
def _fssdp_moe_backward_fake(grad_out, hidden, router_logits, score_bias, w1, w3, w2, b1, b3, b2, need, handle,
                             spec):
    operands = dict(hidden=hidden, router_logits=router_logits, score_bias=score_bias, w1=w1, w3=w3, w2=w2, b1=b1,
                    b3=b3, b2=b2)
    return [torch.empty_like(operands[n]) for n in differentiable(spec) if operands[n] is not None]


def _setup(ctx, inputs, output):
    ctx.present = [t is not None for t in inputs[:-1]]
    ctx.save_for_backward(*[t for t in inputs[:-1] if t is not None], output[1], output[2])
    ctx.spec = inputs[-1]


def _backward(ctx, grad_out, _grad_need, _grad_handle):
    *saved, need, handle = ctx.saved_tensors
    saved = iter(saved)
    operands = [next(saved) if p else None for p in ctx.present]
    grads = torch.ops.moe_compiler.fssdp_moe_backward(grad_out.contiguous(), *operands, need, handle, ctx.spec)
    return operand_grads(operands, grads, differentiable(ctx.spec), _OPERANDS)


torch.library.register_autograd("moe_compiler::fssdp_moe", _backward, setup_context=_setup)

FSSDP_MOE_OP = torch.ops.moe_compiler.fssdp_moe.default
executor.runs_collectives(FSSDP_MOE_OP, torch.ops.moe_compiler.fssdp_moe_backward.default,
                          torch.ops.moe_compiler.sparse_all_gather.default,
                          torch.ops.moe_compiler.sparse_reduce_scatter.default)
