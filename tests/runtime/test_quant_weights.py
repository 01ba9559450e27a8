"""Kernel quant end to end: a model whose linear weights stay in the file's types gives the
logits of the same model with dequantized float32 weights (the torch kernel)."""

from __future__ import annotations

import pytest
import torch

import tandem
from logit_checks import relative_error, top1_agreement
from tandem.kernels.quant_linear import QuantLinear
from tandem.placement.rules import PlacementError, Rule


def rules(device: str, kernel: str) -> list[Rule]:
    return [Rule(r"ffn_(gate|up|down)_exps\.", "cpu", "cpu"), Rule(r"^token_embd\.", "cpu", "ggml"),
            Rule(".", device, kernel)]


PROMPT = list(range(5, 60))


def test_quantized_linears_give_the_dequantized_models_logits(tiny_q8):
    with tandem.LLM(tiny_q8, rules=rules("cpu", "torch"), ctx_size=64) as llm:
        dense = llm.logits(PROMPT)
    with tandem.LLM(tiny_q8, rules=rules("cpu", "quant"), ctx_size=64) as llm:
        kept = [m for m in llm.model.modules() if isinstance(m, QuantLinear)]
        assert len(kept) >= 10 and llm.model.lm_head in kept
        ours = llm.logits(PROMPT)
    # the same float32 weights (exact dequantization), the same float32 matmuls
    torch.testing.assert_close(ours, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_on_the_gpu_quantized_weights_decode_like_bfloat16_ones_in_less_memory(tiny_q8):
    """The prompt path (bf16 copies per matmul) against the bf16 model; the decode steps (the
    compiled matvec inside the decode graphs) against the same model's prompt path over the
    text they generated (teacher forcing: a free-running comparison would diverge at the first
    near tie)."""
    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU")
    with tandem.LLM(tiny_q8, rules=rules("cuda", "torch"), ctx_size=128) as llm:
        bf16 = llm.logits(PROMPT)
        bf16_bytes = llm.memory.resident["cuda"]
    with tandem.LLM(tiny_q8, rules=rules("cuda", "quant"), ctx_size=128) as llm:
        ours = llm.logits(PROMPT)
        new = llm.generate(PROMPT[:9], 24)
        assert llm._graphs is not None  # the steps ran as graphs
        teacher = llm.logits(PROMPT[:9] + new)
        quant_bytes = llm.memory.resident["cuda"]
    assert relative_error(ours, bf16) < 0.02 and top1_agreement(ours, bf16) > 0.95
    agree = sum(int(teacher[8 + i].argmax()) == token for i, token in enumerate(new))
    assert agree >= 0.9 * len(new), f"{agree} of {len(new)} decoded tokens match"
    assert quant_bytes < bf16_bytes


@pytest.mark.cuda
def test_default_rules_keep_the_gpus_weights_quantized_when_copies_would_not_fit(tiny_q8, caplog):
    """A GPU too small for the default bfloat16 copies loads the model with its linear weights
    kept quantized (and says so); one too small for either refuses."""
    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU")
    with tandem.LLM(tiny_q8, ctx_size=128) as llm:
        assert llm.rules[-1].kernel == "torch"
        copies = llm.memory.resident["cuda"]
        bf16 = llm.logits(PROMPT)
    roomy = 1 << 40
    with tandem.LLM(tiny_q8, rules=rules("cuda", "quant"), ctx_size=128) as llm:
        quantized = llm.memory.resident["cuda"]
    assert quantized < copies
    caps = {"cpu": roomy, "cpu-total": roomy, "cuda:0": (quantized + copies) // 2}
    with caplog.at_level("WARNING"), tandem.LLM(tiny_q8, ctx_size=128, memory_caps=caps) as llm:
        assert llm.rules[-1].kernel == "quant" and llm.memory.resident["cuda"] == quantized
        assert any(isinstance(m, QuantLinear) for m in llm.model.modules())
        ours = llm.logits(PROMPT)
    assert "would not fit" in caplog.text and "kernel quant" in caplog.text
    assert relative_error(ours, bf16) < 0.02 and top1_agreement(ours, bf16) > 0.95
    with pytest.raises(PlacementError, match="does not fit"):
        tandem.LLM(tiny_q8, ctx_size=128, memory_caps={**caps, "cuda:0": quantized // 2})
