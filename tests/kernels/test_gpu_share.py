"""Decode tokens split between a GPU share and the CPU kernels (kernels.gpu_share), against the
float MoE oracle on gguf-py's dequantized weights. Off CUDA the share runs on the CPU device
with the same splitting and arithmetic (eager, no pinning, no streams); the GPU run, with the
weights in a read-only file mapping registered with CUDA, is marked cuda."""

from __future__ import annotations

from concurrent.futures import Future

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from expert_checks import make_weight, moe_reference, routing
from logit_checks import relative_error
from tandem.errors import KernelError
from tandem.kernels import gpu_share, native
from tandem.kernels.cpu import SKIPPED_SLOT, CpuKernels
from tandem.kernels.experts import CpuExperts
from tandem.kernels.gpu_share import MAX_TOKENS, GpuShare, ShareBalance, max_experts_for, split
from tandem.kernels.tensors import QuantTensor

RECIPES = {"ud-iq1_s": (T.IQ1_S, T.IQ1_S, T.IQ2_XXS), "q4_k_m": (T.Q4_K, T.Q4_K, T.Q6_K)}
N_EXPERT, N_FF, D, K = 8, 512, 256, 4
Q8_ACTIVATION_TOL = 0.03  # the CPU's part rounds activations to int8 (as test_cpu)


@pytest.fixture(scope="module")
def kernels():
    with CpuKernels() as k:
        yield k


@pytest.fixture(scope="module")
def experts():
    rng = np.random.default_rng(11)
    made = {}
    for recipe, types in RECIPES.items():
        shapes = [(N_EXPERT, N_FF, D), (N_EXPERT, N_FF, D), (N_EXPERT, D, N_FF)]
        made[recipe] = [make_weight(t, shape, rng) for t, shape in zip(types, shapes, strict=True)]
    return made


def _run(experts_obj: CpuExperts, x, ids, weights):
    return experts_obj.collect(experts_obj.submit(x, ids, weights))


@pytest.mark.parametrize("cpu_first", [False, True], ids=["gpu-first", "cpu-first"])
@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("share", [0.0, 0.25, 0.5, 1.0])  # 0, 1 (one half), 2 and 4 experts
def test_split_tokens_match_the_float_reference(kernels, experts, recipe, share, cpu_first):
    """Either order (TANDEM_SHARE_CPU_FIRST: the CPU's part on the kernels' thread, with one
    thread fewer, while the GPU's is launched) gives the oracle's sum."""
    (gate, g_ref), (up, u_ref), (down, d_ref) = experts[recipe]
    gpu_share = GpuShare("cpu", max_experts=N_EXPERT)
    gpu_share.cpu_first = cpu_first
    moe = CpuExperts(kernels, gate, up, down, share=gpu_share, balance=ShareBalance(share, fixed=True))
    assert moe.shares(1)
    x = torch.randn(1, D, generator=torch.Generator().manual_seed(1))
    ids, weights = routing(1, k=K, n_expert=N_EXPERT, seed=3)
    expected = moe_reference(x, ids, weights, g_ref, u_ref, d_ref)
    for ours in (_run(moe, x, ids, weights), moe.compute_shared(x, x.clone(), ids, weights)):
        assert relative_error(ours, expected) < Q8_ACTIVATION_TOL
    wrong = moe_reference(x, (ids + 1) % N_EXPERT, weights, g_ref, u_ref, d_ref)
    assert relative_error(wrong, expected) > 0.5  # the oracle tells experts apart


def test_the_share_part_alone_is_float_exact(experts):
    """All experts on the share: float32 activations, no int8 rounding, so it meets the oracle
    to float32 summation order (the CPU kernels' int8 activations could not)."""
    for recipe in RECIPES:
        (gate, g_ref), (up, u_ref), (down, d_ref) = experts[recipe]
        x = torch.randn(1, D)
        ids, weights = routing(1, k=K, n_expert=N_EXPERT, seed=5)
        used = ids[0].tolist()
        launched = GpuShare("cpu", max_experts=N_EXPERT).launch(x, ids, weights, used, gate, up, down)
        expected = moe_reference(x, ids, weights, g_ref, u_ref, d_ref)
        assert relative_error(launched.out, expected) < 1e-5


def test_balance_turns_a_share_into_whole_experts_and_moves_toward_the_slower_side():
    balance = ShareBalance(0.55)
    taken = [balance.take(8) for _ in range(100)]
    assert set(taken) == {4, 5} and sum(taken) == pytest.approx(0.55 * 8 * 100, abs=1)
    balance.update(gpu_first=True)
    assert balance.share > 0.55
    for _ in range(100):
        balance.update(gpu_first=False)
    assert balance.share == 0.0 and balance.take(8) == 0
    fixed = ShareBalance(0.25, fixed=True)
    fixed.update(gpu_first=True)
    assert fixed.share == 0.25
    with pytest.raises(KernelError, match="GPU expert share must lie in \\[0, 1\\], got 1.5"):
        ShareBalance(1.5)


def test_balance_walks_back_from_a_far_share_in_few_calls_and_then_holds_at_the_crossing():
    """The two sides' times of run v's UD-IQ1_S profile, 8 experts a token: the CPU op 0.267 ms
    an expert + 0.147, the GPU part 0.21 + 0.226; the side done first asks for more."""
    def call(balance: ShareBalance) -> int:
        gpu_experts = balance.take(8)
        cpu_ms, gpu_ms = 0.267 * (8 - gpu_experts) + 0.147, 0.21 * gpu_experts + 0.226
        balance.update(gpu_first=gpu_ms < cpu_ms)
        return gpu_experts
    for start, reached in ((1.0, lambda g: g <= 5), (0.0, lambda g: g >= 4)):
        balance = ShareBalance(start)
        calls = next(i for i in range(1, 50) if reached(call(balance)))
        assert calls <= 10, f"from {start}: {calls} calls (a fixed 0.02 a call took 16 from 1.0)"
        overshoot = [call(balance) for _ in range(10)]
        assert min(overshoot) >= 3 and max(overshoot) <= 6
        assert {call(balance) for _ in range(200)} == {4, 5}  # 4 leaves the CPU last, 5 the GPU


def test_a_single_tokens_split_takes_the_lowest_ids_up_to_the_limit():
    ids = torch.tensor([[7, 3, 200, 5]])
    gpu, cpu_ids = split(ids, 2)
    assert gpu == [3, 5] and cpu_ids.tolist() == [[7, SKIPPED_SLOT, 200, SKIPPED_SLOT]]
    assert cpu_ids.dtype == ids.dtype
    assert split(ids, 3, limit=1)[0] == [3]
    assert split(ids, 9)[0] == [3, 5, 7, 200]
    assert split(ids, 1, resident={200})[0] == [200, 3]  # held in VRAM: first, beyond n
    none, unchanged = split(ids, 0)
    assert none == [] and unchanged is ids


def test_split_gives_the_gpu_experts_with_fewest_tokens_first(monkeypatch):
    ids = torch.tensor([[0, 1, 2], [0, 1, 3], [0, 4, 3]])  # counts: 0:3, 1:2, 2:1, 3:2, 4:1
    monkeypatch.setenv("TANDEM_SHARE_BATCH_PAIRS", "1")
    gpu, cpu_ids = split(ids, 3)
    assert gpu == [2, 4, 1]  # one token each, then two (ties by id)
    assert cpu_ids.tolist() == [[0, SKIPPED_SLOT, SKIPPED_SLOT], [0, SKIPPED_SLOT, 3], [0, SKIPPED_SLOT, 3]]
    assert split(ids, 1)[0] == [2]
    assert split(ids, 9, limit=5)[0] == [2, 4, 1]  # 3 would make 6 pairs, 0 seven
    assert split(ids, 9, limit=3)[0] == [2, 4]
    assert split(torch.tensor([[0], [0], [0]]), 1, limit=4)[0] == []  # 3 pairs: no half of 2 holds them
    none, unchanged = split(ids, 0)
    assert none == [] and torch.equal(unchanged, ids)
    monkeypatch.delenv("TANDEM_SHARE_BATCH_PAIRS")  # the default: one token's experts only
    assert split(ids, 3)[0] == [2, 4]
    assert split(ids, 3, shared_experts=True)[0] == [2, 4, 1]


def test_balanced_calls_stay_correct_while_the_share_moves(kernels, experts):
    (gate, g_ref), (up, u_ref), (down, d_ref) = experts["ud-iq1_s"]
    moe = CpuExperts(kernels, gate, up, down, share=GpuShare("cpu", max_experts=K))
    shares = []
    for seed in range(12):
        x = torch.randn(1, D)
        ids, weights = routing(1, k=K, n_expert=N_EXPERT, seed=seed)
        ours = _run(moe, x, ids, weights)
        assert relative_error(ours, moe_reference(x, ids, weights, g_ref, u_ref, d_ref)) < Q8_ACTIVATION_TOL
        shares.append(moe.balance.share)
    assert len(set(shares)) > 1  # it moved


def test_long_batches_and_foreign_types_do_not_share(kernels, experts, rng):
    (gate, _), (up, _), (down, _) = experts["ud-iq1_s"]
    moe = CpuExperts(kernels, gate, up, down, share=GpuShare("cpu", max_experts=K))
    assert moe.shares(1) and moe.shares(MAX_TOKENS) and not moe.shares(MAX_TOKENS + 1)
    x = torch.randn(MAX_TOKENS + 1, D)
    ids, weights = routing(MAX_TOKENS + 1, k=K, n_expert=N_EXPERT)
    assert not isinstance(moe.submit(x, ids, weights), type(moe.submit(x[:1], ids[:1], weights[:1])))
    odd, _ = make_weight(T.IQ4_XS, (N_EXPERT, D, N_FF), rng)  # tandem has no CPU kernel for it
    assert CpuExperts(kernels, gate, up, odd, share=GpuShare("cpu", max_experts=K)).share is None
    with pytest.raises(KernelError, match="the GPU share takes 1..4 experts, got 5"):
        GpuShare("cpu", max_experts=K).launch(torch.randn(1, D), torch.zeros(1, 5, dtype=torch.long),
                                              torch.ones(1, 5), [0, 1, 2, 3, 4], gate, up, down)


@pytest.mark.parametrize("on_runner", [True, False], ids=["runner", "executor"])
def test_a_sharing_layers_unshared_calls_run_on_the_kernels_runner(kernels, experts, monkeypatch, on_runner):
    """Batches the share does not take (longer than MAX_TOKENS: prefill) run on the kernels'
    runner, whose OpenMP team the shared calls use too; TANDEM_SHARE_SUBMIT_ON_RUNNER=0 puts
    them on the executor thread (compute: the caller's). Either way the oracle's sum."""
    if not on_runner:
        monkeypatch.setenv("TANDEM_SHARE_SUBMIT_ON_RUNNER", "0")
    (gate, g_ref), (up, u_ref), (down, d_ref) = experts["ud-iq1_s"]
    moe = CpuExperts(kernels, gate, up, down, share=GpuShare("cpu", max_experts=K))
    n = MAX_TOKENS + 3
    x = torch.randn(n, D, generator=torch.Generator().manual_seed(6))
    ids, weights = routing(n, k=K, n_expert=N_EXPERT, seed=6)
    handle = moe.submit(x, ids, weights)
    assert isinstance(handle, native.RunningMoe if on_runner else Future)
    expected = moe_reference(x, ids, weights, g_ref, u_ref, d_ref)
    assert relative_error(moe.collect(handle), expected) < Q8_ACTIVATION_TOL
    assert relative_error(moe.compute(x, ids, weights), expected) < Q8_ACTIVATION_TOL  # waits for it


# -- batches of several tokens (the server's decode steps) -------------------------------------
MANY = 32  # experts: enough that tokens of a batch often choose one alone


@pytest.fixture(scope="module")
def many_experts():
    rng = np.random.default_rng(12)
    types = RECIPES["ud-iq1_s"]
    shapes = [(MANY, N_FF, D), (MANY, N_FF, D), (MANY, D, N_FF)]
    return [make_weight(t, shape, rng) for t, shape in zip(types, shapes, strict=True)]


@pytest.mark.parametrize("which", ["one-token-experts", "all-experts"])
@pytest.mark.parametrize("n_tokens", [2, 5, MAX_TOKENS])
def test_a_batchs_share_alone_is_float_exact_even_over_nan_padding(many_experts, n_tokens, which):
    """A batch's experts on the share, those one token chose or all (an expert several tokens
    chose: copied once, computed for each of its tokens): each pair on its own token's x,
    summed per token; float-exact against the oracle over just those pairs. The halves are
    padded up to compiled pair counts (weight 0); the slot rows no expert took hold NaN bytes
    here and must add exactly nothing."""
    (gate, g_ref), (up, u_ref), (down, d_ref) = many_experts
    x = torch.randn(n_tokens, D, generator=torch.Generator().manual_seed(n_tokens))
    ids, weights = routing(n_tokens, k=K, n_expert=MANY, seed=n_tokens)
    chosen, _ = split(ids, MANY, shared_experts=which == "all-experts", limit=MANY)
    assert len(chosen) >= 3  # a padded half at least once (3 -> 2 + 1, 5 -> 3 + 2 ...)
    if which == "all-experts":
        assert len(chosen) == len(set(ids.flatten().tolist())) < ids.numel()  # some serve several tokens
    share = GpuShare("cpu", max_experts=MANY)
    share._ensure_slots(MANY * sum(w.expert_bytes() for w in (gate, up, down))).fill_(255)
    launched = share.launch(x, ids, weights, chosen, gate, up, down)
    only_chosen = weights * torch.isin(ids, torch.tensor(chosen))
    expected = moe_reference(x, ids, only_chosen, g_ref, u_ref, d_ref)
    assert launched.out.shape == (n_tokens, D) and torch.isfinite(launched.out).all()
    assert relative_error(launched.out, expected) < 1e-5


@pytest.mark.parametrize("share", [0.25, 1.0])
def test_batches_split_between_share_and_cpu_match_the_float_reference(kernels, many_experts, share):
    (gate, g_ref), (up, u_ref), (down, d_ref) = many_experts
    moe = CpuExperts(kernels, gate, up, down, share=GpuShare("cpu", max_experts=MANY, experts_per_token=K),
                     balance=ShareBalance(share, fixed=True))
    for n_tokens in (2, MAX_TOKENS, 1, 3):  # batches and single tokens, alternating balances
        x = torch.randn(n_tokens, D, generator=torch.Generator().manual_seed(10 + n_tokens))
        ids, weights = routing(n_tokens, k=K, n_expert=MANY, seed=10 + n_tokens)
        expected = moe_reference(x, ids, weights, g_ref, u_ref, d_ref)
        read_before = kernels.expert_bytes_read
        assert relative_error(_run(moe, x, ids, weights), expected) < Q8_ACTIVATION_TOL
        assert kernels.expert_bytes_read > read_before
    assert moe.batch_balance.share == share and moe.balance.share == share  # fixed


def test_the_share_refuses_experts_no_token_chose_or_too_many_pairs(many_experts):
    (gate, _), (up, _), (down, _) = many_experts
    ids = torch.tensor([[0, 1, 2, 3], [0, 4, 5, 6]])
    with pytest.raises(KernelError, match=r"experts \[9\] that no token chose"):
        GpuShare("cpu", max_experts=MANY).launch(torch.randn(2, D), ids, torch.ones(2, 4), [0, 9],
                                                 gate, up, down)
    ids = torch.tensor([[0, 1, 2, 3], [0, 4, 5, 6], [0, 1, 5, 7]])  # expert 0: 3 pairs, 1: 2
    with pytest.raises(KernelError, match="5 pairs of 2 experts do not fit two halves of 2 slots"):
        GpuShare("cpu", max_experts=4).launch(torch.randn(3, D), ids, torch.ones(3, 4), [0, 1],
                                              gate, up, down)


@pytest.mark.cuda
@pytest.mark.parametrize("recipe", RECIPES)
def test_gpu_share_from_a_pinned_file_mapping(kernels, experts, recipe, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    mapped = []
    for i, (q, _) in enumerate(experts[recipe]):
        path = tmp_path / f"w{i}.bin"
        q.data.tofile(path)
        mapped.append(QuantTensor(q.ggml_type, q.shape, np.memmap(path, dtype=np.uint8, mode="r")))
    refs = [ref for _, ref in experts[recipe]]
    share = GpuShare("cuda", max_experts=K)
    share.pin([q.data for q in mapped], [mapped])  # and compiles for 1 and 2 experts per half
    assert share.wait(120), share.skipped
    moe = CpuExperts(kernels, *mapped, share=share)
    try:
        # 1..4 experts on the GPU: both halves' graphs for each count, each replayed again
        # with other experts, weights and x (the slots, buffers and events are reused)
        for seed, fraction in enumerate([0.25, 0.5, 0.75, 1.0] * 2):
            moe.balance = ShareBalance(fraction, fixed=True)
            x = torch.randn(1, D)
            ids, weights = routing(1, k=K, n_expert=N_EXPERT, seed=seed)
            expected = moe_reference(x, ids, weights, *refs)
            submitted = _run(moe, x.cuda(), ids.cuda(), weights.cuda())
            computed = moe.compute_shared(x.cuda(), x.pin_memory(), ids, weights)
            for ours in (submitted, computed):
                assert ours.is_cuda
                assert relative_error(ours.cpu(), expected) < Q8_ACTIVATION_TOL
        one_token = [key for key in share._graphs if not key[1]]
        assert share.ready.is_set() and len(one_token) == 4, share.skipped  # (n, half) replayed
        # batches: each GPU expert on its own token's x; the halves padded to compiled counts
        moe.batch_balance = ShareBalance(1.0, fixed=True)
        assert share.batches_ready.wait(120), share.skipped  # compiled after the one-token kernels
        for seed in range(3):
            x = torch.randn(3, D)
            ids, weights = routing(3, k=K, n_expert=N_EXPERT, seed=20 + seed)
            ours = _run(moe, x.cuda(), ids.cuda(), weights.cuda())
            assert ours.shape == (3, D) and ours.is_cuda
            assert relative_error(ours.cpu(), moe_reference(x, ids, weights, *refs)) < Q8_ACTIVATION_TOL
        assert len(share._graphs) > 4, share.skipped  # the one-token graphs kept beside the batches'
        host = torch.from_numpy(np.asarray(mapped[0].data))
        assert host.is_pinned()  # registered: copies from it are DMA
    finally:
        share.close()
    assert not torch.from_numpy(np.asarray(mapped[0].data)).is_pinned()


@pytest.mark.cuda
@pytest.mark.parametrize("recipe", RECIPES)
def test_gpu_share_with_the_triton_kernels(kernels, experts, recipe, monkeypatch):
    """TANDEM_SHARE_TRITON=1: the experts through kernels.share_triton, in the share's graphs,
    one token and batches, meet the float reference as the compiled decoders do."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    pytest.importorskip("triton")
    monkeypatch.setenv("TANDEM_SHARE_TRITON", "1")
    gpu_share._experts_fn.cache_clear()  # built per type mix: again, with the setting
    try:
        types = RECIPES[recipe]
        for batched in (False, True):
            assert gpu_share._experts_fn(*types, batched, True).__name__ == "triton_where_it_fits"
        tensors = [q for q, _ in experts[recipe]]
        refs = [ref for _, ref in experts[recipe]]
        share = GpuShare("cuda", max_experts=K)
        share.pin([q.data for q in tensors], [tensors])
        assert share.wait(120), share.skipped
        moe = CpuExperts(kernels, *tensors, share=share)
        try:
            for seed, fraction in enumerate([0.25, 0.5, 1.0] * 2):
                moe.balance = ShareBalance(fraction, fixed=True)
                x = torch.randn(1, D)
                ids, weights = routing(1, k=K, n_expert=N_EXPERT, seed=40 + seed)
                ours = moe.compute_shared(x.cuda(), x.pin_memory(), ids, weights)
                assert relative_error(ours.cpu(), moe_reference(x, ids, weights, *refs)) < Q8_ACTIVATION_TOL
            moe.batch_balance = ShareBalance(1.0, fixed=True)  # batches: each expert on its token
            assert share.batches_ready.wait(120), share.skipped
            for seed in range(3):
                x = torch.randn(3, D)
                ids, weights = routing(3, k=K, n_expert=N_EXPERT, seed=50 + seed)
                ours = _run(moe, x.cuda(), ids.cuda(), weights.cuda())
                assert relative_error(ours.cpu(), moe_reference(x, ids, weights, *refs)) < Q8_ACTIVATION_TOL
        finally:
            share.close()
    finally:
        gpu_share._experts_fn.cache_clear()


@pytest.mark.cuda
def test_pinning_more_than_ram_is_refused_with_the_reason(experts):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    share = GpuShare("cuda", max_experts=K)
    share.pin([experts["ud-iq1_s"][0][0].data], ram=1 << 20)
    assert not share.wait(60)
    assert "would not fit in RAM" in share.skipped


@pytest.mark.cuda
def test_a_share_serves_its_gpu_by_any_name():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    share = GpuShare("cuda", max_experts=K)
    assert share.serves("cuda") and share.serves(torch.device("cuda:0")) and not share.serves("cpu")


def test_batch_slots_default_to_half_a_full_batch_and_take_a_setting(monkeypatch):
    monkeypatch.delenv("TANDEM_SHARE_MAX_EXPERTS", raising=False)
    assert max_experts_for(8) == 8 * MAX_TOKENS // 2
    monkeypatch.setenv("TANDEM_SHARE_MAX_EXPERTS", "48")
    assert max_experts_for(8) == 48
    for bad in ("4", "many", "-8"):  # fewer than one token's experts, or not a count
        monkeypatch.setenv("TANDEM_SHARE_MAX_EXPERTS", bad)
        with pytest.raises(KernelError, match="TANDEM_SHARE_MAX_EXPERTS must be a whole number >= 8"):
            max_experts_for(8)


@pytest.mark.parametrize("setting, warned", [("1", True), ("", False)], ids=["asked", "default"])
def test_without_triton_the_compiled_kernels_stay(setting, warned, monkeypatch, caplog):
    """TANDEM_SHARE_TRITON=1 without Triton warns; the default falls back quietly."""
    import sys

    import tandem.kernels
    monkeypatch.setenv("TANDEM_SHARE_TRITON", setting)
    # as if triton were missing: the import fails (even where an earlier test imported it)
    monkeypatch.setitem(sys.modules, "tandem.kernels.share_triton", None)
    monkeypatch.delattr(tandem.kernels, "share_triton", raising=False)
    gpu_share._experts_fn.cache_clear()
    try:
        with caplog.at_level("WARNING"):
            fn = gpu_share._experts_fn(*RECIPES["ud-iq1_s"], False, True)
        assert fn.__name__ != "triton_where_it_fits"
        assert ("Triton is missing" in caplog.text) == warned
    finally:
        gpu_share._experts_fn.cache_clear()


def test_the_triton_kernels_are_the_default_and_0_turns_them_off(monkeypatch):
    pytest.importorskip("triton")
    types = RECIPES["ud-iq1_s"]
    try:
        for setting, written in (("", True), ("1", True), ("0", False)):
            monkeypatch.setenv("TANDEM_SHARE_TRITON", setting)
            gpu_share._experts_fn.cache_clear()
            fn = gpu_share._experts_fn(*types, False, True)
            assert (fn.__name__ == "triton_where_it_fits") == written, f"TANDEM_SHARE_TRITON={setting!r}"
    finally:
        gpu_share._experts_fn.cache_clear()


def test_triton_kernels_that_fail_give_way_to_the_compiled_ones(monkeypatch, caplog):
    """The dispatch alone (both kernels stand-ins): a failure of the written kernels warns once
    and sends this and every later call to the compiled ones."""
    share_triton = pytest.importorskip("tandem.kernels.share_triton", exc_type=ImportError)
    calls = []

    def written(*args):
        calls.append("written")
        raise RuntimeError("PTX .version 9.4 not supported by this driver")

    monkeypatch.setenv("TANDEM_SHARE_TRITON", "1")
    monkeypatch.setattr(gpu_share.compiling, "compiled", lambda fn, **_: lambda *a: calls.append("compiled"))
    monkeypatch.setattr(share_triton, "experts", written)
    monkeypatch.setattr(share_triton, "fits", lambda *_: True)
    gpu_share._experts_fn.cache_clear()
    try:
        fn = gpu_share._experts_fn(*RECIPES["ud-iq1_s"], False, True)
        with caplog.at_level("WARNING"):
            for _ in range(3):
                fn(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1))
    finally:
        gpu_share._experts_fn.cache_clear()
    assert calls == ["written", "compiled", "compiled", "compiled"]
    assert caplog.text.count("its Triton kernels failed (PTX .version 9.4 not supported") == 1
