"""tandem's own CPU kernels (IQ1_S, IQ2_XXS, Q4_K, Q6_K) against gguf-py's dequantizers and
against ggml.

With the activations rounded the way the kernels round them (int8 per 256 values, one float
scale: ggml's Q8_K), a dot product is exact up to float32 accumulation; the rounding in numpy
below is the test's own. Without it, the kernels are within the Q8-activation tolerance of the
float product.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from expert_checks import make_weight, moe_reference, routing
from logit_checks import relative_error
from tandem.errors import KernelError
from tandem.kernels import native
from tandem.kernels.cpu import CpuKernels

OWN_TYPES = [T.IQ1_S, T.IQ2_XXS, T.Q4_K, T.Q6_K]
RECIPES = {"ud-iq1_s": (T.IQ1_S, T.IQ1_S, T.IQ2_XXS), "q4_k_m": (T.Q4_K, T.Q4_K, T.Q6_K)}
Q8_ACTIVATION_TOL = 0.03


def q8_rounded(x: np.ndarray) -> np.ndarray:
    """x as the kernels see it: per 256 values, round(x * 127 / max|x|) * max|x| / 127."""
    blocks = x.reshape(x.shape[0], -1, 256).astype(np.float32)
    amax = np.abs(blocks).max(axis=-1, keepdims=True)
    scale = amax / np.float32(127)
    q = np.rint(blocks * (np.float32(127) / amax))
    return (q * scale).reshape(x.shape).astype(np.float64)


@pytest.fixture(params=[True, False], ids=["vectorized", "portable"])
def kernel_kind(request):
    if request.param and not all(native.vectorized(t) for t in OWN_TYPES):
        pytest.skip("this CPU lacks AVX-512 VNNI/VBMI/BITALG: only the portable kernels run")
    before = native.use_vectorized(request.param)
    yield request.param
    native.use_vectorized(before)


@pytest.mark.parametrize("t", OWN_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n_tokens", [1, 3, 8, 11])
def test_matmul_is_exact_on_rounded_activations(kernel_kind, t, n_tokens, rng):
    weight, reference = make_weight(t, (70, 1024), rng)
    x = rng.standard_normal((n_tokens, 1024)).astype(np.float32)
    y = native.matmul(weight, torch.from_numpy(x), n_threads=2).numpy()
    assert y.shape == (n_tokens, 70)
    reference = reference.double().numpy()
    expected = q8_rounded(x) @ reference.T
    assert np.abs(y - expected).max() <= 1e-5 * np.abs(expected).max()
    assert relative_error(torch.from_numpy(y), torch.from_numpy(x @ reference.T)) < Q8_ACTIVATION_TOL


@pytest.mark.parametrize("t", OWN_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n_tokens", [1, 5])  # one token: IQ1_S rows two at a time, 33 leaves one
def test_vectorized_and_portable_kernels_agree(t, n_tokens, rng):
    if not all(native.vectorized(t) for t in OWN_TYPES):
        pytest.skip("no vectorized kernels on this CPU")
    weight, _ = make_weight(t, (33, 512), rng)
    x = torch.randn(n_tokens, 512, generator=torch.Generator().manual_seed(5))
    fast = native.matmul(weight, x, n_threads=1)
    before = native.use_vectorized(False)
    try:
        slow = native.matmul(weight, x, n_threads=1)
    finally:
        native.use_vectorized(before)
    # Same integer sums, float sums in another order: near-cancelling outputs (Q4_K's mins) differ
    # by float32 rounding of the larger terms, so the tolerance is relative to the output scale.
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5 * slow.abs().max().item())


def _experts(recipe: str, seed: int = 11):
    """8 experts of the recipe's gate/up/down types, with gguf-py references."""
    rng = np.random.default_rng(seed)
    n_expert, n_ff, d = 8, 512, 256
    gate, up, down = RECIPES[recipe]
    return (make_weight(gate, (n_expert, n_ff, d), rng), make_weight(up, (n_expert, n_ff, d), rng),
            make_weight(down, (n_expert, d, n_ff), rng))


def _fast_and_portable(experts, x, ids, weights, amx: bool, setting, value):
    """The MoE op with the vectorized kernels (AMX on or off, `setting(value)` for the call),
    then with the portable ones: the two results."""
    (gate, _), (up, _), (down, _) = experts
    amx_before, setting_before = native.use_amx(amx), setting(value)
    try:
        fast = native.moe(x, ids, weights, gate, up, down, n_threads=2)
    finally:
        native.use_amx(amx_before)
        setting(setting_before)
    before = native.use_vectorized(False)
    try:
        slow = native.moe(x, ids, weights, gate, up, down, n_threads=2)
    finally:
        native.use_vectorized(before)
    return fast, slow


@pytest.mark.parametrize("token_block", [64, 128])
@pytest.mark.parametrize("amx", [False, True], ids=["avx512", "amx"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_many_tokens_per_expert_equal_the_portable_kernels(recipe, amx, token_block):
    """Prefill-sized batches take other paths (tasks of up to 64 or 128 token-slot pairs; GEMMs with the
    tokens in the vector lanes, on AVX-512 or on AMX tiles): the same integer sums as the
    portable kernels, float sums in another order. Where a hidden value lies on a rounding
    boundary of its 8-bit quantization that order can flip it by one step, so a token or two
    may differ a little more."""
    if not native.vectorized(RECIPES[recipe][0]):
        pytest.skip("no vectorized kernels on this CPU")
    if amx and not native.amx_available():
        pytest.skip("no AMX on this CPU")
    x = torch.randn(300, 256, generator=torch.Generator().manual_seed(5))
    ids, weights = routing(300, k=4, seed=5)  # ~150 pairs per expert: blocks of 128 and the rest
    fast, slow = _fast_and_portable(_experts(recipe), x, ids, weights, amx,
                                    native.set_token_block, token_block)
    close = torch.isclose(fast, slow, rtol=1e-5, atol=1e-5 * slow.abs().max().item()).all(dim=1)
    assert close.sum() >= 296, f"{300 - int(close.sum())} of 300 tokens differ"
    assert relative_error(fast, slow) < 1e-3


@pytest.mark.parametrize("gemm_min_pairs", [0, 1, 4])  # 0: the defaults (7 on AMX tiles)
@pytest.mark.parametrize("amx", [False, True], ids=["avx512", "amx"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_a_few_tokens_per_expert_on_the_gemm_path_equal_the_portable_kernels(recipe, amx, gemm_min_pairs):
    """Decode steps of a few streams (1..8 pairs per expert) on the GEMM path when its
    threshold is lowered (by default on AMX; TANDEM_GEMM_MIN_PAIRS): row tasks rounded to whole tiles, panels
    mostly empty lanes; the same sums as the portable kernels up to float order."""
    if not native.vectorized(RECIPES[recipe][0]):
        pytest.skip("no vectorized kernels on this CPU")
    if amx and not native.amx_available():
        pytest.skip("no AMX on this CPU")
    experts = _experts(recipe)
    for n_tokens in (1, 3, 8):
        x = torch.randn(n_tokens, 256, generator=torch.Generator().manual_seed(n_tokens))
        ids, weights = routing(n_tokens, k=4, seed=n_tokens)
        fast, slow = _fast_and_portable(experts, x, ids, weights, amx,
                                        native.set_gemm_min_pairs, gemm_min_pairs)
        assert relative_error(fast, slow) < 1e-3, f"{n_tokens} tokens"


def test_gemm_min_pairs_is_clamped_and_restored():
    before = native.set_gemm_min_pairs(-3)
    try:
        assert before == 0  # the per-pass defaults unless TANDEM_GEMM_MIN_PAIRS says otherwise
        assert native.set_gemm_min_pairs(99) == 0  # -3 was raised to 0, the defaults
        assert native.set_gemm_min_pairs(before) == 16  # 99 was cut to 16
    finally:
        native.set_gemm_min_pairs(before)


@pytest.fixture(scope="module")
def ud_experts():
    """IQ1_S gate/up, IQ2_XXS down: Unsloth's UD-IQ1_S experts."""
    return _experts("ud-iq1_s")


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("n_tokens", [1, 7, 40])
def test_moe_matches_float_reference(kernel_kind, recipe, n_tokens):
    (gate, g_ref), (up, u_ref), (down, d_ref) = _experts(recipe)
    # seeded: the Q8 error of tiny random MoEs spreads from ~0.005 to ~0.023 over random inputs
    x = torch.randn(n_tokens, 256, generator=torch.Generator().manual_seed(n_tokens))
    ids, weights = routing(n_tokens, k=4, seed=n_tokens)  # 40 tokens: every expert shared by many
    y = native.moe(x, ids, weights, gate, up, down, n_threads=2)
    ref = moe_reference(x, ids, weights, g_ref, u_ref, d_ref)
    assert relative_error(y, ref) < Q8_ACTIVATION_TOL
    wrong = moe_reference(x, (ids + 1) % 8, weights, g_ref, u_ref, d_ref)
    assert relative_error(wrong, ref) > 0.5


@pytest.mark.parametrize("recipe", RECIPES)
def test_cpu_kernels_use_them_and_agree_with_ggml(recipe):
    (gate, _), (up, _), (down, _) = _experts(recipe)
    assert native.fits(gate, up, down)
    x = torch.randn(9, 256, generator=torch.Generator().manual_seed(9))
    ids, weights = routing(9, k=3, seed=1)
    with CpuKernels(n_threads=2) as kernels:
        ours = kernels.moe(x, ids, weights, gate, up, down)
        ggml = kernels.moe(x, ids, weights, gate, up, down, own=False)
    assert relative_error(ours, ggml) < 0.01  # both round activations to 8 bits, differently
    assert not torch.equal(ours, ggml)  # two different implementations really ran


@pytest.mark.parametrize("spin_us", [native.RUNNER_SPIN_US, 0], ids=["spin", "sleep-at-once"])
def test_the_runner_thread_computes_calls_while_the_caller_goes_on(ud_experts, spin_us):
    """csrc/runner.c: calls started on the runner meet the float reference, one after another;
    a start before the last call was waited for is declined (the caller runs it itself), and a
    failing call raises at its result. Both sides spinning for the other, or sleeping at once
    (TANDEM_RUNNER_SPIN_US=0: the condition variable's path)."""
    (gate, g_ref), (up, u_ref), (down, d_ref) = ud_experts
    native._lib().tandem_runner_set_spin_ns(spin_us * 1000)
    runner = native.MoeRunner()
    try:
        for seed in (1, 2, 3):
            x = torch.randn(3, 256, generator=torch.Generator().manual_seed(seed))
            ids, weights = routing(3, k=4, seed=seed)
            running = runner.start(x, ids, weights, gate, up, down, n_threads=2)
            assert runner.start(x, ids, weights, gate, up, down, n_threads=2) is None  # busy
            ref = moe_reference(x, ids, weights, g_ref, u_ref, d_ref)
            assert relative_error(running.result(), ref) < Q8_ACTIVATION_TOL
            assert running.result() is running.result()  # waited once
            assert running.seconds > 0
        bad = runner.start(torch.randn(1, 256), torch.tensor([[0, 8]]), torch.ones(1, 2), gate, up, down, 1)
        for _ in range(2):
            with pytest.raises(KernelError, match="expert id out of range"):
                bad.result()
    finally:
        runner.close()
        native._lib().tandem_runner_set_spin_ns(native.RUNNER_SPIN_US * 1000)


def test_a_call_dropped_unwaited_frees_the_runner(ud_experts):
    """An exception between start and result drops the call: the runner then waits for it (its
    buffers kept until it ends) and takes the next one, instead of declining every later one."""
    (gate, g_ref), (up, u_ref), (down, d_ref) = ud_experts
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(5))
    ids, weights = routing(3, k=4, seed=5)
    runner = native.MoeRunner()
    try:
        dropped = runner.start(x, ids, weights, gate, up, down, n_threads=2)
        assert runner.start(x, ids, weights, gate, up, down, n_threads=2) is None  # still held
        del dropped
        running = runner.start(x, ids, weights, gate, up, down, n_threads=2)
        assert running is not None
        ref = moe_reference(x, ids, weights, g_ref, u_ref, d_ref)
        assert relative_error(running.result(), ref) < Q8_ACTIVATION_TOL
    finally:
        runner.close()


def test_cpu_kernels_start_the_op_on_their_runner(ud_experts):
    (gate, g_ref), (up, u_ref), (down, d_ref) = ud_experts
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(4))
    ids, weights = routing(2, k=4, seed=4)
    with CpuKernels(n_threads=2) as kernels:
        running = kernels.start_moe(x, ids, weights, gate, up, down, n_threads=1)
        assert relative_error(running.result(), moe_reference(x, ids, weights, g_ref, u_ref, d_ref)) \
            < Q8_ACTIVATION_TOL
        with pytest.raises(KernelError, match="expert ids must lie in"):  # checked before it starts
            kernels.start_moe(x, ids + 8, weights, gate, up, down)


def test_unsupported_input_is_refused(rng):
    q5, _ = make_weight(T.Q5_K, (16, 256), rng)
    assert not native.supports(T.Q5_K) and not native.fits(q5)
    with pytest.raises(KernelError, match="no CPU kernel for Q5_K"):
        native.matmul(q5, torch.randn(1, 256), n_threads=1)
    short, _ = make_weight(T.IQ2_XXS, (4, 256), rng)
    with pytest.raises(KernelError, match=r"x must be \[T, 256\]"):
        native.matmul(short, torch.randn(1, 128), n_threads=1)


def test_expert_ids_out_of_range_are_refused(ud_experts):
    (gate, _), (up, _), (down, _) = ud_experts
    ids = torch.tensor([[0, 8]])
    with pytest.raises(KernelError, match="expert id out of range"):
        native.moe(torch.randn(1, 256), ids, torch.ones(1, 2), gate, up, down, n_threads=1)



@pytest.mark.parametrize("vectorized", [True, False], ids=["vectorized", "portable"])
def test_hidden_values_are_silu_times_up(vectorized):
    """The MoE's silu(g) * u: its own exp (one op sequence, vectorized or not) against torch's, from
    deep in the negative range (exp clamped) to the positive one."""
    if vectorized and not native.vectorized(T.IQ1_S):
        pytest.skip("no vectorized kernels on this CPU")
    gen = torch.Generator().manual_seed(3)
    g = torch.cat([torch.linspace(-120, 120, 4096), torch.randn(4096, generator=gen) * 4])
    u = torch.randn(g.numel(), generator=gen)
    got = native.silu_mul(g, u, vectorized=vectorized)
    expected = (torch.nn.functional.silu(g.double()) * u.double()).float()
    torch.testing.assert_close(got, expected, rtol=3e-7, atol=1e-30)


def test_vectorized_and_portable_hidden_values_are_identical():
    """Bit for bit: the prefill paths (vectorized) and the portable kernels must quantize the same
    hidden values, or a rounding boundary would flip between them."""
    if not native.vectorized(T.IQ1_S):
        pytest.skip("no vectorized kernels on this CPU")
    g = torch.randn(1 << 16, generator=torch.Generator().manual_seed(4)) * 6
    u = torch.randn(1 << 16, generator=torch.Generator().manual_seed(5))
    assert torch.equal(native.silu_mul(g, u, vectorized=True), native.silu_mul(g, u, vectorized=False))


def _allowed_cpus_of_threads() -> list[str]:
    """Cpus_allowed_list of each thread of this process, as the kernel reports it."""
    lists = []
    for status in Path("/proc/self/task").glob("*/status"):
        for line in status.read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                lists.append(line.split(":", 1)[1].strip())
    return lists


@pytest.mark.skipif(not sys.platform.startswith("linux") or len(os.sched_getaffinity(0)) < 2,
                    reason="Linux thread affinity, 2+ CPUs")
def test_pinned_workers_stay_on_one_cpu_each_and_move_freely_again_when_unpinned():
    """TANDEM_PIN_THREADS: the kernels' worker threads each get one CPU of the process's set
    (the caller's thread keeps all of them); turned off, they get the whole set back."""
    (gate, _), (up, _), (down, _) = _experts("ud-iq1_s")
    x = torch.randn(4, 256)
    ids, weights = routing(4, k=4, seed=2)
    cpus = sorted(os.sched_getaffinity(0))
    before = native.pin_threads(True)
    try:
        pinned = native.moe(x, ids, weights, gate, up, down, n_threads=2)
        assert str(cpus[1]) in _allowed_cpus_of_threads()  # worker 1 on the second CPU alone
        assert sorted(os.sched_getaffinity(0)) == cpus  # the caller's thread untouched
    finally:
        native.pin_threads(before)
    free = native.moe(x, ids, weights, gate, up, down, n_threads=2)
    assert str(cpus[1]) not in _allowed_cpus_of_threads()
    assert torch.equal(pinned, free)  # where a thread runs changes nothing else
