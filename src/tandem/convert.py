"""`tandem convert`: a Hugging Face DeepSeek-V2/V3 folder -> GGUF, with llama.cpp's names.

Writes the same tensor names, shapes and metadata keys as llama.cpp's convert_hf_to_gguf.py,
in any ggml type per tensor (a recipe name or a single type, plus REGEX=TYPE overrides). Meant
for making test models from `transformers`' random tiny DeepseekV3ForCausalLM; it streams one
tensor at a time, so larger folders work too.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from tandem.bench import recipes
from tandem.errors import TandemError
from tandem.gguf import deepseek2
from tandem.gguf.types import GGMLType, ggml_type
from tandem.gguf.writer import write_gguf
from tandem.kernels.quantize import quantize
from tandem.models.hf_config import config_from_hf, read_config_json

# HF name (after "model.layers.N.") -> GGUF name (after "blk.N.")
LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.q_a_proj": "attn_q_a",
    "self_attn.q_a_layernorm": "attn_q_a_norm",
    "self_attn.q_b_proj": "attn_q_b",
    "self_attn.kv_a_proj_with_mqa": "attn_kv_a_mqa",
    "self_attn.kv_a_layernorm": "attn_kv_a_norm",
    "self_attn.kv_b_proj": "attn_kv_b",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "mlp.gate": "ffn_gate_inp",
    "mlp.shared_experts.gate_proj": "ffn_gate_shexp",
    "mlp.shared_experts.up_proj": "ffn_up_shexp",
    "mlp.shared_experts.down_proj": "ffn_down_shexp",
}
TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


class _Checkpoint:
    """The safetensors files of a folder, tensors read lazily by name."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise TandemError(f"{folder}: no .safetensors files")
        self._handles = [safe_open(str(f), framework="pt") for f in files]
        self._where = {k: h for h in self._handles for k in h.keys()}  # noqa: SIM118

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise TandemError(f"checkpoint lacks tensor {name!r}")
        return self._where[name].get_tensor(name).float()


def gguf_sources(n_layers: int, n_expert: int) -> dict[str, Callable[[_Checkpoint], torch.Tensor]]:
    """GGUF tensor name -> how to read it from the checkpoint."""
    sources: dict[str, Callable] = {g: (lambda ck, h=h: ck.get(h)) for h, g in TOP_NAMES.items()}
    for i in range(n_layers):
        for hf, gg in LAYER_NAMES.items():
            sources[f"blk.{i}.{gg}.weight"] = lambda ck, n=f"model.layers.{i}.{hf}.weight": ck.get(n)
        sources[f"blk.{i}.exp_probs_b.bias"] = (
            lambda ck, n=f"model.layers.{i}.mlp.gate.e_score_correction_bias": ck.get(n))
        for part in ("gate", "up", "down"):
            names = [f"model.layers.{i}.mlp.experts.{e}.{part}_proj.weight" for e in range(n_expert)]
            sources[f"blk.{i}.ffn_{part}_exps.weight"] = (
                lambda ck, names=names: torch.stack([ck.get(n) for n in names]))
    return sources


def _split_kv_b(kv_b: torch.Tensor, n_heads: int, nope: int, v: int):
    """attn_kv_b [H*(nope+v), r] -> attn_k_b [H, r, nope] and attn_v_b [H, v, r] (llama.cpp)."""
    per_head = kv_b.view(n_heads, nope + v, -1)
    return per_head[:, :nope, :].transpose(1, 2).contiguous(), per_head[:, nope:, :].contiguous()


def convert(model_dir: str | Path, out: str | Path, *, recipe: str = "f32",
            overrides: list[str] = (), split_kv_b: bool = False, group_keys: bool = True,
            metadata: dict | None = None,
            on_tensor: Callable[[str, int], None] | None = None) -> list[Path]:
    """Write `out` from the HF folder; `recipe` is a recipe name or one ggml type for all;
    `metadata` adds keys (a tokenizer, a chat template)."""
    folder = Path(model_dir).expanduser()
    hf = read_config_json(folder)
    config = config_from_hf(hf, str(folder / "config.json"))
    rules = recipes.parse_overrides(list(overrides))
    rules += recipes.RECIPES[recipe] if recipe in recipes.RECIPES else [(".", ggml_type(recipe))]
    checkpoint = _Checkpoint(folder)
    sources = gguf_sources(config.n_layers, config.n_expert)
    layout = deepseek2.tensor_shapes(config, split_kv_b)
    tensors = [(name, shape, recipes.tensor_type(name, shape, rules)) for name, shape in layout]

    kv_b_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def read(name: str) -> torch.Tensor:
        if name.endswith(("attn_k_b.weight", "attn_v_b.weight")):
            layer = name.rsplit(".", 2)[0]
            if layer not in kv_b_cache:
                kv_b = sources[f"{layer}.attn_kv_b.weight"](checkpoint)
                kv_b_cache[layer] = _split_kv_b(kv_b, config.n_heads, config.qk_nope_head_dim,
                                                config.v_head_dim)
            k_b, v_b = kv_b_cache[layer] if name.endswith("k_b.weight") else kv_b_cache.pop(layer)
            return k_b if name.endswith("k_b.weight") else v_b
        return sources[name](checkpoint)

    def produce(name: str, shape: tuple[int, ...], t: GGMLType) -> np.ndarray:
        values = read(name)
        if tuple(values.shape) != shape:
            raise TandemError(f"{name}: checkpoint gives shape {list(values.shape)}, "
                              f"config.json implies {list(shape)}")
        return quantize(values.numpy().reshape(-1, shape[-1]), t)

    keys = {"general.name": hf.get("_name_or_path") or folder.name,
            **deepseek2.metadata(config, split_kv_b), **(metadata or {})}
    if not group_keys:  # imitate older files (Unsloth's R1) that lack them
        for key in ("expert_group_count", "expert_group_used_count"):
            keys.pop(f"{deepseek2.ARCH}.{key}", None)
    return write_gguf(out, deepseek2.ARCH, keys, tensors, produce, on_tensor=on_tensor)
