"""Shapes of synthetic DeepSeek-V3/R1 (`deepseek2`) models: metadata and tensor list."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class DeepSeekShape:
    n_layers: int
    n_dense_layers: int
    n_embd: int
    n_vocab: int
    n_heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_ff: int
    n_ff_expert: int
    n_expert: int
    n_expert_used: int
    n_shared_experts: int
    n_group: int
    topk_group: int
    context_length: int = 4096
    rope_theta: float = 10000.0
    rope_scaling_factor: float = 40.0
    rope_original_context: int = 4096
    split_kv_b: bool = False  # newer conversions: attn_k_b + attn_v_b instead of attn_kv_b


# DeepSeek-R1 / V3 (671B) dimensions; n_layers is set per file (61 in the real model).
R1 = DeepSeekShape(
    n_layers=61, n_dense_layers=3, n_embd=7168, n_vocab=129280, n_heads=128,
    q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
    v_head_dim=128, n_ff=18432, n_ff_expert=2048, n_expert=256, n_expert_used=8,
    n_shared_experts=1, n_group=8, topk_group=4, context_length=163840,
)

# Small enough for tests, with every row a multiple of 256 so K and IQ types apply.
TINY = DeepSeekShape(
    n_layers=3, n_dense_layers=1, n_embd=256, n_vocab=512, n_heads=4,
    q_lora_rank=256, kv_lora_rank=256, qk_nope_head_dim=32, qk_rope_head_dim=32,
    v_head_dim=64, n_ff=512, n_ff_expert=256, n_expert=8, n_expert_used=2,
    n_shared_experts=1, n_group=2, topk_group=1, context_length=2048,
    rope_scaling_factor=4.0, rope_original_context=512,
)

PRESETS = {"tiny": TINY, "r1": R1}


def shape_for(preset: str, n_layers: int | None = None, n_dense_layers: int | None = None,
              split_kv_b: bool = False) -> DeepSeekShape:
    from tandem.errors import TandemError

    if preset not in PRESETS:
        raise TandemError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    shape = PRESETS[preset]
    layers = shape.n_layers if n_layers is None else n_layers
    dense = min(shape.n_dense_layers, layers) if n_dense_layers is None else n_dense_layers
    if layers < 1 or not 0 <= dense <= layers:
        raise TandemError(f"need layers >= 1 and 0 <= dense layers <= layers; got {layers}, {dense}")
    return replace(shape, n_layers=layers, n_dense_layers=dense, split_kv_b=split_kv_b)


def metadata(s: DeepSeekShape) -> dict[str, object]:
    """GGUF key/values as llama.cpp's converter writes them for DeepSeek-V3."""
    a = "deepseek2"
    return {
        f"{a}.block_count": s.n_layers,
        f"{a}.context_length": s.context_length,
        f"{a}.embedding_length": s.n_embd,
        f"{a}.feed_forward_length": s.n_ff,
        f"{a}.attention.head_count": s.n_heads,
        f"{a}.attention.head_count_kv": 1 if s.split_kv_b else s.n_heads,
        f"{a}.rope.freq_base": s.rope_theta,
        f"{a}.attention.layer_norm_rms_epsilon": 1e-6,
        f"{a}.expert_used_count": s.n_expert_used,
        f"{a}.expert_group_count": s.n_group,
        f"{a}.expert_group_used_count": s.topk_group,
        f"{a}.leading_dense_block_count": s.n_dense_layers,
        f"{a}.vocab_size": s.n_vocab,
        f"{a}.attention.q_lora_rank": s.q_lora_rank,
        f"{a}.attention.kv_lora_rank": s.kv_lora_rank,
        f"{a}.attention.key_length": (s.kv_lora_rank + s.qk_rope_head_dim) if s.split_kv_b
        else s.qk_nope_head_dim + s.qk_rope_head_dim,
        f"{a}.attention.value_length": s.kv_lora_rank if s.split_kv_b else s.v_head_dim,
        **({f"{a}.attention.key_length_mla": s.qk_nope_head_dim + s.qk_rope_head_dim,
            f"{a}.attention.value_length_mla": s.v_head_dim} if s.split_kv_b else {}),
        f"{a}.expert_feed_forward_length": s.n_ff_expert,
        f"{a}.expert_count": s.n_expert,
        f"{a}.expert_shared_count": s.n_shared_experts,
        f"{a}.expert_weights_scale": 2.5,
        f"{a}.expert_weights_norm": True,
        f"{a}.expert_gating_func": 2,  # sigmoid
        f"{a}.rope.dimension_count": s.qk_rope_head_dim,
        f"{a}.rope.scaling.type": "yarn",
        f"{a}.rope.scaling.factor": s.rope_scaling_factor,
        f"{a}.rope.scaling.original_context_length": s.rope_original_context,
        f"{a}.rope.scaling.yarn_log_multiplier": 0.1,
    }


def tensor_shapes(s: DeepSeekShape) -> list[tuple[str, tuple[int, ...]]]:
    """(name, logical shape) in file order; shapes are numpy order (rows..., row length)."""
    out: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (s.n_vocab, s.n_embd))]
    qk_head = s.qk_nope_head_dim + s.qk_rope_head_dim
    for i in range(s.n_layers):
        b = f"blk.{i}"
        out += [
            (f"{b}.attn_norm.weight", (s.n_embd,)),
            (f"{b}.attn_q_a_norm.weight", (s.q_lora_rank,)),
            (f"{b}.attn_kv_a_norm.weight", (s.kv_lora_rank,)),
            (f"{b}.attn_q_a.weight", (s.q_lora_rank, s.n_embd)),
            (f"{b}.attn_q_b.weight", (s.n_heads * qk_head, s.q_lora_rank)),
            (f"{b}.attn_kv_a_mqa.weight", (s.kv_lora_rank + s.qk_rope_head_dim, s.n_embd)),
        ]
        if s.split_kv_b:
            out += [
                (f"{b}.attn_k_b.weight", (s.n_heads, s.kv_lora_rank, s.qk_nope_head_dim)),
                (f"{b}.attn_v_b.weight", (s.n_heads, s.v_head_dim, s.kv_lora_rank)),
            ]
        else:
            out.append((f"{b}.attn_kv_b.weight",
                        (s.n_heads * (s.qk_nope_head_dim + s.v_head_dim), s.kv_lora_rank)))
        out += [
            (f"{b}.attn_output.weight", (s.n_embd, s.n_heads * s.v_head_dim)),
            (f"{b}.ffn_norm.weight", (s.n_embd,)),
        ]
        if i < s.n_dense_layers:
            out += [
                (f"{b}.ffn_gate.weight", (s.n_ff, s.n_embd)),
                (f"{b}.ffn_up.weight", (s.n_ff, s.n_embd)),
                (f"{b}.ffn_down.weight", (s.n_embd, s.n_ff)),
            ]
            continue
        shared = s.n_ff_expert * s.n_shared_experts
        out += [
            (f"{b}.ffn_gate_inp.weight", (s.n_expert, s.n_embd)),
            (f"{b}.exp_probs_b.bias", (s.n_expert,)),
            (f"{b}.ffn_gate_exps.weight", (s.n_expert, s.n_ff_expert, s.n_embd)),
            (f"{b}.ffn_up_exps.weight", (s.n_expert, s.n_ff_expert, s.n_embd)),
            (f"{b}.ffn_down_exps.weight", (s.n_expert, s.n_embd, s.n_ff_expert)),
            (f"{b}.ffn_gate_shexp.weight", (shared, s.n_embd)),
            (f"{b}.ffn_up_shexp.weight", (shared, s.n_embd)),
            (f"{b}.ffn_down_shexp.weight", (s.n_embd, shared)),
        ]
    out += [("output_norm.weight", (s.n_embd,)), ("output.weight", (s.n_vocab, s.n_embd))]
    return out
