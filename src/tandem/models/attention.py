"""Grouped-query attention over a per-layer KV cache (Llama, Gemma 3)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tandem.models.decoder import per_segment
from tandem.models.layers import Linear, RMSNorm


class GQAttention(nn.Module):
    """Attention with n_kv_heads shared by groups of query heads. Optional per-head q/k norms
    (Gemma 3) and a sliding window (keys at most `window - 1` positions back)."""

    def __init__(self, q: Linear, k: Linear, v: Linear, out: Linear, n_heads: int, n_kv_heads: int,
                 head_dim: int, rope: Callable, inv_freq: torch.Tensor, scale: float,
                 q_norm: RMSNorm | None = None, k_norm: RMSNorm | None = None,
                 window: int | None = None):
        super().__init__()
        self.q, self.k, self.v, self.out = q, k, v, out
        self.q_norm, self.k_norm = q_norm, k_norm
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.rope, self.inv_freq, self.scale, self.window = rope, inv_freq, scale, window

    def forward(self, x: torch.Tensor, positions: torch.Tensor, views) -> torch.Tensor:
        t = x.shape[0]
        q = self.q(x).view(t, self.n_heads, self.head_dim)  # [T, H, D]
        k = self.k(x).view(t, self.n_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = self.v(x).view(t, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        angles = positions.to(q.device, torch.float32)[:, None] * self.inv_freq.to(q.device)
        cos, sin = angles.cos(), angles.sin()
        q, k = self.rope(q, cos, sin), self.rope(k, cos, sin)
        out = torch.cat([self._attend(cache, start, *rows)
                         for cache, start, *rows in per_segment(views, q, k, v, positions)])
        return self.out(out.reshape(t, -1))

    def _attend(self, kv, start: int, q, k, v, positions) -> torch.Tensor:
        """One sequence's tokens [T, H, D] against its cache (after adding their own entries)."""
        kv.write(start, k, v)
        keys, values = kv.read(start + q.shape[0])  # [S, Hkv, D]
        group = self.n_heads // self.n_kv_heads
        keys = keys.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [H, S, D]
        values = values.float().repeat_interleave(group, dim=1).transpose(0, 1)
        key_pos = torch.arange(keys.shape[1], device=q.device)
        query_pos = positions.to(q.device)[:, None]
        allowed = key_pos[None, :] <= query_pos  # [T, S]
        if self.window is not None:
            allowed &= key_pos[None, :] > query_pos - self.window
        out = F.scaled_dot_product_attention(q.transpose(0, 1), keys, values, attn_mask=allowed,
                                             scale=self.scale)  # [H, T, D]
        return out.transpose(0, 1)  # [T, H, D]
