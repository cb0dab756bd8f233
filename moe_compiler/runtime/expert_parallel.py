"""Expert-parallel runtime helpers: the ``expert_parallel`` option, placements, weight sharding.

    options={"expert_parallel": True}                          # group = world, mode "all_to_all",
                                                               # contiguous placement
    options={"expert_parallel": {"group": pg,                  # a ProcessGroup, its name, or None (world)
                                 "mode": "all_to_all",         # or "hierarchical" (intra- then inter-node),
                                                               # "coherent" (ExFlow: one dispatch all-to-all
                                                               # per layer along chains of MoE layers joined
                                                               # by per-token ops), "auto" (cost model)
                                 "ranks_per_node": 2,          # hierarchical only: ranks of one node
                                 "placement": "plan.json",     # or a Placement object; default contiguous
                                 "overlap_degree": 1,          # token chunks per layer (Tutel), or "auto":
                                                               # the cost model's overlap_degree decision
                                 "movement": "tokens",         # or "weights" (FSSDP, Hecate) or "auto"
                                 "collectives": "functional",  # all_to_all / hierarchical layers as
                                                               # functional collectives in the graph
                                                               # (codegen/comm/functional.py); or "op": one
                                                               # ep_moe op per layer, run by the executor
                                                               # (which records traffic). Coherent chains
                                                               # and FSSDP always run as their ops.
                                 "release_parameters": True}}  # inference graphs: keep only this rank's
                                                               # expert rows, free the module's whole tensors
                                                               # (runtime/ep_weights.py); False for a model
                                                               # that is also trained
    FSSDP keys (movement "weights" or "auto"; codegen/comm/fssdp.py):
        "materialize": "needed"      # gather every expert a rank's tokens use; "sparse": only the
                                     # top-`replicate` by windowed load, other tokens go to the owner
        "replicate": "auto"          # "sparse": experts gathered per iteration (int, or the cost
                                     # model's replicas decision)
        "rematerialize": False       # free gathered experts after forward, gather again for backward
        "load_window": 5             # "sparse": iterations in the sliding load average
    With movement "weights" the placement gives each expert's one owner (default contiguous).

    shard_experts(model, placement=None, group=None)  -> bytes kept   # keep only this rank's expert rows
    expert_bytes_per_rank(model, placement=None, num_ranks=None) -> [bytes of rank 0, ...]
    expert_bytes_held(model) -> bytes of expert weights this process holds (kept rows + whole tensors)
"""
from __future__ import annotations

import math
import os

import torch

MODES = ("all_to_all", "hierarchical", "coherent")
KEYS = ("group", "mode", "placement", "ranks_per_node", "overlap_degree", "movement", "materialize", "replicate",
        "rematerialize", "load_window", "release_parameters", "collectives")
COLLECTIVES = ("functional", "op")   # functional collectives in the graph | ep_moe op with the schedule executor
MOVEMENTS = ("tokens", "weights", "auto")
MATERIALIZE = ("needed", "sparse")
FSSDP_KEYS = ("materialize", "replicate", "rematerialize", "load_window")
# parameter names of stacked expert weights [E, ...] (MoELayer and transformers 5 experts modules)
EXPERT_PARAM_NAMES = ("gate_up_proj", "down_proj", "up_proj", "gate_proj", "gate_up_proj_bias", "down_proj_bias")


def normalize_options(value):
    """The option as given (True/False/None/dict) -> None (off) or a checked dict with every key.

    Raises moe_compiler.config.ConfigError naming the bad key and the accepted values.
    """
    from moe_compiler.config import ConfigError

    if value is None or value is False:
        return None
    if value is True:
        value = {}
    if not isinstance(value, dict):
        raise ConfigError(f"option 'expert_parallel' must be True, False or a dict with keys {list(KEYS)}, "
                          f"got {type(value).__name__}")
    bad = sorted(set(value) - set(KEYS))
    if bad:
        raise ConfigError(f"option 'expert_parallel' has unknown keys {bad}; accepted keys are {list(KEYS)}")
    out = {"group": value.get("group"), "mode": value.get("mode", "all_to_all"), "placement": value.get("placement"),
           "ranks_per_node": value.get("ranks_per_node"), "overlap_degree": value.get("overlap_degree", 1),
           "movement": value.get("movement", "tokens"), "materialize": value.get("materialize", "needed"),
           "replicate": value.get("replicate", "auto"), "rematerialize": value.get("rematerialize", False),
           "load_window": value.get("load_window", 5), "release_parameters": value.get("release_parameters", True)}
    out["collectives"] = value.get("collectives", "functional")
    if out["collectives"] not in COLLECTIVES:
        raise ConfigError(f"option expert_parallel['collectives'] must be one of {list(COLLECTIVES)}, got "
                          f"{out['collectives']!r}")
    if not isinstance(out["release_parameters"], bool):
        raise ConfigError(f"option expert_parallel['release_parameters'] must be True or False, got "
                          f"{out['release_parameters']!r}")
    _check_fssdp(out, value)
    if out["mode"] not in MODES + ("auto",):
        raise ConfigError(f"option expert_parallel['mode'] must be one of {list(MODES) + ['auto']}, got {out['mode']!r}")
    rpn = out["ranks_per_node"]
    if out["mode"] == "auto":  # per layer, the cost model's ep_mode decision (hierarchical needs ranks_per_node)
        if rpn is not None and (isinstance(rpn, bool) or not isinstance(rpn, int) or rpn < 1):
            raise ConfigError(f"option expert_parallel['ranks_per_node'] must be a positive int, got {rpn!r}")
    elif out["mode"] == "hierarchical":
        if isinstance(rpn, bool) or not isinstance(rpn, int) or rpn < 1:
            raise ConfigError("option expert_parallel['ranks_per_node'] must be a positive int (ranks of one node) "
                              f"in mode 'hierarchical', got {rpn!r}")
    elif rpn is not None:
        raise ConfigError("option expert_parallel['ranks_per_node'] is only accepted with mode 'hierarchical'")
    od = out["overlap_degree"]
    if od != "auto" and (isinstance(od, bool) or not isinstance(od, int) or od < 1):
        raise ConfigError(f"option expert_parallel['overlap_degree'] must be an int >= 1 or 'auto', got {od!r}")
    g = out["group"]
    if g is not None and not isinstance(g, str) and not _is_process_group(g):
        raise ConfigError(f"option expert_parallel['group'] must be None (world), a ProcessGroup or its name, "
                          f"got {type(g).__name__}")
    p = out["placement"]
    if p is not None and not isinstance(p, (str, os.PathLike)) and type(p).__name__ != "Placement":
        raise ConfigError("option expert_parallel['placement'] must be a placement file path or a "
                          f"moe_compiler.passes.placement.Placement, got {type(p).__name__}")
    return out


def _check_fssdp(out: dict, given: dict) -> None:
    from moe_compiler.config import ConfigError

    if out["movement"] not in MOVEMENTS:
        raise ConfigError(f"option expert_parallel['movement'] must be one of {list(MOVEMENTS)} (tokens = expert "
                          f"parallelism, weights = FSSDP), got {out['movement']!r}")
    if out["movement"] == "tokens":
        extra = sorted(k for k in FSSDP_KEYS if k in given)
        if extra:
            raise ConfigError(f"option expert_parallel keys {extra} configure FSSDP; they need movement 'weights' "
                              "or 'auto' (movement is 'tokens')")
    if out["materialize"] not in MATERIALIZE:
        raise ConfigError("option expert_parallel['materialize'] must be 'needed' (gather every expert the tokens use) "
                          f"or 'sparse' (Hecate's sparse materialisation), got {out['materialize']!r}")
    r = out["replicate"]
    if r != "auto" and (isinstance(r, bool) or not isinstance(r, int) or r < 0):
        raise ConfigError(f"option expert_parallel['replicate'] must be 'auto' or an int >= 0, got {r!r}")
    if not isinstance(out["rematerialize"], bool):
        raise ConfigError(f"option expert_parallel['rematerialize'] must be True or False, got {out['rematerialize']!r}")
    w = out["load_window"]
    if isinstance(w, bool) or not isinstance(w, int) or w < 1:
        raise ConfigError(f"option expert_parallel['load_window'] must be an int >= 1, got {w!r}")


def _is_process_group(g) -> bool:
    import torch.distributed as dist

    return dist.is_available() and isinstance(g, dist.ProcessGroup)


def load_placement(p):
    """A Placement from a Placement, a path, or None (None stays None)."""
    if p is None:
        return None
    from moe_compiler.passes.placement import Placement

    return p if isinstance(p, Placement) else Placement.load(p)


def contiguous_rows(num_experts: int, num_ranks: int) -> tuple:
    """Megatron's contiguous placement: expert e on rank e * R // E (blocks differ by at most one)."""
    return tuple(((e * num_ranks) // num_experts,) for e in range(num_experts))


def check_rows(rows, num_experts: int, num_ranks: int, where: str) -> tuple:
    rows = tuple(tuple(int(r) for r in ranks) for ranks in rows)
    if len(rows) != num_experts:
        raise ValueError(f"{where}: the placement lists {len(rows)} experts, the layer has {num_experts}")
    for e, ranks in enumerate(rows):
        if not ranks or any(not 0 <= r < num_ranks for r in ranks):
            raise ValueError(f"{where}: expert {e} is placed on ranks {list(ranks)}; need at least one rank in "
                             f"[0, {num_ranks}) (the expert-parallel group size)")
    return rows


def expert_modules(model: torch.nn.Module) -> list:
    """(path, module) of every module holding stacked expert weights, in module order."""
    out = []
    for path, mod in model.named_modules():
        names = [n for n, p in mod.named_parameters(recurse=False) if n in EXPERT_PARAM_NAMES and p.dim() >= 2]
        if names:
            out.append((path, mod))
    return out


def _rows_for(placement, i: int, path: str, num_experts: int, num_ranks: int) -> tuple:
    if placement is None:
        return contiguous_rows(num_experts, num_ranks)
    names = list(placement.metadata.get("layer_names", ())) if isinstance(placement.metadata, dict) else []
    idx = next((j for j, n in enumerate(names) if n and (path == n or path.startswith(n + "."))), i)
    if idx >= placement.num_layers:
        raise ValueError(f"the placement has {placement.num_layers} layers; expert module {i} ({path}) has none")
    return check_rows(placement.layers[idx], num_experts, num_ranks, f"placement layer {idx} ({path})")


def expert_bytes_per_rank(model: torch.nn.Module, placement=None, num_ranks: int | None = None) -> list:
    """Bytes of expert weights each rank holds under a placement (default contiguous over num_ranks).

    Counts whole experts (a replica costs a full copy); works on whole and on sharded models."""
    placement = load_placement(placement)
    R = int(num_ranks or (placement.num_ranks if placement is not None else 1))
    per = [0] * R
    for i, (path, mod) in enumerate(expert_modules(model)):
        params = [p for n, p in mod.named_parameters(recurse=False) if n in EXPERT_PARAM_NAMES]
        E = getattr(mod, "_moe_compiler_num_experts", params[0].shape[0])  # sharded modules remember E
        rows = _rows_for(placement, i, path, E, R)
        row_bytes = sum(math.prod(p.shape[1:]) * p.element_size() for p in params)
        for ranks in rows:
            for r in ranks:
                per[r] += row_bytes
    return per


def expert_bytes_held(model: torch.nn.Module) -> int:
    """Bytes of expert weights this process holds for `model`: its expert tensors that are not released,
    plus the rows expert parallelism kept for released ones (runtime/ep_weights.py)."""
    from moe_compiler.runtime import ep_weights

    held = 0
    for _, mod in expert_modules(model):
        for n, p in mod.named_parameters(recurse=False):
            if n in EXPERT_PARAM_NAMES:
                whole = p.numel() * p.element_size() if p.untyped_storage().nbytes() else 0  # released: nothing
                held += whole + (ep_weights.kept_bytes(p) if ep_weights.is_released(p) else 0)
    return held


def shard_experts(model: torch.nn.Module, placement=None, group=None) -> int:
    """Keep only this rank's expert rows: each stacked [E, ...] expert parameter becomes [E_local, ...]
    (this rank's experts in ascending order), the rest is freed. Returns the expert bytes kept.

    Use with ``options={"expert_parallel": {..., "placement": <the same placement>}}``: the ep_moe op
    accepts the local rows. This is for training: only layers that call the moe op themselves
    (``moe_compiler.MoELayer``) run sharded, since detection proves a transformers layer against its
    whole tensors. For inference no call is needed: an inference compile with expert parallelism
    keeps this rank's rows and releases the whole tensors itself (option ``release_parameters``).
    """
    import torch.distributed as dist

    placement = load_placement(placement)
    R = dist.get_world_size(group)
    rank = dist.get_rank(group)
    kept = 0
    for i, (path, mod) in enumerate(expert_modules(model)):
        names = [n for n, p in mod.named_parameters(recurse=False) if n in EXPERT_PARAM_NAMES]
        E = getattr(mod, names[0]).shape[0]
        rows = _rows_for(placement, i, path, E, R)
        local = [e for e, ranks in enumerate(rows) if rank in ranks]
        for n in names:
            p = getattr(mod, n)
            if p.shape[0] != E:
                raise ValueError(f"{path}.{n} has {p.shape[0]} rows, {names[0]} has {E}: already sharded?")
            new = torch.nn.Parameter(p.detach()[local].clone(), requires_grad=p.requires_grad)
            setattr(mod, n, new)
            kept += new.numel() * new.element_size()
        mod._moe_compiler_local_experts = tuple(local)
        mod._moe_compiler_num_experts = E
    return kept
