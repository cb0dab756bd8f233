"""Main demo: a tiny transformers Mixtral compiled with backend "moe", checked against eager.

    python examples/demo.py [--dump-dir moe_dumps] [--tokens 64]

Builds the model from a config with random weights (no download), prints what the backend found
(explain), checks the compiled logits against eager with assert_close, times both (interleaved,
medians) and prints the speed ratio and where the pass dumps went.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def build_model(layers: int = 2):
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                        num_attention_heads=8, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
                        max_position_embeddings=256)
    torch.manual_seed(0)
    return MixtralForCausalLM(cfg).eval()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dump-dir", default="moe_dumps")
    ap.add_argument("--tokens", type=int, default=64, help="sequence length (batch 2)")
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    import moe_compiler

    model = build_model()
    ids = torch.randint(0, 512, (2, args.tokens), generator=torch.Generator().manual_seed(0))
    report = moe_compiler.explain(model, ids, dump_dir=args.dump_dir)
    print(report)

    compiled = torch.compile(model, backend="moe", options={"dump_dir": args.dump_dir})
    with torch.no_grad():
        eager_out = model(ids).logits
        t0 = time.perf_counter()
        compiled_out = compiled(ids).logits
        print(f"\nfirst call (compile) took {time.perf_counter() - t0:.1f}s")
        torch.testing.assert_close(compiled_out, eager_out, rtol=1e-4, atol=1e-4)
        print(f"compiled logits equal eager (max abs diff {(compiled_out - eager_out).abs().max().item():.2e})")
        times = {"eager": [], "moe": []}
        for _ in range(args.repeats):  # interleaved: both sides see the same machine noise
            for name, fn in (("eager", model), ("moe", compiled)):
                t0 = time.perf_counter()
                fn(ids)
                times[name].append(time.perf_counter() - t0)
    e, m = statistics.median(times["eager"]), statistics.median(times["moe"])
    print(f"median forward: eager {e * 1e3:.1f} ms, backend moe {m * 1e3:.1f} ms, "
          f"speed ratio eager/moe = {e / m:.2f}x")
    print(f"pass dumps: {os.path.abspath(args.dump_dir)}")


if __name__ == "__main__":
    main()
