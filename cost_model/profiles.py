"""Hardware profiles: the numbers every cost in this package is evaluated with.

A profile is a JSON file (this folder's ``profiles/*.json``, or the calibrated CPU profile cached at
``~/.cache/moe_compiler/cpu_profile.json``) with these fields (SI units: FLOP/s, bytes/s, bytes, s):

    name             str    short name ("h200"), what ``load_profile`` takes
    kind             str    "gpu" or "cpu"
    device           str    human-readable device
    source           str    where the numbers come from (datasheet, calibration command and date)
    peak_flops       {dtype: FLOP/s}   dense matmul peak; "fp32" required, "bf16" optional
    gemm_efficiency  float  (0, 1]  fraction of peak a large GEMM reaches
    small_m_rows     float  >= 0    rows m_half at which a GEMM reaches half its large-M rate:
                                    efficiency(m) = gemm_efficiency * m / (m + small_m_rows)
    gemm_overhead_s  float  >= 0    fixed cost of one GEMM call (launch / dispatch), s
    op_overhead_s    float  >= 0    fixed cost of one elementwise / indexing op, s
    gemm_variants    {name: {gemm_efficiency, small_m_rows, gemm_overhead_s}}  optional other GEMM
                                    implementations (CPU: "prepacked" = oneDNN prepacked weights)
    mem_bandwidth    float  > 0     device memory bandwidth, bytes/s
    memory_bytes     float  > 0     device memory, bytes
    host_link        {bandwidth, latency}   host <-> device link (weight streaming / offload)
    intra_node       {bandwidth, latency}   per-rank, per-direction link inside a node (alpha-beta)
    inter_node       {bandwidth, latency}   per-rank network link between nodes
    ranks_per_node   int    >= 1
    large_alloc_bytes     float > 0, optional  buffers at least this big get fresh pages on every
                                    allocation (CPU glibc malloc: 32 MiB, its mmap threshold cap);
                                    absent = a caching allocator (GPUs), never
    page_fault_bandwidth  float > 0, optional  bytes/s of page faulting fresh pages (on top of the write)

``validate`` checks a dict against this schema and raises ``ProfileError`` naming the file, the field
and what was expected.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from importlib import resources

log = logging.getLogger(__name__)

CPU_CACHE_ENV = "MOE_COMPILER_CPU_PROFILE"


class ProfileError(ValueError):
    """A profile file is missing, unreadable or does not match the schema."""


@dataclass(frozen=True)
class Link:
    bandwidth: float  # bytes/s, per rank and direction
    latency: float    # s per message (alpha)


@dataclass(frozen=True)
class GemmVariant:
    gemm_efficiency: float
    small_m_rows: float
    gemm_overhead_s: float


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    kind: str
    device: str
    source: str
    peak_flops: dict
    gemm_efficiency: float
    small_m_rows: float
    gemm_overhead_s: float
    op_overhead_s: float
    mem_bandwidth: float
    memory_bytes: float
    host_link: Link
    intra_node: Link
    inter_node: Link
    ranks_per_node: int
    gemm_variants: dict = field(default_factory=dict)  # name -> GemmVariant
    large_alloc_bytes: float | None = None      # fresh pages for buffers >= this (None: never)
    page_fault_bandwidth: float | None = None   # bytes/s of first writes to fresh pages
    calibration: dict = field(default_factory=dict)     # raw measurements (calibrated profiles only)

    def flops(self, dtype: str = "fp32") -> float:
        """Peak dense FLOP/s for dtype ("fp32", "bf16", "fp16" ~ "bf16"); bf16 falls back to fp32."""
        d = {"float32": "fp32", "bfloat16": "bf16", "float16": "bf16", "fp16": "bf16"}.get(dtype, dtype)
        return float(self.peak_flops.get(d, self.peak_flops["fp32"]))

    def gemm(self, variant: str = "default") -> GemmVariant:
        """The GEMM efficiency parameters of an implementation ("default" = the profile's own)."""
        if variant == "default":
            return GemmVariant(self.gemm_efficiency, self.small_m_rows, self.gemm_overhead_s)
        if variant not in self.gemm_variants:
            raise KeyError(f"profile {self.name!r} has no GEMM variant {variant!r}; it has "
                           f"{['default', *sorted(self.gemm_variants)]}")
        return self.gemm_variants[variant]

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("name", "kind", "device", "source", "peak_flops", "gemm_efficiency",
                                           "small_m_rows", "gemm_overhead_s", "op_overhead_s", "mem_bandwidth",
                                           "memory_bytes", "ranks_per_node")}
        for k in ("host_link", "intra_node", "inter_node"):
            link = getattr(self, k)
            d[k] = {"bandwidth": link.bandwidth, "latency": link.latency}
        d["gemm_variants"] = {n: {"gemm_efficiency": v.gemm_efficiency, "small_m_rows": v.small_m_rows,
                                  "gemm_overhead_s": v.gemm_overhead_s} for n, v in self.gemm_variants.items()}
        for k in ("large_alloc_bytes", "page_fault_bandwidth"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        if self.calibration:
            d["calibration"] = self.calibration
        return d

    def with_changes(self, **changes) -> "HardwareProfile":
        import dataclasses
        return dataclasses.replace(self, **changes)


def _num(where: str, d: dict, key: str, *, positive: bool = False, at_most: float | None = None,
         required: bool = True, default=None) -> float:
    if key not in d:
        if required:
            raise ProfileError(f"{where}: missing field {key!r}")
        return default
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ProfileError(f"{where}: field {key!r} must be a finite number, got {v!r}")
    if positive and v <= 0:
        raise ProfileError(f"{where}: field {key!r} must be > 0, got {v!r}")
    if v < 0:
        raise ProfileError(f"{where}: field {key!r} must be >= 0, got {v!r}")
    if at_most is not None and v > at_most:
        raise ProfileError(f"{where}: field {key!r} must be <= {at_most}, got {v!r}")
    return float(v)


def _link(where: str, d: dict, key: str) -> Link:
    v = d.get(key)
    if not isinstance(v, dict):
        raise ProfileError(f"{where}: field {key!r} must be an object {{'bandwidth': bytes/s, 'latency': s}}, "
                           f"got {v!r}")
    return Link(_num(f"{where}.{key}", v, "bandwidth", positive=True), _num(f"{where}.{key}", v, "latency"))


def _variant(where: str, v) -> GemmVariant:
    if not isinstance(v, dict):
        raise ProfileError(f"{where}: must be an object with gemm_efficiency, small_m_rows, gemm_overhead_s")
    return GemmVariant(_num(where, v, "gemm_efficiency", positive=True, at_most=1.0),
                       _num(where, v, "small_m_rows"), _num(where, v, "gemm_overhead_s"))


KNOWN_FIELDS = {"name", "kind", "device", "source", "peak_flops", "gemm_efficiency", "small_m_rows",
                "gemm_overhead_s", "op_overhead_s", "gemm_variants", "mem_bandwidth", "memory_bytes",
                "host_link", "intra_node", "inter_node", "ranks_per_node", "calibration", "large_alloc_bytes",
                "page_fault_bandwidth"}


def validate(d, where: str = "profile") -> HardwareProfile:
    """Check a profile dict against the schema (module docstring) and build the HardwareProfile."""
    if not isinstance(d, dict):
        raise ProfileError(f"{where}: a profile must be a JSON object, got {type(d).__name__}")
    unknown = sorted(set(d) - KNOWN_FIELDS)
    if unknown:
        raise ProfileError(f"{where}: unknown fields {unknown}; valid fields are {sorted(KNOWN_FIELDS)}")
    for key in ("name", "kind", "device", "source"):
        if not isinstance(d.get(key), str) or not d.get(key):
            raise ProfileError(f"{where}: field {key!r} must be a non-empty string, got {d.get(key)!r}")
    if d["kind"] not in ("gpu", "cpu"):
        raise ProfileError(f"{where}: field 'kind' must be 'gpu' or 'cpu', got {d['kind']!r}")
    pf = d.get("peak_flops")
    if not isinstance(pf, dict) or "fp32" not in pf:
        raise ProfileError(f"{where}: field 'peak_flops' must be an object with at least 'fp32' (FLOP/s), got {pf!r}")
    peak = {k: _num(f"{where}.peak_flops", pf, k, positive=True) for k in pf}
    variants = d.get("gemm_variants", {})
    if not isinstance(variants, dict):
        raise ProfileError(f"{where}: field 'gemm_variants' must be an object name -> parameters")
    if ("large_alloc_bytes" in d) != ("page_fault_bandwidth" in d):
        raise ProfileError(f"{where}: fields 'large_alloc_bytes' and 'page_fault_bandwidth' go together")
    rpn = d.get("ranks_per_node")
    if isinstance(rpn, bool) or not isinstance(rpn, int) or rpn < 1:
        raise ProfileError(f"{where}: field 'ranks_per_node' must be an integer >= 1, got {rpn!r}")
    return HardwareProfile(
        name=d["name"], kind=d["kind"], device=d["device"], source=d["source"], peak_flops=peak,
        gemm_efficiency=_num(where, d, "gemm_efficiency", positive=True, at_most=1.0),
        small_m_rows=_num(where, d, "small_m_rows"),
        gemm_overhead_s=_num(where, d, "gemm_overhead_s"),
        op_overhead_s=_num(where, d, "op_overhead_s"),
        mem_bandwidth=_num(where, d, "mem_bandwidth", positive=True),
        memory_bytes=_num(where, d, "memory_bytes", positive=True),
        host_link=_link(where, d, "host_link"), intra_node=_link(where, d, "intra_node"),
        inter_node=_link(where, d, "inter_node"), ranks_per_node=rpn,
        gemm_variants={n: _variant(f"{where}.gemm_variants.{n}", v) for n, v in variants.items()},
        calibration=dict(d.get("calibration", {})),
        large_alloc_bytes=_num(where, d, "large_alloc_bytes", positive=True, required=False),
        page_fault_bandwidth=_num(where, d, "page_fault_bandwidth", positive=True, required=False),
    )


def load_file(path: str) -> HardwareProfile:
    """Read and validate one profile JSON file."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise ProfileError(f"cannot read profile {path}: {e}") from e
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ProfileError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from e
    return validate(d, where=path)


def bundled_names() -> list:
    """Names of the profiles shipped in profiles/ (e.g. ['a100', 'cpu_generic', 'h100', 'h200'])."""
    folder = resources.files(__package__) / "profiles"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))


def cpu_cache_path() -> str:
    """Where the calibrated CPU profile is cached ($MOE_COMPILER_CPU_PROFILE or ~/.cache/moe_compiler/)."""
    return os.environ.get(CPU_CACHE_ENV) or os.path.join(
        os.path.expanduser(os.environ.get("XDG_CACHE_HOME", "~/.cache")), "moe_compiler", "cpu_profile.json")


def load_profile(name: str) -> HardwareProfile:
    """A profile by name ("h100", "h200", "a100", "cpu", "cpu_generic") or by path to a JSON file.

    "cpu" is the calibrated profile cached by ``python -m moe_compiler.cost_model.calibrate``; when
    none is cached, the bundled "cpu_generic" (logged). Loading never calibrates (no side effects).
    """
    if name.endswith(".json") or os.sep in name:
        return load_file(name)
    key = name.lower()
    if key == "cpu":
        path = cpu_cache_path()
        if os.path.exists(path):
            return load_file(path)
        log.info("no calibrated CPU profile at %s (run `python -m moe_compiler.cost_model.calibrate`); "
                 "using cpu_generic", path)
        key = "cpu_generic"
    if key not in bundled_names():
        raise ProfileError(f"unknown hardware profile {name!r}; known: {['cpu', *bundled_names()]} "
                           "or a path to a .json file")
    folder = resources.files(__package__) / "profiles"
    return load_file(str(folder / f"{key}.json"))


def profile_for_device(device_type: str, device_name: str = "") -> HardwareProfile:
    """The profile for a device: "cpu" -> the CPU profile; CUDA by name (H200/H100/A100, else H100, logged)."""
    if device_type == "cpu":
        return load_profile("cpu")
    up = device_name.upper()
    for key in ("H200", "H100", "A100"):
        if key in up:
            return load_profile(key.lower())
    log.info("no profile for device %r; using h100", device_name)
    return load_profile("h100")
