"""Train the reference MoE language model and record its routing traces.

    python examples/train_reference_model.py [--minutes 4] [--out tests/data/reference_lm]
    python examples/train_reference_model.py --dim 128 --ffn 512 --steps 1500 --out DIR   # wider experts

A byte-level model (moe_compiler.reference_lm: 8 layers, 16 experts, top-2) trained with
backend "moe" (its lowered, saving backward) on the Python standard library's source files;
the last files (sorted) are held out. Writes model.safetensors, config.json, the held-out
routing trace (routing_heldout.npz, recorded with moe_compiler.record_routing) and
affinity.json: how concentrated P(expert at l+1 | expert at l) is.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

import moe_compiler
from moe_compiler.reference_lm import ReferenceLM, ReferenceLMConfig, corpus_bytes, corpus_files


def batches(data: torch.Tensor, batch: int, context: int, generator):
    while True:
        starts = torch.randint(0, len(data) - context - 1, (batch,), generator=generator)
        chunk = torch.stack([data[s: s + context + 1] for s in starts.tolist()])
        yield chunk[:, :-1], chunk[:, 1:]


def balance_loss(router_logits: list, top_k: int) -> torch.Tensor:
    """Switch-style load-balancing loss: E * sum_e f_e * P_e, averaged over layers."""
    total = 0.0
    for logits in router_logits:
        probs = logits.float().softmax(-1)
        e = probs.shape[-1]
        chosen = F.one_hot(probs.topk(top_k, dim=-1).indices, e).sum(1).float()
        total = total + e * (chosen.mean(0) / top_k * probs.mean(0)).sum()
    return total / len(router_logits)


def affinity_report(trace) -> dict:
    """Per consecutive layer pair: mean over experts of max_j P(j at l+1 | i at l), vs uniform 1/E."""
    e = trace.num_experts
    per_pair = []
    for layer in range(trace.num_layers - 1):
        counts = trace.transition_counts(layer).astype(np.float64)
        rows = counts.sum(1, keepdims=True)
        p = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
        ent = -(np.where(p > 0, p * np.log(p), 0)).sum(1)
        weight = rows[:, 0] / rows.sum()
        per_pair.append(dict(layer=layer, mean_max_conditional=float((p.max(1) * weight).sum()),
                             top4_mass=float((np.sort(p, 1)[:, -4:].sum(1) * weight).sum()),
                             normalized_entropy=float((ent * weight).sum() / math.log(e))))
    mean = {k: float(np.mean([d[k] for d in per_pair])) for k in ("mean_max_conditional", "top4_mass",
                                                                    "normalized_entropy")}
    return dict(uniform_max_conditional=1.0 / e, uniform_top4_mass=4.0 / e, mean=mean, per_layer_pair=per_pair)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=4.0)
    ap.add_argument("--out", default="tests/data/reference_lm")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--heldout-tokens", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None,
                    help="stop after this many steps (reproducible across machines) instead of --minutes")
    defaults = ReferenceLMConfig()
    for name in ("dim", "ffn", "layers", "heads", "experts", "top_k"):
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name),
                        help=f"model {name} (default {getattr(defaults, name)})")
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    cfg = ReferenceLMConfig(dim=args.dim, ffn=args.ffn, layers=args.layers, heads=args.heads,
                            experts=args.experts, top_k=args.top_k)
    files = corpus_files()
    split = int(len(files) * 0.95)
    train, held = corpus_bytes(files[:split]), corpus_bytes(files[split:])
    print(f"corpus: {len(files)} stdlib files, {len(train) / 1e6:.1f} MB train, {len(held) / 1e6:.2f} MB held out")

    model = ReferenceLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    step_fn = torch.compile(model, backend="moe")
    gen = torch.Generator().manual_seed(args.seed)
    t0, step = time.time(), 0
    for x, y in batches(train, args.batch, cfg.context, gen):
        lr = 3e-3 * min(1.0, (step + 1) / 50)
        for g in opt.param_groups:
            g["lr"] = lr
        router_logits = []
        logits = step_fn(x, router_logits)
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab), y.reshape(-1))
        aux = balance_loss(router_logits, cfg.top_k)
        opt.zero_grad(set_to_none=True)
        (loss + 0.01 * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 50 == 0:
            print(f"step {step:5d}  loss {loss.item():.3f} (bits/byte {loss.item() / math.log(2):.2f})  "
                  f"balance {aux.item():.3f}  {time.time() - t0:.0f}s", flush=True)
        if (step >= args.steps) if args.steps is not None else (time.time() - t0 > args.minutes * 60):
            break
    model.eval()
    model.save(args.out)

    n = args.heldout_tokens // cfg.context
    held_batches = [held[i * cfg.context: (i + 1) * cfg.context].view(1, -1) for i in range(n)]
    with torch.no_grad():
        held_loss = np.mean([F.cross_entropy(model(b[:, :-1]).reshape(-1, cfg.vocab), b[0, 1:]).item()
                             for b in held_batches[:16]])
    torch._dynamo.reset()
    trace = moe_compiler.record_routing(model, held_batches, num_experts=cfg.experts, model_name="reference_lm")
    trace.save(os.path.join(args.out, "routing_heldout.npz"))
    report = affinity_report(trace)
    report.update(steps=step, train_seconds=round(time.time() - t0), heldout_loss=float(held_loss),
                  heldout_bits_per_byte=float(held_loss / math.log(2)), trace_tokens=trace.num_tokens)
    with open(os.path.join(args.out, "affinity.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(f"held-out loss {held_loss:.3f} ({held_loss / math.log(2):.2f} bits/byte); trace: {trace.num_tokens} tokens "
          f"x {trace.num_layers} layers x top-{trace.top_k}")
    m = report["mean"]
    print(f"cross-layer affinity: mean max P(e' at l+1 | e at l) = {m['mean_max_conditional']:.3f} "
          f"(uniform {report['uniform_max_conditional']:.3f}); top-4 mass {m['top4_mass']:.3f} "
          f"(uniform {report['uniform_top4_mass']:.3f}); normalized entropy {m['normalized_entropy']:.3f}")


if __name__ == "__main__":
    main()
