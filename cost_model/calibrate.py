"""Calibrate the CPU profile on the machine at hand (a short microbenchmark, < 60 s) and cache it.

    python -m moe_compiler.cost_model.calibrate            # measure, write the cache, print the profile
    python -m moe_compiler.cost_model.calibrate --print    # print the cached profile (no measuring)

What it measures (fp32 unless said, this process's torch threads; GEMMs: the fastest of interleaved
repeats, i.e. the machine's capability rather than its momentary load, which on a shared machine
with several OpenMP threads otherwise swings the fit by 10x; the rest: medians):
  - GEMM time for [m, K] x [K, N] at m in 1..1024 rows and (N, K) in GEMM_SHAPES, cycling through
    8 distinct weights (as a layer's experts: none stays in cache), plain ``torch.mm`` and oneDNN
    prepacked (``mkldnn._linear_pointwise`` on a ``_reorder_linear_weight`` weight); fits
    t = overhead + 2 N K (m + m_half) / peak (least squares on relative error), giving peak FLOP/s,
    ``small_m_rows`` (m_half) and, for plain, ``gemm_overhead_s``; bf16 peak at m = 512
  - what a call of each other variant costs beyond a plain one: one [1, 64] x [64, 64] GEMM on a weight
    in cache, where the call is all there is (~11 us more for oneDNN's prepacked call than ``torch.mm``
    here). A variant's overhead is plain's plus that; its peak and m_half are fitted with it fixed.
    Fitted freely on the large shapes, where a call's cost is lost in the noise, prepacked's overhead
    came out below plain's and the model chose prepacked for a decode-sized expert, whose GEMMs are
    ~5x slower that way ([1, 64] x [64, 128]: ~3 us plain, ~15 us prepacked).
  - page faults: filling a fresh 64 MiB buffer minus filling a reused one (glibc gives buffers over
    32 MiB fresh pages on every allocation, so training's stacked expert gradients pay them each step)
  - memory bandwidth: a streaming read (sum) of 96 MB (also recorded: a 32 MB copy); op overhead: a small
    slice + silu + product, per op
  - gloo all-to-all (``all_to_all_single``, 2 processes on 127.0.0.1) at 1 KB .. 8 MB per rank,
    fitted to alpha-beta: t = alpha + n (G-1)/G / beta

The profile goes to ``profiles.cpu_cache_path()`` (~/.cache/moe_compiler/cpu_profile.json, or
$MOE_COMPILER_CPU_PROFILE) with the raw measurements under "calibration"; ``load_profile("cpu")``
reads it. ``add_calibrate_subcommand(subparsers)`` adds ``moe-compiler calibrate`` to a CLI.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import tempfile
import time

import numpy as np

from moe_compiler.cost_model.profiles import cpu_cache_path, validate

GEMM_ROWS = (1, 4, 16, 64, 256, 1024)
GEMM_SHAPES = ((2048, 512), (512, 256))  # (N, K): a Mixtral-like up projection and a fine-grained expert
GEMM_N, GEMM_K = GEMM_SHAPES[0]
GEMM_STREAM_BYTES = 48 << 20  # weights cycled per sample at small M: more than a 32 MB L3, as a layer's experts
A2A_BYTES = (1 << 10, 1 << 14, 1 << 17, 1 << 20, 1 << 23)


def _median_time(fn, repeats: int, budget_s: float = 1.0) -> float:
    fn()
    times, t_end = [], time.perf_counter() + budget_s
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() > t_end and len(times) >= 3:
            break
    return statistics.median(times)


def measure_gemms(repeats: int = 9, budget_s: float = 25.0) -> dict:
    """{variant: {(N, K, rows): seconds}} for plain and (with oneDNN) prepacked GEMMs, interleaved.

    Each sample runs one GEMM per weight of several distinct [N, K] weights (GEMM_STREAM_BYTES of
    them up to 64 rows, like a layer's experts streaming from memory; 2-4 above) and reports the
    time per GEMM. Stops after ``budget_s`` seconds once every case has 3 samples.
    """
    import torch

    prepack = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    cases = {}
    for n, k in GEMM_SHAPES:
        count = max(4, -(-GEMM_STREAM_BYTES // (n * k * 4)))
        all_ws = [torch.randn(n, k) for _ in range(count)]
        all_packed = [torch.ops.mkldnn._reorder_linear_weight(w, 64) for w in all_ws] if prepack else None
        for m in GEMM_ROWS:
            use = count if m <= 64 else 4 if m <= 256 else 2
            x, ws = torch.randn(m, k), all_ws[:use]
            cases[(n, k, m)] = {"plain": lambda x=x, ws=ws: [torch.mm(x, w.t()) for w in ws]}
            if prepack:
                cases[(n, k, m)]["prepacked"] = lambda x=x, ps=all_packed[:use]: [
                    torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "") for p in ps]
    out: dict = {}
    n_calls = {(n, k, m): (max(4, -(-GEMM_STREAM_BYTES // (n * k * 4))) if m <= 64 else 4 if m <= 256 else 2)
               for n, k, m in cases}
    with torch.no_grad():
        for fns in cases.values():
            for fn in fns.values():
                fn()
        t_end = time.perf_counter() + budget_s
        for rep in range(repeats):
            if rep >= 3 and time.perf_counter() > t_end:
                break
            for key, fns in cases.items():
                for v, fn in fns.items():
                    t0 = time.perf_counter()
                    fn()
                    out.setdefault(v, {}).setdefault(key, []).append((time.perf_counter() - t0) / n_calls[key])
    return {v: {key: min(ts) for key, ts in d.items()} for v, d in out.items()}


def measure_gemm_overhead(repeats: int = 400) -> dict:
    """{variant: seconds} of one GEMM too small to cost anything but the call: [1, 64] x [64, 64]
    fp32 on a cache-resident weight, plain and (with oneDNN) prepacked; fastest of interleaved repeats.
    Differences between variants are what the calibration uses (the absolute figure depends on the
    caller: Python, a compiled graph)."""
    import torch

    x, w = torch.randn(1, 64), torch.randn(64, 64)
    fns = {"plain": lambda: torch.mm(x, w.t())}
    if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
        fns["prepacked"] = lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    best = {v: float("inf") for v in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn()
        for _ in range(repeats):
            for v, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                best[v] = min(best[v], time.perf_counter() - t0)
    return best


def fit_gemm(times: dict, overhead: float | None = None) -> dict:
    """peak FLOP/s, small_m_rows, gemm_overhead_s from {(N, K, rows): seconds}.

    Model (compute.gemm_time): t = overhead + 2 N K (rows + m_half) / peak, fitted by least squares
    on relative error (non-negative) over every shape and row count; with ``overhead`` given, only
    peak and m_half.
    """
    keys = sorted(times)
    t = np.array([times[key] for key in keys])
    nk = np.array([2.0 * n * k for n, k, _ in keys])
    m = np.array([float(r) for _, _, r in keys])
    from scipy.optimize import nnls

    cols = [nk * m, nk] + ([np.ones_like(t)] if overhead is None else [])
    a = np.stack(cols, axis=1) / t[:, None]
    rhs = (t - (overhead or 0.0)) / t
    coef, _ = nnls(a, rhs)  # every term is a cost: non-negative
    inv_peak = max(coef[0], 1e-16)
    ovh = float(max(coef[2], 0.0)) if overhead is None else float(overhead)
    return {"peak": float(1.0 / inv_peak), "small_m_rows": float(max(coef[1], 0.0) / inv_peak), "gemm_overhead_s": ovh}


def measure_memory() -> dict:
    import torch

    src = torch.randn(8 << 20)  # 32 MB
    dst = torch.empty_like(src)
    t_copy = _median_time(lambda: dst.copy_(src), 15)
    big = torch.randn(24 << 20)  # 96 MB, three times the L3: a streaming read, like expert weights
    t_read = _median_time(lambda: big.sum(), 9)
    fresh, reused = [], []
    kept = torch.empty(16 << 20)
    for _ in range(5):  # 64 MiB: above glibc's largest mmap threshold, so fresh pages every time
        t0 = time.perf_counter()
        buf = torch.empty(16 << 20)
        buf.fill_(1.0)
        fresh.append(time.perf_counter() - t0)
        del buf
        t0 = time.perf_counter()
        kept.fill_(1.0)
        reused.append(time.perf_counter() - t0)
    t_fault = max(statistics.median(fresh) - statistics.median(reused), 1e-6)
    small = torch.randn(4, 128)
    # a slice, an activation and a product: the per-expert elementwise ops of the experts loop
    t_op = _median_time(lambda: torch.nn.functional.silu(small[:, :64]) * small[:, 64:], 300) / 3
    small = torch.randn(8, 8)
    t_mm = _median_time(lambda: torch.mm(small, small), 200)
    return {"page_fault_bandwidth": (64 << 20) / t_fault, "copy_bandwidth": 2 * src.numel() * 4 / t_copy, "mem_bandwidth": big.numel() * 4 / t_read,
            "op_overhead_s": t_op, "tiny_gemm_s": t_mm}


def _a2a_worker(rank: int, world: int, port: int, sizes, repeats: int, out_path: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    res = {}
    try:
        for n in sizes:
            x = torch.zeros(n // 4)
            y = torch.empty_like(x)
            ts = []
            for i in range(repeats + 2):
                dist.barrier()
                t0 = time.perf_counter()
                dist.all_to_all_single(y, x)
                ts.append(time.perf_counter() - t0)
            res[n] = statistics.median(ts[2:])
    finally:
        dist.destroy_process_group()
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(res, f)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure_all_to_all(sizes=A2A_BYTES, repeats: int = 20, world: int = 2) -> dict:
    """{bytes per rank: seconds} of gloo all_to_all_single between ``world`` processes on 127.0.0.1."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "a2a.json")
        mp.start_processes(_a2a_worker, args=(world, _free_port(), tuple(sizes), repeats, out), nprocs=world,
                           join=True, start_method="spawn")
        with open(out) as f:
            return {int(k): v for k, v in json.load(f).items()}


def fit_alpha_beta(times: dict, world: int = 2) -> dict:
    """alpha (s) and beta (bytes/s) from {bytes per rank: seconds}: t = alpha (G-1) + n (G-1)/G / beta."""
    n = np.array(sorted(times), dtype=float)
    t = np.array([times[int(b)] for b in n])
    x = n * (world - 1) / world
    slope, intercept = np.polyfit(x, t, 1, w=1.0 / t)
    return {"latency": float(max(intercept / (world - 1), 1e-7)), "bandwidth": float(1.0 / max(slope, 1e-15))}


def calibrate(*, all_to_all: bool = True, threads: int | None = None, log=print) -> dict:
    """Run the microbenchmarks and return a validated CPU profile dict (not written).

    ``threads``: torch threads to measure with (default: the current setting); restored afterwards.
    """
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        return _calibrate(all_to_all, log)
    finally:
        torch.set_num_threads(before)


def _calibrate(all_to_all: bool, log) -> dict:
    import torch

    t0 = time.perf_counter()
    mem = measure_memory()
    log(f"memory: {mem['page_fault_bandwidth'] / 1e9:.1f} GB/s fresh pages, {mem['mem_bandwidth'] / 1e9:.1f} GB/s read, {mem['copy_bandwidth'] / 1e9:.1f} GB/s copy, op overhead {mem['op_overhead_s'] * 1e6:.1f} us")
    overheads = measure_gemm_overhead()
    gemms = measure_gemms()
    fits = {"plain": fit_gemm(gemms["plain"])}
    for v, ts in gemms.items():
        if v != "plain":
            extra = max(0.0, overheads[v] - overheads["plain"])
            fits[v] = fit_gemm(ts, fits["plain"]["gemm_overhead_s"] + extra)
    for v, f in fits.items():
        log(f"gemm {v}: peak {f['peak'] / 1e9:.1f} GFLOP/s, half rate at {f['small_m_rows']:.1f} rows, "
            f"overhead {f['gemm_overhead_s'] * 1e6:.1f} us")
    a = torch.randn(512, GEMM_K, dtype=torch.bfloat16)
    b = torch.randn(GEMM_K, GEMM_N, dtype=torch.bfloat16)
    bf16 = 2 * 512 * GEMM_K * GEMM_N / _median_time(lambda: torch.mm(a, b), 10)
    link = {"bandwidth": mem["mem_bandwidth"] / 4, "latency": 50e-6}
    a2a = {}
    if all_to_all:
        a2a = measure_all_to_all()
        link = fit_alpha_beta(a2a)
        log(f"gloo all-to-all (2 ranks): latency {link['latency'] * 1e6:.0f} us, "
            f"bandwidth {link['bandwidth'] / 1e9:.2f} GB/s")
    plain = fits["plain"]
    prof = {
        "name": "cpu", "kind": "cpu",
        "device": f"{_cpu_name()} ({torch.get_num_threads()} torch threads)",
        "source": (f"calibrated by `python -m moe_compiler.cost_model.calibrate` on "
                   f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}"
                   + ("" if all_to_all else "; all-to-all not measured (link = copy bandwidth / 4, 50 us)")),
        "peak_flops": {"fp32": plain["peak"], "bf16": float(bf16)},
        "gemm_efficiency": 1.0,
        "small_m_rows": plain["small_m_rows"],
        "gemm_overhead_s": plain["gemm_overhead_s"],
        "op_overhead_s": mem["op_overhead_s"],
        "gemm_variants": {v: {"gemm_efficiency": min(1.0, f["peak"] / plain["peak"]),
                              "small_m_rows": f["small_m_rows"], "gemm_overhead_s": f["gemm_overhead_s"]}
                          for v, f in fits.items() if v != "plain"},
        "mem_bandwidth": mem["mem_bandwidth"],
        "memory_bytes": float(_memory_bytes()),
        "host_link": {"bandwidth": mem["mem_bandwidth"], "latency": 1e-6},
        "intra_node": link, "inter_node": link,
        "ranks_per_node": max(2, os.cpu_count() or 2),
        "large_alloc_bytes": float(32 << 20), "page_fault_bandwidth": mem["page_fault_bandwidth"],
        "calibration": {"seconds": round(time.perf_counter() - t0, 1), "threads": torch.get_num_threads(),
                        "gemm_seconds": {v: {f"{n}x{k}x{m}": s for (n, k, m), s in ts.items()}
                                         for v, ts in gemms.items()},
                        "gemm_overhead_seconds": overheads,
                        "all_to_all_seconds": {str(n): s for n, s in a2a.items()}, **mem},
    }
    # a variant faster than plain at large M keeps plain's peak as reference: efficiency capped at 1
    for v, f in fits.items():
        if v != "plain" and f["peak"] > plain["peak"]:
            prof["peak_flops"]["fp32"] = f["peak"]
            prof["gemm_efficiency"] = plain["peak"] / f["peak"]
            prof["gemm_variants"][v]["gemm_efficiency"] = 1.0
    validate(prof, where="calibrated cpu profile")
    return prof


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "CPU"


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def write_profile(prof: dict, path: str | None = None) -> str:
    path = path or cpu_cache_path()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(prof, f, indent=2)
    os.replace(tmp, path)
    return path


def _run(args) -> int:
    path = args.output or cpu_cache_path()
    if args.print:
        if not os.path.exists(path):
            print(f"no calibrated CPU profile at {path}; run `python -m moe_compiler.cost_model.calibrate`")
            return 1
        with open(path) as f:
            print(f.read())
        return 0
    prof = calibrate(all_to_all=not args.no_all_to_all, threads=args.threads)
    print(f"wrote {write_profile(prof, path)} ({prof['calibration']['seconds']} s)")
    return 0


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", "-o", default=None, help="where to write the profile (default: the cache path)")
    p.add_argument("--print", action="store_true", help="print the cached profile instead of measuring")
    p.add_argument("--threads", type=int, default=None, help="torch threads to measure with (default: torch's)")
    p.add_argument("--no-all-to-all", action="store_true", help="skip the 2-process gloo all-to-all measurement")


def add_calibrate_subcommand(subparsers) -> None:
    """Add ``calibrate`` to an argparse subparsers object (for ``moe-compiler calibrate``)."""
    p = subparsers.add_parser("calibrate", help="measure this CPU and cache its cost-model profile")
    _add_arguments(p)
    p.set_defaults(func=_run)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moe_compiler.cost_model.calibrate", description=__doc__.splitlines()[0])
    _add_arguments(ap)
    return _run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
