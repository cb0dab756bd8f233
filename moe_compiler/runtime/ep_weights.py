"""The expert rows a rank keeps under expert parallelism; the module's whole expert tensors are released.

An inference graph compiled with ``expert_parallel`` reads only this rank's experts (its placement's
under expert parallelism, the experts it owns under FSSDP, which gathers the others). sparse_collectives
copies those rows into a process-wide table (``keep``: [E_local, ...] per weight, ascending expert
order), names them in the layer's spec note ("ep_weights", key), and once the graph is compiled frees
the module's whole tensors (``release``: storage resized to 0; shape, dtype and identity stay, as for
offloaded weights), so a rank holds its placement's experts and nothing more.

A later compile of the same model (a recompile for new shapes) gets the tensors back for its duration
(``restored``): this rank's rows from the table, the other ranks' rows filled with random values of the
same scale. Only compile-time work sees those (detection's proof runs the captured graph on them and
compares it with the reference on the same values); every op that computes with the weights is
given the kept rows instead, and a graph that would read the whole tensor is refused
(``check_graph``), as is a call of an op with a released tensor (``check_not_released``).
"""
from __future__ import annotations

import itertools
import weakref
from contextlib import contextmanager

import torch

from moe_compiler.runtime.memory import refilled

NOTE = "ep_weights"
WEIGHT_NAMES = ("w1", "w3", "w2", "b1", "b3", "b2")

_KEYS = itertools.count()
_KEPT: dict = {}        # key -> tuple of 6 tensors or None ([E_local, ...] rows of w1, w3, w2, b1, b3, b2)
_EXPERTS: dict = {}     # key -> the experts those rows are, ascending
_BY_SOURCE: dict = {}   # (id(whole tensors)..., local) -> key, while the sources live
_ROWS: dict = {}        # id(whole tensor) -> (weakref, {expert: row [..]}) rows with their true values
_RELEASED: dict = {}    # id(whole tensor) -> weakref, for tensors whose storage this module freed


class ReleasedWeightsError(RuntimeError):
    """A graph or op needs expert rows this rank released (expert parallelism keeps only its own)."""


def is_released(t) -> bool:
    """Was t released by this module? (True also while a compile has it restored.)"""
    ref = _RELEASED.get(id(t))
    return ref is not None and ref() is t


def releasable(t: torch.Tensor) -> bool:
    """A tensor this module may free: it owns its whole storage (not a view into a larger one)."""
    return (t.storage_offset() == 0 and t.is_contiguous()
            and t.untyped_storage().nbytes() == t.numel() * t.element_size())


def keep(weights, local: tuple) -> str:
    """Copy this rank's rows of a layer's expert weights; returns the key the op looks them up by.

    weights: (w1, w3, w2, b1, b3, b2), each [E, ...] or None; local: this rank's experts, ascending.
    Released sources and the same experts give the same key (a recompile shares the rows, no second
    copy); sources still whole are copied afresh (they may have been updated in place since)."""
    local = tuple(int(e) for e in local)
    ident = tuple(id(w) if w is not None else None for w in weights) + (local,)
    key = _BY_SOURCE.get(ident)
    if key is not None and all(w is None or is_released(w) for w in weights):
        return key
    rows = tuple(None if w is None else _rows_of(w, local) for w in weights)
    key = f"epw{next(_KEYS)}"
    _KEPT[key], _EXPERTS[key] = rows, local
    _BY_SOURCE[ident] = key
    # the rows live as long as the model's tensor: a compiled graph cannot run without its model
    weakref.finalize(next(w for w in weights if w is not None), _drop, key, ident)
    return key


def _drop(key: str, ident: tuple) -> None:
    _KEPT.pop(key, None)
    _EXPERTS.pop(key, None)
    if _BY_SOURCE.get(ident) == key:
        del _BY_SOURCE[ident]


def _rows_of(w: torch.Tensor, local: tuple) -> torch.Tensor:
    """[E_local, ...] true values of w's rows `local`: read from w, or from rows kept before it was released."""
    entry = _ROWS.get(id(w))
    known = entry[1] if entry is not None and entry[0]() is w else {}
    if is_released(w):  # restored for a compile: only kept rows are true
        missing = [e for e in local if e not in known]
        if missing:
            raise ReleasedWeightsError(
                f"expert rows {missing} of a {tuple(w.shape)} weight are not on this rank: an earlier inference "
                "compile released them (option expert_parallel release_parameters) under another placement. "
                "Reload the model, or compile with release_parameters False")
        out = torch.stack([known[e] for e in local]) if local else w.new_empty((0,) + tuple(w.shape[1:]))
    else:
        index = torch.tensor(local, dtype=torch.int64, device=w.device)
        out = w.detach().index_select(0, index).clone()
    if not known:
        weakref.finalize(w, _ROWS.pop, id(w), None)
    known.update({e: out[i] for i, e in enumerate(local)})
    _ROWS[id(w)] = (weakref.ref(w), known)
    return out


def rows(key: str) -> tuple:
    """The kept (w1, w3, w2, b1, b3, b2) rows of a layer."""
    try:
        return _KEPT[key]
    except KeyError:
        raise ReleasedWeightsError(f"no kept expert rows {key!r} in this process (the op is only valid in the process "
                                   "that compiled it)") from None


def experts_of(key: str) -> tuple:
    """The experts whose rows ``rows(key)`` holds, ascending."""
    rows(key)  # a clear error for an unknown key
    return _EXPERTS[key]


def release(t: torch.Tensor) -> None:
    """Free a whole expert tensor whose rows this rank needs were kept (storage resized to 0)."""
    if id(t) not in _RELEASED:
        weakref.finalize(t, _RELEASED.pop, id(t), None)
    _RELEASED[id(t)] = weakref.ref(t)
    with torch.no_grad():
        t.untyped_storage().resize_(0)


def kept_bytes(t: torch.Tensor) -> int:
    """Bytes of the rows of the whole tensor t that this rank keeps (0 when none are kept)."""
    entry = _ROWS.get(id(t))
    if entry is None or entry[0]() is not t:
        return 0
    return sum(row.numel() * row.element_size() for row in entry[1].values())


def check_not_released(w, what: str) -> None:
    if isinstance(w, torch.Tensor) and is_released(w):
        raise ReleasedWeightsError(
            f"{what}: this expert weight {tuple(w.shape)} was released by an inference compile with expert "
            "parallelism (only this rank's experts are kept). A graph that needs the whole tensor (a training "
            "graph, FSSDP, a single-process layer) cannot run on it: compile with "
            "options={'expert_parallel': {..., 'release_parameters': False}} for a model that is also trained, "
            "or reload the model")


def check_graph(gm: torch.fx.GraphModule, example_inputs, reads_kept_rows, paths) -> None:
    """Refuse a graph that reads a released tensor anywhere but in an op that is given kept rows.

    reads_kept_rows: node -> True when it is an op whose spec names kept rows; paths: each
    placeholder's parameter name or None."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value, path in zip(placeholders, example_inputs, paths):
        if not is_released(value):
            continue
        bad = [u for u in node.users if not reads_kept_rows(u)]
        if bad:
            check_not_released(value, f"{path or node.name} (read by {bad[0].name})")


@contextmanager
def restored(tensors):
    """Give released tensors among ``tensors`` values for the duration of a compile: kept rows where this
    rank has them, random values of the same scale elsewhere (see the module docstring); free them after."""
    def fill(t):
        entry = _ROWS.get(id(t))
        known = entry[1] if entry is not None and entry[0]() is t else {}
        scale = float(torch.stack(list(known.values())).float().std()) if len(known) > 1 else 1.0
        gen = torch.Generator().manual_seed(t.numel())
        t.copy_((torch.randn(t.shape, generator=gen) * (scale if scale == scale and scale > 0 else 1.0))
                .to(t.device, t.dtype))
        for e, row in known.items():
            t[e].copy_(row)

    freed = [t for t in tensors if isinstance(t, torch.Tensor) and is_released(t) and not t.untyped_storage().nbytes()]
    with refilled(freed, fill):
        yield


def forget() -> None:
    """Drop every table (tests); tensors already released stay released."""
    _KEPT.clear()
    _EXPERTS.clear()
    _BY_SOURCE.clear()
    _ROWS.clear()
