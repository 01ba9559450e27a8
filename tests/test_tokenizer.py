"""Tokenizers built from GGUF metadata against reference tokenizers, on multilingual text."""

from __future__ import annotations

import numpy as np
import pytest

import tandem
from hf_tiny import deepseek_vocabulary
from tandem.gguf.types import GGMLType
from tandem.gguf.writer import write_gguf
from tandem.tokenizer import StreamDecoder, Tokenizer, TokenizerError

TEXT = (
    "Hello world! The GPU's 12345 cores don't idle; I'll say 3.14159.\n"
    "你好，世界。深度求索的模型。こんにちは、カタカナ。안녕하세요\n"
    "def square(x: int) -> int:\n    return x ** 2  # comment\n\t\ttabs  and   spaces\n"
    "Emoji: 🚀🎉👩‍💻 naïve café Ångström — “quotes” «guillemets»\r\n<|im_start|>user\n"
)


@pytest.mark.parametrize("which", ["smollm2", "gemma"])
def test_matches_transformers_tokenizer(which, smollm2_gguf, gemma_gguf, hf_tokenizer_from_gguf):
    path = smollm2_gguf if which == "smollm2" else gemma_gguf
    reference = hf_tokenizer_from_gguf(path)
    ours = Tokenizer.from_gguf(tandem.open_gguf(path).metadata, str(path))
    ids = ours.encode(TEXT, add_bos=False)
    assert ids == reference.encode(TEXT, add_special_tokens=False)
    assert ours.decode(ids) == TEXT == reference.decode(ids)
    assert len(ids) > 40  # a real segmentation, not one token per character
    with_bos = ours.encode("hi")
    assert (with_bos[0] == ours.bos_id) == (which == "gemma")  # Gemma adds BOS, SmolLM2 not


def test_deepseek_style_bpe_vocabulary(tmp_path):
    reference, metadata = deepseek_vocabulary(800, [TEXT * 3])
    path = write_gguf(tmp_path / "vocab.gguf", "deepseek2", metadata,
                      [("x.weight", (1, 32), GGMLType.F32)],
                      lambda *a: np.zeros(32, np.float32))[0]
    ours = Tokenizer.from_gguf(tandem.open_gguf(path).metadata, str(path))
    text = TEXT.replace("<|im_start|>", "")
    ids = ours.encode(text, add_bos=False)
    assert ids == reference.encode(text).ids
    assert ours.decode(ids) == text
    assert ours.encode("x")[0] == 0  # BOS added, as the file asks
    assert ours.stop_ids() == {1}
    assert ours.encode("<think>", add_bos=False) == [ours.token_id("<think>")]  # kept whole


def test_stream_decoder_never_splits_a_character(smollm2_gguf):
    tok = Tokenizer.from_gguf(tandem.open_gguf(smollm2_gguf).metadata)
    ids = tok.encode("深度求索 🚀 naïve")
    stream = StreamDecoder(tok)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) == "深度求索 🚀 naïve"
    assert all("\ufffd" not in p for p in pieces)


@pytest.mark.parametrize("which", ["smollm2", "gemma"])  # byte-level BPE, SentencePiece
def test_stream_decoder_pieces_add_up_to_the_whole_decode(which, smollm2_gguf, gemma_gguf):
    """Decoding a window per token gives the same text as decoding everything at once (the
    tokenizer's own decode), spaces, multi-byte characters and skipped special tokens included."""
    path = smollm2_gguf if which == "smollm2" else gemma_gguf
    tok = Tokenizer.from_gguf(tandem.open_gguf(path).metadata)
    ids = tok.encode(TEXT * 3, add_bos=False)
    stream = StreamDecoder(tok)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) == tok.decode(ids, skip_special=True)
    assert all("\ufffd" not in p for p in pieces)
    assert sum(bool(p) for p in pieces) > len(ids) // 2  # piece by piece, not all at the end


def test_unsupported_tokenizers_are_named():
    with pytest.raises(TokenizerError, match="pre-tokenizer 'klingon' is not supported"):
        Tokenizer.from_gguf({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "klingon",
                             "tokenizer.ggml.tokens": ["a"], "tokenizer.ggml.merges": ["a a"]})
    with pytest.raises(TokenizerError, match="tokenizer model 'rwkv' is not supported"):
        Tokenizer.from_gguf({"tokenizer.ggml.model": "rwkv", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(TokenizerError, match="no tokenizer in the metadata"):
        Tokenizer.from_gguf({}, "x.gguf")


def test_tokenizer_json_from_model_path(smollm2_gguf, hf_tokenizer_from_gguf, tmp_path):
    """A Hugging Face folder's tokenizer.json (here: transformers' own, saved) is used as is."""
    reference = hf_tokenizer_from_gguf(smollm2_gguf)
    reference.save_pretrained(tmp_path)
    ours = Tokenizer.from_file(tmp_path)
    assert ours.encode(TEXT, add_bos=False) == reference.encode(TEXT, add_special_tokens=False)
    assert ours.eos_id == reference.eos_token_id
    with pytest.raises(TokenizerError, match="cannot load tokenizer"):
        Tokenizer.from_file(tmp_path / "tokenizer_config.json")
