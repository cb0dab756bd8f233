"""Process memory of expert offloading: peak RSS while decoding, against the fast-tier budget.

    python bench/offload_memory.py            # the reference architecture at dim 512, ffn 1024 (768 MiB of experts)
    python bench/offload_memory.py --quick    # dim 256, ffn 512 (192 MiB); last line is a JSON object

bench/offload.py measures speed on the trained reference model, whose experts (6 MiB in all) are far
below the noise of a process's RSS. Here the same architecture is built wider, with random weights,
so that expert bytes dominate, and every variant runs in a fresh process (RSS is per process):

    resident        no offload: all experts in memory
    offload@<pct>   offload with prediction (prefetch_source "residual", policy "shallow") at a budget of
                    pct% of the expert bytes

Each child compiles the model, runs prefill + decode once (compiles, fills the cache), then measures
a second prefill + decode:

    rss_idle    resident set with the fast tier emptied (``ExpertStore.clear()``): everything but
                cached experts (interpreter, torch, compiled code, the model's non-expert weights)
    peak        the kernel's high-water mark of the resident set (VmHWM, reset via /proc/self/clear_refs
                before the measured run)
    growth      peak - rss_idle: what running offloaded added (cached experts + loads in flight)
    overhead    growth - budget: memory beyond the budget (read buffers, parsed copies, allocator slack)

Linux only (VmHWM and clear_refs are Linux /proc interfaces).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

MIB = 2 ** 20


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # 5: reset the peak resident set size (VmHWM) to the current one


def child(args) -> dict:
    """One variant in this process; returns its memory figures in bytes."""
    import torch

    from moe_compiler.reference_lm import ReferenceLM, ReferenceLMConfig
    from moe_compiler.runtime import offload
    from moe_compiler.runtime.memory import process_status_bytes

    torch.manual_seed(0)
    torch._dynamo.config.cache_size_limit = 256  # dynamic=False: one graph per decode length
    config = ReferenceLMConfig(dim=args.dim, ffn=args.ffn, layers=args.layers, experts=args.experts)
    model = ReferenceLM(config).eval()
    expert_bytes = 4 * 3 * args.dim * args.ffn * args.experts * args.layers
    options = {"inner_backend": "eager"}
    store = None
    if args.budget is not None:
        folder = tempfile.mkdtemp(prefix="moe_offload_memory_")
        options["offload"] = {"budget": args.budget, "policy": "shallow", "dir": folder,
                              "prefetch_source": "residual"}
        _, store = offload.store_for(offload.normalize_options(options["offload"]))
    fn = torch.compile(model, backend="moe", options=options, dynamic=False)
    tokens = torch.randint(0, config.vocab, (1, args.prompt + args.decode), generator=torch.Generator().manual_seed(1))

    def run():
        with torch.no_grad():
            _, cache = fn(tokens[:, :args.prompt], cache=[])
            for t in range(args.prompt, tokens.shape[1]):
                _, cache = fn(tokens[:, t:t + 1], cache=cache)

    run()  # compiles; fills the cache
    if store is not None:
        store.drain()
        store.clear()
        store.reset_stats()
    import gc

    gc.collect()
    rss_idle = process_status_bytes("VmRSS")
    _reset_peak()
    run()
    peak = process_status_bytes("VmHWM")
    out = {"expert_bytes": expert_bytes, "rss_idle": rss_idle, "peak": peak}
    if store is not None:
        out.update(budget=store.budget, store_peak=store.peak_bytes, bytes_loaded=store.stats()["bytes_loaded"])
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dim", type=int, default=None)
    ap.add_argument("--ffn", type=int, default=None)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--decode", type=int, default=8)
    ap.add_argument("--budgets", default="0.25,0.5,0.75")
    ap.add_argument("--budget", type=float, default=None, help=argparse.SUPPRESS)  # a child's variant
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.dim = args.dim or (256 if args.quick else 512)
    args.ffn = args.ffn or (512 if args.quick else 1024)
    if args.child:
        print(json.dumps(child(args)))
        return None
    if not os.path.exists("/proc/self/clear_refs"):
        raise SystemExit("bench/offload_memory.py needs Linux: it reads VmHWM and resets it via /proc/self/clear_refs")
    common = ["--dim", str(args.dim), "--ffn", str(args.ffn), "--layers", str(args.layers),
              "--experts", str(args.experts), "--prompt", str(args.prompt), "--decode", str(args.decode)]
    variants = [("resident", None)] + [(f"offload@{round(100 * float(b))}", float(b)) for b in args.budgets.split(",")]
    rows = {}
    for name, budget in variants:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", *common]
        if budget is not None:
            cmd += ["--budget", str(budget)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"variant {name} failed:\n{done.stderr[-3000:]}")
        rows[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{name}: done", file=sys.stderr, flush=True)
    total = rows["resident"]["expert_bytes"]
    print(f"reference architecture at dim {args.dim}, ffn {args.ffn}: {args.layers} layers x {args.experts} experts, "
          f"{total / MIB:.0f} MiB of experts; prompt {args.prompt}, {args.decode} decode steps; one process per variant")
    print(f"{'variant':12s} {'budget':>8s} {'store peak':>10s} {'rss idle':>9s} {'peak':>8s} {'growth':>8s} "
          f"{'overhead':>8s}   (MiB)")
    headline = {"expert_mib": total / MIB}
    for name, r in rows.items():
        growth = r["peak"] - r["rss_idle"]
        budget = r.get("budget")
        overhead = growth - budget if budget is not None else None
        f = (lambda x: "-" if x is None else f"{x / MIB:.1f}")
        print(f"{name:12s} {f(budget):>8s} {f(r.get('store_peak')):>10s} {f(r['rss_idle']):>9s} {f(r['peak']):>8s} "
              f"{f(growth):>8s} {f(overhead):>8s}")
        if budget is not None:
            headline[f"{name}_overhead_mib"] = overhead / MIB
            headline[f"{name}_peak_saved_vs_resident_mib"] = (rows["resident"]["peak"] - r["peak"]) / MIB
    print(json.dumps(headline))
    return headline


if __name__ == "__main__":
    main()
