"""Hugging Face DeepSeek-V2/V3 config.json -> DeepSeek2Config, and merging it with a GGUF's.

`--model_path` points at the original model folder. Its config.json fills what the GGUF lacks
(older R1 files have no group-routing keys) and is checked against what the GGUF says: a
disagreement usually means the wrong folder, so it is an error, not a guess.
"""

from __future__ import annotations

import json
import math
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from tandem.errors import TandemError
from tandem.gguf.config import DeepSeek2Config


class ConfigError(TandemError):
    """config.json missing, unreadable, or disagreeing with the GGUF."""


def read_config_json(model_path: str | Path) -> dict[str, Any]:
    path = Path(model_path).expanduser()
    if path.is_dir():
        path = path / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file (a Hugging Face model folder holds config.json)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config ({exc})") from None


def rope_scaling(hf: dict[str, Any]) -> dict[str, Any] | None:
    """The YaRN parameters, from `rope_scaling` (released configs) or `rope_parameters` (v5)."""
    params = hf.get("rope_scaling") or hf.get("rope_parameters") or None
    if not params:
        return None
    kind = params.get("type") or params.get("rope_type")
    return None if kind in (None, "default") else {**params, "type": kind}


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> DeepSeek2Config:
    def need(key: str) -> Any:
        if key not in hf or hf[key] is None:
            raise ConfigError(f"{source}: lacks {key!r}")
        return hf[key]

    scaling = rope_scaling(hf)
    rope_theta = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta") or 10000.0
    gating = hf.get("scoring_func") or ("sigmoid" if hf.get("model_type") == "deepseek_v3" else "softmax")
    return DeepSeek2Config(
        n_layers=int(need("num_hidden_layers")),
        n_embd=int(need("hidden_size")),
        n_vocab=int(need("vocab_size")),
        context_length=int(need("max_position_embeddings")),
        n_heads=int(need("num_attention_heads")),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta),
        q_lora_rank=int(hf.get("q_lora_rank") or 0),
        kv_lora_rank=int(need("kv_lora_rank")),
        qk_nope_head_dim=int(need("qk_nope_head_dim")),
        qk_rope_head_dim=int(need("qk_rope_head_dim")),
        v_head_dim=int(need("v_head_dim")),
        n_ff=int(need("intermediate_size")),
        n_dense_layers=int(hf.get("first_k_dense_replace", 0)),
        n_expert=int(need("n_routed_experts")),
        n_expert_used=int(need("num_experts_per_tok")),
        n_ff_expert=int(need("moe_intermediate_size")),
        n_shared_experts=int(hf.get("n_shared_experts") or 0),
        expert_weights_scale=float(hf.get("routed_scaling_factor", 1.0)),
        expert_weights_norm=bool(hf.get("norm_topk_prob", False)),
        expert_gating=gating,
        n_group=int(hf["n_group"]) if hf.get("n_group") else None,
        topk_group=int(hf["topk_group"]) if hf.get("topk_group") else None,
        rope_scaling=scaling["type"] if scaling else None,
        rope_scaling_factor=float(scaling["factor"]) if scaling else 1.0,
        rope_original_context=int(scaling.get("original_max_position_embeddings", 0)) if scaling else 0,
        rope_yarn_log_multiplier=0.1 * float(scaling.get("mscale_all_dim") or 0) if scaling else 0.0,
    )


# Fields a GGUF may lack; config.json fills them. All others must agree.
FILLABLE = ("n_group", "topk_group")


def merge(gguf: DeepSeek2Config, hf: DeepSeek2Config, gguf_source: str,
          hf_source: str) -> tuple[DeepSeek2Config, list[str]]:
    """The GGUF's config completed from config.json; returns it and the fields filled.

    Raises ConfigError listing every field on which the two disagree."""
    filled, disagree = {}, []
    for f in fields(DeepSeek2Config):
        ours, theirs = getattr(gguf, f.name), getattr(hf, f.name)
        if ours is None and f.name in FILLABLE:
            if theirs is not None:
                filled[f.name] = theirs
        elif not _same(ours, theirs):
            disagree.append(f"{f.name}: GGUF {ours!r} vs config.json {theirs!r}")
    if disagree:
        raise ConfigError(f"{gguf_source} and {hf_source} describe different models:\n  "
                          + "\n  ".join(disagree)
                          + "\n(is --model_path the folder this GGUF was converted from?)")
    return replace(gguf, **filled), sorted(filled)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-9)
    return a == b
