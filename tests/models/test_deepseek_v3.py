"""DeepSeek-V3 in tandem against `transformers`' DeepseekV3ForCausalLM in float32.

The same random tiny model is saved by transformers, converted to GGUF by `tandem.convert`
(llama.cpp's names and layout) and run by tandem: CPU only here, default (GPU) rules under the
`cuda` marker.
"""

from __future__ import annotations

import pytest
import torch

import tandem
from hf_tiny import CONFIGS, V2_CONFIGS, build_hf, load_hf
from logit_checks import relative_error, top1_agreement
from tandem.convert import convert
from tandem.placement.rules import Rule

PROMPT_LEN, NEW_TOKENS = 40, 32
CPU_RULES = [Rule(r"ffn_(gate|up|down)_exps\.", "cpu", "ggml"), Rule(".", "cpu", "torch")]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def rules_for(device: str):
    return CPU_RULES if device == "cpu" else None  # None: default rules, dense parts on the GPU


def prompt(vocab: int, n: int = PROMPT_LEN, seed: int = 0) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def hf_logits(model, tokens: list[int]) -> torch.Tensor:
    return model(torch.tensor([tokens])).logits[0].float()


@torch.no_grad()
def hf_greedy(model, tokens: list[int], n: int) -> list[int]:
    """Greedy by full forward passes. (transformers 5.24's cached `generate` drifts from its
    own forward for DeepseekV3 after the first step, so it is no oracle here.)"""
    seq = list(tokens)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(tokens):]


@pytest.fixture(scope="module")
def f32_files(hf_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf32")
    return {name: convert(folder, root / f"{name}.gguf", recipe="f32")[0]
            for name, folder in hf_models.items()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_f32_logits_and_greedy_match_transformers(name, device, hf_models, f32_files):
    hf = load_hf(hf_models[name])
    tokens = prompt(hf.config.vocab_size)
    reference = hf_logits(hf, tokens)
    assert reference.abs().max() > 1.0  # logits of a size where 1e-4 means something
    with tandem.LLM(f32_files[name], rules=rules_for(device), ctx_size=128,
                    prefill_chunk=16) as llm:
        ours = llm.logits(tokens)
        assert ours.shape == reference.shape and ours.dtype == torch.float32
        assert (ours - reference).abs().max().item() < 1e-4
        assert llm.generate(tokens[:8], NEW_TOKENS) == hf_greedy(hf, tokens[:8], NEW_TOKENS)


def test_attention_in_query_blocks_matches_transformers(hf_models, f32_files, monkeypatch):
    """A prompt chunk longer than the attention's query block (long prompts are attended
    QUERY_BLOCK queries at a time): blocks of 7 over one 40-token chunk."""
    from tandem.models import deepseek_v3

    monkeypatch.setattr(deepseek_v3, "QUERY_BLOCK", 7)
    name = next(iter(CONFIGS))
    hf = load_hf(hf_models[name])
    tokens = prompt(hf.config.vocab_size)
    with tandem.LLM(f32_files[name], rules=CPU_RULES, ctx_size=128, prefill_chunk=64) as llm:
        ours = llm.logits(tokens)
    assert (ours - hf_logits(hf, tokens)).abs().max().item() < 1e-4


@pytest.mark.parametrize("recipe,tolerance", [("f16", 1e-2), ("bf16", 6e-2)])
def test_half_precision_weights_within_their_rounding(recipe, tolerance, hf_models, tmp_path):
    """CPU path: dense weights rounded to F16 (11 significant bits) or BF16 (8), math in
    float32 (ggml's expert kernels round their activations to the weight type too): logits of
    size ~5 move by ~5e-3 and ~3e-2."""
    name = "qlora-groups2-dense1"
    hf = load_hf(hf_models[name])
    path = convert(hf_models[name], tmp_path / f"{recipe}.gguf", recipe=recipe)[0]
    tokens = prompt(hf.config.vocab_size)
    reference = hf_logits(hf, tokens)
    with tandem.LLM(path, rules=CPU_RULES, ctx_size=128) as llm:
        err = (llm.logits(tokens) - reference).abs().max().item()
    assert err < tolerance
    assert err > 1e-6  # the rounding is really there: this is not the F32 path


@pytest.mark.cuda
@pytest.mark.parametrize("recipe,tolerance", [("f16", 2e-2), ("bf16", 1e-1)])
def test_half_precision_on_the_gpu(recipe, tolerance, hf_models, tmp_path):
    """GPU path: weights stay F16/BF16 and the GPU multiplies in that precision, activations
    rounded at every matmul. A near-tie in the router can then flip one expert for one token,
    which moves that token's logits a lot: judge by relative error and top-1 agreement."""
    name = "qlora-groups2-dense1"
    hf = load_hf(hf_models[name])
    path = convert(hf_models[name], tmp_path / f"{recipe}.gguf", recipe=recipe)[0]
    tokens = prompt(hf.config.vocab_size)
    reference = hf_logits(hf, tokens)
    with tandem.LLM(path, ctx_size=128) as llm:
        assert llm.placements["blk.0.attn_q_a.weight"].device.type == "cuda"
        ours = llm.logits(tokens)
    rel = relative_error(ours, reference)
    agree = top1_agreement(ours, reference)
    print(f"{recipe} on cuda: relative error {rel:.4f}, top-1 agreement {agree:.3f}")
    assert rel < tolerance
    assert agree >= 0.9


def test_kv_b_and_split_k_b_v_b_give_the_same_logits(hf_models, f32_files, tmp_path):
    name = "qlora-groups4-dense2"
    split = convert(hf_models[name], tmp_path / "split.gguf", recipe="f32", split_kv_b=True)[0]
    model = tandem.open_gguf(split)
    assert "blk.0.attn_k_b.weight" in model.tensors and "blk.0.attn_kv_b.weight" not in model.tensors
    tokens = prompt(320)
    with tandem.LLM(f32_files[name], rules=CPU_RULES, ctx_size=64) as a, \
         tandem.LLM(split, rules=CPU_RULES, ctx_size=64) as b:
        torch.testing.assert_close(a.logits(tokens), b.logits(tokens), rtol=0, atol=1e-5)


def test_prefill_chunking_and_decode_agree(hf_models, f32_files):
    """Logits of a token are the same whether it came in a big chunk, a small one, or decode."""
    name = "noqlora-groups1-dense2"
    tokens = prompt(320, n=24)
    with tandem.LLM(f32_files[name], rules=CPU_RULES, ctx_size=64, prefill_chunk=5) as llm:
        chunked = llm.logits(tokens)
        llm.prefill_chunk = 64
        whole = llm.logits(tokens)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)


def test_torch_expert_kernel_matches_ggml_on_f32(f32_files):
    """The reference expert path (dequantized torch) and ggml agree on an F32 file."""
    name = "qlora-groups2-dense1"
    tokens = prompt(320)
    torch_rules = [Rule(".", "cpu", "torch")]
    with tandem.LLM(f32_files[name], rules=CPU_RULES, ctx_size=64) as a, \
         tandem.LLM(f32_files[name], rules=torch_rules, ctx_size=64) as b:
        torch.testing.assert_close(a.logits(tokens), b.logits(tokens), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", list(V2_CONFIGS))
def test_deepseek_v2_matches_transformers(name, tmp_path):
    """V2 and V2-Lite share the file layout: softmax routing, no correction bias."""
    folder = build_hf(tmp_path / name, seed=3, version=2, **V2_CONFIGS[name])
    path = convert(folder, tmp_path / f"{name}.gguf", recipe="f32")[0]
    assert not any("exp_probs_b" in n for n in tandem.open_gguf(path).tensors)
    hf = load_hf(folder)
    tokens = prompt(hf.config.vocab_size)
    with tandem.LLM(path, rules=CPU_RULES, ctx_size=128) as llm:
        assert llm.config.expert_gating == "softmax"
        assert (llm.logits(tokens) - hf_logits(hf, tokens)).abs().max().item() < 1e-4
        assert llm.generate(tokens[:8], 16) == hf_greedy(hf, tokens[:8], 16)
