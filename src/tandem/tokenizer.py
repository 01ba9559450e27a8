"""Tokenizers from GGUF metadata (or a tokenizer.json), built on the `tokenizers` library.

- `gpt2` (byte-level BPE): vocabulary and merges from the file; the pre-tokenizer regexes by
  `tokenizer.ggml.pre`, as llama.cpp splits text for that model family.
- `llama` (SentencePiece BPE, e.g. Gemma): merges rebuilt from the pieces' scores, byte
  fallback to <0xNN> tokens, spaces as "▁".

Control and user-defined tokens (token types 3 and 4) are matched whole before any splitting.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from tandem.errors import TandemError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
           r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
          r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DEEPSEEK_V3 = [
    r"\p{N}{1,3}",
    r"[一-龥぀-ゟ゠-ヿ]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
]

# tokenizer.ggml.pre -> regexes applied one after another (each splits the previous pieces),
# after llama.cpp's llama-vocab.cpp.
PRE_TOKENIZERS: dict[str, list[str]] = {
    "gpt-2": [_GPT2], "gpt2": [_GPT2], "mpt": [_GPT2], "olmo": [_GPT2], "jais": [_GPT2],
    "llama-bpe": [_LLAMA3], "llama3": [_LLAMA3], "dbrx": [_LLAMA3], "smaug-bpe": [_LLAMA3],
    "qwen2": [_QWEN2], "stablelm2": [_QWEN2],
    "deepseek-v3": _DEEPSEEK_V3,
    "smollm": [r"\p{N}", _GPT2], "starcoder": [r"\p{N}", _GPT2], "refact": [r"\p{N}", _GPT2],
    "command-r": [r"\p{N}", _GPT2], "codeshell": [r"\p{N}", _GPT2],
}

# Tokens that end a turn in common chat formats, besides EOS.
END_OF_TURN = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<｜end▁of▁sentence｜>",
               "<|endoftext|>")


class TokenizerError(TandemError):
    """A tokenizer that cannot be built from what the file holds."""


class Tokenizer:
    def __init__(self, backend: HFTokenizer, bos_id: int | None, eos_id: int | None,
                 add_bos: bool, source: str):
        self.backend, self.bos_id, self.eos_id, self.add_bos = backend, bos_id, eos_id, add_bos
        self.source = source
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_gguf(cls, metadata: dict[str, Any], source: str = "GGUF") -> Tokenizer:
        kind = metadata.get("tokenizer.ggml.model")
        tokens = metadata.get("tokenizer.ggml.tokens")
        if not kind or not tokens:
            raise TokenizerError(f"{source}: no tokenizer in the metadata (tokenizer.ggml.model/"
                                 "tokens); give --model_path with a tokenizer.json")
        types = metadata.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
        if kind == "gpt2":
            backend = _byte_level_bpe(tokens, metadata, source)
        elif kind == "llama":
            backend = _sentencepiece_bpe(tokens, types, metadata, source)
        else:
            raise TokenizerError(f"{source}: tokenizer model {kind!r} is not supported "
                                 "(supported: gpt2, llama)")
        special = [AddedToken(t, special=kind_ == CONTROL, normalized=False)
                   for t, kind_ in zip(tokens, types, strict=True) if kind_ in (CONTROL, USER_DEFINED)]
        backend.add_special_tokens([t for t in special if t.special])
        backend.add_tokens([t for t in special if not t.special])
        bos = metadata.get("tokenizer.ggml.bos_token_id")
        eos = metadata.get("tokenizer.ggml.eos_token_id")
        add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", kind == "llama"))
        return cls(backend, bos, eos, add_bos and bos is not None, source)

    @classmethod
    def from_file(cls, path: str | Path, bos: str | None = None, eos: str | None = None) -> Tokenizer:
        """A Hugging Face tokenizer.json (and its tokenizer_config.json for BOS/EOS)."""
        path = Path(path)
        folder = path.parent if path.is_file() else path
        file = path if path.is_file() else path / "tokenizer.json"
        try:
            backend = HFTokenizer.from_file(str(file))
        except Exception as exc:  # the library raises plain Exceptions
            raise TokenizerError(f"{file}: cannot load tokenizer ({exc})") from None
        config = folder / "tokenizer_config.json"
        settings = json.loads(config.read_text()) if config.exists() else {}
        bos = bos or _token_text(settings.get("bos_token"))
        eos = eos or _token_text(settings.get("eos_token"))
        bos_id = backend.token_to_id(bos) if bos else None
        eos_id = backend.token_to_id(eos) if eos else None
        add_bos = bool(settings.get("add_bos_token", False))
        return cls(backend, bos_id, eos_id, add_bos and bos_id is not None, str(file))

    # -- use ------------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; special tokens written in the text are recognized."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        wants_bos = self.add_bos if add_bos is None else add_bos
        if wants_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special)

    def token_id(self, text: str) -> int | None:
        return self.backend.token_to_id(text)

    def stop_ids(self) -> set[int]:
        """EOS and the end-of-turn tokens this vocabulary has."""
        ids = {self.eos_id} if self.eos_id is not None else set()
        ids |= {i for t in END_OF_TURN if (i := self.token_id(t)) is not None}
        return ids


class StreamDecoder:
    """Text of a growing token sequence, piece by piece, never splitting a UTF-8 character.
    Each push decodes a window (the tokens of the last piece and those since), not the whole
    sequence: a long answer's cost per token stays flat. The window's first tokens give the
    context that decoding needs (SentencePiece drops the space of a decode's first token, the
    same in both texts compared)."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True):
        self.tokenizer, self.skip_special = tokenizer, skip_special
        self.ids: list[int] = []
        self._start = 0  # the window's first token
        self._read = 0  # tokens whose text has been returned

    def push(self, token: int) -> str:
        self.ids.append(token)
        decode = self.tokenizer.decode
        before = decode(self.ids[self._start : self._read], self.skip_special)
        text = decode(self.ids[self._start :], self.skip_special)
        if len(text) <= len(before) or text.endswith("\ufffd"):  # nothing yet, or an incomplete
            return ""  # multi-byte character: wait for more
        self._start, self._read = self._read, len(self.ids)
        return text[len(before) :]


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def _byte_level_bpe(tokens: list[str], metadata: dict[str, Any], source: str) -> HFTokenizer:
    merges_raw = metadata.get("tokenizer.ggml.merges")
    if not merges_raw:
        raise TokenizerError(f"{source}: gpt2 tokenizer without tokenizer.ggml.merges")
    merges = []
    for m in merges_raw:
        cut = m.find(" ", 1)
        merges.append((m[:cut], m[cut + 1:]))
    vocab = {t: i for i, t in enumerate(tokens)}
    pre = metadata.get("tokenizer.ggml.pre", "default")
    regexes = PRE_TOKENIZERS.get(pre)
    if regexes is None:
        raise TokenizerError(f"{source}: pre-tokenizer {pre!r} is not supported (supported: "
                             f"{', '.join(sorted(PRE_TOKENIZERS))})")
    backend = HFTokenizer(models.BPE(vocab, merges, ignore_merges=pre in ("llama-bpe", "llama3")))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(tokens: list[str], types: list[int], metadata: dict[str, Any],
                       source: str) -> HFTokenizer:
    scores = metadata.get("tokenizer.ggml.scores")
    if not scores:
        raise TokenizerError(f"{source}: llama tokenizer without tokenizer.ggml.scores")
    vocab = {t: i for i, t in enumerate(tokens)}
    mergeable = {t: s for t, s, k in zip(tokens, scores, types, strict=True) if k == NORMAL}
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None else None
    backend = HFTokenizer(models.BPE(vocab, _merges_from_scores(mergeable, vocab), unk_token=unk,
                                     byte_fallback=True, fuse_unk=True))
    steps = []
    if metadata.get("tokenizer.ggml.add_space_prefix", True):
        steps.append(normalizers.Prepend("▁"))
    steps.append(normalizers.Replace(" ", "▁"))
    backend.normalizer = normalizers.Sequence(steps)
    parts = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if metadata.get("tokenizer.ggml.add_space_prefix", True):
        parts.append(decoders.Strip(content=" ", left=1))
    backend.decoder = decoders.Sequence(parts)
    return backend


def _merges_from_scores(pieces: dict[str, float], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """SentencePiece BPE stores a score per piece instead of merges: a piece is made by merging
    two smaller pieces, and higher-scored pieces merge first."""
    found = []
    for piece, score in pieces.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in pieces and right in pieces:
                found.append((-score, vocab[left], vocab[right], left, right))
    found.sort()
    return [(left, right) for _, _, _, left, right in found]
