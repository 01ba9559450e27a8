"""Llama-family decoders (GGUF architecture `llama`: Llama 2/3, SmolLM2, Mistral-style) as plain
torch modules: RMSNorm, grouped-query attention with rotary embeddings, SwiGLU."""

from __future__ import annotations

import torch
from torch import nn

from tandem.models.attention import GQAttention
from tandem.models.layers import GatedMLP, Linear, RMSNorm


class Block(nn.Module):
    def __init__(self, attn_norm: RMSNorm, attn: GQAttention, ffn_norm: RMSNorm, mlp: GatedMLP):
        super().__init__()
        self.attn_norm, self.attn, self.ffn_norm, self.mlp = attn_norm, attn, ffn_norm, mlp

    def forward(self, x: torch.Tensor, positions: torch.Tensor, kv, start: int) -> torch.Tensor:
        x = x.to(self.attn_norm.weight.device)
        x = x + self.attn(self.attn_norm(x), positions, kv, start)
        return x + self.mlp(self.ffn_norm(x))


class Decoder(nn.Module):
    """embed -> blocks -> norm -> lm_head, with an optional embedding scale (Gemma)."""

    def __init__(self, embed: nn.Module, blocks: list[nn.Module], norm: RMSNorm, lm_head: Linear,
                 embed_scale: float = 1.0):
        super().__init__()
        self.embed, self.blocks, self.norm, self.lm_head = embed, nn.ModuleList(blocks), norm, lm_head
        self.embed_scale = embed_scale

    def forward(self, tokens: torch.Tensor, start: int, kv: list, last_only: bool = False) -> torch.Tensor:
        positions = torch.arange(start, start + tokens.shape[0])
        x = self.embed(tokens) * self.embed_scale  # [T, d]
        for i, block in enumerate(self.blocks):
            x = block(x, positions, kv[i], start)
        if last_only:
            x = x[-1:]
        return self.lm_head(self.norm(x))
