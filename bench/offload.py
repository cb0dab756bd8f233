"""Expert offloading on the trained reference model: prefill and decode, budgets x policies, side by side.

    python bench/offload.py            # budgets 25/50/75%, every variant
    python bench/offload.py --quick    # 50% budget, fewer steps; last line is a JSON object
    python bench/offload.py --quick --device cuda --variants on_demand,lru,res+shallow   # on a GPU, a subset
    python bench/offload.py --quick --inner eager --threads 2    # faster compiles; every core to the model
    python bench/offload.py --quick --model wide  # the same model trained with 16x wider experts (768 KiB)
    python bench/offload.py --quick --model DIR   # any saved ReferenceLM folder

``--model wide`` is examples/train_reference_model.py --dim 128 --ffn 512 --steps 1500 (the reference
model's recipe and step count, experts of 768 KiB instead of 48 KiB), trained on first use into
~/.cache/moe_compiler/reference_lm_wide (~20 minutes on 2 cores). On the reference model a 48 KiB read
costs about what the expert's compute costs; with wider experts a load costs several times the
compute, as it does when real experts come over PCIe or from disk, which is where prediction pays.

The model (tests/data/reference_lm: 8 MoE layers, 16 experts each, top-2) is compiled with backend
"moe" once per variant, each from its own copy of the weights (offloading frees the module's expert
weights). Variants, all on identical teacher-forced tokens from held-out text:

    resident          no offload: every expert in memory (the bound)
    on_demand         offload, no prediction, a fast tier of one expert: each layer loads what it uses
    lru               offload, no prediction, LRU cache of the budget
    cache+<policy>    offload, no prediction, a cache of the budget with policy arc / shallow / predicted
                      (without predictions, "predicted" keeps each layer's most used experts: its share
                      of the budget follows use)
    pred+<policy>     offload with hoist_prefetch (Fate) and policy lru / arc / shallow / predicted,
                      top-(k+1) experts predicted per token
    pred2+shallow     the same with top-(k+2) per token (option prefetch_extra=2)
    res+<policy>      prefetch_source "residual": each layer predicted from the residual stream entering
                      its block, through its own norm and router (loads overlap the block's attention)
    res2+predicted    the same with top-(k+2) per token and the predicted-demand policy
    res0+predicted    the same with top-k per token (prefetch_extra 0)
    res+ahead2+<p>    prefetch_lookahead 2: each layer also predicted from the residual stream entering the
                      block before (loads start a block earlier; the nearer prediction refines them)
    pred+ahead2+<p>   the same from the gate inputs of the two layers before
    <v>+int8          the same with quantize "int8": the fast tier holds int8 copies (results change:
                      reported as the largest logit difference and the top-1 agreement with resident)
    <v>/p, <v>/r      (--loaders thread,process,readahead) the same with the loader process or kernel
                      readahead instead of the loader thread

Every variant is compiled the way users get it (inner backend Inductor, torch.compile's default
dynamic=None; --inner eager compiles ~2x faster, --shapes static compiles a graph per decode
length as before session 12) and runs with --threads intra-op threads (default: all cores but one,
so a background loader has a core of its own; the resident bound runs with the same setting). Each
repetition runs every variant in turn (interleaved) on the next stretch of held-out text (the same
for every variant; a new one each repetition, so a cache never meets text it has seen): a prompt of
--prompt tokens per sequence (prefill), then --decode single-token steps with a KV cache. Expert
reads go to disk: the store drops each file's page-cache pages after reading it (posix_fadvise
DONTNEED). Reported per variant: median
tokens/s for prefill and decode, hit rate (used experts resident or already in flight when the layer
needed them), ready rate (of those, already loaded: the layer did not wait), prediction recall (used
experts inside the predicted set), token recall (a token's routed experts inside its own top-(k+1)
prediction), useful (prefetched experts a step then used), late (of those, the ones no loader had
started when the layer needed them: the model's thread read them itself), MiB loaded, stall time and
the store's peak bytes against its budget; outputs are
compared with the resident model's bit for bit (torch.equal), repetition by repetition.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from moe_compiler.reference_lm import ReferenceLM, corpus_bytes, corpus_files  # noqa: E402
from moe_compiler.runtime import offload  # noqa: E402

MODEL_DIR = os.path.join(os.path.dirname(HERE), "tests", "data", "reference_lm")
POLICIES = ("lru", "arc", "shallow", "predicted")
LOADER_SUFFIX = {"thread": "", "process": "/p", "readahead": "/r"}


WIDE_TRAINING = ["--dim", "128", "--ffn", "512", "--steps", "1500", "--seed", "0"]


def model_folder(name: str) -> str:
    """--model: a saved ReferenceLM folder, or "wide" (trained on first use, see the module docstring)."""
    if name != "wide":
        return name
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    folder = os.path.join(cache, "moe_compiler", "reference_lm_wide")
    if not os.path.exists(os.path.join(folder, "affinity.json")):  # written last by the training script
        train = os.path.join(os.path.dirname(HERE), "examples", "train_reference_model.py")
        print(f"training the wide reference model into {folder} (~20 minutes on 2 cores)", flush=True)
        subprocess.run([sys.executable, train, *WIDE_TRAINING, "--out", folder], check=True)
    return folder


def expert_bytes(model_dir: str) -> int:
    """Bytes of one expert of a saved ReferenceLM: gate_up [2F, D] + down [D, F] in fp32."""
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    return 4 * 3 * cfg["dim"] * cfg["ffn"]


def heldout_tokens(batch: int, length: int, start: int = 0) -> torch.Tensor:
    """[batch, length] bytes of held-out text: sequence i from position i * (len / batch) + start."""
    files = corpus_files()
    held = corpus_bytes(files[int(len(files) * 0.95):])
    stride = len(held) // batch
    if start + length > stride:
        raise ValueError(f"held-out text has {stride} bytes per sequence, fewer than {start + length}")
    return torch.stack([held[i * stride + start: i * stride + start + length] for i in range(batch)])


class Variant:
    def __init__(self, name: str, budget, policy: str | None, prefetch: bool, root: str, extra: int = 1,
                 source: str = "gate", lookahead: int = 1, device: str = "cpu", loader: str = "thread",
                 quantize: str | None = None, inner: str = "inductor", dynamic: bool | None = False,
                 model_dir: str = MODEL_DIR, host_budget=0):
        self.name, self.budget, self.policy, self.prefetch, self.extra = name, budget, policy, prefetch, extra
        self.model = ReferenceLM.load(model_dir).to(device)
        self.sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        options = {"inner_backend": inner}
        self.store = None
        if policy is not None:
            folder = os.path.join(root, name.replace("+", "_").replace("/", "_"))
            shutil.rmtree(folder, ignore_errors=True)
            options["offload"] = {"budget": budget, "policy": policy, "dir": folder, "prefetch": prefetch,
                                  "prefetch_extra": extra, "prefetch_source": source, "loader": loader,
                                  "prefetch_lookahead": lookahead, "host_budget": host_budget,
                                  "quantize": quantize}
            self.store_id, self.store = offload.store_for(offload.normalize_options(options["offload"]))
        self.fn = torch.compile(self.model, backend="moe", options=options, dynamic=dynamic)
        self.prefill_s, self.decode_s, self.decode_cpu_s, self.outputs = [], [], [], None
        self.outputs_by_rep = []  # logits of each measured repetition (compared with resident's, rep by rep)
        self.phase = {"prefill": {}, "decode": {}}  # summed store counters per phase

    def _count(self, phase: str, before: dict | None):
        if self.store is None:
            return None
        now = self.store.stats()
        if before is not None:
            acc = self.phase[phase]
            for k in ("hits", "ready", "misses", "predicted", "predicted_of", "token_hits", "token_total",
                      "bytes_loaded", "stall_s", "prefetched", "prefetch_used", "prefetches_read_by_caller"):
                acc[k] = acc.get(k, 0) + now[k] - before[k]
        return now

    def run(self, tokens: torch.Tensor, prompt: int):
        """Prefill tokens[:, :prompt], then decode the rest one position at a time (teacher forced)."""
        outs = []
        with torch.no_grad():
            s0 = self._count("prefill", None)
            self.sync()
            t0 = time.perf_counter()
            logits, cache = self.fn(tokens[:, :prompt], cache=[])
            self.sync()
            t1 = time.perf_counter()
            c1 = time.thread_time()
            s1 = self._count("prefill", s0)
            outs.append(logits)
            for t in range(prompt, tokens.shape[1]):
                logits, cache = self.fn(tokens[:, t:t + 1], cache=cache)
                outs.append(logits)
            self.sync()
            t2 = time.perf_counter()
            self.last_decode_cpu = time.thread_time() - c1
            self._count("decode", s1)
        return torch.cat(outs, 1), t1 - t0, t2 - t1

    def measured(self, phase: str) -> dict:
        a = self.phase[phase]
        used = a.get("hits", 0) + a.get("misses", 0)
        ratio = (lambda n, d: a.get(n, 0) / a[d] if a.get(d) else None)
        return {"hit_rate": a["hits"] / used if used else None, "ready_rate": a["ready"] / used if used else None,
                "prediction_recall": ratio("predicted", "predicted_of"),
                "token_recall": ratio("token_hits", "token_total"), "bytes_loaded": a.get("bytes_loaded", 0),
                "stall_s": a.get("stall_s", 0.0), "prefetched": a.get("prefetched", 0),
                "prefetch_used": a.get("prefetch_used", 0),
                "prefetches_read_by_caller": a.get("prefetches_read_by_caller", 0)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", default=MODEL_DIR,
                    help="a saved ReferenceLM folder (default: the trained reference model), or 'wide': the "
                         "same recipe with 768 KiB experts, trained on first use")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--decode", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--budgets", default=None, help="comma-separated fractions, e.g. 0.25,0.5,0.75")
    ap.add_argument("--host-budget", type=float, default=0.0,
                    help="the host tier of every offload variant, a fraction of expert bytes (default 0: every "
                         "load reads the disk; 1: the experts stay in host memory after their first read, "
                         "as in Fate's and MoE-Infinity's setting, and a load only prepares a host copy)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (experts copied on the store's side stream)")
    ap.add_argument("--variants", default=None,
                    help="comma-separated name prefixes to run, e.g. on_demand,lru,res+shallow (resident always runs)")
    ap.add_argument("--loaders", default="thread",
                    help="comma-separated: thread, process, readahead (each offload variant once per loader; "
                         "process and readahead variants are named <variant>@<pct>/p and /r)")
    ap.add_argument("--inner", default="inductor", choices=("inductor", "eager"),
                    help="the moe backend's inner backend for the graph around the MoE ops")
    ap.add_argument("--shapes", default="auto", choices=("auto", "static"),
                    help="auto: torch.compile's default (dynamic=None: symbolic lengths from the first "
                         "recompile on, a few graphs per variant); static: dynamic=False, a graph per decode length")
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                    help="torch intra-op threads for every variant (default: all cores but one)")
    args = ap.parse_args(argv)
    shown = "reference_lm" if args.model == MODEL_DIR else args.model   # how the model is named in the output
    args.model = model_folder(args.model)
    dynamic = {"static": False, "auto": None}[args.shapes]
    torch.set_num_threads(args.threads)
    decode = args.decode or (24 if args.quick else 48)
    reps = args.reps or (3 if args.quick else 5)
    budgets = [float(b) for b in (args.budgets or ("0.5" if args.quick else "0.25,0.5,0.75")).split(",")]
    torch.manual_seed(0)
    torch._dynamo.config.cache_size_limit = 256
    # a new stretch of text every repetition: caches that learn what a text uses (frequency policies)
    # must not be measured on text they have already seen
    length = args.prompt + decode
    tokens = [heldout_tokens(args.batch, length, rep * length).to(args.device) for rep in range(reps + 1)]
    root = tempfile.mkdtemp(prefix="moe_offload_bench_")
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    wanted = args.variants.split(",") if args.variants else None

    loaders = args.loaders.split(",")

    def variant(name, *a, **kw):
        if wanted is None or any(name.startswith(w + "@") for w in wanted):
            for loader in loaders:
                variants.append(Variant(name + LOADER_SUFFIX[loader], *a, root=root, device=args.device,
                                        loader=loader, inner=args.inner, dynamic=dynamic, model_dir=args.model,
                                        host_budget=args.host_budget or 0, **kw))   # 0: no host tier

    variants = [Variant("resident", None, None, False, root, device=args.device, inner=args.inner, dynamic=dynamic,
                        model_dir=args.model)]
    for b in budgets:
        pct = int(round(100 * b))
        variant(f"on_demand@{pct}", expert_bytes(args.model), "lru", False)  # room for one expert
        variant(f"lru@{pct}", b, "lru", False)
        for p in (POLICIES[1:] if not args.quick else ("predicted",)):
            variant(f"cache+{p}@{pct}", b, p, False)
        for p in (POLICIES if not args.quick else ("lru", "shallow", "predicted")):
            variant(f"pred+{p}@{pct}", b, p, True)
        # a wider prediction (top-(k+2) per token): more recall for more wasted loads
        variant(f"pred2+shallow@{pct}", b, "shallow", True, extra=2)
        # predicted from the residual stream entering each block (prefetch_source "residual")
        for p in ("lru", "shallow", "predicted"):
            variant(f"res+{p}@{pct}", b, p, True, source="residual")
        variant(f"res2+predicted@{pct}", b, "predicted", True, source="residual", extra=2)
        # top-k per token only (prefetch_extra 0): fewer wasted loads, less recall
        variant(f"res0+predicted@{pct}", b, "predicted", True, source="residual", extra=0)
        # predicted from two sources (prefetch_lookahead 2): loads start a block earlier, the nearer
        # prediction refines them
        for p in ("lru", "predicted"):
            variant(f"res+ahead2+{p}@{pct}", b, p, True, source="residual", lookahead=2)
        variant(f"pred+ahead2+predicted@{pct}", b, "predicted", True, lookahead=2)
        # int8 cached copies (results change): about four times the experts fit the same budget
        variant(f"lru+int8@{pct}", b, "lru", False, quantize="int8")
        variant(f"res+shallow+int8@{pct}", b, "shallow", True, source="residual", quantize="int8")
    # --shapes static compiles a graph per decode length, for every variant: dynamo's limit on all
    # recompilations together (256) would otherwise end a larger sweep with the model run eagerly
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit,
                                                           len(variants) * (decode + 4))
    print(f"model {shown} ({expert_bytes(args.model) / 1024:.0f} KiB per expert) on {args.device}, batch {args.batch}, "
          f"prompt {args.prompt}, {decode} decode steps, {reps} reps (+1 warm-up), {len(variants)} variants, "
          f"inner backend {args.inner}, {args.threads} torch threads", flush=True)

    for rep in range(reps + 1):  # rep 0 compiles and warms the caches
        started = time.perf_counter()
        for v in variants:
            out, pre, dec = v.run(tokens[rep], args.prompt)
            if rep == 0:
                v.phase = {"prefill": {}, "decode": {}}
                continue
            v.prefill_s.append(pre)
            v.decode_s.append(dec)
            v.decode_cpu_s.append(v.last_decode_cpu)
            # the resident model packs its expert weights (oneDNN) from its second call on, so its
            # outputs are compared from the first measured repetition
            v.outputs_by_rep.append(out)
            if rep == 1:
                v.outputs = out
        print(f"repetition {rep}/{reps}{' (compile and warm-up)' if rep == 0 else ''}: "
              f"{time.perf_counter() - started:.1f} s", flush=True)
    resident = variants[0]
    rows = []
    for v in variants:
        st = v.store.stats() if v.store is not None else {}
        row = {"variant": v.name,
               "prefill_tok_s": args.batch * args.prompt / statistics.median(v.prefill_s),
               "decode_tok_s": args.batch * decode / statistics.median(v.decode_s),
               # CPU time of the model's own thread per decode step (loader thread and OpenMP workers excluded)
               "decode_cpu_ms": 1e3 * statistics.median(v.decode_cpu_s) / decode,
               "equal_to_resident": len(v.outputs_by_rep) == len(resident.outputs_by_rep) and all(
                   torch.equal(a, b) for a, b in zip(v.outputs_by_rep, resident.outputs_by_rep)),
               "quantized": "+int8" in v.name}
        if row["quantized"] and v.outputs is not None and resident.outputs is not None:
            row["max_logit_diff"] = float((v.outputs.float() - resident.outputs.float()).abs().max())
            row["top1_agreement"] = float((v.outputs.argmax(-1) == resident.outputs.argmax(-1)).float().mean())
        if st:
            for phase in ("prefill", "decode"):
                m = v.measured(phase)
                row[phase] = dict(hit_rate=m["hit_rate"], ready_rate=m["ready_rate"],
                                  prediction_recall=m["prediction_recall"], token_recall=m["token_recall"],
                                  mib_loaded=m["bytes_loaded"] / 2 ** 20 / reps,
                                  stall_ms=1e3 * m["stall_s"] / reps,
                                  prefetch_useful=m["prefetch_used"] / m["prefetched"] if m["prefetched"] else None,
                                  # used prefetches no loader had started in time: the model's thread read them
                                  prefetch_late=(m["prefetches_read_by_caller"] / m["prefetch_used"]
                                                 if m["prefetch_used"] else None))
            row.update(peak_mib=st["peak_bytes"] / 2 ** 20, budget_mib=st["budget_bytes"] / 2 ** 20,
                       within_budget=st["peak_bytes"] <= st["budget_bytes"])
        rows.append(row)
    f = (lambda x, fmt: "-" if x is None else format(x, fmt))
    width = max(len(r["variant"]) for r in rows)   # names like res+ahead2+predicted@50/p
    for phase in ("prefill", "decode"):
        print(f"\n{phase + ':':9s}{'variant':{width}s} {'tok/s':>8s} {'hit':>6s} {'ready':>6s} {'recall':>6s} {'tokrec':>6s} "
              f"{'useful':>6s} {'late':>6s} {'MiB/rep':>8s} {'stall ms':>8s} {'peak/budget MiB':>16s} equal")
        for r in rows:
            p = r.get(phase, {})
            print(f"{'':9s}{r['variant']:{width}s} {r[phase + '_tok_s']:8.1f} {f(p.get('hit_rate'), '6.3f'):>6s} "
                  f"{f(p.get('ready_rate'), '6.3f'):>6s} {f(p.get('prediction_recall'), '6.3f'):>6s} "
                  f"{f(p.get('token_recall'), '6.3f'):>6s} "
                  f"{f(p.get('prefetch_useful'), '6.3f'):>6s} {f(p.get('prefetch_late'), '6.3f'):>6s} "
                  f"{f(p.get('mib_loaded'), '8.2f'):>8s} "
                  f"{f(p.get('stall_ms'), '8.1f'):>8s} "
                  f"{(f(r.get('peak_mib'), '.2f') + '/' + f(r.get('budget_mib'), '.2f')) if 'peak_mib' in r else '-':>16s} "
                  f"{r['equal_to_resident']}")
    for r in rows:
        if "max_logit_diff" in r:
            print(f"{r['variant']}: logits differ from resident by up to {r['max_logit_diff']:.4f} "
                  f"(resident logits up to {float(resident.outputs.abs().max()):.2f}); top-1 agreement "
                  f"{r['top1_agreement']:.4f}")
    print("\nmodel thread CPU per decode step (ms; the loader thread and OpenMP workers excluded): "
          + ", ".join(f"{r['variant']} {r['decode_cpu_ms']:.2f}" for r in rows))
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    total_mib = variants[-1].store.total_expert_bytes / 2 ** 20 if variants[-1].store else 0
    print(f"expert bytes of the model: {total_mib:.2f} MiB; process peak RSS grew {(rss1 - rss0) / 1024:.0f} MiB "
          f"while {len(variants)} compiled copies ran (the model is far below RSS noise: the store's peak bytes "
          "above are the memory figure)")
    by = {r["variant"]: r for r in rows}
    at50 = [r for r in rows if r["variant"].startswith(("pred", "res")) and r["variant"].split("/")[0].endswith("@50")
            and not r["quantized"]]
    first = LOADER_SUFFIX[args.loaders.split(",")[0]]   # the first loader's variants stand for plain names
    int8 = by.get("res+shallow+int8@50" + first)
    best = max(at50, key=lambda r: r["decode"]["hit_rate"] or 0) if at50 else None

    def on_demand_for(r):
        """On-demand loading in the variant's run of budgets with its own loader (readahead also speeds up
        on-demand loads); on-demand keeps room for one expert whatever the budget."""
        tail = r["variant"].split("@", 1)[1]                 # "50" or "50/r"
        return by.get("on_demand@" + tail, by.get("on_demand@" + tail.split("/")[0]))

    def speedup(r):
        """Decode speed of variant r over on-demand loading (on_demand_for), None when either is missing."""
        od = on_demand_for(r) if r is not None else None
        return r["decode_tok_s"] / od["decode_tok_s"] if od is not None else None

    def fastest_exact(pct: int):
        """The exact variant at budget pct fastest against on-demand loading (prediction or not)."""
        exact = [r for r in rows if r["variant"].split("/")[0].endswith(f"@{pct}")
                 and not r["variant"].startswith("on_demand") and not r["quantized"] and r["equal_to_resident"]
                 and speedup(r) is not None]
        return max(exact, key=speedup) if exact else None

    od50, lru50 = by.get("on_demand@50" + first), by.get("lru@50" + first)
    fastest_by_pct = {int(round(100 * b)): fastest_exact(int(round(100 * b))) for b in budgets}
    fastest = fastest_by_pct.get(50)
    by_budget = {f"{pct}pct": {"variant": r["variant"], "decode_speedup_vs_on_demand": round(speedup(r), 3)}
                 for pct, r in fastest_by_pct.items() if r is not None}
    headline = {
        "hit_rate_at_50pct": best["decode"]["hit_rate"] if best else None,  # decode; prefill in the table
        "ready_rate_at_50pct": best["decode"]["ready_rate"] if best else None,
        "best_policy_at_50pct": best["variant"] if best else None,
        "decode_speedup_vs_on_demand": speedup(best),
        "decode_speedup_lru_vs_on_demand": speedup(lru50),
        "decode_vs_resident": best["decode_tok_s"] / by["resident"]["decode_tok_s"] if best else None,
        # the exact variant at 50% fastest against on-demand loading by its own loader (prediction or not)
        "fastest_exact_at_50pct": fastest["variant"] if fastest else None,
        "fastest_decode_speedup_vs_on_demand": speedup(fastest),
        "fastest_exact_by_budget": by_budget,
        "prediction_recall": best["decode"]["prediction_recall"] if best else None,
        # of the prefetches it used, the share no loader had started in time (the model's thread read them)
        "prefetch_late_at_50pct": best["decode"]["prefetch_late"] if best else None,
        "outputs_equal": all(r["equal_to_resident"] for r in rows if not r["quantized"]),
        "int8_hit_rate_at_50pct": int8["decode"]["hit_rate"] if int8 else None,
        "int8_decode_speedup_vs_on_demand": speedup(int8),
        "int8_max_logit_diff": int8.get("max_logit_diff") if int8 else None,
        "int8_top1_agreement": int8.get("top1_agreement") if int8 else None,
        "within_budget": all(r.get("within_budget", True) for r in rows),
        # the ceiling of any offloading scheme against on-demand loading on this machine
        "resident_over_on_demand": (by["resident"]["decode_tok_s"] / od50["decode_tok_s"] if od50 else None),
        "inner_backend": args.inner, "threads": args.threads,
        "model": shown, "expert_kib": expert_bytes(args.model) / 1024,
    }
    shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(headline))
    return headline


if __name__ == "__main__":
    main()
