"""Tiny transformers MoE models built from configs with random weights (no downloads).

Each entry: family name -> (config class name, model class name, config kwargs). All share 2 decoder
layers, hidden 64 (or as the family needs) and a small vocabulary.
"""
from __future__ import annotations

import torch

COMMON = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64)

FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(intermediate_size=80, moe_intermediate_size=40, shared_expert_intermediate_size=56,
                       num_experts=6, num_experts_per_tok=2, norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(intermediate_size=80, moe_intermediate_size=40, num_experts=8, num_experts_per_tok=3,
                       norm_topk_prob=True, head_dim=16)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(intermediate_size=80, moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=2,
                         n_group=4, topk_group=2, n_shared_experts=1, first_k_dense_replace=0,
                         routed_scaling_factor=2.5, norm_topk_prob=True, q_lora_rank=None, kv_lora_rank=16,
                         qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, rope_scaling=None)),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                     sliding_window=16, layer_types=["sliding_attention", "full_attention"])),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              dict(intermediate_size=40, num_experts=8, num_experts_per_tok=2)),
}


def make_model(family: str, *, dtype=torch.float32, experts_implementation: str | None = None, seed: int = 0):
    import transformers

    cfg_name, model_name, kw = FAMILIES[family]
    cfg = getattr(transformers, cfg_name)(**{**COMMON, **kw})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg)
    # random init leaves DeepSeek's router/bias at zeros: give every parameter and buffer a real spread
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.2 if p.dim() > 1 else 0.05)
        for name, b in model.named_buffers():
            if "bias" in name and b.is_floating_point():
                b.normal_(0, 0.05)
    model = model.to(dtype).eval()
    if experts_implementation:
        model.set_experts_implementation(experts_implementation)
    return model


def expected_layers(model) -> list[tuple[str, int, int]]:
    """(path, num_experts, top_k) of every MoE block, read from the module tree."""
    out = []
    for name, mod in model.named_modules():
        experts = getattr(mod, "experts", None)
        stacked = getattr(experts, "gate_up_proj", None)
        stacked = stacked if stacked is not None else getattr(experts, "up_proj", None)  # ungated (Nemotron-H)
        if experts is not None and hasattr(experts, "num_experts") and isinstance(stacked, torch.nn.Parameter) \
                and stacked.dim() == 3:
            router = getattr(mod, "gate", None) or getattr(mod, "router", None)
            k = getattr(router, "top_k", None) or getattr(mod, "top_k", None)
            out.append((name, experts.num_experts, k))
    return out


GENERIC = dict(vocab_size=128, hidden_size=64, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_local_experts=8,
               n_routed_experts=8, num_experts_per_tok=2, first_k_dense_replace=0, max_position_embeddings=128,
               shared_expert_intermediate_size=32, n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=None,
               qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, decoder_sparse_step=1, mlp_only_layers=[],
               moe_layer_freq=1, num_dense_layers=0)


def make_generic(model_type: str, seed: int = 0, **overrides):
    """Any transformers MoE family from one set of tiny sizes (keys a family does not use are ignored);
    ``overrides``: config keys a family needs beyond them (e.g. which layers are sparse)."""
    import transformers

    cfg = transformers.AutoConfig.for_model(model_type, **{**GENERIC, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.2 if p.dim() > 1 else 0.05)
    return model


def randomize_router_scales(model, seed: int = 1):
    """Draw Gemma 4's router scale and per-expert weight scale in [0.5, 1.5) (they start at 1.0, where a
    dropped factor would go unnoticed)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("per_expert_scale", "router.scale")):
                p.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(seed))
    return model
