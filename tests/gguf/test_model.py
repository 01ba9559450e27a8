"""Opening single files, split sets and folders; metadata; tensor views; typed config."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from gguf import GGUFReader, quants

import tandem
from tandem.errors import GGUFError
from tandem.gguf.config import DeepSeek2Config


def test_single_file_metadata_and_tensors(tiny_q8):
    model = tandem.open_gguf(tiny_q8)
    assert model.files == [tiny_q8]
    assert model.architecture == "deepseek2"
    reference = GGUFReader(tiny_q8)  # gguf's own reader, element by element
    assert set(model.tensors) == {t.name for t in reference.tensors}
    for t in reference.tensors:
        info = model.tensors[t.name]
        assert info.shape == tuple(reversed(t.shape.tolist()))
        assert info.ggml_type == t.tensor_type
        assert info.n_bytes == t.n_bytes
        assert info.file == tiny_q8
        np.testing.assert_array_equal(model.raw(t.name), t.data.reshape(-1).view(np.uint8))
    expected = {k: f.contents() for k, f in reference.fields.items() if not k.startswith("GGUF.")}
    assert model.metadata.keys() == expected.keys()
    for key, value in expected.items():  # floats were stored as float32
        assert model.metadata[key] == pytest.approx(value), key


def test_raw_is_a_zero_copy_view(tiny_q8):
    model = tandem.open_gguf(tiny_q8)
    raw = model.raw("blk.1.ffn_gate_exps.weight")
    assert not raw.flags.owndata and not raw.flags.writeable


def test_dequantize_gives_logical_shape(tiny_q8):
    model = tandem.open_gguf(tiny_q8)
    name = "blk.1.ffn_down_exps.weight"
    info = model.tensors[name]
    assert info.shape == (8, 256, 256)
    w = model.dequantize(name)
    assert w.shape == info.shape
    ref = quants.dequantize(model.raw(name).reshape(-1, 34), info.ggml_type).reshape(info.shape)
    np.testing.assert_array_equal(w.numpy(), ref)


def test_split_set_from_any_member(tiny_split):
    assert len(tiny_split) == 3
    models = [tandem.open_gguf(p) for p in tiny_split]
    for m in models:
        assert m.files == tiny_split
        assert len(m.tensors) == models[0].metadata["split.tensors.count"]
    files_used = {t.file for t in models[0].tensors.values()}
    assert files_used == set(tiny_split)
    name = "blk.2.ffn_up_exps.weight"
    info = models[0].tensors[name]
    reader = GGUFReader(info.file)
    stored = next(t for t in reader.tensors if t.name == name)
    np.testing.assert_array_equal(models[1].raw(name), stored.data.reshape(-1).view(np.uint8))


def test_folder_with_one_model(tiny_split, tmp_path):
    for p in tiny_split:
        shutil.copy(p, tmp_path / p.name)
    (tmp_path / "README.md").write_text("not a model")
    model = tandem.open_gguf(tmp_path)
    assert [p.name for p in model.files] == [p.name for p in tiny_split]


def test_folder_with_two_models_is_refused(tiny_q8, tiny_split, tmp_path):
    shutil.copy(tiny_q8, tmp_path / tiny_q8.name)
    for p in tiny_split:
        shutil.copy(p, tmp_path / p.name)
    with pytest.raises(GGUFError, match="holds 2 models"):
        tandem.open_gguf(tmp_path)


def test_empty_folder_is_refused(tmp_path):
    with pytest.raises(GGUFError, match="no .gguf file"):
        tandem.open_gguf(tmp_path)


def test_deepseek_config_from_both_kv_b_forms(tiny_q8, tiny_split):
    old = tandem.open_gguf(tiny_q8).config
    new = tandem.open_gguf(tiny_split[0]).config
    assert isinstance(old, DeepSeek2Config)
    # The same shape, whichever way the file spells the MLA head sizes.
    assert old == new
    assert (old.qk_nope_head_dim, old.qk_rope_head_dim, old.v_head_dim) == (32, 32, 64)
    assert (old.n_expert, old.n_expert_used, old.n_group, old.topk_group) == (8, 2, 2, 1)
    assert old.expert_gating == "sigmoid" and old.rope_scaling == "yarn"


def test_config_names_a_missing_key(tiny_q8):
    meta = dict(tandem.open_gguf(tiny_q8).metadata)
    del meta["deepseek2.attention.kv_lora_rank"]
    with pytest.raises(GGUFError, match="deepseek2.attention.kv_lora_rank"):
        DeepSeek2Config.from_metadata(meta, "x.gguf")


def test_gemma_config(gemma_gguf):
    from tandem.gguf.config import Gemma3Config

    c = tandem.open_gguf(gemma_gguf).config
    assert isinstance(c, Gemma3Config)
    assert (c.n_layers, c.n_embd, c.n_heads, c.n_kv_heads, c.head_dim) == (18, 640, 4, 1, 256)
    assert c.sliding_window == 512 and c.n_vocab == 262144
    assert [i for i in range(18) if c.is_global(i)] == [5, 11, 17]


def test_config_for_unknown_architecture(tmp_path):
    from tandem.gguf.config import config_from_metadata

    with pytest.raises(GGUFError, match="no model config for architecture 'mamba'"):
        config_from_metadata({"general.architecture": "mamba"}, "x.gguf")


def test_gemma_metadata_matches_gguf_reader(gemma_gguf):
    # Our bulk array parsing against gguf's element-by-element reader on a 262k-token vocab.
    model = tandem.open_gguf(gemma_gguf)
    reference = GGUFReader(gemma_gguf)
    for key, field in reference.fields.items():
        if key.startswith("GGUF."):
            continue
        assert model.metadata[key] == pytest.approx(field.contents()), key
    assert len(model.metadata["tokenizer.ggml.tokens"]) == 262144
