"""Config from the GGUF, completed and checked by --model_path's config.json."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

import tandem
from tandem.convert import convert
from tandem.models.hf_config import ConfigError
from tandem.placement.rules import Rule

CPU_RULES = [Rule(r"ffn_(gate|up|down)_exps\.", "cpu", "ggml"), Rule(".", "cpu", "torch")]


@pytest.fixture(scope="module")
def hf_folder(hf_models):
    return hf_models["qlora-groups2-dense1"]


@pytest.fixture(scope="module")
def old_style_gguf(hf_folder, tmp_path_factory):
    """Like Unsloth's R1 files: no expert_group_count / expert_group_used_count keys."""
    path = tmp_path_factory.mktemp("old") / "old.gguf"
    return convert(hf_folder, path, recipe="f32", group_keys=False)[0]


def test_model_path_fills_group_keys(hf_folder, old_style_gguf, caplog):
    from hf_tiny import load_hf

    hf = load_hf(hf_folder)
    tokens = list(range(3, 40))
    with caplog.at_level(logging.INFO), \
         tandem.LLM(old_style_gguf, model_path=hf_folder, rules=CPU_RULES, ctx_size=64) as llm:
        assert (llm.config.n_group, llm.config.topk_group) == (2, 1)
        logits = llm.logits(tokens)
    with torch.no_grad():
        reference = hf(torch.tensor([tokens])).logits[0]
    assert (logits - reference).abs().max().item() < 1e-4
    assert "n_group from" in caplog.text


def test_without_model_path_r1_defaults_apply_and_are_logged(old_style_gguf, caplog):
    with caplog.at_level(logging.WARNING), \
         tandem.LLM(old_style_gguf, rules=CPU_RULES, ctx_size=64) as llm:
        assert (llm.config.n_group, llm.config.topk_group) == (8, 4)
        llm.logits([1, 2, 3])
    assert "using DeepSeek-R1's n_group=8, topk_group=4" in caplog.text


def test_disagreeing_config_is_an_error(hf_folder, old_style_gguf, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(hf_folder, other)
    config = json.loads((other / "config.json").read_text())
    config["routed_scaling_factor"] = 1.0
    config["num_attention_heads"] = 8
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError) as err:
        tandem.LLM(old_style_gguf, model_path=other, rules=CPU_RULES, ctx_size=64)
    message = str(err.value)
    assert "n_heads: GGUF 4 vs config.json 8" in message
    assert "expert_weights_scale: GGUF 2.5 vs config.json 1.0" in message


def test_model_path_without_config_json(old_style_gguf, tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        tandem.LLM(old_style_gguf, model_path=tmp_path, rules=CPU_RULES)
