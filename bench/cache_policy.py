"""Bookkeeping cost of the cache policies per decode token, at a real model's shape.

    python bench/cache_policy.py                      # DeepSeek-V3's shape: 58 MoE layers x 256 experts, top-8
    python bench/cache_policy.py --layers 8 --experts 16 --top-k 2    # the wide reference model's

An expert store spends this time on the model's thread. The policy is driven by
``cache_replay.replay`` (the store's calls: the predictor's votes for the layer's top-(k+1) experts,
an access per cached expert used, ``on_use``, then per miss an eviction in the policy's order and
an insert) over a synthetic decode trace: each layer routes from its own Zipf-like popularity (some
experts hot, so a cache has something to learn), and its prediction holds the used experts with one
wrong half the time plus one extra. The fast tier holds --budget of all experts. No tensors, no
files: only Python bookkeeping. Prints ms per token (median of --reps traces) and the hit rate.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe_compiler.runtime.cache_policy import POLICIES  # noqa: E402
from moe_compiler.runtime.cache_replay import replay  # noqa: E402


def synthetic_trace(layers: int, experts: int, top_k: int, tokens: int, seed: int) -> tuple:
    """(expert_ids, predicted_ids): [tokens, layers, top_k] and [tokens, layers, top_k + 1]."""
    rng = np.random.default_rng(seed)
    popularity = 1.0 / (1.0 + rng.permuted(np.tile(np.arange(experts), (layers, 1)), axis=1)) ** 1.1
    popularity /= popularity.sum(1, keepdims=True)
    ids = np.empty((tokens, layers, top_k), dtype=np.int64)
    for layer in range(layers):
        for t in range(tokens):
            ids[t, layer] = rng.choice(experts, top_k, replace=False, p=popularity[layer])
    predicted = np.concatenate([ids, rng.integers(0, experts, (tokens, layers, 1))], axis=2)
    wrong = rng.random((tokens, layers)) < 0.5
    slot = rng.integers(0, top_k, (tokens, layers))
    t_idx, l_idx = np.nonzero(wrong)
    predicted[t_idx, l_idx, slot[t_idx, l_idx]] = rng.integers(0, experts, len(t_idx))
    return ids, predicted


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=58)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--budget", type=float, default=0.5, help="fraction of all experts the fast tier holds")
    ap.add_argument("--tokens", type=int, default=100)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--policies", default=",".join(POLICIES))
    args = ap.parse_args(argv)
    capacity = int(args.budget * args.layers * args.experts)
    traces = [synthetic_trace(args.layers, args.experts, args.top_k, args.tokens, seed) for seed in range(args.reps)]
    print(f"{args.layers} layers x {args.experts} experts, top-{args.top_k}, fast tier {capacity} experts "
          f"({args.budget:.0%}), {args.tokens} decode tokens x {args.reps} traces")
    result = {}
    for name in args.policies.split(","):
        times, hits = [], []
        for ids, predicted in traces:
            start = time.perf_counter()
            r = replay(ids, name, capacity, args.experts, predicted_ids=predicted)
            times.append(time.perf_counter() - start)
            hits.append(r.hit_rate)
        ms = 1e3 * statistics.median(times) / args.tokens
        result[name] = round(ms, 3)
        print(f"  {name:10s} {ms:8.3f} ms per token   hit rate {statistics.median(hits):.3f}")
    print(json.dumps({"ms_per_token": result, "layers": args.layers, "experts": args.experts,
                      "top_k": args.top_k, "budget": args.budget}))


if __name__ == "__main__":
    main()
