"""The `deepseek2` GGUF layout: metadata keys and tensor names/shapes for a DeepSeek2Config.

Names and keys are llama.cpp's (convert_hf_to_gguf.py, DeepseekV2Model). Used to write files
(synth, convert) and to check a file before loading it.
"""

from __future__ import annotations

from tandem.gguf.config import DeepSeek2Config

ARCH = "deepseek2"
GATING_IDS = {"softmax": 1, "sigmoid": 2}


def metadata(c: DeepSeek2Config, split_kv_b: bool = False) -> dict[str, object]:
    """GGUF key/values as llama.cpp's converter writes them. Keys whose value is None (an
    old file without group routing keys, say) are left out."""
    a = ARCH
    qk_head = c.qk_nope_head_dim + c.qk_rope_head_dim
    keys: dict[str, object] = {
        f"{a}.block_count": c.n_layers,
        f"{a}.context_length": c.context_length,
        f"{a}.embedding_length": c.n_embd,
        f"{a}.feed_forward_length": c.n_ff,
        f"{a}.attention.head_count": c.n_heads,
        f"{a}.attention.head_count_kv": 1 if split_kv_b else c.n_heads,
        f"{a}.rope.freq_base": c.rope_theta,
        f"{a}.attention.layer_norm_rms_epsilon": c.rms_norm_eps,
        f"{a}.expert_used_count": c.n_expert_used,
        f"{a}.expert_group_count": c.n_group,
        f"{a}.expert_group_used_count": c.topk_group,
        f"{a}.leading_dense_block_count": c.n_dense_layers,
        f"{a}.vocab_size": c.n_vocab,
        f"{a}.attention.q_lora_rank": c.q_lora_rank or None,
        f"{a}.attention.kv_lora_rank": c.kv_lora_rank,
        # Newer conversions describe the absorbed (MQA) view here and the MLA sizes in *_mla.
        f"{a}.attention.key_length": c.kv_lora_rank + c.qk_rope_head_dim if split_kv_b else qk_head,
        f"{a}.attention.value_length": c.kv_lora_rank if split_kv_b else c.v_head_dim,
        f"{a}.attention.key_length_mla": qk_head if split_kv_b else None,
        f"{a}.attention.value_length_mla": c.v_head_dim if split_kv_b else None,
        f"{a}.expert_feed_forward_length": c.n_ff_expert,
        f"{a}.expert_count": c.n_expert,
        f"{a}.expert_shared_count": c.n_shared_experts,
        f"{a}.expert_weights_scale": c.expert_weights_scale,
        f"{a}.expert_weights_norm": c.expert_weights_norm,
        f"{a}.expert_gating_func": GATING_IDS[c.expert_gating],
        f"{a}.rope.dimension_count": c.qk_rope_head_dim,
    }
    if c.rope_scaling:
        keys |= {
            f"{a}.rope.scaling.type": c.rope_scaling,
            f"{a}.rope.scaling.factor": c.rope_scaling_factor,
            f"{a}.rope.scaling.original_context_length": c.rope_original_context,
            f"{a}.rope.scaling.yarn_log_multiplier": c.rope_yarn_log_multiplier,
        }
    return {k: v for k, v in keys.items() if v is not None}


def tensor_shapes(c: DeepSeek2Config, split_kv_b: bool = False) -> list[tuple[str, tuple[int, ...]]]:
    """(name, logical shape) in file order; shapes are numpy order (rows..., row length)."""
    out: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (c.n_vocab, c.n_embd))]
    qk_head = c.qk_nope_head_dim + c.qk_rope_head_dim
    for i in range(c.n_layers):
        b = f"blk.{i}"
        out.append((f"{b}.attn_norm.weight", (c.n_embd,)))
        if c.q_lora_rank:
            out += [
                (f"{b}.attn_q_a_norm.weight", (c.q_lora_rank,)),
                (f"{b}.attn_q_a.weight", (c.q_lora_rank, c.n_embd)),
                (f"{b}.attn_q_b.weight", (c.n_heads * qk_head, c.q_lora_rank)),
            ]
        else:
            out.append((f"{b}.attn_q.weight", (c.n_heads * qk_head, c.n_embd)))
        out += [
            (f"{b}.attn_kv_a_norm.weight", (c.kv_lora_rank,)),
            (f"{b}.attn_kv_a_mqa.weight", (c.kv_lora_rank + c.qk_rope_head_dim, c.n_embd)),
        ]
        if split_kv_b:
            out += [
                (f"{b}.attn_k_b.weight", (c.n_heads, c.kv_lora_rank, c.qk_nope_head_dim)),
                (f"{b}.attn_v_b.weight", (c.n_heads, c.v_head_dim, c.kv_lora_rank)),
            ]
        else:
            out.append((f"{b}.attn_kv_b.weight",
                        (c.n_heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank)))
        out += [
            (f"{b}.attn_output.weight", (c.n_embd, c.n_heads * c.v_head_dim)),
            (f"{b}.ffn_norm.weight", (c.n_embd,)),
        ]
        if i < c.n_dense_layers:
            out += [
                (f"{b}.ffn_gate.weight", (c.n_ff, c.n_embd)),
                (f"{b}.ffn_up.weight", (c.n_ff, c.n_embd)),
                (f"{b}.ffn_down.weight", (c.n_embd, c.n_ff)),
            ]
            continue
        out.append((f"{b}.ffn_gate_inp.weight", (c.n_expert, c.n_embd)))
        if c.expert_gating == "sigmoid":  # V3's choice-only correction bias; V2 has none
            out.append((f"{b}.exp_probs_b.bias", (c.n_expert,)))
        out += [
            (f"{b}.ffn_gate_exps.weight", (c.n_expert, c.n_ff_expert, c.n_embd)),
            (f"{b}.ffn_up_exps.weight", (c.n_expert, c.n_ff_expert, c.n_embd)),
            (f"{b}.ffn_down_exps.weight", (c.n_expert, c.n_embd, c.n_ff_expert)),
        ]
        if c.n_shared_experts:
            shared = c.n_ff_expert * c.n_shared_experts
            out += [
                (f"{b}.ffn_gate_shexp.weight", (shared, c.n_embd)),
                (f"{b}.ffn_up_shexp.weight", (shared, c.n_embd)),
                (f"{b}.ffn_down_shexp.weight", (c.n_embd, shared)),
            ]
    out += [("output_norm.weight", (c.n_embd,)), ("output.weight", (c.n_vocab, c.n_embd))]
    return out
