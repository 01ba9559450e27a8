"""TANDEM_SHARE_DIRECT=1: the share's Triton kernels read each expert where it lies (the pinned
file mapping over PCIe, or rows of an expert cache in VRAM) through a table of addresses,
instead of copies into slots; against the float MoE oracle on gguf-py's dequantized weights.
Off CUDA the kernels run under Triton's interpreter (TRITON_INTERPRET=1) on host addresses;
skipped where neither a GPU nor the interpreter is available."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from expert_checks import make_weight, moe_reference, routing
from logit_checks import relative_error
from tandem.errors import KernelError
from tandem.kernels.cpu import CpuKernels
from tandem.kernels.experts import CpuExperts
from tandem.kernels.gpu_share import MAX_TOKENS, GpuShare, ShareBalance, split
from tandem.kernels.tensors import QuantTensor

pytest.importorskip("tandem.kernels.share_triton", exc_type=ImportError)  # needs triton
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
RECIPES = {"ud-iq1_s": (T.IQ1_S, T.IQ1_S, T.IQ2_XXS), "q4_k_m": (T.Q4_K, T.Q4_K, T.Q6_K)}
N_EXPERT, N_FF, D, K = 16, 256, 256, 4
Q8_ACTIVATION_TOL = 0.03  # the CPU's part rounds activations to int8 (as test_cpu)


@pytest.fixture(autouse=True)
def in_place(monkeypatch):
    monkeypatch.setenv("TANDEM_SHARE_DIRECT", "1")


@pytest.fixture(scope="module")
def kernels():
    with CpuKernels() as k:
        yield k


@pytest.fixture(scope="module", params=list(RECIPES))
def experts(request, tmp_path_factory):
    """The recipe's gate, up and down experts in read-only file mappings (as a GGUF's are),
    with their float references."""
    rng = np.random.default_rng(13)
    types = RECIPES[request.param]
    shapes = [(N_EXPERT, N_FF, D), (N_EXPERT, N_FF, D), (N_EXPERT, D, N_FF)]
    made, folder = [], tmp_path_factory.mktemp(request.param)
    for i, (t, shape) in enumerate(zip(types, shapes, strict=True)):
        q, ref = make_weight(t, shape, rng)
        path = folder / f"w{i}.bin"
        q.data.tofile(path)
        made.append((QuantTensor(q.ggml_type, q.shape, np.memmap(path, dtype=np.uint8, mode="r")), ref))
    return made


@pytest.mark.skipif(not INTERPRETED, reason="the host run needs TRITON_INTERPRET=1 (slow)")
@pytest.mark.parametrize("n_tokens", [1, 3])
def test_the_share_reads_experts_in_place_float_exact(experts, n_tokens):
    """One token's experts and a batch's (experts several tokens chose among them, padded to a
    compiled pair count): float-exact against the oracle over just those pairs, and no slot
    was ever allocated, so nothing was copied."""
    (gate, g_ref), (up, u_ref), (down, d_ref) = experts
    x = torch.randn(n_tokens, D, generator=torch.Generator().manual_seed(n_tokens))
    ids, weights = routing(n_tokens, k=K, n_expert=N_EXPERT, seed=n_tokens)
    chosen, _ = split(ids, N_EXPERT, limit=2 * MAX_TOKENS, shared_experts=True)
    share = GpuShare("cpu", max_experts=2 * MAX_TOKENS, experts_per_token=K)
    launched = share.launch(x, ids, weights, chosen, gate, up, down)
    only_chosen = weights * torch.isin(ids, torch.tensor(chosen))
    expected = moe_reference(x, ids, only_chosen, g_ref, u_ref, d_ref)
    assert launched.out.shape == (n_tokens, D)
    assert relative_error(launched.out, expected) < 1e-5
    assert share._slots is None and share.counts["from_file"] == len(chosen)


def test_more_pairs_than_the_share_holds_are_refused_by_name(experts):
    """Three experts that both tokens chose: six pairs for a share of four (before any kernel)."""
    (gate, _), (up, _), (down, _) = experts
    ids = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]])
    share = GpuShare("cpu", max_experts=4, experts_per_token=K)
    with pytest.raises(KernelError, match=r"6 \(token, expert\) pairs exceed the share's 4"):
        share.launch(torch.randn(2, D), ids, torch.ones(2, K), [0, 1, 2], gate, up, down)


@pytest.mark.cuda
def test_the_share_reads_the_pinned_mapping_and_its_cache_in_place(kernels, experts):
    """On the GPU: the mapping registered as mapped, one token's calls at several shares and
    batches, each against the oracle; then a VRAM cache of the most used experts, whose rows
    the kernels read instead (after the cache's swaps, in stream order)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    tensors = [q for q, _ in experts]
    refs = [ref for _, ref in experts]
    share = GpuShare("cuda", max_experts=2 * MAX_TOKENS, experts_per_token=K)
    share.pin([q.data for q in tensors], [tensors])
    assert share.wait(120) and share.batches_ready.wait(120), share.skipped
    moe = CpuExperts(kernels, *tensors, share=share)
    moe.batch_balance = ShareBalance(1.0, fixed=True)

    def check(seed: int, n_tokens: int) -> None:
        x = torch.randn(n_tokens, D)
        ids, weights = routing(n_tokens, k=K, n_expert=N_EXPERT, seed=seed)
        if n_tokens == 1:
            ours = moe.compute_shared(x.cuda(), x.pin_memory(), ids, weights)
        else:
            ours = moe.collect(moe.submit(x.cuda(), ids.cuda(), weights.cuda()))
        assert relative_error(ours.cpu(), moe_reference(x, ids, weights, *refs)) < Q8_ACTIVATION_TOL

    try:
        for seed, fraction in enumerate([0.25, 0.5, 1.0] * 2):
            moe.balance = ShareBalance(fraction, fixed=True)
            check(seed, 1)
        for seed in range(3):
            check(20 + seed, 3)
        assert share._slots is None, "a call copied experts into slots"
        assert all(key[0] == "in place" for key in share._graphs)
        share.keep_in_vram([tensors], 4 * sum(w.expert_bytes() for w in tensors))
        moe.balance = ShareBalance(1.0, fixed=True)
        for seed in range(80):  # past the cache's refreshes: its rows fill and then serve
            check(100 + seed % 5, 1)
        assert share.counts["from_cache"] > 0
    finally:
        share.close()
