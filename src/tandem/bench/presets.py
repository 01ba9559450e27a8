"""Shapes of synthetic DeepSeek-V3/R1 (`deepseek2`) models, as typed configs."""

from __future__ import annotations

from dataclasses import replace

from tandem.errors import TandemError
from tandem.gguf.config import DeepSeek2Config

# DeepSeek-R1 / V3 (671B) dimensions; n_layers is set per file (61 in the real model).
R1 = DeepSeek2Config(
    n_layers=61, n_embd=7168, n_vocab=129280, context_length=163840, n_heads=128,
    rms_norm_eps=1e-6, rope_theta=10000.0, q_lora_rank=1536, kv_lora_rank=512,
    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_ff=18432, n_dense_layers=3,
    n_expert=256, n_expert_used=8, n_ff_expert=2048, n_shared_experts=1,
    expert_weights_scale=2.5, expert_weights_norm=True, expert_gating="sigmoid",
    n_group=8, topk_group=4, rope_scaling="yarn", rope_scaling_factor=40.0,
    rope_original_context=4096, rope_yarn_log_multiplier=0.1,
)

# Small enough for tests, with every row a multiple of 256 so K and IQ types apply.
TINY = replace(
    R1, n_layers=3, n_dense_layers=1, n_embd=256, n_vocab=512, context_length=2048, n_heads=4,
    q_lora_rank=256, kv_lora_rank=256, qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=64,
    n_ff=512, n_ff_expert=256, n_expert=8, n_expert_used=2, n_group=2, topk_group=1,
    rope_scaling_factor=4.0, rope_original_context=512,
)

PRESETS = {"tiny": TINY, "r1": R1}


def shape_for(preset: str, n_layers: int | None = None,
              n_dense_layers: int | None = None) -> DeepSeek2Config:
    if preset not in PRESETS:
        raise TandemError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    shape = PRESETS[preset]
    layers = shape.n_layers if n_layers is None else n_layers
    dense = min(shape.n_dense_layers, layers) if n_dense_layers is None else n_dense_layers
    if layers < 1 or not 0 <= dense <= layers:
        raise TandemError(f"need layers >= 1 and 0 <= dense layers <= layers; got {layers}, {dense}")
    return replace(shape, n_layers=layers, n_dense_layers=dense)
