"""Quantized routed experts (ggml's kernels, and tandem's own where they cover the types) against
tandem's own dequantized-float32 run of the same file.

Both runs read identical weights; they differ only in the expert arithmetic: ggml quantizes
each expert's input to Q8_K (Q8_0 for Q8_0 weights) before its integer dot products, which
costs ~1% relative error per matmul. Through 2 MoE layers the logits move by a few percent of
their norm: we allow 5%.
"""

from __future__ import annotations

import pytest
import torch

import tandem
from logit_checks import relative_error, top1_agreement
from tandem.convert import convert
from tandem.placement.rules import Rule

EXPERTS = r"ffn_(gate|up|down)_exps\."
GGML_RULES = [Rule(EXPERTS, "cpu", "ggml"), Rule(".", "cpu", "torch")]
OWN_RULES = [Rule(EXPERTS, "cpu", "cpu"), Rule(".", "cpu", "torch")]  # IQ1_S, IQ2_XXS: tandem's
DEQUANT_RULES = [Rule(".", "cpu", "torch", "float32")]  # experts dequantized to F32 in torch
TOLERANCE = 0.05

MIXES = {
    "q8_0": ["ffn_(gate|up|down)_exps=q8_0"],
    "q4_k": ["ffn_(gate|up|down)_exps=q4_k"],
    "iq2_xxs-q4_k": ["ffn_(gate|up)_exps=iq2_xxs", "ffn_down_exps=q4_k"],
    "ud-iq1_s": ["ffn_(gate|up)_exps=iq1_s", "ffn_down_exps=iq2_xxs"],
}


@pytest.fixture(scope="module")
def quant_files(hf_quant_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    return {name: convert(hf_quant_model, root / f"{name}.gguf", recipe="f32", overrides=rules)[0]
            for name, rules in MIXES.items()}


def prompt(n: int = 24) -> list[int]:
    return torch.randint(0, 320, (n,), generator=torch.Generator().manual_seed(5)).tolist()


@pytest.mark.parametrize(("mix", "rules"), [*((m, GGML_RULES) for m in MIXES), ("ud-iq1_s", OWN_RULES)],
                         ids=[*(f"{m}-ggml" for m in MIXES), "ud-iq1_s-own"])
def test_cpu_experts_match_dequantized_reference(mix, rules, quant_files):
    types = {t.ggml_type.name for n, t in tandem.open_gguf(quant_files[mix]).tensors.items()
             if "_exps" in n}
    assert "F32" not in types  # the experts really are quantized
    tokens = prompt()
    with tandem.LLM(quant_files[mix], rules=rules, ctx_size=64) as llm:
        ours = llm.logits(tokens)
    with tandem.LLM(quant_files[mix], rules=DEQUANT_RULES, ctx_size=64) as llm:
        reference = llm.logits(tokens)
    rel = relative_error(ours, reference)
    assert rel < TOLERANCE, f"{mix}: relative logit error {rel:.4f}"
    # The two runs agree on what matters for decoding most of the time.
    agree = top1_agreement(ours, reference)
    assert agree > 0.8


@pytest.mark.parametrize("mix", ["ud-iq1_s", "q4_k"])
def test_greedy_continuation_is_stable(mix, quant_files):
    """Same tokens on a second run and with another thread count."""
    tokens = prompt(8)
    with tandem.LLM(quant_files[mix], rules=GGML_RULES, ctx_size=64, n_threads=1) as llm:
        first = llm.generate(tokens, 24)
        again = llm.generate(tokens, 24)
    with tandem.LLM(quant_files[mix], rules=GGML_RULES, ctx_size=64, n_threads=2) as llm:
        other_threads = llm.generate(tokens, 24)
    assert len(first) == 24
    assert first == again == other_threads
