"""Real weights: SmolLM2-135M-Instruct (llama, Q4_1) and Gemma 3 270M (gemma3, Q4_K_M) against
transformers' models loaded from the same GGUF (transformers dequantizes with gguf-py and maps
the tensors back itself: an independent path from the file to the logits).

Tolerance: both sides compute in float32 from identical dequantized weights; only summation
order differs, which moves logits of size ~30-120 by ~1e-4. We allow 2e-3 max abs (relative to
logits that large, float32 rounding), and demand identical greedy continuations.
"""

from __future__ import annotations

import pytest
import torch

import tandem
from logit_checks import relative_error, top1_agreement
from tandem.placement.rules import Rule

TOLERANCE = 2e-3
CPU_RULES = [Rule(r"^token_embd\.", "cpu", "ggml"), Rule(".", "cpu", "torch")]


def fixed_prompt(tokenizer) -> list[int]:
    text = "The history of the graphics processing unit began in the 1970s, when"
    return tokenizer.encode(text, add_special_tokens=True)


@torch.no_grad()
def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                         pad_token_id=0, eos_token_id=None)
    return out[0, len(ids):].tolist()


def check(path, transformers_from_gguf, n_new=24, long_prompt=0):
    hf, hf_tok = transformers_from_gguf(path)
    ids = fixed_prompt(hf_tok)
    if long_prompt:  # past Gemma's 512-token sliding window
        ids = ids + torch.randint(10, 20000, (long_prompt,),
                                  generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        reference = hf(torch.tensor([ids])).logits[0]
    with tandem.LLM(path, rules=CPU_RULES, ctx_size=1024) as llm:
        ours = llm.logits(ids)
        err = (ours - reference).abs().max().item()
        assert err < TOLERANCE, f"max abs logit difference {err}"
        if not long_prompt:
            assert llm.generate(ids, n_new) == hf_greedy(hf, ids, n_new)


def test_smollm2_matches_transformers(smollm2_gguf, transformers_from_gguf):
    check(smollm2_gguf, transformers_from_gguf)


def test_gemma3_matches_transformers(gemma_gguf, transformers_from_gguf):
    check(gemma_gguf, transformers_from_gguf)


@pytest.mark.slow
def test_gemma3_sliding_window(gemma_gguf, transformers_from_gguf):
    check(gemma_gguf, transformers_from_gguf, long_prompt=600)


@pytest.mark.cuda
@pytest.mark.parametrize("which", ["smollm2", "gemma"])
def test_default_gpu_rules(which, smollm2_gguf, gemma_gguf, transformers_from_gguf):
    """Default rules on a GPU: weights in bfloat16 there, math in bfloat16. Judged by relative
    logit error and top-1 agreement, since bf16 carries 8 significant bits."""
    path = smollm2_gguf if which == "smollm2" else gemma_gguf
    hf, hf_tok = transformers_from_gguf(path)
    ids = fixed_prompt(hf_tok)
    with torch.no_grad():
        reference = hf(torch.tensor([ids])).logits[0]
    with tandem.LLM(path, ctx_size=1024) as llm:
        assert llm.placements["blk.0.attn_q.weight"].device.type == "cuda"
        ours = llm.logits(ids)
    rel = relative_error(ours, reference)
    agree = top1_agreement(ours, reference)
    print(f"{which} on cuda: relative error {rel:.4f}, top-1 agreement {agree:.3f}")
    assert rel < 0.05 and agree >= 0.8
