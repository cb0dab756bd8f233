"""Expert parallelism in a compiled model: the ep_moe op against functional collectives in the graph.

    python bench/ep_collectives.py [--quick] [--ranks 2] [--tokens 64] [--reps 15] [--overlap 1,2] [--reorder]

A transformers Mixtral built from a config (random weights; hidden 256, 8 experts, top-2, 2 layers)
on N gloo ranks, each feeding its own batch, compiled with backend "moe" and Inductor twice:
``expert_parallel={"collectives": "op"}`` (one opaque ep_moe op per layer, run by the collective
executor) and ``{"collectives": "functional"}`` (the default: functional collectives traced into
the graph). ``--overlap N`` sets overlap_degree (token chunks; a list such as ``1,2`` times each
degree as its own variant, so pipelined chunks are compared with one chunk in the same run),
``--reorder`` turns on Inductor's reorder_for_compute_comm_overlap in the ranks. The variants
are timed in one process, interleaved, for an inference forward and a training step (forward +
backward); medians over the repetitions, the slowest rank's time per step. Every
variant's logits are compared with single-process eager (and the training loss). The LAST line is
JSON: ``functional_over_op_inference``, ``functional_over_op_training`` (time ratios, < 1 = the
functional form is faster, at the first overlap degree listed), ``outputs_equal``, and with several
degrees ``<collectives>_overlap<N>_over_overlap<first>_<inference|training>``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("op", "functional")


def build_model(hidden: int):
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                        max_position_embeddings=256)
    torch.manual_seed(0)
    model = MixtralForCausalLM(cfg)
    with torch.no_grad():  # a real spread of router logits (random init is nearly uniform)
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.05 if p.dim() > 1 else 0.02)
    return model


def worker(rank, world, tokens, hidden, reps, overlaps=(1,), reorder=False):
    import torch.distributed as dist

    if reorder:   # Inductor may move a collective's issue earlier and its wait later, around compute
        torch._inductor.config.reorder_for_compute_comm_overlap = True

    ids = torch.randint(0, 256, (1, tokens), generator=torch.Generator().manual_seed(100 + rank))
    base = build_model(hidden)
    with torch.no_grad():
        ref = base.eval()(ids).logits
    ref_loss = base.train()(ids).logits.float().square().mean()
    runs, err = {}, {}
    variants = [variant_name(c, n, overlaps) for n in overlaps for c in VARIANTS]
    for n, c in [(n, c) for n in overlaps for c in VARIANTS]:
        opts = {"expert_parallel": {"collectives": c, "release_parameters": False, "overlap_degree": n}}
        inf_model, train_model = copy.deepcopy(base).eval(), copy.deepcopy(base).train()
        runs[variant_name(c, n, overlaps)] = (torch.compile(inf_model, backend="moe", options=opts),
                                              torch.compile(train_model, backend="moe", options=opts), train_model)

    def inference(v):
        with torch.no_grad():
            return runs[v][0](ids).logits

    def training(v):
        runs[v][2].zero_grad(set_to_none=True)
        loss = runs[v][1](ids).logits.float().square().mean()
        loss.backward()
        return loss

    for v in variants:  # compile and warm up
        err[v] = float((inference(v) - ref).abs().max() / (1 + ref.abs().max()))
        err[v + "_loss"] = float((training(v) - ref_loss).abs())
    times = {f"{v}/{kind}": [] for v in variants for kind in ("inference", "training")}
    for _ in range(reps):
        for v in variants:
            for kind, fn in (("inference", inference), ("training", training)):
                dist.barrier()
                t0 = time.perf_counter()
                fn(v)
                dist.barrier()
                times[f"{v}/{kind}"].append(time.perf_counter() - t0)
    return {"median_s": {k: statistics.median(t) for k, t in times.items()}, "err": err}


def variant_name(collectives: str, overlap: int, overlaps) -> str:
    """"op" / "functional", with the overlap degree when several are compared ("functional/2")."""
    return collectives if len(overlaps) == 1 else f"{collectives}/{overlap}"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--overlap", default="1",
                   help="overlap_degree: token chunks per layer (a comma list compares several)")
    p.add_argument("--reorder", action="store_true",
                   help="torch._inductor.config.reorder_for_compute_comm_overlap in the ranks")
    a = p.parse_args(argv)
    tokens = a.tokens or (32 if a.quick else 128)
    reps = a.reps or (7 if a.quick else 21)
    overlaps = [int(n) for n in str(a.overlap).split(",")]
    if any(n < 1 for n in overlaps) or len(set(overlaps)) != len(overlaps):
        p.error(f"--overlap: distinct degrees >= 1, e.g. 1 or 1,2; got {a.overlap!r}")
    sys.path.insert(0, ROOT)
    from moe_compiler.runtime.launch import run_ranks

    t0 = time.perf_counter()
    res = run_ranks("ep_collectives:worker", a.ranks, dict(tokens=tokens, hidden=a.hidden, reps=reps, overlaps=overlaps,
                                                        reorder=a.reorder), timeout=1200,
                    pg_timeout=300, python_path=(os.path.dirname(os.path.abspath(__file__)),))
    slowest = {k: max(r["median_s"][k] for r in res) for k in res[0]["median_s"]}
    errs = {k: max(r["err"][k] for r in res) for k in res[0]["err"]}
    print(f"transformers Mixtral (hidden {a.hidden}, 8 experts, top-2, 2 layers), {a.ranks} gloo ranks, {tokens} "
          f"tokens per rank, Inductor, {reps} interleaved repetitions ({time.perf_counter() - t0:.0f} s in all)")
    variants = [variant_name(c, n, overlaps) for n in overlaps for c in VARIANTS]
    print(f"{'collectives':<14} {'inference ms':>13} {'training ms':>12} {'max rel err':>12} {'loss err':>10}")
    for v in variants:
        print(f"{v:<14} {slowest[v + '/inference'] * 1e3:13.2f} {slowest[v + '/training'] * 1e3:12.2f} "
              f"{errs[v]:12.1e} {errs[v + '_loss']:10.1e}")
    first = overlaps[0]
    op, functional = variant_name("op", first, overlaps), variant_name("functional", first, overlaps)
    summary = {f"functional_over_op_{kind}": round(slowest[f"{functional}/{kind}"] / slowest[f"{op}/{kind}"], 3)
               for kind in ("inference", "training")}
    for n in overlaps[1:]:
        for c in VARIANTS:
            for kind in ("inference", "training"):
                chunked, one = variant_name(c, n, overlaps), variant_name(c, first, overlaps)
                summary[f"{c}_overlap{n}_over_overlap{first}_{kind}"] = round(
                    slowest[f"{chunked}/{kind}"] / slowest[f"{one}/{kind}"], 3)
    summary["outputs_equal"] = all(e < 1e-4 for e in errs.values())
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
