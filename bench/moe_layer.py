"""One MoE layer, side by side: transformers eager, Inductor, backend "moe", and the dense bound.

    python bench/moe_layer.py            # full: more repeats
    python bench/moe_layer.py --quick    # < 1 minute; last line is a JSON object of headline figures
    python bench/moe_layer.py --device cuda --dtype bfloat16 --layers mixtral_8x7b,qwen_moe_a2_7b --tokens 16,512,4096

Layers (fp32, CPU): Mixtral-like (8 experts, top-2, hidden 512, ffn 1792) and a fine-grained one
(Qwen2-MoE block: 64 experts, top-6, ffn 256, gated shared expert of ffn 512), at 1024 and 64 tokens,
forward and forward+backward; `--layers llama4_like` adds Llama 4's block (16 experts, top-1, hidden
512, ffn 1024, shared expert), which transformers runs densely over every expert (`llama4_top2_like`:
the same block routing top-2). All sides run in one process, interleaved, and medians are compared.

The bound: dense matmuls of the same FLOPs (router + T*k rows through one [H, 2I] and one [I, H]
GEMM, + the shared expert); for 64 tokens also the time to read the active experts' weights once
(weight streaming), whichever is larger.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

LAYERS = {
    "mixtral_like": dict(family="mixtral", E=8, k=2, H=512, I=1792, shared=0),
    "fine_grained": dict(family="qwen2_moe", E=64, k=6, H=512, I=256, shared=512),
    # full-size layers for a GPU: Mixtral-8x7B's and Qwen1.5-MoE-A2.7B's MoE blocks
    "mixtral_8x7b": dict(family="mixtral", E=8, k=2, H=4096, I=14336, shared=0),
    "qwen_moe_a2_7b": dict(family="qwen2_moe", E=60, k=4, H=2048, I=1408, shared=5632),
    # Llama 4's block (top-1, sigmoid scores scaling the experts' input, shared expert); transformers
    # runs every expert on every token (scores of 0 for the others)
    "llama4_like": dict(family="llama4", E=16, k=1, H=512, I=1024, shared=1024),
    # the same block routing top-2: each slot's expert sees the input scaled by that slot's score
    "llama4_top2_like": dict(family="llama4", E=16, k=2, H=512, I=1024, shared=1024),
    # the reference model's MoE layer (moe_compiler.reference_lm; bench/offload.py): 48 KiB experts
    "reference_sized": dict(family="mixtral", E=16, k=2, H=64, I=64, shared=0),
}
CPU_LAYERS = ("mixtral_like", "fine_grained")  # what a 2-core CPU runs in minutes (the defaults)


def build_block(spec: dict, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    if spec["family"] == "llama4":
        assert spec["shared"] == spec["I"], "Llama 4's shared expert has the experts' intermediate size"
        cfg = transformers.Llama4TextConfig(hidden_size=spec["H"], intermediate_size=spec["I"],
                                            num_local_experts=spec["E"], num_experts_per_tok=spec["k"])
        block = transformers.models.llama4.modeling_llama4.Llama4TextMoe
    elif spec["family"] == "mixtral":
        cfg = transformers.MixtralConfig(hidden_size=spec["H"], intermediate_size=spec["I"],
                                         num_local_experts=spec["E"], num_experts_per_tok=spec["k"])
        block = transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock
    else:
        cfg = transformers.Qwen2MoeConfig(hidden_size=spec["H"], moe_intermediate_size=spec["I"],
                                          num_experts=spec["E"], num_experts_per_tok=spec["k"],
                                          shared_expert_intermediate_size=spec["shared"], norm_topk_prob=False)
        block = transformers.models.qwen2_moe.modeling_qwen2_moe.Qwen2MoeSparseMoeBlock
    cfg._experts_implementation = "grouped_mm"  # what a whole transformers model picks by default
    m = block(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, p.shape[-1] ** -0.5)
    return m


class DenseBound(torch.nn.Module):
    """Dense matmuls with the layer's FLOPs: every token-slot through one big gated MLP."""

    def __init__(self, spec):
        super().__init__()
        H, I, E, s = spec["H"], spec["I"], spec["E"], spec["shared"]
        self.k = spec["k"]
        self.router = torch.nn.Parameter(torch.randn(E, H) * H ** -0.5)
        self.w1 = torch.nn.Parameter(torch.randn(2 * I, H) * H ** -0.5)
        self.w2 = torch.nn.Parameter(torch.randn(H, I) * I ** -0.5)
        self.s1 = torch.nn.Parameter(torch.randn(2 * s, H) * H ** -0.5) if s else None
        self.s2 = torch.nn.Parameter(torch.randn(H, s) * max(s, 1) ** -0.5) if s else None

    def forward(self, x):
        x = x.reshape(-1, x.shape[-1])
        logits = F.linear(x, self.router)
        xr = x.repeat(self.k, 1)
        g, u = F.linear(xr, self.w1).chunk(2, -1)
        y = F.linear(F.silu(g) * u, self.w2).view(self.k, x.shape[0], -1).sum(0)
        if self.s1 is not None:
            g, u = F.linear(x, self.s1).chunk(2, -1)
            y = y + F.linear(F.silu(g) * u, self.s2)
        return y + logits.sum() * 0


def active_weight_stream(block, x):
    """Read every active expert's weights once (a bandwidth-bound reduction)."""
    with torch.no_grad():
        if hasattr(block, "router"):  # Llama 4: (scores, logits)
            logits = block.router(x.reshape(-1, x.shape[-1]))[1]
            chosen = logits.topk(block.top_k, dim=-1).indices
        else:
            _, _, chosen = block.gate(x.reshape(-1, x.shape[-1]))  # transformers routers: (logits, weights, ids)
    idx = torch.unique(chosen)
    w13, w2 = block.experts.gate_up_proj, block.experts.down_proj

    active = idx.tolist()

    def stream():  # a read of each active expert's weights, no copy
        return sum(w13[e].sum() + w2[e].sum() for e in active)

    return stream


def timed(fn, train: bool, params):
    def run(x):
        if train:
            xx = x.detach().requires_grad_(True)
            for p in params:
                p.grad = None
            out = fn(xx)
            out = out[0] if isinstance(out, tuple) else out
            out.float().sum().backward()
        else:
            with torch.no_grad():
                fn(x)
    return run


def _sync(x):
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


def measure(sides: dict, x, repeats: int, warmup: int = 2) -> dict:
    for fn in sides.values():
        for _ in range(warmup):
            fn(x)
    times = {k: [] for k in sides}
    for _ in range(repeats):
        for name, fn in sides.items():  # interleaved: all sides see the same machine noise
            _sync(x)
            t0 = time.perf_counter()
            fn(x)
            _sync(x)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_layer(name: str, tokens: int, train: bool, repeats: int, device="cpu", dtype=torch.float32) -> dict:
    spec = LAYERS[name]
    block = build_block(spec).to(device, dtype)
    dense = DenseBound(spec).to(device, dtype)
    x = torch.randn(1, tokens, spec["H"], device=device, dtype=dtype)
    params = list(block.parameters())
    torch._dynamo.reset()
    moe = torch.compile(block, backend="moe", dynamic=False)
    with torch.no_grad():  # the rewrite must hold before its speed counts
        want, got = block(x), moe(x)
        want, got = (want[0] if isinstance(want, tuple) else want), (got[0] if isinstance(got, tuple) else got)
        diff = (got.float() - want.float()).abs().max().item() / max(want.float().abs().max().item(), 1e-30)
    sides = {
        "eager": timed(block, train, params),
        "inductor": timed(torch.compile(block, backend="inductor", dynamic=False), train, params),
        "moe": timed(moe, train, params),
        "dense": timed(torch.compile(dense, backend="inductor", dynamic=False), train, list(dense.parameters())),
    }
    if not train:
        sides["stream"] = lambda _x, s=active_weight_stream(block, x): s()
    t = measure(sides, x, repeats)
    bound = max(t["dense"], t.get("stream", 0.0)) if tokens <= 128 else t["dense"]
    t["bound"] = bound
    t["rel_diff"] = diff
    return t


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--layers", default=",".join(CPU_LAYERS), help=f"comma-separated, from {list(LAYERS)}")
    ap.add_argument("--tokens", default="1024,64", help="comma-separated token counts")
    ap.add_argument("--no-train", action="store_true", help="forward only")
    args = ap.parse_args(argv)
    repeats = args.repeats or (5 if args.quick else 20)
    dtype = getattr(torch, args.dtype)
    cases = [(n, int(t), tr) for n in args.layers.split(",") for t in args.tokens.split(",")
             for tr in ((False,) if args.no_train else (False, True))]
    if args.quick:
        cases = [("mixtral_like", 1024, False), ("mixtral_like", 64, False), ("mixtral_like", 1024, True)]
    rows, headline = [], {}
    print(f"{'layer':<13} {'tokens':>6} {'pass':<8} {'eager ms':>9} {'induct ms':>9} {'moe ms':>8} {'bound ms':>8}"
          f" {'moe/bound':>9} {'eager/moe':>9} {'ind/moe':>8} {'moe vs eager':>12}")
    for name, tokens, train in cases:
        t = bench_layer(name, tokens, train, repeats, args.device, dtype)
        diff = t.pop("rel_diff")
        row = dict(layer=name, tokens=tokens, pass_="fwd+bwd" if train else "fwd", **{k: v * 1e3 for k, v in t.items()})
        rows.append(row)
        print(f"{name:<13} {tokens:>6} {row['pass_']:<8} {row['eager']:9.2f} {row['inductor']:9.2f} {row['moe']:8.2f} "
              f"{row['bound']:8.2f} {t['moe'] / t['bound']:9.2f} {t['eager'] / t['moe']:9.2f} "
              f"{t['inductor'] / t['moe']:8.2f} {diff:12.1e}", flush=True)
        if name == "mixtral_like" and tokens == 1024 and not train:
            headline["moe_over_dense_1024"] = round(t["moe"] / t["dense"], 3)
        if name == "mixtral_like" and tokens == 64 and not train:
            headline["speedup_vs_eager_64"] = round(t["eager"] / t["moe"], 3)
        if name == "mixtral_like" and tokens == 1024 and train:
            headline["train_speedup_vs_eager"] = round(t["eager"] / t["moe"], 3)
    print(json.dumps(headline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
