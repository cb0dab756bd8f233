"""The ``offload`` option: expert stores shared by the graphs of a process, and released weights.

    torch.compile(model, backend="moe", options={"offload": {
        "budget": 0.5,             # fast-tier bytes: a fraction of all experts' bytes, or "2GB" / int bytes
        "policy": "lru",           # "lru" | "arc" | "shallow" | "predicted" (runtime.cache_policy)
        "dir": "/path/experts",    # where expert files go (default: a folder under the temp dir)
        "host_budget": 0,          # optional host tier (bytes or fraction), LRU
        "prefetch": True,          # hoist_prefetch: predict each layer's experts from an earlier gate input
        "prefetch_depth": 1,       # layers ahead to predict from, or "auto" (the cost model's decision)
        "prefetch_source": "gate", # "gate": an earlier layer's gate input (Fate); "residual": the residual
                                   # stream entering the layer's block, through the layer's own norm and
                                   # router (more accurate, loads overlap only the block's attention)
        "prefetch_extra": 1,       # experts predicted per token beyond top-k (more recall, more wasted loads)
        "prefetch_lookahead": 1,   # sources each layer is predicted from: the nearest (above) and the
                                   # lookahead - 1 before it, one layer further back each; a farther
                                   # prediction starts loads earlier, a nearer one refines it (the
                                   # farther one's unstarted loads it no longer predicts are dropped)
        "shallow_layers": 1,       # policy "shallow": leading layers that keep all their experts
        "loader": "thread",        # "thread": a background thread reads experts; "process": a child process
                                   # does (CPU layers), so reads cost the model thread no GIL time;
                                   # "readahead" (CPU layers): the kernel reads files into the page cache in
                                   # the background (posix_fadvise WILLNEED), the first use copies them in
        "quantize": None,          # "int8": the fast tier holds int8 copies (one fp32 scale per row), so it
                                   # holds ~4x the fp32 experts; CHANGES RESULTS, hence off by default
        "release_parameters": True,  # free the module's expert weights once they are on disk
        "drop_page_cache": True}})   # posix_fadvise(DONTNEED) after each read, so reads hit the disk

Graphs compiled with the same ``dir`` share one store (one budget for the whole model). Released
parameters keep their shape and dtype but no storage (FSDP's storage.resize_(0)); a later
compilation that needs their values (a recompile for new shapes) gets them back from disk for
the duration of the compile (``restored``).
"""
from __future__ import annotations

import atexit
import hashlib
import json
import os
import tempfile
import threading
import weakref
from contextlib import contextmanager

import torch

from moe_compiler.runtime.cache_policy import POLICIES
from moe_compiler.runtime.expert_store import LOADERS, ExpertStore, parse_bytes
from moe_compiler.runtime.memory import refilled
from moe_compiler.runtime.quantize import MODES as QUANTIZE_MODES

KEYS = ("budget", "policy", "dir", "host_budget", "prefetch", "prefetch_depth", "prefetch_extra", "prefetch_source",
        "prefetch_lookahead", "shallow_layers", "loader", "quantize", "release_parameters", "drop_page_cache")
PREFETCH_SOURCES = ("gate", "residual")

_STORES: dict = {}          # store id -> ExpertStore
_RELEASED: dict = {}        # id(tensor) -> (weakref, store id, layer index, weight name)
_LOCK = threading.Lock()


def normalize_options(value):
    """The option as given (None/False/True/dict) -> None (off) or a checked dict with every key.

    Raises moe_compiler.config.ConfigError naming the bad key and the accepted values.
    """
    from moe_compiler.config import ConfigError

    if value is None or value is False:
        return None
    if value is True:
        value = {}
    if not isinstance(value, dict):
        raise ConfigError(f"option 'offload' must be True, False or a dict with keys {list(KEYS)}, "
                          f"got {type(value).__name__}")
    bad = sorted(set(value) - set(KEYS))
    if bad:
        raise ConfigError(f"option 'offload' has unknown keys {bad}; accepted keys are {list(KEYS)}")
    out = {"budget": value.get("budget", 0.5), "policy": value.get("policy", "lru"), "dir": value.get("dir"),
           "host_budget": value.get("host_budget", 0), "prefetch": value.get("prefetch", True),
           "prefetch_depth": value.get("prefetch_depth", 1), "shallow_layers": value.get("shallow_layers", 1),
           "prefetch_extra": value.get("prefetch_extra", 1), "prefetch_source": value.get("prefetch_source", "gate"),
           "prefetch_lookahead": value.get("prefetch_lookahead", 1),
           "loader": value.get("loader", "thread"), "quantize": value.get("quantize"),
           "release_parameters": value.get("release_parameters", True),
           "drop_page_cache": value.get("drop_page_cache", True)}
    for key in ("budget", "host_budget"):
        try:
            parse_bytes(out[key])
        except ValueError as e:
            raise ConfigError(f"option offload[{key!r}]: {e}") from None
    if out["loader"] not in LOADERS:
        raise ConfigError(f"option offload['loader'] must be one of {list(LOADERS)}, got {out['loader']!r}")
    if out["quantize"] not in QUANTIZE_MODES:
        raise ConfigError(f"option offload['quantize'] must be one of {list(QUANTIZE_MODES)} (int8 copies change "
                          f"results, so it is off unless asked for), got {out['quantize']!r}")
    if out["policy"] not in POLICIES:
        raise ConfigError(f"option offload['policy'] must be one of {list(POLICIES)}, got {out['policy']!r}")
    for key in ("prefetch", "release_parameters", "drop_page_cache"):
        if not isinstance(out[key], bool):
            raise ConfigError(f"option offload[{key!r}] must be True or False, got {out[key]!r}")
    depth = out["prefetch_depth"]
    if depth != "auto" and (isinstance(depth, bool) or not isinstance(depth, int) or depth < 1):
        raise ConfigError(f"option offload['prefetch_depth'] must be an int >= 1 or 'auto', got {depth!r}")
    extra = out["prefetch_extra"]
    if isinstance(extra, bool) or not isinstance(extra, int) or extra < 0:
        raise ConfigError(f"option offload['prefetch_extra'] must be an int >= 0, got {extra!r}")
    lookahead = out["prefetch_lookahead"]
    if isinstance(lookahead, bool) or not isinstance(lookahead, int) or lookahead < 1:
        raise ConfigError(f"option offload['prefetch_lookahead'] must be an int >= 1 (1: predict each layer from "
                          f"one source), got {lookahead!r}")
    if out["prefetch_source"] not in PREFETCH_SOURCES:
        raise ConfigError(f"option offload['prefetch_source'] must be one of {list(PREFETCH_SOURCES)}, "
                          f"got {out['prefetch_source']!r}")
    sl = out["shallow_layers"]
    if isinstance(sl, bool) or not isinstance(sl, int) or sl < 0:
        raise ConfigError(f"option offload['shallow_layers'] must be an int >= 0, got {sl!r}")
    if out["dir"] is not None and not isinstance(out["dir"], (str, os.PathLike)):
        raise ConfigError(f"option offload['dir'] must be a path, got {out['dir']!r}")
    return out


def store_for(options: dict) -> tuple[str, ExpertStore]:
    """(store id, store) for normalized offload options; the same dir gives the same store."""
    settings = {k: options[k] for k in ("budget", "policy", "host_budget", "shallow_layers", "drop_page_cache",
                                        "loader", "quantize")}
    root = options["dir"]
    if root is None:
        digest = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]
        root = os.path.join(tempfile.gettempdir(), f"moe_compiler_offload_{os.getpid()}_{digest}")
    root = os.path.abspath(os.fspath(root))
    with _LOCK:
        if root not in _STORES:
            policy_options = {"shallow_layers": options["shallow_layers"]} if options["policy"] == "shallow" else {}
            _STORES[root] = ExpertStore(root, budget=options["budget"], policy=options["policy"],
                                        host_budget=options["host_budget"], policy_options=policy_options,
                                        drop_page_cache=options["drop_page_cache"], loader=options["loader"],
                                        quantize=options["quantize"])
        return root, _STORES[root]


@atexit.register
def _close_stores() -> None:
    for store in list(_STORES.values()):
        store.close()


def get_store(store_id: str) -> ExpertStore:
    try:
        return _STORES[store_id]
    except KeyError:
        raise RuntimeError(f"no expert store {store_id!r} in this process: the compiled graph was built "
                           "in another process or the store was closed; compile the model again") from None


def stores() -> dict:
    """store id -> ExpertStore of every store this process created."""
    return dict(_STORES)


def forget_stores() -> None:
    """Close and drop every store (tests; weights already released stay released)."""
    with _LOCK:
        for store in _STORES.values():
            store.close()
        _STORES.clear()


def release(tensor: torch.Tensor, store_id: str, layer: int, name: str) -> None:
    """Free a parameter's storage (its experts live in the store); shape, dtype and identity stay."""
    with _LOCK:
        _RELEASED[id(tensor)] = (weakref.ref(tensor), store_id, layer, name)
    with torch.no_grad():
        tensor.untyped_storage().resize_(0)


def is_released(tensor) -> bool:
    entry = _RELEASED.get(id(tensor))
    return entry is not None and entry[0]() is tensor and tensor.untyped_storage().nbytes() == 0


@contextmanager
def restored(tensors):
    """Give released tensors among ``tensors`` their values back (read from the store's files) for
    the duration of the block, then free them again."""
    def fill(t):
        _, store_id, layer, name = _RELEASED[id(t)]
        store = get_store(store_id)
        lay = store.layers[layer]
        for e in range(lay.num_experts):
            t[e].copy_(store.files.read_expert(lay.folder, e, lay.manifest)[name])

    with refilled([t for t in tensors if isinstance(t, torch.Tensor) and is_released(t)], fill):
        yield
