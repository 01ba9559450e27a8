"""DeepSeek-V2/V3/R1 as plain torch modules.

No file access and no device decisions: every weight arrives from the loader already in its
dtype and on its device, and modules move their input to where their weights are. The routed
experts are behind a seam (`RoutedExperts`): the loader plugs in the CPU ggml kernels or a
torch reference.

Shapes: T tokens of one sequence, d = n_embd, H heads, r = kv_lora_rank, p = qk_rope_head_dim,
n = qk_nope_head_dim, v = v_head_dim, E experts, k experts per token.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from tandem.gguf.config import DeepSeek2Config
from tandem.kernels.env import triton_module
from tandem.models.decoder import per_segment
from tandem.models.layers import GatedMLP, Linear, RMSNorm, rope_pairs


class Rope:
    """Rotary embedding over adjacent pairs (x0, x1), (x2, x3), ... as GGUF files lay it out
    (llama.cpp's NORM mode; transformers' rope_interleave=True), with YaRN scaling."""

    def __init__(self, c: DeepSeek2Config, device: torch.device):
        dim, base = c.qk_rope_head_dim, c.rope_theta
        pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        inv_freq = 1.0 / pos_freqs
        self.softmax_mscale = 1.0
        if c.rope_scaling == "yarn" and c.rope_scaling_factor > 1:
            inv_freq = _yarn_inv_freq(pos_freqs, c.rope_scaling_factor, c.rope_original_context,
                                      base, dim)
            # YaRN sharpens attention by mscale^2 (DeepSeek's mscale_all_dim); the rotation
            # itself stays unscaled, as llama.cpp does for this architecture.
            self.softmax_mscale = 1.0 + c.rope_yarn_log_multiplier * math.log(c.rope_scaling_factor)
        self.inv_freq = inv_freq.to(device)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.to(self.inv_freq.device, torch.float32)[:, None] * self.inv_freq  # [T, p/2]
        return angles.cos(), angles.sin()


def _yarn_inv_freq(pos_freqs: torch.Tensor, factor: float, original_context: int, base: float,
                   dim: int, beta_fast: float = 32.0, beta_slow: float = 1.0) -> torch.Tensor:
    """YaRN frequencies (Peng et al. 2023): extrapolate high frequencies, interpolate low ones,
    ramp linearly between the dimensions that turn beta_fast and beta_slow times in the
    original context."""

    def dim_for(rotations: float) -> float:
        return dim * math.log(original_context / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(dim_for(beta_fast)), 0)
    high = min(math.ceil(dim_for(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate


QUERY_BLOCK = 512  # queries whose attention scores are computed at once


class LayerKV(Protocol):
    """One layer's latent cache: write T new entries at `start` (or at the positions in a
    tensor, unchecked: CUDA-graph decode), read the first `length`."""

    def write(self, start: int, latent: torch.Tensor, rope_key: torch.Tensor) -> None: ...

    def write_at(self, positions: torch.Tensor, latent: torch.Tensor, rope_key: torch.Tensor) -> None: ...

    def read(self, length: int) -> tuple[torch.Tensor, torch.Tensor]: ...


class MLAttention(nn.Module):
    """Multi-head latent attention, absorbed: the cache holds only the normed latent c [r] and
    the rotated shared key [p] per token; q_nope is mapped into latent space through W_k and the
    latent output back through W_v, so per-head keys and values are never materialized."""

    def __init__(self, c: DeepSeek2Config, q: nn.Module, kv_a: Linear, kv_a_norm: RMSNorm,
                 w_k: torch.Tensor, w_v: torch.Tensor, out: Linear, rope: Rope):
        super().__init__()
        self.c = c
        self.q, self.kv_a, self.kv_a_norm, self.out = q, kv_a, kv_a_norm, out
        self.w_k = nn.Parameter(w_k, requires_grad=False)  # [H, n, r]
        self.w_v = nn.Parameter(w_v, requires_grad=False)  # [H, v, r]
        self.rope = rope
        self.scale = rope.softmax_mscale**2 / math.sqrt(c.qk_nope_head_dim + c.qk_rope_head_dim)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, views) -> torch.Tensor:
        q_latent, q_pe, latent, k_pe = self._project(x, positions)
        out_latent = torch.cat([
            self._attend(cache, start, *rows)
            for cache, start, *rows in per_segment(views, q_latent, q_pe, latent, k_pe, positions)
        ])  # [T, H, r]
        return self._output(out_latent)

    def decode(self, x: torch.Tensor, positions: torch.Tensor, kvs: Sequence[LayerKV],
               length: int) -> torch.Tensor:
        """One token for each of B sequences, x [B, d]: sequence b's at positions[b] (a [B]
        tensor) in its cache kvs[b], against that cache's first `length` entries, those past
        its position masked: fixed shapes, no host sync (CUDA graphs). The projections run
        once for all B; the attention per sequence."""
        q_latent, q_pe, latent, k_pe = self._project(x, positions)
        out = []
        for b, kv in enumerate(kvs):
            at = positions[b : b + 1]
            kv.write_at(at, latent[b : b + 1], k_pe[b : b + 1])
            out.append(self._scores(q_latent[b : b + 1], q_pe[b : b + 1], *kv.read(length), at))
        return self._output(out[0] if len(out) == 1 else torch.cat(out))

    def _project(self, x: torch.Tensor, positions: torch.Tensor):
        """Queries in latent space [T, H, r] and rotated [T, H, p]; new cache rows [T, r], [T, p]."""
        c = self.c
        t = x.shape[0]
        q = self.q(x).view(t, c.n_heads, -1)  # [T, H, n+p]
        q_nope, q_pe = q.split([c.qk_nope_head_dim, c.qk_rope_head_dim], dim=-1)
        latent_and_key = self.kv_a(x)  # [T, r+p]
        latent = self.kv_a_norm(latent_and_key[:, : c.kv_lora_rank])  # [T, r]
        cos, sin = self.rope.cos_sin(positions)
        q_pe = rope_pairs(q_pe, cos, sin)  # [T, H, p]
        k_pe = rope_pairs(latent_and_key[:, c.kv_lora_rank :], cos, sin)  # [T, p]
        q_latent = torch.einsum("thn,hnr->thr", q_nope.to(self.w_k.dtype), self.w_k)  # weights' dtype
        return q_latent, q_pe, latent, k_pe

    def _output(self, out_latent: torch.Tensor) -> torch.Tensor:
        t = out_latent.shape[0]
        out = torch.einsum("thr,hvr->thv", out_latent.to(self.w_v.dtype), self.w_v).float()  # [T, H, v]
        return self.out(out.reshape(t, -1))

    def _attend(self, kv: LayerKV, start: int, q_latent, q_pe, latent, k_pe, positions):
        """One sequence's tokens against its cache (after adding their own entries), QUERY_BLOCK
        queries at a time: the scores of a long prompt chunk would not fit ([H, T, S] floats),
        and each block reads the cache only up to its own last position."""
        kv.write(start, latent, k_pe)
        t = latent.shape[0]
        return torch.cat([
            self._scores(q_latent[i : i + QUERY_BLOCK], q_pe[i : i + QUERY_BLOCK],
                         *kv.read(start + min(i + QUERY_BLOCK, t)), positions[i : i + QUERY_BLOCK])
            for i in range(0, t, QUERY_BLOCK)
        ])

    def _scores(self, q_latent, q_pe, cached_latent, cached_key, positions):
        """Attention of queries at `positions` over cache rows [S, r], [S, p]: [T, H, r] in the
        weights' dtype. The products run in that dtype (bf16 on a GPU: tensor cores, float32
        sums); scale, mask and softmax in float32."""
        dtype = self.w_k.dtype
        cached_latent = cached_latent.to(dtype)  # once for the scores and the values
        scores = torch.einsum("thr,sr->hts", q_latent.to(dtype), cached_latent).float()
        scores += torch.einsum("thp,sp->hts", q_pe.to(dtype), cached_key.to(dtype)).float()  # [H, T, S]
        scores *= self.scale
        key_pos = torch.arange(cached_latent.shape[0], device=scores.device)
        future = key_pos[None, :] > positions.to(scores.device)[:, None]  # [T, S]
        scores.masked_fill_(future, float("-inf"))
        probs = scores.softmax(dim=-1).to(dtype)
        return torch.einsum("hts,sr->thr", probs, cached_latent)


class LoraQuery(nn.Module):
    """q = W_qb norm(W_qa x): DeepSeek-V3's low-rank query path."""

    def __init__(self, a: Linear, norm: RMSNorm, b: Linear):
        super().__init__()
        self.a, self.norm, self.b = a, norm, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.norm(self.a(x)))


def route(logits: torch.Tensor, bias: torch.Tensor | None,
          c: DeepSeek2Config) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert ids [T, k] and weights [T, k] from router logits [T, E].

    V3/R1: sigmoid scores; the correction bias only steers the choice; groups ranked by the
    sum of their two best biased scores, experts chosen from the best `topk_group` groups;
    weights are the unbiased scores, renormalized and scaled. V2: softmax scores, groups ranked
    by their best score."""
    logits = logits.float()
    scores = logits.sigmoid() if c.expert_gating == "sigmoid" else logits.softmax(dim=-1)
    choice = scores if bias is None else scores + bias.to(scores.device, torch.float32)
    t, e = choice.shape
    n_group, topk_group = c.n_group or 1, c.topk_group or 1
    if n_group > 1 and topk_group < n_group:
        grouped = choice.view(t, n_group, e // n_group)
        if c.expert_gating == "sigmoid":
            group_scores = grouped.topk(min(2, e // n_group), dim=-1).values.sum(dim=-1)  # [T, G]
        else:
            group_scores = grouped.max(dim=-1).values
        keep = group_scores.topk(topk_group, dim=-1).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        choice = choice.masked_fill(~group_mask.repeat_interleave(e // n_group, dim=1),
                                    float("-inf"))
    ids = choice.topk(c.n_expert_used, dim=-1).indices  # [T, k]
    weights = scores.gather(1, ids)
    if c.expert_weights_norm:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return ids, weights * c.expert_weights_scale


class RoutedExperts(Protocol):
    """The seam where routed experts leave the model: submit now, collect when needed."""

    def submit(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor): ...

    def collect(self, handle) -> torch.Tensor: ...


class MoE(nn.Module):
    def __init__(self, c: DeepSeek2Config, router: torch.Tensor, bias: torch.Tensor | None,
                 experts: RoutedExperts, shared: GatedMLP | None):
        super().__init__()
        self.c = c
        self.router = nn.Parameter(router.float(), requires_grad=False)  # [E, d]
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)
        self.experts, self.shared = experts, shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, weights = self.choose(x)
        handle = self.experts.submit(x, ids, weights)  # the CPU starts on the routed experts
        shared = self.shared(x) if self.shared is not None else None  # meanwhile, here
        routed = self.experts.collect(handle).to(x.device, torch.float32)
        return routed if shared is None else routed + shared.to(x.device)

    def choose(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ids and weights [T, k] for x [T, d]."""
        c = self.c
        logits = F.linear(x.to(self.router.device, torch.float32), self.router)  # [T, E]
        fused = _fused_route() if logits.is_cuda and c.expert_gating == "sigmoid" else None
        n_group, topk_group = c.n_group or 1, c.topk_group or 1
        if fused is not None and fused.supports(logits.shape[0], logits.shape[1], n_group, topk_group,
                                                c.n_expert_used):
            return fused.route(logits, self.bias, n_group, topk_group, c.n_expert_used,
                               c.expert_weights_scale, c.expert_weights_norm)
        return route(logits, self.bias, c)


ROUTE_ENV = "TANDEM_ROUTE_TRITON"


@functools.cache
def _fused_route():
    """kernels.triton_route where TANDEM_ROUTE_TRITON=1 (A/B runs) and Triton is there, else
    None: the routing as the torch ops of `route`."""
    if os.environ.get(ROUTE_ENV) != "1":
        return None
    return triton_module("triton_route", ROUTE_ENV, "torch's routing")
