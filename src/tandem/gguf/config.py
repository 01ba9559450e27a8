"""Typed hyperparameters per architecture, read from GGUF metadata.

One dataclass per architecture family, registered under its `general.architecture` name.
Keys that older files lack stay None here; the model code decides what to do about them
(e.g. DeepSeek-R1's group routing keys, which `--model_path` or R1 defaults fill in).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from tandem.errors import GGUFError

CONFIGS: dict[str, type] = {}


def register(arch: str):
    def wrap(cls):
        CONFIGS[arch] = cls
        return cls

    return wrap


class _Keys:
    """Reads `{arch}.*` keys with errors that name the key and the file."""

    def __init__(self, metadata: dict[str, Any], arch: str, source: str):
        self.metadata, self.arch, self.source = metadata, arch, source

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(f"{self.arch}.{key}", default)

    def need(self, key: str) -> Any:
        full = f"{self.arch}.{key}"
        if full not in self.metadata:
            raise GGUFError(f"{self.source}: metadata lacks {full!r}, which {self.arch} models need")
        return self.metadata[full]


@register("deepseek2")
@dataclass(frozen=True)
class DeepSeek2Config:
    """DeepSeek-V2/V3/R1 (GGUF architecture `deepseek2`)."""

    n_layers: int
    n_embd: int
    n_vocab: int
    context_length: int
    n_heads: int
    rms_norm_eps: float
    rope_theta: float
    q_lora_rank: int  # 0: no q LoRA (V2-Lite)
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_ff: int  # dense layers
    n_dense_layers: int  # leading dense blocks
    n_expert: int
    n_expert_used: int
    n_ff_expert: int
    n_shared_experts: int
    expert_weights_scale: float
    expert_weights_norm: bool
    expert_gating: str  # "softmax" (V2) or "sigmoid" (V3/R1)
    n_group: int | None  # None: the file does not say
    topk_group: int | None
    rope_scaling: str | None  # "yarn" or None
    rope_scaling_factor: float
    rope_original_context: int
    rope_yarn_log_multiplier: float

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any], source: str = "GGUF") -> DeepSeek2Config:
        k = _Keys(metadata, "deepseek2", source)
        rope_dim = int(k.need("rope.dimension_count"))
        # Newer conversions store the MLA head sizes under *_mla and the MQA view in key_length.
        key_len = int(k.get("attention.key_length_mla") or k.need("attention.key_length"))
        value_len = int(k.get("attention.value_length_mla") or k.need("attention.value_length"))
        gating = {1: "softmax", 2: "sigmoid"}.get(int(k.get("expert_gating_func", 1)))
        if gating is None:
            raise GGUFError(f"{source}: deepseek2.expert_gating_func={k.get('expert_gating_func')} "
                            "is neither 1 (softmax) nor 2 (sigmoid)")
        vocab = _vocab_size(k, metadata, source)
        scaling = k.get("rope.scaling.type")
        # Newer conversions append the multi-token-prediction layers to the block count.
        n_layers = int(k.need("block_count")) - int(k.get("nextn_predict_layers", 0))
        return cls(
            n_layers=n_layers,
            n_embd=int(k.need("embedding_length")),
            n_vocab=int(vocab),
            context_length=int(k.need("context_length")),
            n_heads=int(k.need("attention.head_count")),
            rms_norm_eps=float(k.need("attention.layer_norm_rms_epsilon")),
            rope_theta=float(k.get("rope.freq_base", 10000.0)),
            q_lora_rank=int(k.get("attention.q_lora_rank", 0)),
            kv_lora_rank=int(k.need("attention.kv_lora_rank")),
            qk_nope_head_dim=key_len - rope_dim,
            qk_rope_head_dim=rope_dim,
            v_head_dim=value_len,
            n_ff=int(k.need("feed_forward_length")),
            n_dense_layers=int(k.get("leading_dense_block_count", 0)),
            n_expert=int(k.need("expert_count")),
            n_expert_used=int(k.need("expert_used_count")),
            n_ff_expert=int(k.need("expert_feed_forward_length")),
            n_shared_experts=int(k.get("expert_shared_count", 0)),
            expert_weights_scale=float(k.get("expert_weights_scale", 1.0)),
            expert_weights_norm=bool(k.get("expert_weights_norm", False)),
            expert_gating=gating,
            n_group=_opt_int(k.get("expert_group_count")),
            topk_group=_opt_int(k.get("expert_group_used_count")),
            rope_scaling=None if scaling in (None, "none") else str(scaling),
            rope_scaling_factor=float(k.get("rope.scaling.factor", 1.0)),
            rope_original_context=int(k.get("rope.scaling.original_context_length", 0)),
            rope_yarn_log_multiplier=float(k.get("rope.scaling.yarn_log_multiplier", 0.0)),
        )

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def config_from_metadata(metadata: dict[str, Any], source: str = "GGUF"):
    """The typed config for the file's architecture; GGUFError if tandem has none for it."""
    arch = metadata.get("general.architecture")
    cls = CONFIGS.get(arch)
    if cls is None:
        raise GGUFError(f"{source}: no model config for architecture {arch!r} "
                        f"(known: {', '.join(sorted(CONFIGS))})")
    return cls.from_metadata(metadata, source)


@dataclass(frozen=True)
class DecoderConfig:
    """Hyperparameters of a grouped-query-attention decoder (Llama, Gemma and kin)."""

    n_layers: int
    n_embd: int
    n_vocab: int
    context_length: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_ff: int
    rms_norm_eps: float
    rope_theta: float


@register("llama")
@dataclass(frozen=True)
class LlamaConfig(DecoderConfig):
    """Llama-family decoders (GGUF architecture `llama`)."""

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any], source: str = "GGUF") -> LlamaConfig:
        k = _Keys(metadata, "llama", source)
        return cls(**_decoder_fields(k, metadata, source),
                   rope_theta=float(k.get("rope.freq_base", 10000.0)))


@register("gemma3")
@dataclass(frozen=True)
class Gemma3Config(DecoderConfig):
    """Gemma 3 text decoders (GGUF architecture `gemma3`); rope_theta is the global layers'."""

    rope_local_theta: float  # sliding-window layers (not in the file; 10000 in every Gemma 3)
    rope_scaling_factor: float  # linear, global layers only
    sliding_window: int
    sliding_window_pattern: int  # every Nth layer is global (6 in every Gemma 3)

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any], source: str = "GGUF") -> Gemma3Config:
        k = _Keys(metadata, "gemma3", source)
        scaling = k.get("rope.scaling.type")
        return cls(
            **_decoder_fields(k, metadata, source),
            rope_theta=float(k.get("rope.freq_base", 1_000_000.0)),
            rope_local_theta=10_000.0,
            rope_scaling_factor=float(k.get("rope.scaling.factor", 1.0)) if scaling == "linear" else 1.0,
            sliding_window=int(k.need("attention.sliding_window")),
            sliding_window_pattern=6,
        )

    def is_global(self, layer: int) -> bool:
        return (layer + 1) % self.sliding_window_pattern == 0


def _decoder_fields(k: _Keys, metadata: dict[str, Any], source: str) -> dict[str, Any]:
    """The hyperparameters every grouped-query-attention decoder shares."""
    n_embd, n_heads = int(k.need("embedding_length")), int(k.need("attention.head_count"))
    return {
        "n_layers": int(k.need("block_count")),
        "n_embd": n_embd,
        "n_vocab": _vocab_size(k, metadata, source),
        "context_length": int(k.need("context_length")),
        "n_heads": n_heads,
        "n_kv_heads": int(k.get("attention.head_count_kv", n_heads)),
        "head_dim": int(k.get("attention.key_length", n_embd // n_heads)),
        "n_ff": int(k.need("feed_forward_length")),
        "rms_norm_eps": float(k.need("attention.layer_norm_rms_epsilon")),
    }


def _vocab_size(k: _Keys, metadata: dict[str, Any], source: str) -> int:
    vocab = k.get("vocab_size") or len(metadata.get("tokenizer.ggml.tokens", ()))
    if not vocab:
        raise GGUFError(f"{source}: neither {k.arch}.vocab_size nor tokenizer.ggml.tokens given")
    return int(vocab)
