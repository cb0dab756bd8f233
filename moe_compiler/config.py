"""Typed backend configuration.

Every field can be set three ways, later ones winning:
  1. its default here,
  2. the environment variable MOE_COMPILER_<FIELD> (e.g. MOE_COMPILER_DUMP_DIR=/tmp/d),
  3. ``torch.compile(model, backend="moe", options={"<field>": value})``.
An unknown option, or a value of the wrong kind, raises ConfigError naming the key and what it accepts.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Optional

INNER_BACKENDS = ("inductor", "eager")


BoolOrDict = typing.Union[bool, dict]  # the expert_parallel option: True/False or a dict of settings


class ConfigError(ValueError):
    """A bad option: the message names the key and the accepted values."""


@dataclass(frozen=True)
class BackendConfig:
    # Folder for pass dumps (one sub-folder per compiled graph); None = no dumps unless
    # TORCH_COMPILE_DEBUG=1, which dumps under torch's debug folder.
    dump_dir: Optional[str] = None
    # Find MoE layers and raise each to one moe_compiler.moe op (False: plain Inductor).
    detect: bool = True
    # Check each raised layer numerically against the original subgraph at compile time
    # (on the example inputs and on random inputs); a layer that fails is left untouched.
    verify: bool = True
    # Raise instead of falling back to Inductor when something fails (for debugging).
    strict: bool = False
    # What compiles the graph after the passes: "inductor" (default) or "eager" (no codegen; fast to compile).
    inner_backend: str = "inductor"
    # Passes to skip, by name (see `moe-compiler passes`).
    disable_passes: tuple = ()
    # Per-pass options: {"<pass name>": {"<field>": value}}; keys are checked against each pass's fields.
    pass_options: dict = field(default_factory=dict)
    # torch.compile's mode= (None, "default", "reduce-overhead", "max-autotune", ...), passed to Inductor.
    mode: Optional[str] = None
    # Expert placement for every MoE layer: {"file": placement.json} or {"trace": routing.npz, "ranks": N,
    # "ranks_per_node": M, "method": "ilp"|"eplb"|..., "replicas": R, "coherent_weight": w}; None = no placement.
    placement: Optional[dict] = None
    # Expert parallelism on torch.distributed (pass sparse_collectives): True (world group, all_to_all,
    # contiguous placement) or {"group": pg|name|None, "mode": "all_to_all"|"hierarchical"|"coherent"|"auto",
    # "ranks_per_node": M (hierarchical), "placement": path|Placement, "overlap_degree": n,
    # "movement": "tokens"|"weights"|"auto" (weights = FSSDP, Hecate), "materialize": "needed"|"sparse",
    # "replicate": n|"auto", "rematerialize": bool, "load_window": n, "release_parameters": bool,
    # "collectives": "functional"|"op"}; None/False = off.
    # See moe_compiler/runtime/expert_parallel.py.
    expert_parallel: Optional[BoolOrDict] = None
    # Expert offloading for inference (passes offload_experts, hoist_prefetch): True or {"budget": 0.5 | "2GB",
    # "policy": "lru"|"arc"|"shallow"|"predicted", "dir": path, "host_budget": ..., "prefetch": True,
    # "prefetch_depth": 1|"auto", "prefetch_extra": 1, "prefetch_lookahead": 1, "shallow_layers": 1,
    # "release_parameters": True, "drop_page_cache": True};
    # None/False = off. See moe_compiler/runtime/offload.py.
    offload: Optional[BoolOrDict] = None

    def __post_init__(self):
        if self.inner_backend not in INNER_BACKENDS:
            raise ConfigError(f"option 'inner_backend' must be one of {INNER_BACKENDS}, got {self.inner_backend!r}")
        if self.expert_parallel is not None:
            from moe_compiler.runtime.expert_parallel import normalize_options

            normalize_options(self.expert_parallel)
        if self.offload is not None:
            from moe_compiler.runtime import expert_parallel, offload

            if offload.normalize_options(self.offload) and expert_parallel.normalize_options(self.expert_parallel):
                raise ConfigError("options 'offload' and 'expert_parallel' cannot be combined: offloading serves "
                                  "single-device inference; turn one of them off")


_FIELDS = {f.name: f for f in dataclasses.fields(BackendConfig)}


def _coerce(key: str, value, annotation: str):
    """Convert value to the field's type, or raise ConfigError naming what is accepted."""
    kind = annotation.replace("Optional[", "").rstrip("]")
    optional = annotation.startswith("Optional[")
    if value is None:
        if optional:
            return None
        raise ConfigError(f"option {key!r} must not be None (accepted: {kind})")
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"option {key!r} must be a bool (True/False, or '1'/'0' in the environment), got {value!r}")
    if kind == "str":
        if isinstance(value, (str, os.PathLike)):
            return os.fspath(value)
        raise ConfigError(f"option {key!r} must be a string, got {type(value).__name__} {value!r}")
    if kind == "tuple":
        if isinstance(value, str):
            return tuple(v.strip() for v in value.split(",") if v.strip())
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ConfigError(f"option {key!r} must be a list of strings (or a comma-separated string), got {value!r}")
    if kind == "BoolOrDict":
        if isinstance(value, (bool, dict)):
            return value
        if isinstance(value, str):  # from the environment: 1/0 or JSON
            if value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                return value.lower() in ("1", "true", "yes", "on")
            parsed = _json_dict(value)
            if parsed is not None:
                return parsed
        raise ConfigError(f"option {key!r} must be True/False or a dict, got {type(value).__name__} {value!r}")
    if kind == "dict":
        if isinstance(value, dict):
            return dict(value)
        if isinstance(value, str):  # from the environment: JSON
            parsed = _json_dict(value)
            if parsed is not None:
                return parsed
        raise ConfigError(f"option {key!r} must be a dict, got {type(value).__name__}")
    raise AssertionError(f"unhandled config annotation {annotation}")


def _json_dict(text: str):
    """A JSON object given as a string (environment variables), else None."""
    import json

    try:
        parsed = json.loads(text)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


def from_env(environ=None) -> dict:
    """The MOE_COMPILER_* variables that name config fields, coerced to their types."""
    environ = os.environ if environ is None else environ
    out = {}
    for name, f in _FIELDS.items():
        var = f"MOE_COMPILER_{name.upper()}"
        if var in environ:
            out[name] = _coerce(var, environ[var], f.type)
    return out


def make_config(options: dict | None = None, mode: str | None = None, environ=None) -> BackendConfig:
    """Build the config from defaults, MOE_COMPILER_* variables and torch.compile options."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(_FIELDS))
    if unknown:
        raise ConfigError(
            f"unknown moe backend option(s) {unknown}; valid options are: {sorted(_FIELDS)}"
        )
    values = from_env(environ)
    for key, value in options.items():
        values[key] = _coerce(key, value, _FIELDS[key].type)
    if mode is not None:
        values["mode"] = mode
    try:
        return BackendConfig(**values)
    except TypeError as e:  # pragma: no cover - guarded by the checks above
        raise ConfigError(str(e)) from e


def describe_options() -> list[tuple[str, str, str, str]]:
    """(name, type, default, comment) for every option, read from this file's field comments."""
    import inspect

    src = inspect.getsource(BackendConfig).splitlines()
    comments: dict[str, list[str]] = {}
    pending: list[str] = []
    for line in src:
        s = line.strip()
        if s.startswith("#"):
            pending.append(s.lstrip("# "))
        elif ":" in s and not s.startswith(("def ", "class ", "@", '"')):
            name = s.split(":")[0].strip()
            if name in _FIELDS:
                comments[name] = pending
            pending = []
        else:
            pending = []
    rows = []
    for name, f in _FIELDS.items():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        rows.append((name, str(f.type), repr(default), " ".join(comments.get(name, []))))
    return rows


_ = typing  # keep the typing import for annotations evaluated as strings
