"""Tiny random DeepSeek-V3 models from `transformers` (random init, save_pretrained)."""

from __future__ import annotations

from pathlib import Path

import torch

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
        "original_max_position_embeddings": 64, "mscale": 1.0, "mscale_all_dim": 1.0,
        "beta_fast": 32, "beta_slow": 1}

BASE = dict(
    vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
    n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
    q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    max_position_embeddings=256, rope_parameters=YARN, initializer_range=0.08,
    routed_scaling_factor=2.5, norm_topk_prob=True,
)

CONFIGS = {
    # q LoRA, 2 of 2 groups... 1 of 2 groups kept, one dense layer
    "qlora-groups2-dense1": {},
    # no q LoRA (V2-Lite style q_proj), no group limit, two dense layers
    "noqlora-groups1-dense2": dict(q_lora_rank=None, n_group=1, topk_group=1,
                                   first_k_dense_replace=2, num_hidden_layers=4),
    # 4 groups of 2 experts, 2 kept; 3 experts per token, 2 shared experts
    "qlora-groups4-dense2": dict(n_group=4, topk_group=2, num_experts_per_tok=3,
                                 n_shared_experts=2, first_k_dense_replace=2, num_hidden_layers=4),
}

# Rows that fill 256-blocks, for K and IQ expert types.
QUANT_BASE = dict(BASE, hidden_size=256, moe_intermediate_size=256, intermediate_size=256,
                  kv_lora_rank=256, q_lora_rank=256)


# DeepSeek-V2 (softmax routing, no correction bias) and V2-Lite (no q LoRA, no groups).
V2_CONFIGS = {
    "v2-group-limited": dict(q_lora_rank=32, n_group=4, topk_group=2,
                             topk_method="group_limited_greedy", n_shared_experts=2,
                             routed_scaling_factor=1.0, norm_topk_prob=False),
    "v2-lite-greedy": dict(q_lora_rank=None, n_group=1, topk_group=1, topk_method="greedy",
                           routed_scaling_factor=1.0, norm_topk_prob=False),
}


def build_hf(folder: Path, seed: int = 0, version: int = 3, **overrides) -> Path:
    """A random DeepseekV3ForCausalLM (or V2) saved to `folder`; norms and the routing bias
    randomized too, so that every weight matters."""
    import transformers

    config_cls = getattr(transformers, f"DeepseekV{version}Config")
    model_cls = getattr(transformers, f"DeepseekV{version}ForCausalLM")
    config = config_cls(**{**BASE, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.copy_(0.1 * torch.rand_like(b))
    model.save_pretrained(folder)
    return folder


def load_hf(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


