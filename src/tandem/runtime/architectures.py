"""What tandem.LLM needs to know per GGUF architecture: the tensors the file must hold, which
tensor decides each layer's device, the KV cache, and how to build the torch model.

Adding a family means adding a spec here and its modules under tandem/models/.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path

import torch

from tandem.gguf import deepseek2
from tandem.gguf.config import DeepSeek2Config, Gemma3Config, LlamaConfig
from tandem.gguf.model import GGUFModel
from tandem.models import deepseek_v3 as ds
from tandem.models import gemma3
from tandem.models.attention import GQAttention
from tandem.models.decoder import Block, Decoder
from tandem.models.layers import inverse_frequencies, rope_halves, rope_pairs
from tandem.runtime.kv_cache import KVLayer, LayerCache
from tandem.runtime.loader import WeightLoader

log = logging.getLogger(__name__)

Shapes = list[tuple[str, tuple[int, ...]]]


class DeepSeek2Spec:
    R1_GROUPS = (8, 4)  # DeepSeek-R1/V3: 256 experts in 8 groups, pick from the best 4

    def config(self, file: GGUFModel, model_path: str | Path | None) -> DeepSeek2Config:
        from tandem.models import hf_config

        config = file.config
        if model_path is not None:
            path = Path(model_path).expanduser()
            hf = hf_config.config_from_hf(hf_config.read_config_json(path), str(path))
            config, filled = hf_config.merge(config, hf, str(file.path), str(path))
            for name in filled:
                log.info("%s from %s: %s", name, path, getattr(config, name))
        return self._with_groups(config)

    def _with_groups(self, c: DeepSeek2Config) -> DeepSeek2Config:
        """Group-routing keys from the file or config.json, else R1's, said in the log."""
        if c.n_group is not None and c.topk_group is not None:
            return c
        n_group, topk_group = self.R1_GROUPS if c.n_expert % self.R1_GROUPS[0] == 0 else (1, 1)
        log.warning("neither the GGUF nor --model_path gives expert_group_count/"
                    "expert_group_used_count; using DeepSeek-R1's n_group=%d, topk_group=%d",
                    n_group, topk_group)
        return replace(c, n_group=n_group, topk_group=topk_group)

    def aliases(self, file: GGUFModel) -> dict[str, str]:
        return {}

    def tensors(self, c: DeepSeek2Config, file: GGUFModel) -> Shapes:
        return deepseek2.tensor_shapes(c, split_kv_b="blk.0.attn_kv_b.weight" not in file.tensors)

    def layer_anchor(self, i: int) -> str:
        return f"blk.{i}.attn_kv_a_mqa.weight"

    def cache_layer_bytes(self, c: DeepSeek2Config, ctx: int, dtype: torch.dtype) -> int:
        return ctx * (c.kv_lora_rank + c.qk_rope_head_dim) * dtype.itemsize

    def cache(self, c: DeepSeek2Config, ctx: int, devices, dtype) -> list:
        return [LayerCache(ctx, c.kv_lora_rank, c.qk_rope_head_dim, d, dtype) for d in devices]

    def build(self, file: GGUFModel, c: DeepSeek2Config, loader: WeightLoader, devices):
        eps = c.rms_norm_eps
        blocks = []
        for i in range(c.n_layers):
            b = f"blk.{i}"
            if c.q_lora_rank:
                q = ds.LoraQuery(loader.linear(f"{b}.attn_q_a.weight"),
                                 loader.norm(f"{b}.attn_q_a_norm.weight", eps),
                                 loader.linear(f"{b}.attn_q_b.weight"))
            else:
                q = loader.linear(f"{b}.attn_q.weight")
            w_k, w_v = self._absorbed_kv_b(file, loader, b, c)
            attn = ds.MLAttention(c, q, loader.linear(f"{b}.attn_kv_a_mqa.weight"),
                                  loader.norm(f"{b}.attn_kv_a_norm.weight", eps), w_k, w_v,
                                  loader.linear(f"{b}.attn_output.weight"), ds.Rope(c, devices[i]))
            if i < c.n_dense_layers:
                ffn = loader.mlp(b)
            else:
                shared = loader.mlp(b, "_shexp") if c.n_shared_experts else None
                bias_name = f"{b}.exp_probs_b.bias"
                bias = loader.dense(bias_name) if bias_name in file.tensors else None
                ffn = ds.MoE(c, loader.dense(f"{b}.ffn_gate_inp.weight"), bias,
                             loader.experts(b), shared)
            blocks.append(Block(loader.norm(f"{b}.attn_norm.weight", eps), attn,
                                   loader.norm(f"{b}.ffn_norm.weight", eps), ffn))
        return Decoder(loader.embedding("token_embd.weight"), blocks,
                       loader.norm("output_norm.weight", eps), loader.linear("output.weight"))

    @staticmethod
    def _absorbed_kv_b(file: GGUFModel, loader: WeightLoader, b: str, c: DeepSeek2Config):
        """W_k [H, n, r] and W_v [H, v, r] from either attn_kv_b or attn_k_b + attn_v_b."""
        if f"{b}.attn_kv_b.weight" in file.tensors:
            kv_b = loader.dense(f"{b}.attn_kv_b.weight").view(c.n_heads, -1, c.kv_lora_rank)
            return (kv_b[:, : c.qk_nope_head_dim].contiguous(),
                    kv_b[:, c.qk_nope_head_dim :].contiguous())
        k_b = loader.dense(f"{b}.attn_k_b.weight")  # [H, r, n]
        return k_b.transpose(1, 2).contiguous(), loader.dense(f"{b}.attn_v_b.weight")


class _GQASpec:
    """Shared by the families with plain grouped-query attention and a K/V cache."""

    def config(self, file: GGUFModel, model_path) -> LlamaConfig | Gemma3Config:
        return file.config

    def layer_anchor(self, i: int) -> str:
        return f"blk.{i}.attn_q.weight"

    def cache_layer_bytes(self, c, ctx: int, dtype: torch.dtype) -> int:
        return KVLayer.nbytes(ctx, c.n_kv_heads, c.head_dim, dtype)

    def cache(self, c, ctx: int, devices, dtype) -> list:
        return [KVLayer(ctx, c.n_kv_heads, c.head_dim, d, dtype) for d in devices]

    @staticmethod
    def _attention_shapes(c, b: str) -> Shapes:
        return [
            (f"{b}.attn_norm.weight", (c.n_embd,)),
            (f"{b}.attn_q.weight", (c.n_heads * c.head_dim, c.n_embd)),
            (f"{b}.attn_k.weight", (c.n_kv_heads * c.head_dim, c.n_embd)),
            (f"{b}.attn_v.weight", (c.n_kv_heads * c.head_dim, c.n_embd)),
            (f"{b}.attn_output.weight", (c.n_embd, c.n_heads * c.head_dim)),
            (f"{b}.ffn_norm.weight", (c.n_embd,)),
            (f"{b}.ffn_gate.weight", (c.n_ff, c.n_embd)),
            (f"{b}.ffn_up.weight", (c.n_ff, c.n_embd)),
            (f"{b}.ffn_down.weight", (c.n_embd, c.n_ff)),
        ]

    @staticmethod
    def _head(file: GGUFModel, c) -> Shapes:
        return [("token_embd.weight", (c.n_vocab, c.n_embd)), ("output_norm.weight", (c.n_embd,)),
                ("output.weight", (c.n_vocab, c.n_embd))]

    def aliases(self, file: GGUFModel) -> dict[str, str]:
        """Tied embeddings: no output.weight in the file; the head is a copy of token_embd,
        placed by the rules like any output.weight (the embedding itself stays in the file)."""
        return {} if "output.weight" in file.tensors else {"output.weight": "token_embd.weight"}


class LlamaSpec(_GQASpec):
    def tensors(self, c: LlamaConfig, file: GGUFModel) -> Shapes:
        shapes = self._head(file, c)
        for i in range(c.n_layers):
            shapes += self._attention_shapes(c, f"blk.{i}")
        return shapes

    def build(self, file: GGUFModel, c: LlamaConfig, loader: WeightLoader, devices):
        inv_freq = inverse_frequencies(c.head_dim, c.rope_theta)
        blocks = []
        for i in range(c.n_layers):
            b = f"blk.{i}"
            attn = GQAttention(*(loader.linear(f"{b}.attn_{p}.weight") for p in ("q", "k", "v", "output")),
                               c.n_heads, c.n_kv_heads, c.head_dim, rope_pairs, inv_freq,
                               scale=1 / math.sqrt(c.head_dim))
            blocks.append(Block(loader.norm(f"{b}.attn_norm.weight", c.rms_norm_eps), attn,
                                      loader.norm(f"{b}.ffn_norm.weight", c.rms_norm_eps),
                                      loader.mlp(b)))
        return Decoder(loader.embedding("token_embd.weight"), blocks,
                             loader.norm("output_norm.weight", c.rms_norm_eps),
                             loader.linear("output.weight"))


class Gemma3Spec(_GQASpec):
    def tensors(self, c: Gemma3Config, file: GGUFModel) -> Shapes:
        shapes = self._head(file, c)
        for i in range(c.n_layers):
            b = f"blk.{i}"
            shapes += self._attention_shapes(c, b) + [
                (f"{b}.attn_q_norm.weight", (c.head_dim,)),
                (f"{b}.attn_k_norm.weight", (c.head_dim,)),
                (f"{b}.post_attention_norm.weight", (c.n_embd,)),
                (f"{b}.post_ffw_norm.weight", (c.n_embd,)),
            ]
        return shapes

    def build(self, file: GGUFModel, c: Gemma3Config, loader: WeightLoader, devices):
        eps = c.rms_norm_eps
        local_freq = inverse_frequencies(c.head_dim, c.rope_local_theta)
        global_freq = inverse_frequencies(c.head_dim, c.rope_theta) / c.rope_scaling_factor
        blocks = []
        for i in range(c.n_layers):
            b = f"blk.{i}"
            is_global = c.is_global(i)
            attn = GQAttention(*(loader.linear(f"{b}.attn_{p}.weight") for p in ("q", "k", "v", "output")),
                               c.n_heads, c.n_kv_heads, c.head_dim, rope_halves,
                               global_freq if is_global else local_freq,
                               scale=1 / math.sqrt(c.head_dim),
                               q_norm=loader.norm(f"{b}.attn_q_norm.weight", eps),
                               k_norm=loader.norm(f"{b}.attn_k_norm.weight", eps),
                               window=None if is_global else c.sliding_window)
            blocks.append(gemma3.Block(
                loader.norm(f"{b}.attn_norm.weight", eps), attn,
                loader.norm(f"{b}.post_attention_norm.weight", eps),
                loader.norm(f"{b}.ffn_norm.weight", eps), loader.mlp(b, activation="gelu_tanh"),
                loader.norm(f"{b}.post_ffw_norm.weight", eps)))
        return Decoder(loader.embedding("token_embd.weight"), blocks,
                             loader.norm("output_norm.weight", eps), loader.linear("output.weight"),
                             embed_scale=math.sqrt(c.n_embd))


ARCHITECTURES = {"deepseek2": DeepSeek2Spec(), "llama": LlamaSpec(), "gemma3": Gemma3Spec()}
