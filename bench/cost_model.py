"""Cost model validation: predicted vs measured on this CPU, and predictions vs published GPU figures.

    python bench/cost_model.py            # the CPU-sized layers, forward and forward+backward
    python bench/cost_model.py --quick    # < 1 minute: forward only, fewer repeats; last line is JSON

CPU side (profile: the calibrated one, ``python -m moe_compiler.cost_model.calibrate``; calibrated
first when none is cached). Items, each predicted by moe_compiler.cost_model and measured here:
  - the layers of bench/moe_layer.py (built with its builders): the backend "moe" side
    (torch.compile(backend="moe"), inner backend eager in --quick, Inductor in full) and the dense
    bound (bench/moe_layer.DenseBound, eager): Mixtral-like 8x top-2 H512 I1792, fine-grained 64x
    top-6 I256 + shared expert 512, and the reference model's layer (16x top-2 H64 I64, 48 KiB
    experts), at 1024, 64 and 1 tokens, forward (and forward+backward in full)
  - the routed experts alone (codegen.torch_experts.experts_forward) with oneDNN-prepacked and plain
    GEMMs: the single-device alternative the cpu_gemm decision picks between
  - gloo all_to_all_single between 2 processes on 127.0.0.1 at sizes other than calibration's
All timed items of one case run interleaved and medians are compared (the machine is shared).

Metrics: median absolute relative error |pred - meas| / meas over all items; pairwise rank
accuracy over pairs of alternatives (moe vs dense per case; prepacked vs plain per case; the two
layer variants per (tokens, pass, side); all-to-all sizes): the fraction of pairs the model orders
as measured (also printed: the same over pairs measured more than 10% apart, where noise cannot
flip the order).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from unittest import mock

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import moe_layer as ML  # noqa: E402  (the single-layer benchmark's builders)

from moe_compiler.cost_model import LayerShape, T, evaluate, load_profile  # noqa: E402
from moe_compiler.cost_model import collectives as C  # noqa: E402
from moe_compiler.cost_model import compute as CM  # noqa: E402
from moe_compiler.cost_model.profiles import cpu_cache_path  # noqa: E402


def shape_of(spec: dict) -> LayerShape:
    return LayerShape(num_experts=spec["E"], top_k=spec["k"], hidden=spec["H"], ffn=spec["I"],
                      shared_ffn=spec["shared"], dtype="fp32")


def _interleaved(fns: dict, repeats: int, warmup: int = 2) -> dict:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    ts = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            ts[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in ts.items()}


def layer_items(name: str, tokens: int, train: bool, repeats: int, quick: bool, profile) -> list:
    """[(item, group, predicted s, measured s)] for one (layer, tokens, pass) case."""
    from moe_compiler.codegen.torch_experts import PackedWeights, experts_forward
    from moe_compiler.ir import ExpertSpec

    spec = ML.LAYERS[name]
    shape = shape_of(spec)
    block = ML.build_block(spec)
    dense = ML.DenseBound(spec)
    x = torch.randn(1, tokens, spec["H"])
    torch._dynamo.reset()
    opts = {"inner_backend": "eager", "verify": False} if quick else {}
    moe = torch.compile(block, backend="moe", dynamic=False, options=opts)
    run_moe = ML.timed(moe, train, list(block.parameters()))
    run_dense = ML.timed(dense, train, list(dense.parameters()))
    fns = {"moe": lambda: run_moe(x), "dense": lambda: run_dense(x)}
    pred = {"moe": CM.moe_layer_time(shape, profile, training=train, variant="prepacked")["total"],
            "dense": CM.dense_bound_time(shape, profile, training=train)}
    if not train:  # the routed experts alone, prepacked vs plain
        xs = x.reshape(-1, spec["H"])
        ids = torch.randn(tokens, spec["E"]).topk(spec["k"], -1).indices
        w = torch.rand(tokens, spec["k"])
        ex = block.experts
        es = ExpertSpec(hidden_size=spec["H"], ffn_size=spec["I"])
        args = (xs, ids, w, ex.gate_up_proj.data, None, ex.down_proj.data, None, None, None, es)

        def plain():
            with mock.patch.object(PackedWeights, "available", staticmethod(lambda _w: False)):
                experts_forward(*args)

        def packed():
            experts_forward(*args)

        fns.update({"experts_prepacked": packed, "experts_plain": plain})
        no_shared = LayerShape(shape.num_experts, shape.top_k, shape.hidden, shape.ffn, dtype=shape.dtype)
        for v, key in (("prepacked", "experts_prepacked"), ("default", "experts_plain")):
            pred[key] = (CM.experts_time(no_shared, profile, T, v) + CM.permute_combine_time(no_shared, profile)
                         + CM.activation_time(no_shared, profile))
    with torch.no_grad() if not train else torch.enable_grad():
        meas = _interleaved(fns, repeats)
    case = f"{name}/{tokens}/{'fwd+bwd' if train else 'fwd'}"
    return [(f"{case}/{k}", case, float(evaluate(pred[k], T=tokens)), meas[k]) for k in fns]


def a2a_items(profile, repeats: int) -> list:
    from moe_compiler.cost_model.calibrate import measure_all_to_all

    sizes = (1 << 12, 1 << 16, 1 << 19, 1 << 22)
    meas = measure_all_to_all(sizes=sizes, repeats=repeats)
    return [(f"gloo_all_to_all/{n >> 10}KB", "all_to_all", float(evaluate(C.all_to_all(n, 2, profile))), meas[n])
            for n in sizes]


def rank_pairs(items: list) -> list:
    """Pairs of alternatives (see module docstring): [(a, b, predicted order right)]."""
    by = {i[0]: i for i in items}
    pairs = []
    for case in sorted({i[1] for i in items}):
        if case == "all_to_all":
            group = [i for i in items if i[1] == case]
            pairs += list(itertools.combinations(group, 2))
            continue
        for a, b in (("moe", "dense"), ("experts_prepacked", "experts_plain")):
            if f"{case}/{a}" in by and f"{case}/{b}" in by:
                pairs.append((by[f"{case}/{a}"], by[f"{case}/{b}"]))
    # the two CPU layer variants against each other (the reference-sized layer is orders smaller:
    # pairing it would only add pairs no model gets wrong)
    names = sorted({i[0].split("/", 1)[0] for i in items if i[1] != "all_to_all"} & set(ML.CPU_LAYERS))
    for key in sorted({i[0].split("/", 1)[1] for i in items if i[1] != "all_to_all"}):
        for a, b in itertools.combinations([by.get(f"{n}/{key}") for n in names], 2):
            if a and b:
                pairs.append((a, b))
    return [(a[0], b[0], (a[2] < b[2]) == (a[3] < b[3]), abs(a[3] - b[3]) / min(a[3], b[3])) for a, b in pairs]


def gpu_table() -> list:
    """[(what, predicted, published, gap)] for the GPU profiles against published measurements."""
    h200, h800_like = load_profile("h200"), load_profile("h100")
    n = 8192
    mm = float(evaluate(CM.gemm_time(n, n, n, h200, "bf16")))
    rows = [("H200 bf16 dense matmul 8192^3, TFLOP/s", 2 * n ** 3 / mm / 1e12, 790.0,
             "NVIDIA H200 datasheet peak 989 dense; ~790 measured in public GEMM benchmarks (cuBLAS)")]
    # DeepEP (github.com/deepseek-ai/DeepEP README, H800): normal dispatch, 4096 tokens x 7168 hidden,
    # top-8, FP8 dispatch: intranode EP8 ~153 GB/s NVLink, internode EP16-64 ~43-58 GB/s RDMA (~45 typical).
    tok, hid, k = 4096, 7168, 8
    nbytes = tok * k * hid * 1
    for ranks, pub, what in ((8, 153.0, "intranode EP8 (NVLink)"), (32, 45.0, "internode EP32 (RDMA)")):
        t = float(evaluate(C.all_to_all(nbytes, ranks, h800_like)))
        # DeepEP's figure: bytes a rank sends over the bottleneck link / time
        rpn = min(ranks, h800_like.ranks_per_node)
        moved = nbytes * ((rpn - 1) / ranks if ranks <= rpn else (ranks - rpn) / ranks)
        rows.append((f"DeepEP dispatch {what}, GB/s", moved / t / 1e9, pub,
                     "DeepEP README, H800 (NVLink 200/dir); H100 profile: NVLink 450, IB 50 GB/s per direction"))
    return [(w, p, m, p / m, src) for w, p, m, src in rows]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--layers", default=",".join(ML.CPU_LAYERS + ("reference_sized",)),
                    help=f"comma-separated, from {list(ML.LAYERS)} (the full-size ones need tens of GB)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for calibration and measurement (1: robust on a shared machine)")
    ap.add_argument("--cached-profile", action="store_true",
                    help="predict with the cached CPU profile instead of calibrating now")
    args = ap.parse_args(argv)
    layers = args.layers.split(",")
    unknown = [n for n in layers if n not in ML.LAYERS]
    if unknown:
        ap.error(f"unknown layers {unknown}; known: {list(ML.LAYERS)}")
    repeats = args.repeats or (5 if args.quick else 15)
    torch.set_num_threads(args.threads)
    if args.cached_profile:
        if not os.path.exists(cpu_cache_path()):
            from moe_compiler.cost_model.calibrate import calibrate, write_profile
            print(f"no calibrated CPU profile: calibrating ({write_profile(calibrate())})")
        profile = load_profile("cpu")
    else:  # same threads and machine load as the measurements below
        from moe_compiler.cost_model.calibrate import calibrate
        from moe_compiler.cost_model.profiles import validate
        profile = validate(calibrate(log=lambda s: print("calibrate:", s)), where="in-process calibration")
    print(f"profile: {profile.name} ({profile.device}); {profile.source}")
    t0 = time.perf_counter()
    cases = [(n, t, tr) for n in layers for t in (1024, 64, 1) for tr in ((False,) if args.quick else (False, True))]
    items = []
    for name, tokens, train in cases:
        items += layer_items(name, tokens, train, repeats, args.quick, profile)
    items += a2a_items(profile, repeats=30)
    print(f"\n{'item':<44} {'predicted ms':>12} {'measured ms':>12} {'error':>8}")
    errors = []
    for name, _, p, m in items:
        errors.append(abs(p - m) / m)
        print(f"{name:<44} {p * 1e3:12.3f} {m * 1e3:12.3f} {(p - m) / m:+8.1%}")
    pairs = rank_pairs(items)
    print(f"\npairs of alternatives ({len(pairs)}):")
    for a, b, ok, gap in pairs:
        print(f"  {'ok   ' if ok else 'WRONG'} {a} vs {b}  (measured gap {gap:.0%})")
    med, acc = statistics.median(errors), sum(p[2] for p in pairs) / max(1, len(pairs))
    clear = [p for p in pairs if p[3] > 0.10]
    acc_clear = sum(p[2] for p in clear) / max(1, len(clear))
    print(f"\nmedian |error| {med:.1%} (target <= 25%), pairwise rank accuracy {acc:.1%} (target >= 90%); "
          f"on the {len(clear)} pairs measured more than 10% apart {acc_clear:.1%}; {time.perf_counter() - t0:.0f} s")
    print(f"\n{'GPU prediction vs published':<52} {'model':>8} {'published':>10} {'model/pub':>9}")
    for what, p, m, ratio, src in gpu_table():
        print(f"{what:<52} {p:8.1f} {m:10.1f} {ratio:9.2f}   {src}")
    print(json.dumps({"median_abs_error": round(med, 4), "pairwise_rank_accuracy": round(acc, 4),
                      "pairwise_rank_accuracy_gap_over_10pct": round(acc_clear, 4),
                      "items": len(items), "pairs": len(pairs)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
