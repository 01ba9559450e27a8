"""Quant recipes: which ggml type each tensor of a synthetic file gets.

A recipe is an ordered list of (regex on the tensor name, type); the first match wins. 1-D
tensors (norms, biases) are always F32, as ggml needs. Where a tensor's rows do not fill whole
blocks of the chosen type, the next type in FALLBACK that fits is used instead, as llama.cpp's
quantizer does.
"""

from __future__ import annotations

import re

from tandem.errors import TandemError
from tandem.gguf.types import GGMLType, block_size

Rule = tuple[str, GGMLType]
T = GGMLType

FALLBACK = (T.Q8_0, T.F16, T.F32)

_ROUTER = [(r"ffn_gate_inp\.", T.F32)]  # router logits stay exact in published files

RECIPES: dict[str, list[Rule]] = {
    # Unsloth's DeepSeek-R1 UD-IQ1_S ("1.58-bit"): 1.56-bit gate/up experts, 2.06-bit down
    # experts, 4-6 bit everything that is read for every token.
    "ud-iq1_s": _ROUTER + [
        (r"ffn_(gate|up)_exps\.", T.IQ1_S),
        (r"ffn_down_exps\.", T.IQ2_XXS),
        (r"_shexp\.", T.Q4_K),
        (r"attn_(kv_b|k_b|v_b)\.", T.Q6_K),
        (r"attn_", T.Q4_K),
        (r"ffn_down\.", T.Q6_K),
        (r"ffn_", T.Q4_K),
        (r"^output\.", T.Q6_K),
        (r"^token_embd\.", T.Q4_K),
    ],
    # llama.cpp's Q4_K_M: Q4_K nearly everywhere, Q6_K for down projections and the output.
    "q4_k_m": _ROUTER + [
        (r"ffn_down(_exps|_shexp)?\.", T.Q6_K),
        (r"attn_(kv_b|v_b)\.", T.Q6_K),
        (r"^output\.", T.Q6_K),
        (r".", T.Q4_K),
    ],
    "q8_0": _ROUTER + [(r".", T.Q8_0)],
    "bf16": _ROUTER + [(r".", T.BF16)],
    "f16": _ROUTER + [(r".", T.F16)],
    "f32": [(r".", T.F32)],
}


def parse_overrides(items: list[str]) -> list[Rule]:
    """`REGEX=TYPE` strings (from --type) as rules."""
    from tandem.gguf.types import ggml_type

    rules = []
    for item in items:
        pattern, sep, type_name = item.rpartition("=")
        if not sep or not pattern:
            raise TandemError(f"--type takes REGEX=TYPE, got {item!r}")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise TandemError(f"--type {item!r}: bad regex ({exc})") from None
        rules.append((pattern, ggml_type(type_name)))
    return rules


def recipe_rules(name: str, overrides: list[Rule] = ()) -> list[Rule]:
    if name not in RECIPES:
        raise TandemError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return list(overrides) + RECIPES[name]


def tensor_type(name: str, shape: tuple[int, ...], rules: list[Rule]) -> GGMLType:
    if len(shape) == 1:
        return T.F32
    chosen = next((t for pattern, t in rules if re.search(pattern, name)), T.F32)
    for t in (chosen, *FALLBACK):
        if shape[-1] % block_size(t) == 0:
            return t
    return T.F32
