"""The latent KV cache of MLA: per layer and token, the normed latent [r] and the rotated
shared key [p] (576 values for R1, against 2 x 128 x 192 for plain multi-head attention)."""

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

    def read(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.latent[:length], self.rope_key[:length]


class LatentKVCache:
    """One sequence's cache for every layer, each on its layer's device."""

    def __init__(self, ctx: int, latent_dim: int, rope_dim: int, devices: list[torch.device],
                 dtype: torch.dtype = torch.float32):
        self.ctx = ctx
        self.layers = [LayerCache(ctx, latent_dim, rope_dim, d, dtype) for d in devices]

    @staticmethod
    def bytes_per_device(ctx: int, latent_dim: int, rope_dim: int, devices: list[torch.device],
                         dtype: torch.dtype = torch.float32) -> dict[str, int]:
        per_layer = ctx * (latent_dim + rope_dim) * torch.tensor([], dtype=dtype).element_size()
        out: dict[str, int] = {}
        for d in devices:
            out[str(d)] = out.get(str(d), 0) + per_layer
        return out

    def __getitem__(self, i: int) -> LayerCache:
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)


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
