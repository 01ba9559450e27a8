"""Building blocks shared by the model families: linear, RMSNorm, gated MLP, rotary helpers.

Modules move their input to where their weights are and compute in the weight's dtype; the
residual stream stays float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    """y = x W^T in the weight's dtype on the weight's device; float32 out."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        return F.linear(x.to(w.device, w.dtype), w).float()


class RMSNorm(nn.Module):
    """x / rms(x) * w over the last dim (GGUF stores Gemma's 1 + w already added)."""

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight.float(), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.weight.device, torch.float32)
        # one fused kernel on CUDA where torch has it (six elementwise ones written out: ~15 us
        # of a ~410 us decode segment per norm on the GPU machine)
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


ACTIVATIONS = {
    "silu": F.silu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class GatedMLP(nn.Module):
    """down(act(gate x) * up x): SwiGLU (Llama, DeepSeek) or GeGLU (Gemma)."""

    def __init__(self, gate: Linear, up: Linear, down: Linear, activation: str = "silu"):
        super().__init__()
        self.gate, self.up, self.down = gate, up, down
        self.act = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.gate(x)) * self.up(x))


def inverse_frequencies(dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


def _broadcast(cos: torch.Tensor, sin: torch.Tensor, ndim: int):
    while cos.dim() < ndim:  # [T, D/2] -> [T, 1, ..., D/2]
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return cos, sin


def rope_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x0, x1), (x2, x3), ...: ggml's NORM mode. llama.cpp permutes
    Llama's q/k rows at conversion so that this equals transformers' rotate_half, and DeepSeek
    stores its rope dims interleaved."""
    # (x0 + i x1)(cos + i sin): two kernels on a GPU instead of ~8; torch.compile has no code
    # for complex numbers but fuses the strided form into one kernel
    if not torch.compiler.is_compiling() and _pairs_as_complex(x):
        pairs = torch.view_as_complex(x.unflatten(-1, (-1, 2)))
        cos, sin = _broadcast(cos.to(x.dtype), sin.to(x.dtype), pairs.dim())
        return torch.view_as_real(pairs * torch.complex(cos, sin)).flatten(-2)
    even, odd = x[..., 0::2], x[..., 1::2]
    cos, sin = _broadcast(cos, sin, even.dim())
    out = torch.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def _pairs_as_complex(x: torch.Tensor) -> bool:
    """Whether x's adjacent pairs can be viewed as complex numbers in place (float32/64, pairs
    contiguous and aligned)."""
    return (x.dtype in (torch.float32, torch.float64) and x.dim() >= 1 and x.shape[-1] % 2 == 0
            and x.stride(-1) == 1 and x.storage_offset() % 2 == 0
            and all(stride % 2 == 0 for stride in x.stride()[:-1]))


def rope_halves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (x_i, x_{i+D/2}) pairs: ggml's NEOX mode, transformers' rotate_half."""
    half = x.shape[-1] // 2
    first, second = x[..., :half], x[..., half:]
    cos, sin = _broadcast(cos, sin, first.dim())
    return torch.cat((first * cos - second * sin, first * sin + second * cos), dim=-1)
