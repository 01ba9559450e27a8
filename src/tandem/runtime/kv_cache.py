"""Per-layer KV caches of one sequence.

`LayerCache` is MLA's latent cache: per token the normed latent [r] and the rotated shared key
[p] (576 values for R1, against 2 x 128 x 192 for plain multi-head attention). `KVLayer` holds
keys and values of grouped-query attention. Both write new entries at a position and read the
first `length`; writing past the context raises ContextFull."""

from __future__ import annotations

import torch

from tandem.errors import TandemError


class ContextFull(TandemError):
    """A sequence longer than the context the cache was sized for."""


class LayerCache:
    def __init__(self, ctx: int, latent_dim: int, rope_dim: int, device: torch.device,
                 dtype: torch.dtype):
        self.latent = torch.zeros(ctx, latent_dim, device=device, dtype=dtype)
        self.rope_key = torch.zeros(ctx, rope_dim, device=device, dtype=dtype)

    def write(self, start: int, latent: torch.Tensor, rope_key: torch.Tensor) -> None:
        end = start + latent.shape[0]
        if end > self.latent.shape[0]:
            raise ContextFull(f"sequence of {end} tokens exceeds the context size "
                              f"{self.latent.shape[0]}")
        self.latent[start:end] = latent.to(self.latent.device, self.latent.dtype)
        self.rope_key[start:end] = rope_key.to(self.rope_key.device, self.rope_key.dtype)

    def write_at(self, positions: torch.Tensor, latent: torch.Tensor, rope_key: torch.Tensor) -> None:
        """Rows at the positions in a tensor; no bounds check, no host sync (CUDA graphs)."""
        self.latent.index_copy_(0, positions, latent.to(self.latent.dtype))
        self.rope_key.index_copy_(0, positions, rope_key.to(self.rope_key.dtype))

    def read(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.latent[:length], self.rope_key[:length]


class KVLayer:
    """One layer's keys and values [ctx, n_kv_heads, head_dim] (grouped-query attention)."""

    def __init__(self, ctx: int, n_kv_heads: int, head_dim: int, device: torch.device,
                 dtype: torch.dtype):
        self.keys = torch.zeros(ctx, n_kv_heads, head_dim, device=device, dtype=dtype)
        self.values = torch.zeros(ctx, n_kv_heads, head_dim, device=device, dtype=dtype)

    @staticmethod
    def nbytes(ctx: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * ctx * n_kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()

    def write(self, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        end = start + keys.shape[0]
        if end > self.keys.shape[0]:
            raise ContextFull(f"sequence of {end} tokens exceeds the context size {self.keys.shape[0]}")
        self.keys[start:end] = keys.to(self.keys.device, self.keys.dtype)
        self.values[start:end] = values.to(self.values.device, self.values.dtype)

    def read(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[:length], self.values[:length]
