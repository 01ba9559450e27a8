"""The decoder stack shared by the families, over a batch of sequence segments.

One forward pass takes the tokens of several sequences at once (continuous batching): each
`Segment` is `length` consecutive tokens of one sequence starting at position `start`, with that
sequence's per-layer caches. Linear layers and the MoE see all tokens together; attention runs
per segment against its own cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from tandem.models.layers import Linear, RMSNorm


@dataclass(frozen=True)
class Segment:
    caches: Sequence  # one cache object per layer
    start: int
    length: int


def positions_of(segments: Sequence[Segment]) -> torch.Tensor:
    return torch.cat([torch.arange(s.start, s.start + s.length) for s in segments])


def layer_views(segments: Sequence[Segment], layer: int) -> list[tuple[object, int, int]]:
    """(cache, start, length) per segment for one layer, in token order."""
    return [(s.caches[layer], s.start, s.length) for s in segments]


class Block(nn.Module):
    """x + attn(norm(x)), then + ffn(norm(x)): Llama and DeepSeek layers."""

    def __init__(self, attn_norm: RMSNorm, attn: nn.Module, ffn_norm: RMSNorm, ffn: nn.Module):
        super().__init__()
        self.attn_norm, self.attn, self.ffn_norm, self.ffn = attn_norm, attn, ffn_norm, ffn

    def forward(self, x: torch.Tensor, positions: torch.Tensor, views) -> torch.Tensor:
        x = x.to(self.attn_norm.weight.device)  # the residual stream lives with the layer
        x = x + self.attn(self.attn_norm(x), positions, views).to(x.device)
        return x + self.ffn(self.ffn_norm(x)).to(x.device)


class Decoder(nn.Module):
    """embed -> blocks -> norm -> lm_head, with an optional embedding scale (Gemma)."""

    def __init__(self, embed: nn.Module, blocks: list[nn.Module], norm: RMSNorm, lm_head: Linear,
                 embed_scale: float = 1.0):
        super().__init__()
        self.embed, self.blocks = embed, nn.ModuleList(blocks)
        self.norm, self.lm_head, self.embed_scale = norm, lm_head, embed_scale

    def forward(self, tokens: torch.Tensor, segments: Sequence[Segment],
                last_only: bool = False) -> torch.Tensor:
        """Logits [T, V] for all tokens, or [len(segments), V] for each segment's last."""
        positions = positions_of(segments)
        x = self.embed(tokens) * self.embed_scale  # [T, d]
        for i, block in enumerate(self.blocks):
            x = block(x, positions, layer_views(segments, i))
        if last_only:
            ends = torch.tensor([s.length for s in segments]).cumsum(0) - 1
            x = x[ends.to(x.device)]
        return self.lm_head(self.norm(x))


def per_segment(views, *tensors: torch.Tensor):
    """Yield (cache, start, rows...) for each segment, `rows` the segment's slices of each tensor."""
    offset = 0
    for cache, start, length in views:
        yield (cache, start, *(t[offset:offset + length] for t in tensors))
        offset += length
