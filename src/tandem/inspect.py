"""What `tandem inspect` reports about a model: a plain dict, rendered by the CLI."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from tandem.gguf.model import GGUFModel
from tandem.gguf.types import bits_per_weight

# Per-architecture keys worth a line, if the file has them ({arch}.KEY).
HYPERPARAMETERS = (
    "block_count", "embedding_length", "feed_forward_length",
    "attention.head_count", "attention.head_count_kv", "attention.q_lora_rank",
    "attention.kv_lora_rank", "leading_dense_block_count", "expert_count", "expert_used_count",
    "expert_shared_count", "expert_feed_forward_length", "expert_group_count",
    "expert_group_used_count", "rope.scaling.type", "rope.scaling.factor", "vocab_size",
)


def summarize(model: GGUFModel) -> dict[str, Any]:
    arch = model.architecture
    meta = model.metadata
    mix: dict[str, dict[str, float]] = defaultdict(lambda: {"tensors": 0, "bytes": 0, "params": 0})
    for t in model.tensors.values():
        row = mix[t.ggml_type.name]
        row["tensors"] += 1
        row["bytes"] += t.n_bytes
        row["params"] += t.n_elements
    n_params = sum(r["params"] for r in mix.values())
    n_bytes = sum(r["bytes"] for r in mix.values())
    tokens = meta.get("tokenizer.ggml.tokens")
    return {
        "files": [{"path": str(p), "bytes": p.stat().st_size} for p in model.files],
        "architecture": arch,
        "name": meta.get("general.name"),
        "parameters": n_params,
        "tensor_bytes": n_bytes,
        "bits_per_weight": 8 * n_bytes / n_params if n_params else 0.0,
        "context_length": meta.get(f"{arch}.context_length"),
        "hyperparameters": {k: meta[f"{arch}.{k}"] for k in HYPERPARAMETERS
                            if f"{arch}.{k}" in meta},
        "tokenizer": {"model": meta.get("tokenizer.ggml.model"),
                      "tokens": len(tokens) if isinstance(tokens, list) else None,
                      "chat_template": "tokenizer.chat_template" in meta},
        "quant_mix": {
            name: {**row, "share": row["bytes"] / n_bytes if n_bytes else 0.0}
            for name, row in sorted(mix.items(), key=lambda kv: -kv[1]["bytes"])
        },
        "tensors": [
            {"name": t.name, "type": t.ggml_type.name, "shape": list(t.shape), "bytes": t.n_bytes,
             "bits_per_weight": bits_per_weight(t.ggml_type),
             "file": model.files.index(t.file) + 1}
            for t in model.tensors.values()
        ],
    }


def human_count(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return str(int(n))


def human_bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"
