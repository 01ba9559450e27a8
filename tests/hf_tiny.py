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




def deepseek_vocabulary(vocab_size: int, extra_corpus: list[str] = ()):
    """A byte-level BPE with DeepSeek-V3's tokenizer.json pre-tokenizer (three isolated splits,
    then byte-level without its own regex), trained on a small corpus; returns the `tokenizers`
    object and the same vocabulary as GGUF metadata (pre-tokenizer "deepseek-v3")."""
    import json

    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    splits = [
        r"\p{N}{1,3}",
        r"[一-龥぀-ゟ゠-ヿ]+",
        r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
        r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ]
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    specials = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
                "<think>", "</think>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [*extra_corpus, "Mixture of experts models route each token to 8 of 256 experts. " * 20,
              "深度求索 人工智能 模型 推理 " * 20, "for i in range(10):\n    print(i * 2)\n" * 20,
              "The quick brown fox jumps over the lazy dog. Hello world! " * 20]
    tok.train_from_iterator(corpus, trainer)
    tokens = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    merges = [" ".join(m) if isinstance(m, list) else m
              for m in json.loads(tok.to_str())["model"]["merges"]]
    metadata = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "deepseek-v3",
                "tokenizer.ggml.tokens": tokens,
                "tokenizer.ggml.token_type": [3 if t in specials else 1 for t in tokens],
                "tokenizer.ggml.merges": merges, "tokenizer.ggml.bos_token_id": 0,
                "tokenizer.ggml.eos_token_id": 1, "tokenizer.ggml.add_bos_token": True}
    return tok, metadata


# The shape of DeepSeek-R1's chat template (reasoning stripped from earlier answers).
R1_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{% set content = m['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)
