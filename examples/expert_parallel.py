"""Expert parallelism: a tiny transformers Mixtral on 4 gloo ranks with backend "moe".

    python examples/expert_parallel.py [--ranks 4] [--tokens 32]

Every rank builds the same model (random weights, no download) and feeds its OWN token batch.
The model is compiled with ``options={"expert_parallel": {...}}`` for each mode; the MoE layers
then route locally, exchange per-destination counts, send tokens to their experts' ranks with
all_to_all_single, run the local experts and send the results back. Each rank checks its logits
against single-process eager, and the script prints the bytes each mode moved between ranks
(hidden-state payload and routing metadata, summed over ranks), the expert weight bytes each rank
needs under the placement (moe_compiler.explain reports the same) and the bytes each rank holds
after the compile (inference compiles keep only this rank's experts and release the module's whole
tensors; each mode therefore compiles a fresh copy of the model). The "fssdp" mode
(``{"movement": "weights"}``) moves the experts each rank's tokens use instead of the tokens.
Mode "coherent" (ExFlow) keeps tokens on their experts' ranks between MoE layers; Mixtral has attention
between them, which the chain crosses by all-gathering every token's key/value projections (the
context made coherent) so each rank runs attention for the rows it holds. The forward runs without a
KV cache (``use_cache=False``: a returned cache would need every token's keys at home, and the chain
says so). The gather costs about as much as the return all-to-all it saves: this model's keys and
values are as wide as its hidden state, and coherent moves 1.03x the bytes of two all-to-alls at 2
ranks, 1.35x at 4 (bench/ep_attention.py: 0.96x and 1.27x with keys+values half as wide). The byte counts come
from the collective executor, so these modes run with ``"collectives": "op"`` (one ep_moe op per
layer). "functional" is mode all_to_all as users get it by default: the all-to-alls are functional
collectives traced into the graph, which the traffic recorder does not see (no byte count is
printed for it; it moves the same rows as all_to_all).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

OP = {"collectives": "op"}   # the ep_moe op: its collectives go through the executor, which counts bytes
MODES = (("all_to_all", OP), ("hierarchical", {"ranks_per_node": 2, **OP}),
         ("coherent", OP),                     # ExFlow: applies only where MoE layers are joined by per-token ops
         ("fssdp", {"movement": "weights"}),   # Hecate: the experts move to the tokens instead
         ("functional", {}))                   # the default: all_to_all as functional collectives in the graph


def build_model():
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=96, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                        max_position_embeddings=64)
    torch.manual_seed(0)
    model = MixtralForCausalLM(cfg).eval()
    with torch.no_grad():  # a real spread of router logits (random init is nearly uniform)
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.2 if p.dim() > 1 else 0.05)
    return model


def rank_main(rank, world, tokens):
    from moe_compiler.codegen.comm.executor import record_traffic
    from moe_compiler.explain import collect_records
    from moe_compiler.runtime.expert_parallel import expert_bytes_held, expert_bytes_per_rank

    ids = torch.randint(0, 96, (1, tokens), generator=torch.Generator().manual_seed(100 + rank))
    model = build_model()
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    out = {"expert_bytes": expert_bytes_per_rank(model, None, world), "expert_bytes_whole": expert_bytes_held(model)}
    for mode, extra in MODES:
        torch._dynamo.reset()
        model = build_model()  # a fresh copy: an inference compile releases the experts this rank does not hold
        opts = extra if mode in ("fssdp", "functional") else {"mode": mode, **extra}
        compiled = torch.compile(model, backend="moe", options={
            "expert_parallel": opts, "inner_backend": "eager", "strict": True})
        with torch.no_grad():
            with collect_records() as records:
                compiled(ids, use_cache=False)  # compile (collectives run too: every rank compiles the same graph)
            with record_traffic() as traffic:
                logits = compiled(ids, use_cache=False).logits
        torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
        payload = sum(t["bytes_remote"] for t in traffic if not t["step"].endswith("_meta"))
        meta = sum(t["bytes_remote"] for t in traffic if t["step"].endswith("_meta"))
        out[mode] = dict(payload=payload, meta=meta, steps=len(traffic), held=expert_bytes_held(model),
                         strategy=[layer.strategy for rec in records for layer in rec.moe_layers][:1])
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    a = ap.parse_args(argv)
    from moe_compiler.runtime.launch import run_ranks

    here = os.path.dirname(os.path.abspath(__file__))
    res = run_ranks("expert_parallel:rank_main", a.ranks, {"tokens": a.tokens}, timeout=600, pg_timeout=120,
                    python_path=(here,))
    print(f"tiny Mixtral (2 layers, 8 experts, top-2, hidden 64) on {a.ranks} gloo ranks, {a.tokens} tokens per rank;"
          " logits equal single-process eager on every rank")
    print(f"expert weight bytes per rank (contiguous placement): {res[0]['expert_bytes_whole']} B in the whole "
          "model; each rank's share: " + ", ".join(f"rank {r}: {b} B" for r, b in enumerate(res[0]["expert_bytes"])))
    for mode, _ in MODES:
        if mode == "functional":   # Inductor-traced collectives: the executor's traffic recorder does not see them
            print(f"{mode:<13} all_to_all as functional collectives in the graph "
                  f"({res[0][mode]['strategy'][0] if res[0][mode]['strategy'] else '?'}); expert weight bytes "
                  "each rank holds: " + ", ".join(f"rank {r}: {res[r][mode]['held']} B" for r in range(len(res))))
            continue
        payload = sum(r[mode]["payload"] for r in res)
        meta = sum(r[mode]["meta"] for r in res)
        what = "expert weights (sparse all-gather)" if mode == "fssdp" else "hidden states"
        print(f"{mode:<13} moved {payload:>8} B of {what} + {meta:>6} B of routing metadata between ranks "
              f"({res[0][mode]['steps']} data collectives per rank, count/load exchanges not counted)")
        print(f"{'':<13} expert weight bytes each rank holds after the compile: "
              + ", ".join(f"rank {r}: {res[r][mode]['held']} B" for r in range(len(res))))
        if mode == "coherent":
            print(f"{'':<13} layer 0: {res[0][mode]['strategy'][0] if res[0][mode]['strategy'] else '?'}")


if __name__ == "__main__":
    sys.exit(main())
