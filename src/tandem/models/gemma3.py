"""Gemma 3 (GGUF architecture `gemma3`) as plain torch modules: sliding-window and global
attention layers (5 local : 1 global), per-head q/k RMSNorm, GeGLU, norms after attention and
after the MLP as well as before, embeddings scaled by sqrt(d) and tied to the output head."""

from __future__ import annotations

import torch
from torch import nn

from tandem.models.attention import GQAttention
from tandem.models.layers import GatedMLP, RMSNorm


class Block(nn.Module):
    def __init__(self, attn_norm: RMSNorm, attn: GQAttention, post_attn_norm: RMSNorm,
                 ffn_norm: RMSNorm, mlp: GatedMLP, post_ffn_norm: RMSNorm):
        super().__init__()
        self.attn_norm, self.attn, self.post_attn_norm = attn_norm, attn, post_attn_norm
        self.ffn_norm, self.mlp, self.post_ffn_norm = ffn_norm, mlp, post_ffn_norm

    def forward(self, x: torch.Tensor, positions: torch.Tensor, views) -> torch.Tensor:
        x = x.to(self.attn_norm.weight.device)
        x = x + self.post_attn_norm(self.attn(self.attn_norm(x), positions, views))
        return x + self.post_ffn_norm(self.mlp(self.ffn_norm(x)))
