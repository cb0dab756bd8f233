"""FSSDP runtime: Hecate's heterogeneous sharding (re-own experts by load) and moving shards between ranks.

    loads = layer_loads()                                   # {layer: [E] windowed global loads} seen by fssdp_moe
    placement = plan_owners(loads_matrix [L, E], num_ranks, ranks_per_node=None, top_t=0)
    reshard(model, optimizer, placement, group=None)        # collective: every rank calls it

``plan_owners`` follows Hecate's heterogeneous sharding: per layer the top-t experts by load (the
ones sparse materialisation replicates anyway) are placed last, into slots reserved for them spread
over the nodes; the other experts are placed layer
by layer, starting with the layer whose heaviest expert is heaviest, heaviest expert first, each on
the least-loaded node and then the least-loaded rank of that node that has a free slot (slots per
rank and layer: ceil(E / G), so every rank keeps the same number of experts when G divides E);
the top-t experts take the remaining slots.

``reshard`` moves each sharded expert parameter (left by ``shard_experts``) and its optimizer state
rows (tensors shaped like the parameter, e.g. Adam's exp_avg / exp_avg_sq) from the old owners to
the new ones with all_to_all_single, in place (``param.data`` is replaced, so the optimizer keeps
its keys), and tells compiled ``fssdp_moe`` ops the new owners (no recompile when shapes stay).
Call it between optimizer steps, never between a forward and its backward.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from moe_compiler.runtime.expert_parallel import EXPERT_PARAM_NAMES, _rows_for, expert_modules, load_placement

# layer path -> owners per expert, set by reshard(); fssdp_moe ops use it instead of their plan's owners
_OWNERS: dict = {}


def owners_override(layer: str):
    """The owners reshard() gave the layer at ``layer`` (a spec path), or None."""
    if not _OWNERS or not layer:
        return None
    for path, owners in _OWNERS.items():
        if layer == path or layer.startswith(path + ".") or path.startswith(layer + "."):
            return owners
    return None


def clear_owners() -> None:
    _OWNERS.clear()


def layer_loads() -> dict:
    """{layer path: [E] float64} the windowed global per-expert loads FSSDP layers observed."""
    from moe_compiler.codegen.comm import fssdp

    return fssdp.windowed_loads()


def plan_owners(loads, num_ranks: int, ranks_per_node: int | None = None, top_t: int = 0, metadata=None):
    """Hecate heterogeneous sharding: one owner per expert per layer from loads [L, E] -> Placement."""
    from moe_compiler.passes.placement import Placement

    loads = np.asarray(loads, dtype=float)
    if loads.ndim != 2 or loads.shape[1] < 1:
        raise ValueError(f"plan_owners: loads must be [layers, experts], got shape {loads.shape}")
    if np.any(~np.isfinite(loads)) or np.any(loads < 0):
        raise ValueError("plan_owners: loads must be finite and non-negative")
    G = int(num_ranks)
    if G < 1:
        raise ValueError(f"plan_owners: num_ranks must be >= 1, got {num_ranks}")
    M = int(ranks_per_node or G)
    if G % M:
        raise ValueError(f"plan_owners: ranks_per_node={M} must divide num_ranks={G}")
    L, E = loads.shape
    t = max(0, min(int(top_t), E))
    slots = math.ceil(E / G)
    owners = np.full((L, E), -1, dtype=int)
    used = np.zeros((L, G), dtype=int)
    layer_load = np.zeros((L, G))
    total_load = np.zeros(G)

    # the top-t experts' slots are reserved up front, spread over nodes first, so they do not all
    # land on whichever rank the other experts left free
    spread = [n * M + j for j in range(M) for n in range(G // M)]
    reserved = np.zeros(G, dtype=int)
    for i in range(t):
        reserved[spread[i % G]] += 1

    def place(l: int, e: int, cap) -> int:
        free = [r for r in range(G) if used[l, r] < cap[r]]
        node_load = {n: sum(layer_load[l, r] for r in range(n * M, (n + 1) * M)) for n in {r // M for r in free}}
        node = min(node_load, key=lambda n: (node_load[n], n))
        rank = min((r for r in free if r // M == node), key=lambda r: (layer_load[l, r], total_load[r], used[l, r], r))
        owners[l, e] = rank
        used[l, rank] += 1
        layer_load[l, rank] += loads[l, e]
        total_load[rank] += loads[l, e]
        return rank

    order = [np.argsort(-loads[l], kind="stable") for l in range(L)]
    # a reserved slot counts as the mean top-t load until its expert arrives, so heavy experts avoid it
    virtual = np.array([loads[l, order[l][:t]].mean() if t else 0.0 for l in range(L)])
    layer_load += virtual[:, None] * reserved[None, :]
    full = np.full(G, slots)
    for l in sorted(range(L), key=lambda l: -loads[l].max()):
        for e in order[l][t:]:
            place(l, int(e), np.maximum(full - reserved, 0))
    for l in range(L):
        left = reserved.copy()
        for e in order[l][:t]:
            rank = place(l, int(e), used[l] + left)
            left[rank] -= 1
            layer_load[l, rank] -= virtual[l]
    meta = {"method": "hecate_heterogeneous_sharding", "top_t": t, **dict(metadata or {})}
    return Placement(G, [[(int(o),) for o in owners[l]] for l in range(L)], meta)


def _move_rows(t: torch.Tensor, old: list, new: list, rank: int, group) -> torch.Tensor:
    """Rows of this rank's experts under ``old`` (ascending expert order) -> rows under ``new``."""
    import torch.distributed as dist

    G = dist.get_world_size(group)
    mine_old = [e for e, o in enumerate(old) if o == rank]
    send_order = [e for r in range(G) for e in mine_old if new[e] == r]
    send_splits = [sum(1 for e in mine_old if new[e] == r) for r in range(G)]
    mine_new = [e for e, o in enumerate(new) if o == rank]
    recv_order = [e for r in range(G) for e in mine_new if old[e] == r]
    recv_splits = [sum(1 for e in mine_new if old[e] == r) for r in range(G)]
    pos = {e: i for i, e in enumerate(mine_old)}
    send = t.index_select(0, torch.tensor([pos[e] for e in send_order], dtype=torch.int64, device=t.device))
    got = t.new_empty((len(recv_order),) + tuple(t.shape[1:]))
    dist.all_to_all_single(got, send.contiguous(), recv_splits, send_splits, group=group)
    where = {e: i for i, e in enumerate(recv_order)}
    return got.index_select(0, torch.tensor([where[e] for e in mine_new], dtype=torch.int64, device=t.device))


def reshard(model: torch.nn.Module, optimizer, placement, group=None) -> dict:
    """Give every sharded expert module the owners of ``placement``; returns {path: experts moved}."""
    import torch.distributed as dist

    placement = load_placement(placement)
    G, rank = dist.get_world_size(group), dist.get_rank(group)
    moved = {}
    for i, (path, mod) in enumerate(expert_modules(model)):
        local = getattr(mod, "_moe_compiler_local_experts", None)
        E = getattr(mod, "_moe_compiler_num_experts", None)
        if local is None or E is None:
            raise ValueError(f"reshard: expert module {path} is not sharded; call moe_compiler.shard_experts first")
        old = owners_override(path) or _owners_of(local, E, rank, group)
        rows = _rows_for(placement, i, path, E, G)
        if any(len(r) != 1 for r in rows):
            raise ValueError(f"reshard: the placement gives some experts of {path} several ranks; FSSDP needs one owner")
        new = [r[0] for r in rows]
        for n, p in mod.named_parameters(recurse=False):
            if n not in EXPERT_PARAM_NAMES:
                continue
            state = optimizer.state.get(p, {}) if optimizer is not None else {}
            for key, val in list(state.items()):
                if isinstance(val, torch.Tensor) and val.shape == p.shape and val.dim() >= 1:
                    state[key] = _move_rows(val, old, new, rank, group)
            p.data = _move_rows(p.data, old, new, rank, group)
        mod._moe_compiler_local_experts = tuple(e for e in range(E) if new[e] == rank)
        _OWNERS[path] = tuple(new)
        moved[path] = sum(1 for a, b in zip(old, new) if a != b)
    return moved


def _owners_of(local, num_experts: int, rank: int, group) -> list:
    """Every rank's local experts -> owner per expert (collective)."""
    import torch.distributed as dist

    mask = torch.zeros(num_experts, dtype=torch.int64)
    mask[list(local)] = 1
    parts = [torch.empty_like(mask) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mask, group=group)
    owners = [-1] * num_experts
    for r, m in enumerate(parts):
        for e in torch.nonzero(m).flatten().tolist():
            if owners[e] != -1:
                raise ValueError(f"reshard: expert {e} is held by ranks {owners[e]} and {r}; FSSDP needs one owner")
            owners[e] = r
    if -1 in owners:
        raise ValueError(f"reshard: experts {[e for e, o in enumerate(owners) if o == -1]} have no owner")
    return owners
