"""DeepSeek-V3/R1 routing (models.deepseek_v3.route, sigmoid gating) in one Triton kernel.

In a decode step the routing is ~16 tiny kernels per MoE layer (sigmoid, bias, group top-2
sums, top groups, masks, top-k, gather, normalization), each a few microseconds of a GPU that
waits on them; here one program per token does all of it in registers. TANDEM_ROUTE_TRITON=1
turns it on (A/B runs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_TOKENS = 16  # rows a call takes (decode steps)


@triton.jit
def _route_kernel(logits, bias, ids, weights, scale, E: tl.constexpr, G: tl.constexpr,
                  TOPK_GROUP: tl.constexpr, K: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr):
    t = tl.program_id(0)
    e = tl.arange(0, E)
    score = tl.sigmoid(tl.load(logits + t * E + e))
    choice = score
    if HAS_BIAS:
        choice = score + tl.load(bias + e)
    # groups ranked by the sum of their two best biased scores
    grouped = tl.reshape(choice, [G, E // G])
    within = tl.arange(0, E // G)
    best = tl.max(grouped, axis=1)
    first = tl.argmax(grouped, axis=1)
    second = tl.max(tl.where(within[None, :] == first[:, None], float("-inf"), grouped), axis=1)
    group_score = best + second
    groups = tl.arange(0, G)
    keep = groups < 0  # all false
    for _ in tl.static_range(TOPK_GROUP):
        g = tl.argmax(group_score, axis=0)
        keep = keep | (groups == g)
        group_score = tl.where(groups == g, float("-inf"), group_score)
    kept = tl.reshape(tl.broadcast_to(keep[:, None], [G, E // G]), [E])
    masked = tl.where(kept, choice, float("-inf"))
    # the K best experts of the kept groups, best first; weights the unbiased scores
    slots = tl.arange(0, K)
    chosen = tl.zeros([K], dtype=tl.int32)
    chosen_weight = tl.zeros([K], dtype=tl.float32)
    for j in tl.static_range(K):
        i = tl.argmax(masked, axis=0)
        chosen = tl.where(slots == j, i, chosen)
        chosen_weight = tl.where(slots == j, tl.sum(tl.where(e == i, score, 0.0), axis=0), chosen_weight)
        masked = tl.where(e == i, float("-inf"), masked)
    if NORM:
        chosen_weight = chosen_weight / (tl.sum(chosen_weight, axis=0) + 1e-20)
    tl.store(ids + t * K + slots, chosen.to(tl.int64))
    tl.store(weights + t * K + slots, chosen_weight * scale)


def supports(n_tokens: int, n_expert: int, n_group: int, topk_group: int, k: int) -> bool:
    """Whether the kernel takes this routing: powers of two for the experts, groups and k."""
    def power_of_two(n: int) -> bool:
        return n > 0 and n & (n - 1) == 0
    return (0 < n_tokens <= MAX_TOKENS and power_of_two(n_expert) and power_of_two(n_group)
            and power_of_two(k) and n_expert % n_group == 0 and 0 < topk_group <= n_group)


def route(logits: torch.Tensor, bias: torch.Tensor | None, n_group: int, topk_group: int, k: int,
          scale: float, norm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert ids (int64) and weights (float32) [T, k] from router logits [T, E], as
    models.deepseek_v3.route for sigmoid gating."""
    logits = logits.float().contiguous()
    t, e = logits.shape
    ids = torch.empty(t, k, dtype=torch.int64, device=logits.device)
    weights = torch.empty(t, k, dtype=torch.float32, device=logits.device)
    has_bias = bias is not None
    bias = bias.to(logits.device, torch.float32).contiguous() if has_bias else logits
    _route_kernel[(t,)](logits, bias, ids, weights, float(scale), E=e, G=n_group, TOPK_GROUP=topk_group, K=k,
                        HAS_BIAS=has_bias, NORM=norm)
    return ids, weights
