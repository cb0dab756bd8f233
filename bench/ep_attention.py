"""Context-coherent EP across attention against two all-to-alls, in a transformers Mixtral.

    python bench/ep_attention.py [--quick] [--ranks 2] [--tokens 64] [--kv-heads 2] [--layers 4] [--reps 9]

A transformers Mixtral built from a config (random weights; hidden 128, 8 heads of 16, ``--kv-heads``
key/value heads, 8 experts, top-2, ``--layers`` layers) on N gloo ranks, each feeding its own batch
of two sequences without a KV cache, compiled with backend "moe" twice, both through the collective
executor (``"collectives": "op"``, so their bytes are recorded):

  * ``all_to_all``: each layer sends its tokens to their experts and back (two all-to-alls);
  * ``coherent``: tokens stay on their experts' ranks; the attention between layers gets every
    token's key/value projections by an all-gather (2 x kv_heads x 16 values per token).

Bytes moved between ranks (payload and metadata, summed over the ranks) come from one forward each;
times per inference forward are medians over interleaved repetitions, the slowest rank's. Logits are
compared with single-process eager. The LAST line is JSON: ``coherent_over_a2a_bytes`` (payload and
metadata), ``coherent_over_a2a_time``, ``context_bytes_share`` (the all-gathers' share of the
coherent bytes) and ``outputs_equal``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("all_to_all", "coherent")


def build_model(kv_heads: int, layers: int):
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                        num_attention_heads=8, num_key_value_heads=kv_heads, head_dim=16, num_local_experts=8,
                        num_experts_per_tok=2, max_position_embeddings=512)
    torch.manual_seed(0)
    model = MixtralForCausalLM(cfg).eval()
    with torch.no_grad():  # a real spread of router logits (random init is nearly uniform)
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.1 if p.dim() > 1 else 0.02)
    return model


def worker(rank, world, tokens, kv_heads, layers, reps):
    import torch.distributed as dist

    from moe_compiler.codegen.comm.executor import record_traffic
    from moe_compiler.pipeline import counters

    ids = torch.randint(0, 256, (2, tokens // 2), generator=torch.Generator().manual_seed(100 + rank))
    base = build_model(kv_heads, layers)
    with torch.no_grad():
        ref = base(ids, use_cache=False).logits
    runs, out = {}, {"bytes": {}, "err": {}, "chained": {}}
    for mode in MODES:
        counters.clear()
        runs[mode] = torch.compile(build_model(kv_heads, layers), backend="moe", options={
            "expert_parallel": {"mode": mode, "collectives": "op", "release_parameters": False}, "strict": True})
        with torch.no_grad():
            runs[mode](ids, use_cache=False)   # compile
            with record_traffic() as traffic:
                y = runs[mode](ids, use_cache=False).logits
        out["chained"][mode] = counters["sparse_collectives"].get("layers_coherent", 0)
        out["err"][mode] = float((y - ref).abs().max() / (1 + ref.abs().max()))
        steps: dict = {}
        for t in traffic:
            steps[t["step"]] = steps.get(t["step"], 0) + t["bytes_remote"]
        out["bytes"][mode] = steps
    times = {mode: [] for mode in MODES}
    for _ in range(reps):
        for mode in MODES:
            dist.barrier()
            t0 = time.perf_counter()
            with torch.no_grad():
                runs[mode](ids, use_cache=False)
            dist.barrier()
            times[mode].append(time.perf_counter() - t0)
    out["median_s"] = {m: statistics.median(t) for m, t in times.items()}
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--tokens", type=int, default=None, help="tokens per rank (two sequences)")
    p.add_argument("--kv-heads", type=int, default=2, choices=(1, 2, 4, 8))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--reps", type=int, default=None)
    a = p.parse_args(argv)
    tokens = a.tokens or (32 if a.quick else 128)
    reps = a.reps or (5 if a.quick else 15)
    sys.path.insert(0, ROOT)
    from moe_compiler.runtime.launch import run_ranks

    t0 = time.perf_counter()
    res = run_ranks("ep_attention:worker", a.ranks,
                    dict(tokens=tokens, kv_heads=a.kv_heads, layers=a.layers, reps=reps), timeout=1200,
                    pg_timeout=300, python_path=(os.path.dirname(os.path.abspath(__file__)),))
    total = {m: sum(sum(r["bytes"][m].values()) for r in res) for m in MODES}
    context = sum(v for r in res for k, v in r["bytes"]["coherent"].items() if k.startswith("context"))
    slowest = {m: max(r["median_s"][m] for r in res) for m in MODES}
    err = max(max(r["err"].values()) for r in res)
    print(f"transformers Mixtral (hidden 128, 8 heads, {a.kv_heads} KV heads, 8 experts, top-2, {a.layers} layers), "
          f"{a.ranks} gloo ranks, {tokens} tokens per rank, no KV cache, Inductor, {reps} interleaved repetitions "
          f"({time.perf_counter() - t0:.0f} s in all); keys+values: {2 * a.kv_heads * 16} values per token, hidden 128")
    print(f"{'mode':<11} {'bytes moved':>12} {'ms/forward':>11} {'layers chained':>15}")
    for m in MODES:
        print(f"{m:<11} {total[m]:12d} {slowest[m] * 1e3:11.2f} {res[0]['chained'][m]:15d}")
    print("coherent bytes by step: " + ", ".join(f"{k} {sum(r['bytes']['coherent'].get(k, 0) for r in res)}"
                                                 for k in sorted(res[0]["bytes"]["coherent"])))
    summary = {"coherent_over_a2a_bytes": round(total["coherent"] / total["all_to_all"], 3),
               "coherent_over_a2a_time": round(slowest["coherent"] / slowest["all_to_all"], 3),
               "context_bytes_share": round(context / max(1, total["coherent"]), 3),
               "layers_chained": res[0]["chained"]["coherent"], "outputs_equal": err < 1e-4}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
