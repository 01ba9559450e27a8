"""The routing kernel against models.deepseek_v3.route (sigmoid gating, groups, bias). On a
GPU, or on the CPU under Triton's interpreter (TRITON_INTERPRET=1); skipped otherwise."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from tandem.models.deepseek_v3 import route as reference_route

triton_route = pytest.importorskip("tandem.kernels.triton_route", exc_type=ImportError)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs an NVIDIA GPU or TRITON_INTERPRET=1")


@pytest.mark.parametrize("tokens", [1, 5])
@pytest.mark.parametrize("with_bias,norm", [(True, True), (False, False)])
def test_kernel_routes_as_the_reference(tokens, with_bias, norm):
    """R1's shape: 256 experts in 8 groups, the best 4 groups kept, 8 experts a token."""
    g = torch.Generator().manual_seed(tokens)
    logits = torch.randn(tokens, 256, generator=g)
    bias = torch.randn(256, generator=g) * 0.5 if with_bias else None
    c = SimpleNamespace(expert_gating="sigmoid", n_group=8, topk_group=4, n_expert_used=8,
                        expert_weights_norm=norm, expert_weights_scale=2.5)
    want_ids, want_weights = reference_route(logits, bias, c)
    ids, weights = triton_route.route(logits.to(DEVICE), None if bias is None else bias.to(DEVICE),
                                      8, 4, 8, 2.5, norm)
    assert torch.equal(ids.cpu(), want_ids)  # the same experts, best first
    torch.testing.assert_close(weights.cpu(), want_weights, rtol=1e-5, atol=1e-6)
    # the group limit matters here: plain top-8 over all experts would pick others
    assert not torch.equal((logits if bias is None else logits.sigmoid() + bias).topk(8).indices, want_ids)


def test_supports():
    assert triton_route.supports(1, 256, 8, 4, 8) and triton_route.supports(16, 256, 8, 4, 8)
    assert not triton_route.supports(17, 256, 8, 4, 8)  # more rows than a decode step's
    assert not triton_route.supports(1, 160, 8, 3, 6)  # V2: 160 experts, k 6


@pytest.mark.cuda
def test_moe_choose_takes_the_kernel_when_asked(monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU")
    from tandem.models import deepseek_v3
    g = torch.Generator().manual_seed(0)
    c = SimpleNamespace(expert_gating="sigmoid", n_group=8, topk_group=4, n_expert_used=8,
                        expert_weights_norm=True, expert_weights_scale=2.5)
    moe = deepseek_v3.MoE(c, torch.randn(256, 64, generator=g), torch.randn(256, generator=g) * 0.5,
                          experts=None, shared=None).cuda()
    x = torch.randn(3, 64, generator=g).cuda()
    want = moe.choose(x)
    monkeypatch.setenv("TANDEM_ROUTE_TRITON", "1")
    deepseek_v3._fused_route.cache_clear()
    try:
        assert deepseek_v3._fused_route() is triton_route
        ids, weights = moe.choose(x)
    finally:
        deepseek_v3._fused_route.cache_clear()
    assert torch.equal(ids, want[0])
    torch.testing.assert_close(weights, want[1], rtol=1e-5, atol=1e-6)
