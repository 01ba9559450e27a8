"""Quantized test weights with gguf-py's float references, routings, a float MoE oracle, and a
loaded model's CPU experts: what the CPU kernel tests (ggml's and tandem's own) share."""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants

from tandem.kernels.experts import CpuExperts
from tandem.kernels.quantize import quantize
from tandem.kernels.tensors import QuantTensor


def make_weight(t: T, shape: tuple[int, ...], rng) -> tuple[QuantTensor, torch.Tensor]:
    """Random weights quantized by ggml, and gguf-py's dequantization of them (float32)."""
    values = (rng.standard_normal(shape) * 0.1).astype(np.float32)
    raw = quantize(values.reshape(-1, shape[-1]), t).reshape(-1)
    reference = quants.dequantize(raw, t).reshape(shape).astype(np.float32)
    return QuantTensor(t, shape, raw), torch.from_numpy(reference)


def ud_iq1_s_experts(n_expert: int, n_ff: int, d: int, seed: int) -> list[tuple[QuantTensor, torch.Tensor]]:
    """Gate, up and down experts as Unsloth's UD-IQ1_S quantizes them (IQ1_S, IQ1_S, IQ2_XXS),
    each with its float reference (make_weight)."""
    rng = np.random.default_rng(seed)
    shapes = [(n_expert, n_ff, d), (n_expert, n_ff, d), (n_expert, d, n_ff)]
    types = (T.IQ1_S, T.IQ1_S, T.IQ2_XXS)
    return [make_weight(t, shape, rng) for t, shape in zip(types, shapes, strict=True)]


def moe_reference(x, ids, weights, gate, up, down):
    """sum_k w[t,k] * down_e(silu(gate_e x_t) * up_e x_t) with float weights, token by token."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for slot in range(ids.shape[1]):
            e = int(ids[t, slot])
            h = torch.nn.functional.silu(gate[e] @ x[t]) * (up[e] @ x[t])
            out[t] += weights[t, slot] * (down[e] @ h)
    return out


def routing(n_tokens: int, k: int = 4, n_expert: int = 8, seed: int = 0):
    """k distinct random experts per token and random weights."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(n_expert, generator=g)[:k] for _ in range(n_tokens)])
    return ids, torch.rand(n_tokens, k, generator=g)


def cpu_experts(llm) -> list[CpuExperts]:
    """The CpuExperts of an LLM's MoE blocks."""
    found = [getattr(b.ffn, "experts", None) for b in llm.model.blocks]
    return [e for e in found if isinstance(e, CpuExperts)]
