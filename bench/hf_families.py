"""Which transformers MoE families backend "moe" raises: every family, tiny config, random weights.

    python bench/hf_families.py                    # every family below (~10 min on 2 cores)
    python bench/hf_families.py --families mixtral,phimoe

Per family, in a subprocess of its own (one compile at a time; --timeout s each): build the model
with tests/hf_models.make_generic (hidden 64, 2 layers, 8 experts, top-2; the config keys a family
needs beyond those are in OVERRIDES), run eager, explain() with the eager inner backend (which
layers were found, raised, and why not), then compile with backend "moe" and compare the logits
with eager. Prints one row per family and, last, a JSON line: families, all_layers_raised,
outputs_equal (every family's compiled logits within 1e-4 of eager, raised or not).

A family whose layers are not raised still runs (those layers stay as the model wrote them); the
reason column is what explain() reports for them.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.join(os.path.dirname(HERE), "tests")

# config keys a family needs on top of tests/hf_models.GENERIC to build, run eagerly and have MoE layers
OVERRIDES = {
    "axk1": {"q_lora_rank": 16, "num_key_value_heads": 4, "head_dim": 8},
    "axk2": {"q_lora_rank": 16, "num_key_value_heads": 4},
    "bailing_hybrid": {"pad_token_id": 0, "layer_group_size": 2},
    "beam": {"mlp_layer_types": ["sparse", "sparse"]},
    "deepseek_v3": {"q_lora_rank": 16, "num_key_value_heads": 4, "head_dim": 8},
    "deepseek_v32": {"q_lora_rank": 16, "num_key_value_heads": 4},
    "deepseek_v4": {"q_lora_rank": 16, "mlp_layer_types": ["hash_moe", "moe"]},
    "doge": {"is_moe": True, "num_experts": 16},
    "dots1": {"n_shared_experts": 1},
    "dots3_note_text": {"q_lora_rank": 16, "num_key_value_heads": 4, "pad_token_id": 0},
    "flex_olmo": {"pad_token_id": 0},
    "gemma4_text": {"enable_moe_block": True, "top_k_experts": 2},
    "glm4_moe_lite": {"num_key_value_heads": 4},
    "glm_moe_dsa": {"q_lora_rank": 16, "num_key_value_heads": 4},
    "gpt_oss": {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 16},
    "granitemoehybrid": {"layer_types": ["mamba", "attention"]},
    "hy_v4": {"q_lora_rank": 16, "num_key_value_heads": 4, "pad_token_id": 0},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 1, "expert_layer_offset": 0},
    "kimi_linear": {"pad_token_id": 0, "layer_types": ["linear_attention", "full_attention"]},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    "llama4_text": {"num_experts_per_tok": 1},  # Llama 4 Scout and Maverick route top-1
    "longcat_flash": {"q_lora_rank": 16, "num_key_value_heads": 4, "head_dim": 8},
    "minimax_m3_vl_text": {"moe_layer_freq": [1, 1]},
    "qwen3_5_moe_text": {"layer_types": ["linear_attention", "full_attention"]},
    "qwen3_next": {"layer_types": ["linear_attention", "full_attention"]},
    "qwen4_exp_text": {"layer_types": ["linear_attention", "indexed_attention"], "indexer_n_heads": 2,
                       "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 4,
                       "indexer_compress_ratio": 2},
    "zaya": {"num_experts_per_tok": 1},
    "dbrx": {"d_model": 64, "n_heads": 4, "n_layers": 2, "max_seq_len": 128,
             "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
             "ffn_config": {"ffn_hidden_size": 64, "moe_num_experts": 8, "moe_top_k": 2}},
}
FAMILIES = sorted({
    "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "gpt_oss", "olmoe", "ernie4_5_moe",
    "minimax", "granitemoe", "glm4_moe", "afmoe", "doge", "inkling2_loop_text", "aria_text", "cohere2_moe", "exaone_moe", "flint",
    "granitemoe_swa", "granitemoeshared", "hunyuan_v1_moe", "hy_v3", "inkling_text", "inkling2_text",
    "jetmoe", "kolibri1", "laguna", "lara_mini", "llama4_text", "mellum", "mimo_v2_flash", "minimax_m2",
    "nemotron_h", "phimoe", "sarvam_moe", "sarvam_mla", "solar_open", *OVERRIDES})


def one_family(family: str) -> dict:
    """Runs in the subprocess: build, eager, explain, compile, compare."""
    import torch

    sys.path.insert(0, TESTS)
    import moe_compiler
    from hf_models import make_generic

    out = {"family": family}
    try:
        model = make_generic(family, **OVERRIDES.get(family, {}))
        ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref = model(ids).logits
    except Exception as e:  # a config this table does not fit: reported, not fatal
        out["error"] = f"build/eager: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
        return out
    report = moe_compiler.explain(model, ids, inner_backend="eager")
    out["layers"] = [(m.path, m.rewritten, m.reason) for m in report.moe_layers]
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(model, backend="moe", options={"inner_backend": "eager"})(ids).logits
    out["max_abs_diff"] = float((got.float() - ref.float()).abs().max())
    out["outputs_equal"] = bool(torch.allclose(got.float(), ref.float(), rtol=1e-4, atol=1e-4))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default=None, help="comma-separated model types (default: all in FAMILIES)")
    ap.add_argument("--timeout", type=int, default=300)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the subprocess's entry
    args = ap.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(one_family(args.one)))
        return
    families = args.families.split(",") if args.families else FAMILIES
    rows = []
    print(f"{'family':20s} {'MoE blocks':>10s} {'raised':>6s} {'equal':>5s}  why not raised")
    for fam in families:
        try:
            proc = subprocess.run([sys.executable, __file__, "--one", fam], capture_output=True, text=True,
                                  timeout=args.timeout)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            r = json.loads(lines[-1][7:]) if lines else {"family": fam, "error": (proc.stderr.strip().splitlines()
                                                                                or ["no output"])[-1][:160]}
        except subprocess.TimeoutExpired:
            r = {"family": fam, "error": f"timed out after {args.timeout} s"}
        rows.append(r)
        if "error" in r:
            print(f"{fam:20s} {'-':>10s} {'-':>6s} {'-':>5s}  {r['error']}")
            continue
        blocks = {p for p, _, _ in r["layers"]}
        raised = {p for p, ok, _ in r["layers"] if ok}
        why = "; ".join(dict.fromkeys(reason[:120] for _, ok, reason in r["layers"] if not ok))
        print(f"{fam:20s} {len(blocks):>10d} {len(raised):>6d} {str(r['outputs_equal']):>5s}  {why}", flush=True)
    ran = [r for r in rows if "error" not in r]
    all_raised = [r["family"] for r in ran if r["layers"] and all(ok for _, ok, _ in r["layers"])]
    print(json.dumps({"families": len(rows), "ran": len(ran), "all_layers_raised": len(all_raised),
                      "not_all_raised": sorted(r["family"] for r in ran if r["family"] not in all_raised),
                      "errors": sorted(r["family"] for r in rows if "error" in r),
                      "outputs_equal": all(r["outputs_equal"] for r in ran)}))


if __name__ == "__main__":
    main()
