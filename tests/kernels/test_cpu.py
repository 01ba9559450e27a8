"""CPU kernels against a float32 reference: weights dequantized by the `gguf` package, math in
torch.

Tolerances. ggml quantizes the activations before its integer dot products: to Q8_K (256-value
blocks, one scale) for K and IQ weights, to Q8_0 for the legacy types, and rounds them to F16 for
F16 weights. 8-bit max-abs scaling costs ~0.5-1% relative error per matmul; the MoE op does it
twice in a row (x before gate/up, then h before down), so it lands near 2%: we allow 3%. F16
rounding (2^-11) allows 2e-3. A wrong expert, weight or layout gives errors near 100%.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants

from expert_checks import make_weight, moe_reference, routing
from logit_checks import relative_error
from tandem.errors import KernelError
from tandem.kernels.cpu import SKIPPED_SLOT, CpuKernels, resize_openmp_team
from tandem.kernels.tensors import QuantTensor

Q8_ACTIVATION_TOL = 0.03
F16_TOL = 2e-3


def tolerance(*types: T) -> float:
    return F16_TOL if all(t in (T.F16, T.F32, T.BF16) for t in types) else Q8_ACTIVATION_TOL


@pytest.fixture(scope="module")
def kernels():
    with CpuKernels() as k:
        yield k


@pytest.mark.parametrize("t", [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_K, T.Q6_K, T.Q2_K,
                               T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ4_XS, T.TQ2_0, T.MXFP4],
                         ids=lambda t: t.name)
@pytest.mark.parametrize("n_tokens", [1, 5])
def test_matmul_any_type(kernels, t, n_tokens, rng):
    weight, reference = make_weight(t, (300, 512), rng)
    x = torch.randn(n_tokens, 512)
    y = kernels.matmul(weight, x)
    assert y.shape == (n_tokens, 300)
    assert relative_error(y, x @ reference.T) < tolerance(t)


MIXES = {
    "iq1_s-gate-up_q4_k-down": (T.IQ1_S, T.IQ1_S, T.Q4_K),
    "q8_0": (T.Q8_0, T.Q8_0, T.Q8_0),
    "q4_k-gate-up_q6_k-down": (T.Q4_K, T.Q4_K, T.Q6_K),
    "f16": (T.F16, T.F16, T.F16),
    "iq2_xxs-gate_q8_0-up_iq4_xs-down": (T.IQ2_XXS, T.Q8_0, T.IQ4_XS),
}


@pytest.fixture(scope="module")
def experts():
    """Stacked experts [E, n_ff, d] / [E, d, n_ff] per mix, with their float32 references."""
    rng = np.random.default_rng(7)
    n_expert, n_ff, d = 8, 512, 256
    made = {}
    for name, (tg, tu, td) in MIXES.items():
        made[name] = (make_weight(tg, (n_expert, n_ff, d), rng),
                      make_weight(tu, (n_expert, n_ff, d), rng),
                      make_weight(td, (n_expert, d, n_ff), rng))
    return made


@pytest.mark.parametrize("mix", list(MIXES))
@pytest.mark.parametrize("n_tokens", [1, 7, 64])
def test_moe_matches_float_reference(kernels, experts, mix, n_tokens):
    (gate, g_ref), (up, u_ref), (down, d_ref) = experts[mix]
    x = torch.randn(n_tokens, 256)
    ids, weights = routing(n_tokens, seed=n_tokens)
    y = kernels.moe(x, ids, weights, gate, up, down)
    ref = moe_reference(x, ids, weights, g_ref, u_ref, d_ref)
    assert relative_error(y, ref) < tolerance(*MIXES[mix])
    # Sanity of the oracle itself: other experts give a clearly different answer.
    wrong = moe_reference(x, (ids + 1) % 8, weights, g_ref, u_ref, d_ref)
    assert relative_error(wrong, ref) > 0.5


def test_moe_repeated_calls_reuse_graph_with_new_inputs(kernels, experts):
    (gate, g_ref), (up, u_ref), (down, d_ref) = experts["q8_0"]
    for seed in range(3):
        x = torch.randn(3, 256)
        ids, weights = routing(3, seed=seed)
        y = kernels.moe(x, ids, weights, gate, up, down)
        assert relative_error(y, moe_reference(x, ids, weights, g_ref, u_ref, d_ref)) < Q8_ACTIVATION_TOL


def test_thread_count_changes_nothing_but_speed(experts):
    (gate, _), (up, _), (down, _) = experts["iq1_s-gate-up_q4_k-down"]
    x = torch.randn(7, 256)
    ids, weights = routing(7)
    with CpuKernels(n_threads=1) as k:
        one = k.moe(x, ids, weights, gate, up, down)
        k.set_threads(2)
        assert k.n_threads == 2
        two = k.moe(x, ids, weights, gate, up, down)
    torch.testing.assert_close(one, two, rtol=1e-5, atol=1e-6)


def test_moe_releases_the_gil(experts):
    """While the op runs on its own thread, Python code on this thread keeps running."""
    (gate, _), (up, _), (down, _) = experts["q4_k-gate-up_q6_k-down"]
    x = torch.randn(64, 256)
    ids, weights = routing(64)
    with CpuKernels(n_threads=1) as k:
        k.moe(x, ids, weights, gate, up, down)  # build the graph outside the measured part
        start = time.perf_counter()
        for _ in range(3):
            k.moe(x, ids, weights, gate, up, down)
        one_call = (time.perf_counter() - start) / 3
        calls = 20
        progress = 0
        futures = [k.submit_moe(x, ids, weights, gate, up, down) for _ in range(calls)]
        while not futures[-1].done():
            progress += 1
        for f in futures:
            f.result()
    # With the GIL held during the C call, this loop would stall for the calls' whole length.
    assert one_call * calls > 0.02, "op too fast to tell"
    assert progress > 1000


def test_moe_rejects_bad_input(kernels, experts):
    (gate, _), (up, _), (down, _) = experts["q8_0"]
    x = torch.randn(2, 256)
    with pytest.raises(KernelError, match=r"expert ids must lie in \[0, 8\) \(or be -1: skipped\), got 0..8"):
        kernels.moe(x, torch.tensor([[0, 8], [1, 2]]), torch.ones(2, 2), gate, up, down)
    with pytest.raises(KernelError, match="x must be \\[T, 256\\]"):
        kernels.moe(torch.randn(2, 128), torch.zeros(2, 2), torch.ones(2, 2), gate, up, down)
    with pytest.raises(KernelError, match="expert_weights must be \\[2, 2\\]"):
        kernels.moe(x, torch.zeros(2, 2), torch.ones(2, 3), gate, up, down)
    with pytest.raises(KernelError, match="expert shapes disagree"):
        kernels.moe(x, torch.zeros(2, 2), torch.ones(2, 2), gate, up, gate)


@pytest.mark.parametrize("mix", ["iq1_s-gate-up_q4_k-down", "q8_0"])  # tandem's kernels, ggml's
def test_moe_writes_into_a_given_output(kernels, experts, mix):
    (gate, g_ref), (up, u_ref), (down, d_ref) = experts[mix]
    x = torch.randn(5, 256)
    ids, weights = routing(5, seed=2)
    out = torch.full((5, 256), float("nan"))
    assert kernels.moe(x, ids, weights, gate, up, down, out=out) is out
    assert relative_error(out, moe_reference(x, ids, weights, g_ref, u_ref, d_ref)) < Q8_ACTIVATION_TOL
    for bad in (torch.empty(5, 128), torch.empty(5, 256, dtype=torch.float64), torch.empty(256, 5).t()):
        with pytest.raises(KernelError, match="out must be a contiguous float32 \\[5, 256\\] CPU tensor"):
            kernels.moe(x, ids, weights, gate, up, down, out=bad)


@pytest.mark.parametrize("mix", ["iq1_s-gate-up_q4_k-down", "q4_k-gate-up_q6_k-down"])
def test_skipped_slots_add_nothing(kernels, experts, mix):
    """Slots marked SKIPPED_SLOT (their experts computed on the GPU) leave the sum over the
    others, as the float oracle without those slots says; all skipped: zeros."""
    (gate, g_ref), (up, u_ref), (down, d_ref) = experts[mix]
    x = torch.randn(6, 256)
    ids, weights = routing(6, seed=4)
    skipped = ids.clone()
    skipped[ids % 3 == 0] = SKIPPED_SLOT
    y = kernels.moe(x, skipped, weights, gate, up, down)
    kept = torch.where(ids % 3 == 0, 0.0, weights)
    assert relative_error(y, moe_reference(x, ids, kept, g_ref, u_ref, d_ref)) < Q8_ACTIVATION_TOL
    assert relative_error(y, moe_reference(x, ids, weights, g_ref, u_ref, d_ref)) > 0.1
    none = kernels.moe(x, torch.full_like(ids, SKIPPED_SLOT), weights, gate, up, down)
    assert torch.equal(none, torch.zeros_like(none))


def test_skipped_slots_need_own_kernels_and_other_negatives_are_refused(kernels, experts):
    (gate, _), (up, _), (down, _) = experts["q8_0"]  # ggml's kernels: no skipping
    x = torch.randn(2, 256)
    with pytest.raises(KernelError, match=r"skipped slots \(id -1\) need tandem's own kernels"):
        kernels.moe(x, torch.tensor([[0, -1], [1, 2]]), torch.ones(2, 2), gate, up, down)
    (gate, _), (up, _), (down, _) = experts["iq1_s-gate-up_q4_k-down"]
    with pytest.raises(KernelError, match=r"expert ids must lie in \[0, 8\) \(or be -1"):
        kernels.moe(x, torch.tensor([[0, -2], [1, 2]]), torch.ones(2, 2), gate, up, down)


def test_fewer_threads_for_one_call_change_nothing_but_speed(experts):
    (gate, _), (up, _), (down, _) = experts["iq1_s-gate-up_q4_k-down"]
    x = torch.randn(4, 256)
    ids, weights = routing(4, seed=6)
    with CpuKernels(n_threads=2) as two:
        assert torch.equal(two.moe(x, ids, weights, gate, up, down, n_threads=1),
                           two.moe(x, ids, weights, gate, up, down))


@pytest.mark.parametrize("n_tokens", [3, 40])  # 24 ids (decode) and 320 (past SMALL_IDS)
def test_expert_bytes_read_counts_each_distinct_expert_once(kernels, experts, n_tokens):
    """The bench's GB/s: one read of each expert a call used, skipped slots not counted."""
    (gate, _), (up, _), (down, _) = experts["iq1_s-gate-up_q4_k-down"]
    ids, weights = routing(n_tokens, seed=5)
    ids[0, 0] = SKIPPED_SLOT
    before = kernels.expert_bytes_read
    kernels.moe(torch.randn(n_tokens, 256), ids, weights, gate, up, down)
    used = np.setdiff1d(np.unique(ids.numpy()), [SKIPPED_SLOT]).size
    per_expert = gate.expert_bytes() + up.expert_bytes() + down.expert_bytes()
    assert kernels.expert_bytes_read - before == used * per_expert


@pytest.mark.cuda
def test_cpu_experts_take_gpu_input_through_pinned_memory(kernels, experts):
    """What a GPU-side MoE hands over (CUDA tensors) comes back as the CPU input would, from a
    pinned buffer (fast to upload)."""
    from tandem.kernels.experts import CpuExperts

    (gate, _), (up, _), (down, _) = experts["iq1_s-gate-up_q4_k-down"]
    cpu_experts = CpuExperts(kernels, gate, up, down)
    x = torch.randn(40, 256)
    ids, weights = routing(40, seed=3)
    reference = cpu_experts.collect(cpu_experts.submit(x, ids, weights))
    ours = cpu_experts.collect(cpu_experts.submit(x.cuda(), ids.cuda(), weights.cuda()))
    assert ours.is_pinned() and not reference.is_pinned()
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)


def test_matmul_rejects_types_without_kernel(kernels):
    raw = np.zeros(4 * 32, dtype=np.int32).view(np.uint8)
    with pytest.raises(KernelError, match="I32 has no CPU matmul kernel"):
        kernels.matmul(QuantTensor(T.I32, (4, 32), raw), torch.randn(1, 32))


def test_moe_from_a_gguf_file(kernels, tiny_q8):
    """Experts read in place from the memory-mapped file."""
    import tandem

    model = tandem.open_gguf(tiny_q8)
    names = [f"blk.1.ffn_{p}_exps.weight" for p in ("gate", "up", "down")]
    gate, up, down = (QuantTensor.from_gguf(model, n) for n in names)
    refs = [torch.from_numpy(quants.dequantize(model.raw(n), model.tensors[n].ggml_type)
                             .reshape(model.tensors[n].shape)) for n in names]
    x = torch.randn(4, 256)
    ids, weights = routing(4, k=2)
    y = kernels.moe(x, ids, weights, gate, up, down)
    assert relative_error(y, moe_reference(x, ids, weights, *refs)) < Q8_ACTIVATION_TOL
    assert gate.data.base is not None  # a view, not a copy


def _os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux's /proc")
def test_resizing_the_openmp_team_releases_its_other_threads():
    before = torch.get_num_threads()
    try:
        resize_openmp_team(6)  # a team of 6 on this thread (5 more OS threads)
        grown = _os_threads()
        resize_openmp_team(2)  # libgomp lets 4 of them go
        deadline = time.monotonic() + 5
        while _os_threads() > grown - 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _os_threads() <= grown - 4
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    with pytest.raises(KernelError, match="thread count"):
        resize_openmp_team(0)

