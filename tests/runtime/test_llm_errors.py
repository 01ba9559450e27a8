"""Bad input to tandem.LLM: clear errors, raised before any weight is loaded."""

from __future__ import annotations

import numpy as np
import pytest

import tandem
from tandem.convert import convert
from tandem.errors import GGUFError, TandemError
from tandem.gguf.types import GGMLType
from tandem.gguf.writer import write_gguf
from tandem.placement.rules import PlacementError, Rule
from tandem.runtime.kv_cache import ContextFull

CPU_RULES = [Rule(r"ffn_(gate|up|down)_exps\.", "cpu", "ggml"), Rule(".", "cpu", "torch")]


@pytest.fixture(scope="module")
def good(hf_models, tmp_path_factory):
    return convert(hf_models["qlora-groups2-dense1"], tmp_path_factory.mktemp("e") / "m.gguf",
                   recipe="f32")[0]


def rewrite(src, dst, drop=(), reshape=None):
    """Copy a GGUF, leaving out tensors in `drop` and giving `reshape` tensors a new shape."""
    model = tandem.open_gguf(src)
    reshape = reshape or {}
    tensors = [(n, reshape.get(n, t.shape), t.ggml_type) for n, t in model.tensors.items()
               if n not in drop]

    def produce(name, shape, t):
        data = model.raw(name)
        need = int(np.prod(shape)) * 4
        return np.resize(data, need)  # F32 file: 4 bytes a value

    meta = {k: v for k, v in model.metadata.items() if k != "general.architecture"}
    return write_gguf(dst, model.architecture, meta, tensors, produce)[0]


def test_missing_tensor(good, tmp_path):
    bad = rewrite(good, tmp_path / "bad.gguf", drop={"blk.1.ffn_up_shexp.weight"})
    with pytest.raises(GGUFError, match=r"bad.gguf: missing tensors blk.1.ffn_up_shexp.weight"):
        tandem.LLM(bad, rules=CPU_RULES)


def test_tensor_with_wrong_shape(good, tmp_path):
    bad = rewrite(good, tmp_path / "bad.gguf", reshape={"blk.0.attn_output.weight": (64, 32)})
    with pytest.raises(GGUFError, match=r"tensor 'blk.0.attn_output.weight' has shape \[64, 32\], "
                                        r"the config \(metadata\) implies \[64, 64\]"):
        tandem.LLM(bad, rules=CPU_RULES)


def test_rule_that_matches_nothing(good):
    rules = [Rule("ffn_gate_exps_typo", "cpu", "ggml"), *CPU_RULES]
    with pytest.raises(PlacementError, match="rules that match no tensor.*ffn_gate_exps_typo"):
        tandem.LLM(good, rules=rules)


def test_device_that_does_not_exist(good):
    with pytest.raises(PlacementError, match="sends tensors to cuda:7, which this machine lacks"):
        tandem.LLM(good, rules=[CPU_RULES[0], Rule(".", "cuda:7", "torch")])


def test_tensor_no_rule_places(good):
    with pytest.raises(PlacementError, match="no rule places tensor 'token_embd.weight'"):
        tandem.LLM(good, rules=[CPU_RULES[0], Rule("blk", "cpu", "torch")])


def test_ggml_kernel_only_for_experts(good):
    with pytest.raises(PlacementError, match="ggml serves the routed experts"):
        tandem.LLM(good, rules=[Rule(".", "cpu", "ggml")])


def test_experts_split_across_kernels(good):
    rules = [Rule(r"ffn_gate_exps\.", "cpu", "ggml"), Rule(".", "cpu", "torch")]
    with pytest.raises(GGUFError, match="must share one kernel"):
        tandem.LLM(good, rules=rules)


def test_plan_that_does_not_fit(good):
    caps = {"cpu": 10_000, "cpu-total": 1 << 40}
    with pytest.raises(PlacementError) as err:
        tandem.LLM(good, rules=CPU_RULES, memory_caps=caps)
    text = str(err.value)
    assert "does not fit" in text and "cpu: needs" in text and "short" in text
    assert "rule '.'" in text  # names the rule to change


def test_kv_for_every_sequence_is_planned(good):
    with tandem.LLM(good, rules=CPU_RULES, ctx_size=64) as one:
        single = one.memory.resident["cpu"]
    with tandem.LLM(good, rules=CPU_RULES, ctx_size=64, sequences=9) as many:
        per_sequence = 3 * 64 * (32 + 8) * 4  # 3 layers x ctx x (latent + rope key) x float32
        assert many.memory.resident["cpu"] - single == 8 * per_sequence


def test_rules_from_yaml(good, tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text("- match: 'ffn_(gate|up|down)_exps\\.'\n  device: cpu\n  kernel: ggml\n"
                    "- match: '.'\n  device: cpu\n  dtype: float32\n")
    with tandem.LLM(good, rules=path, ctx_size=32) as llm:
        assert llm.logits([1, 2, 3]).shape == (3, 320)
    path.write_text("- match: '.'\n  device: cpu\n  kernal: torch\n")
    with pytest.raises(PlacementError, match=r"rule 1 has unknown keys \['kernal'\]"):
        tandem.LLM(good, rules=path)
    path.write_text("- match: '(['\n  device: cpu\n")
    with pytest.raises(PlacementError, match="bad regex"):
        tandem.LLM(good, rules=path)
    path.write_text("match: x\n")
    with pytest.raises(PlacementError, match="non-empty YAML list"):
        tandem.LLM(good, rules=path)


def test_bad_tokens_and_context(good):
    with tandem.LLM(good, rules=CPU_RULES, ctx_size=16) as llm:
        with pytest.raises(TandemError, match="token ids must lie in 0..319"):
            llm.logits([1, 320])
        with pytest.raises(TandemError, match="no tokens"):
            llm.logits([])
        with pytest.raises(ContextFull, match="17 tokens exceed the context size 16"):
            llm.logits(list(range(17)))
        # Generation stops at the context end instead of overrunning the cache.
        assert len(llm.generate(list(range(10)), max_new_tokens=50)) == 7
    with pytest.raises(TandemError, match="ctx_size 999 must lie in 1..256"):
        tandem.LLM(good, rules=CPU_RULES, ctx_size=999)


def test_unsupported_architecture(tmp_path):
    path = write_gguf(tmp_path / "mamba.gguf", "mamba", {"mamba.block_count": 1},
                      [("x.weight", (4, 32), GGMLType.F32)],
                      lambda name, shape, t: np.zeros(shape, np.float32))[0]
    with pytest.raises(GGUFError, match="architecture 'mamba' is not supported .*deepseek2"):
        tandem.LLM(path)
