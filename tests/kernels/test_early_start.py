"""A decode call's CPU part posted before its routing exists (csrc/runner.c's start_after,
CpuKernels.start_moe_after, CpuExperts.start_early; TANDEM_SHARE_EARLY).

On the GPU machine the runner polls the CUDA event recorded after the segment that writes the
routing to pinned memory. Here a C-callable Python function stands in for cudaEventQuery (600,
"not ready", until the test has written the inputs): the thing under test is the runner's wait,
its split of the token's slots by count and the op after it, checked against the float oracle.
"""

from __future__ import annotations

import ctypes
import threading
import time

import numpy as np
import pytest
import torch

from expert_checks import moe_reference, ud_iq1_s_experts
from logit_checks import relative_error
from tandem.errors import KernelError
from tandem.kernels import native
from tandem.kernels.cpu import CpuKernels
from tandem.kernels.experts import CpuExperts
from tandem.kernels.gpu_share import GpuShare, Launched, ShareBalance
from tandem.kernels.tensors import QuantTensor

N_EXPERT, N_FF, D, K = 16, 512, 256, 8
Q8_ACTIVATION_TOL = 0.03
NOT_READY = 600  # cudaErrorNotReady
READY_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)
COPY_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                           ctypes.c_void_p)
RECORD_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
SET_DEVICE_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)


class Readiness:
    """A C function pointer that answers like cudaEventQuery: 600 until `set`, then 0 (or
    `error`), counting how often the runner asked."""

    def __init__(self, error: int = 0):
        self.done, self.error, self.polls = threading.Event(), error, 0
        self._fn = READY_FN(self._query)  # kept alive: the runner calls it
        self.address = ctypes.cast(self._fn, ctypes.c_void_p).value

    def _query(self, _event) -> int:
        self.polls += 1
        return self.error if self.done.is_set() else NOT_READY


class HostRuntime:
    """Host stand-ins for the three CUDA runtime functions the runner queues a GPU share's copies
    with (cudaMemcpyAsync as a memmove, cudaEventRecord, cudaSetDevice), each call logged in
    order; `copy_error`: what every copy returns instead."""

    def __init__(self, copy_error: int = 0):
        self.copy_error, self.calls = copy_error, []
        self._fns = (COPY_FN(self._copy), RECORD_FN(self._record), SET_DEVICE_FN(self._set_device))
        self.addresses = [ctypes.cast(fn, ctypes.c_void_p).value for fn in self._fns]

    def _copy(self, dst, src, n, kind, stream) -> int:
        if self.copy_error:
            return self.copy_error
        ctypes.memmove(dst, src, n)
        self.calls.append(("copy", n, kind, stream))
        return 0

    def _record(self, event, stream) -> int:
        self.calls.append(("record", event, stream))
        return 0

    def _set_device(self, device) -> int:
        self.calls.append(("device", device))
        return 0


SIZES = (96, 64, 80)  # bytes of one expert's gate, up, down in the copies' test


def share_copies(runtime: HostRuntime, capacity: int = 4) -> tuple[native.ShareCopies, list, list]:
    """A plan over host arrays: each matrix's N_EXPERT experts of distinct bytes, and each
    half's slots (zeros)."""
    rng = np.random.default_rng(0)
    sources = [rng.integers(0, 256, N_EXPERT * size, dtype=np.uint8) for size in SIZES]
    slots = [[np.zeros(capacity * size, dtype=np.uint8) for size in SIZES] for _ in range(2)]
    plan = native.ShareCopies(*runtime.addresses, 0x42, (0x1000, 0x2000),
                              tuple(a.ctypes.data for a in sources), SIZES,
                              tuple(tuple(a.ctypes.data for a in half) for half in slots), 3)
    return plan, sources, slots


@pytest.fixture(scope="module")
def experts():
    return ud_iq1_s_experts(N_EXPERT, N_FF, D, seed=5)


@pytest.fixture(scope="module")
def kernels():
    with CpuKernels(n_threads=2) as k:
        yield k


def inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, D, generator=g), torch.randperm(N_EXPERT, generator=g)[:K].view(1, K),
            torch.rand(1, K, generator=g))


def empty() -> torch.Tensor:
    return torch.empty(1, D)


def lowest_skipped(ids: torch.Tensor, weights: torch.Tensor, n_skip: int,
                   resident: frozenset[int] = frozenset()) -> torch.Tensor:
    """The routing weights with the slots of `resident` experts and of the n_skip lowest other
    ids zeroed: what the CPU part computes."""
    kept = weights.clone()
    row = ids[0].tolist()
    others = sorted(e for e in row if e not in resident)[:n_skip]
    for slot, e in enumerate(row):
        if e in resident or e in others:
            kept[0, slot] = 0.0
    return kept


def flags(experts: set[int]) -> torch.Tensor:
    out = torch.zeros(N_EXPERT, dtype=torch.uint8)
    out[list(experts)] = 1
    return out


@pytest.mark.parametrize("n_skip", [0, 3, 7])
def test_the_runner_waits_for_the_inputs_then_computes_the_unskipped_slots(kernels, experts, n_skip):
    (gate, g_ref), (up, u_ref), (down, d_ref) = experts
    x, ids, weights = (torch.zeros(1, D), torch.zeros(1, K, dtype=torch.long), torch.zeros(1, K))
    out, ready = torch.empty(1, D), Readiness()
    running = kernels.start_moe_after(ready.address, 0, x, ids, weights, n_skip, gate, up, down, out=out)
    time.sleep(0.02)
    assert ready.polls > 0  # asked, and waited: the buffers are still zeros
    written = inputs(n_skip)
    for buffer, value in zip((x, ids, weights), written, strict=True):
        buffer.copy_(value)
    ready.done.set()
    ours = running.result()
    expected = moe_reference(x, ids, lowest_skipped(ids, weights, n_skip), g_ref, u_ref, d_ref)
    assert ours is out and relative_error(ours, expected) < Q8_ACTIVATION_TOL
    others = moe_reference(x, ids, lowest_skipped(ids, weights, n_skip + 1), g_ref, u_ref, d_ref)
    assert relative_error(others, expected) > 0.05  # the oracle tells the splits apart


def test_a_failed_wait_or_a_repeated_expert_fails_the_call_and_frees_the_runner(kernels, experts):
    (gate, _), (up, _), (down, _) = experts
    x, ids, weights = inputs(1)
    failing = Readiness(error=719)  # cudaErrorLaunchFailure
    failing.done.set()
    running = kernels.start_moe_after(failing.address, 0, x, ids, weights, 2, gate, up, down, out=empty())
    with pytest.raises(KernelError, match="waiting for its inputs failed"):
        running.result()
    twice = ids.clone()
    twice[0, 1] = twice[0, 0]
    ready = Readiness()
    ready.done.set()
    running = kernels.start_moe_after(ready.address, 0, x, twice, weights, 2, gate, up, down, out=empty())
    with pytest.raises(KernelError, match="chose one expert twice"):
        running.result()
    with pytest.raises(KernelError, match="ids must be"):
        kernels.start_moe_after(ready.address, 0, x, ids.int(), weights, 2, gate, up, down, out=empty())
    with pytest.raises(KernelError, match="skips 0..8"):
        kernels.start_moe_after(ready.address, 0, x, ids, weights, 9, gate, up, down, out=empty())


@pytest.mark.parametrize(("resident", "n_skip"), [({12, 3}, 2), ({12, 3, 6}, 0), ({0}, 3), ({1, 2}, 6)])
def test_experts_held_in_vram_go_to_the_gpu_before_the_lowest_others(kernels, experts, resident, n_skip):
    """Flags of experts the share holds in VRAM (a prefetch): their slots are the GPU's where
    the token chose them, then the n_skip lowest other ids; flagged experts it did not choose
    count for nothing."""
    (gate, g_ref), (up, u_ref), (down, d_ref) = experts
    ready = Readiness()
    ready.done.set()
    x, _, weights = inputs(11)
    ids = torch.tensor([[9, 2, 3, 14, 4, 11, 7, 0]])  # 12, 6, 1 not chosen
    running = kernels.start_moe_after(ready.address, 0, x, ids, weights, n_skip, gate, up, down, out=empty(),
                                      resident=flags(resident))
    kept = lowest_skipped(ids, weights, n_skip, frozenset(resident))
    held = len(resident & set(ids[0].tolist()))
    assert int((kept == 0).sum()) == min(K, held + n_skip)
    expected = moe_reference(x, ids, kept, g_ref, u_ref, d_ref)
    assert relative_error(running.result(), expected) < Q8_ACTIVATION_TOL


def test_resident_flags_are_checked_and_never_come_with_runner_copies(kernels, experts):
    (gate, _), (up, _), (down, _) = experts
    ready = Readiness()
    x, ids, weights = inputs(12)
    with pytest.raises(KernelError, match=r"resident must be a contiguous uint8 \[16\]"):
        kernels.start_moe_after(ready.address, 0, x, ids, weights, 2, gate, up, down, out=empty(),
                                resident=torch.zeros(8, dtype=torch.uint8))
    plan, _, _ = share_copies(HostRuntime())
    with pytest.raises(KernelError, match="not with experts held in VRAM"):
        kernels.start_moe_after(ready.address, 0, x, ids, weights, 2, gate, up, down, out=empty(),
                                copies=plan, resident=flags({1}))


def test_the_runner_queues_the_gpu_experts_copies_in_halves_before_its_op(kernels, experts):
    """A call started with share copies: once the inputs are in, the runner copies the n_skip
    lowest experts' gate, up and down bytes into the two halves' slot rows (the first ceil(n/2)
    experts, then the rest; runs of consecutive ids as one copy, host to device, on the plan's
    stream and device), records each half's event after its copies, and still computes the
    other slots' experts."""
    (gate, g_ref), (up, u_ref), (down, d_ref) = experts
    runtime = HostRuntime()
    plan, sources, slots = share_copies(runtime)
    x, _, weights = inputs(9)
    ids = torch.tensor([[9, 2, 3, 14, 4, 11, 7, 0]])  # the 5 lowest: 0, 2, 3 | 4, 7
    ready = Readiness()
    out = empty()
    running = kernels.start_moe_after(ready.address, 0, x, ids, weights, 5, gate, up, down, out=out,
                                      copies=plan)
    time.sleep(0.02)
    assert not runtime.calls  # nothing before the inputs are in
    ready.done.set()
    assert running.copies_queued() == 0
    for half, experts_of_half in enumerate(([0, 2, 3], [4, 7])):
        for m, size in enumerate(SIZES):
            for row, e in enumerate(experts_of_half):
                slot = slots[half][m][row * size : (row + 1) * size]
                assert (slot == sources[m][e * size : (e + 1) * size]).all()
    assert not slots[1][0][2 * SIZES[0]:].any()  # no third row in the second half
    copies = [("copy", n * size, 1, 0x42) for size in SIZES for n in (1, 2)]  # 0 | 2, 3 per matrix
    second = [("copy", size, 1, 0x42) for size in SIZES for _ in range(2)]  # 4 | 7 per matrix
    assert runtime.calls == [("device", 3), *copies, ("record", 0x1000, 0x42),
                             *second, ("record", 0x2000, 0x42)]
    ours = running.result()
    expected = moe_reference(x, ids, lowest_skipped(ids, weights, 5), g_ref, u_ref, d_ref)
    assert relative_error(ours, expected) < Q8_ACTIVATION_TOL


def test_failed_copies_are_reported_and_a_failed_wait_fails_both(kernels, experts):
    """A copy that fails: its CUDA code from copies_queued, the op computed all the same (the
    caller copies instead). A failed wait for the inputs: no copies, its code from both."""
    (gate, g_ref), (up, u_ref), (down, d_ref) = experts
    x, ids, weights = inputs(10)
    ready = Readiness()
    ready.done.set()
    plan, _, _ = share_copies(HostRuntime(copy_error=2))  # cudaErrorMemoryAllocation
    running = kernels.start_moe_after(ready.address, 0, x, ids, weights, 3, gate, up, down, out=empty(),
                                      copies=plan)
    assert running.copies_queued() == 2
    expected = moe_reference(x, ids, lowest_skipped(ids, weights, 3), g_ref, u_ref, d_ref)
    assert relative_error(running.result(), expected) < Q8_ACTIVATION_TOL
    failing, runtime = Readiness(error=719), HostRuntime()
    failing.done.set()
    plan, _, _ = share_copies(runtime)
    running = kernels.start_moe_after(failing.address, 0, x, ids, weights, 3, gate, up, down, out=empty(),
                                      copies=plan)
    assert running.copies_queued() == -6 and not runtime.calls
    with pytest.raises(KernelError, match="waiting for its inputs failed"):
        running.result()
    running = kernels.start_moe_after(ready.address, 0, x, ids, weights, 3, gate, up, down, out=empty())
    with pytest.raises(KernelError, match="carries no GPU share copies"):
        running.copies_queued()
    running.result()


@pytest.mark.parametrize(("share", "counts"), [(0.0, (0, 0)), (0.45, (3, 4)), (0.5, (4, 4)), (0.75, (6, 6))])
def test_an_early_call_splits_like_the_share_and_sums_to_the_oracle(kernels, experts, monkeypatch, share,
                                                                     counts):
    """CpuExperts.start_early, then compute_shared with it: the GPU share (its kernels run on
    the CPU here) takes the balance's count of the lowest ids, the runner the others; the sum
    meets the float oracle, and the balance's carry moves as in an ordinary call."""
    (gate, g_ref), (up, u_ref), (down, d_ref) = experts
    ready = Readiness()
    monkeypatch.setattr(GpuShare, "event_query", lambda self, event: (ready.address, 0))
    gpu_share = GpuShare("cpu", max_experts=K)
    gpu_share.early = True
    moe = CpuExperts(kernels, gate, up, down, share=gpu_share, balance=ShareBalance(share, fixed=True))
    for seed, count in zip((1, 2), counts, strict=True):
        x, ids, weights = torch.zeros(1, D), torch.zeros(1, K, dtype=torch.long), torch.zeros(1, K)
        ready.done.clear()
        early = moe.start_early(x, ids, weights, inputs_in=None)
        assert early is not None and early.n_gpu == count  # 0.45 of 8: 3.6 -> 3, then 3.6 + 0.6 -> 4
        assert not early.copies  # off CUDA the share copies when it launches
        for buffer, value in zip((x, ids, weights), inputs(seed), strict=True):
            buffer.copy_(value)
        ready.done.set()
        before = kernels.expert_bytes_read
        ours = moe.compute_shared(x, x, ids, weights, early=early)
        expected = moe_reference(x, ids, weights, g_ref, u_ref, d_ref)
        assert relative_error(ours, expected) < Q8_ACTIVATION_TOL
        assert kernels.expert_bytes_read - before == K * sum(w.expert_bytes() for w in (gate, up, down))


@pytest.mark.parametrize("hits", [0, 1, 2])
def test_an_early_call_gives_the_gpu_its_prefetched_experts_first(kernels, experts, monkeypatch, hits):
    """A layer with experts prefetched into VRAM (TANDEM_SHARE_PREFETCH) still starts early:
    the GPU takes the prefetched experts the token chose, then the balance's share of k less
    the prefetched (0.5 of 6: 3) among the others, lowest first; the sum meets the oracle, and
    the bytes counted are each expert once."""
    (gate, g_ref), (up, u_ref), (down, d_ref) = experts
    ready = Readiness()
    monkeypatch.setattr(GpuShare, "event_query", lambda self, event: (ready.address, 0))
    gpu_share = GpuShare("cpu", max_experts=K)
    gpu_share.early, gpu_share.prefetch_rows = True, 2
    moe = CpuExperts(kernels, gate, up, down, share=gpu_share, balance=ShareBalance(0.5, fixed=True))
    x, ids, weights = inputs(13)
    chosen, missed = ids[0].tolist(), [e for e in range(N_EXPERT) if e not in ids[0].tolist()]
    predicted = chosen[-hits:][:hits] + missed[: 2 - hits]  # `hits` of the 2 prefetched chosen
    gpu_share.prefetch((gate, up, down), predicted)
    buffers = torch.zeros(1, D), torch.zeros(1, K, dtype=torch.long), torch.zeros(1, K)
    before = kernels.expert_bytes_read
    early = moe.start_early(*buffers, inputs_in=None)
    assert early is not None and early.n_gpu == 3 and early.resident == frozenset(predicted)
    for buffer, value in zip(buffers, (x, ids, weights), strict=True):
        buffer.copy_(value)
    ready.done.set()
    ours = moe.compute_shared(x, *buffers, early=early)
    assert relative_error(ours, moe_reference(x, ids, weights, g_ref, u_ref, d_ref)) < Q8_ACTIVATION_TOL
    assert gpu_share.counts["from_prefetch"] == hits
    one_expert = sum(w.expert_bytes() for w in (gate, up, down))
    assert kernels.expert_bytes_read - before == K * one_expert
    cpu_part = early.cpu.result()  # the runner's half alone: the GPU's slots left out
    kept = lowest_skipped(ids, weights, 3, frozenset(predicted))
    assert relative_error(cpu_part, moe_reference(x, ids, kept, g_ref, u_ref, d_ref)) < Q8_ACTIVATION_TOL


def test_no_early_start_when_off_above_its_share_or_with_a_cache_in_vram(kernels, experts, monkeypatch):
    (gate, _), (up, _), (down, _) = experts
    ready = Readiness()
    monkeypatch.setattr(GpuShare, "event_query", lambda self, event: (ready.address, 0))
    monkeypatch.setenv("TANDEM_SHARE_EARLY", "0")
    gpu_share = GpuShare("cpu", max_experts=K)
    moe = CpuExperts(kernels, gate, up, down, share=gpu_share)
    x, ids, weights = inputs(3)
    assert not gpu_share.early and moe.start_early(x, ids, weights, None) is None
    gpu_share.early = True
    moe.balance.share = 0.9  # 7.2 of 8 experts -> 7, above 75% (a share climbing: the ordinary path)
    assert moe.start_early(x, ids, weights, None) is None
    assert moe.balance.take(K) == 7  # its carry untouched: 7.2 -> 7 as the first time
    monkeypatch.setenv("TANDEM_SHARE_EARLY_UP_TO", "50")
    moe.balance.share = 0.7  # 5.6 -> 5 of 8, above 50%
    assert GpuShare("cpu", max_experts=K).early_up_to == 0.5
    gpu_share.early_up_to = 0.5
    assert moe.start_early(x, ids, weights, None) is None
    monkeypatch.setenv("TANDEM_SHARE_EARLY_UP_TO", "half")
    with pytest.raises(KernelError, match="TANDEM_SHARE_EARLY_UP_TO must be a whole number"):
        GpuShare("cpu", max_experts=K)
    moe.balance.share = 0.5
    two_tokens = torch.zeros(2, D), torch.zeros(2, K, dtype=torch.long), torch.zeros(2, K)
    assert moe.start_early(*two_tokens, None) is None
    gpu_share.keep_in_vram([(gate, up, down)], 4 * sum(w.expert_bytes() for w in (gate, up, down)))
    assert moe.start_early(x, ids, weights, None) is None  # a cache: how many the token hits is unknown
    monkeypatch.delenv("TANDEM_SHARE_EARLY")
    monkeypatch.delenv("TANDEM_SHARE_EARLY_UP_TO")
    default = GpuShare("cpu", max_experts=K)
    assert default.early and default.early_up_to == 0.75
    assert not default.copies_on_runner  # the caller copies unless TANDEM_SHARE_RUNNER_COPIES=1
    monkeypatch.setenv("TANDEM_SHARE_RUNNER_COPIES", "1")
    assert GpuShare("cpu", max_experts=K).copies_on_runner


@pytest.mark.cuda
def test_the_runner_waits_for_a_cuda_event_before_it_reads_what_the_gpu_wrote(kernels, experts):
    """The real readiness query: the inputs reach pinned memory by copies queued behind a GPU
    sleep of ~50 ms, the event after them; the runner, posted at once, computes on the copied
    values (zeros until then), as the oracle does."""
    (gate, g_ref), (up, u_ref), (down, d_ref) = experts
    share = GpuShare("cuda", max_experts=K)
    x, ids, weights = (torch.zeros(1, D).pin_memory(), torch.zeros(1, K, dtype=torch.long).pin_memory(),
                       torch.zeros(1, K).pin_memory())
    written = [t.cuda() for t in inputs(4)]
    torch.cuda.synchronize()
    torch.cuda._sleep(100_000_000)  # ~50 ms at ~2 GHz
    for buffer, value in zip((x, ids, weights), written, strict=True):
        buffer.copy_(value, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    query = share.event_query(event)
    assert query is not None, "no CUDA runtime library found to query the event"
    running = kernels.start_moe_after(*query, x, ids, weights, 2, gate, up, down, out=empty().pin_memory())
    assert not event.query()  # posted while the GPU still sleeps
    ours = running.result()
    expected = moe_reference(x, ids, lowest_skipped(ids, weights, 2), g_ref, u_ref, d_ref)
    assert relative_error(ours, expected) < Q8_ACTIVATION_TOL


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["runner-copies", "caller-copies", "prefetched"])
def test_early_calls_whose_runner_copies_the_gpu_experts_meet_the_oracle(kernels, experts, tmp_path,
                                                                        monkeypatch, mode):
    """On the GPU: early calls of 2..6 GPU experts whose copies the runner queues from the
    pinned file mapping once the routing is in (TANDEM_SHARE_RUNNER_COPIES; the caller's when
    0), the inputs written behind a GPU sleep; the sums meet the float oracle. `prefetched`:
    two experts of each call, one of them chosen, prefetched into VRAM first (the caller
    copies then)."""
    on_runner = mode != "caller-copies"
    monkeypatch.setenv("TANDEM_SHARE_RUNNER_COPIES", "1" if on_runner else "0")
    mapped = []
    for i, (q, _) in enumerate(experts):
        path = tmp_path / f"w{i}.bin"
        q.data.tofile(path)
        mapped.append(QuantTensor(q.ggml_type, q.shape, np.memmap(path, dtype=np.uint8, mode="r")))
    refs = [ref for _, ref in experts]
    share = GpuShare("cuda", max_experts=K)
    share.prefetch_rows = 2 if mode == "prefetched" else 0
    share.pin([q.data for q in mapped], [mapped])
    assert share.wait(120), share.skipped
    moe = CpuExperts(kernels, *mapped, share=share, balance=ShareBalance(0.5, fixed=True))
    try:
        x, ids, weights = inputs(20)
        moe.compute_shared(x.cuda(), x.pin_memory(), ids, weights)  # an ordinary call makes the copy events
        buffers = (torch.zeros(1, D).pin_memory(), torch.zeros(1, K, dtype=torch.long).pin_memory(),
                   torch.zeros(1, K).pin_memory())
        for seed, fraction in enumerate([0.25, 0.5, 0.75, 0.375, 0.625] * 2):
            moe.balance = ShareBalance(fraction, fixed=True)
            written = [t.cuda() for t in inputs(30 + seed)]
            if share.prefetch_rows:
                chosen = written[1][0].tolist()
                missed = next(e for e in range(N_EXPERT) if e not in chosen)
                share.prefetch(mapped, [chosen[seed % K], missed])
            torch.cuda.synchronize()
            torch.cuda._sleep(20_000_000)  # ~10 ms: the call is posted before its inputs are in
            for buffer, value in zip(buffers, written, strict=True):
                buffer.copy_(value, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            early = moe.start_early(*buffers, inputs_in=event)
            others = K - share.prefetch_rows
            assert early is not None and early.n_gpu == int(fraction * others)
            assert early.copies == (mode == "runner-copies")
            event.synchronize()
            ours = moe.compute_shared(written[0], *buffers, early=early)
            expected = moe_reference(*(b.clone() for b in buffers), *refs)
            assert ours.is_cuda and relative_error(ours.cpu(), expected) < Q8_ACTIVATION_TOL
        assert share.copies_on_runner == on_runner  # no copy failed
        assert share.counts["from_prefetch"] == (10 if mode == "prefetched" else 0)
    finally:
        share.close()


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_a_shared_call_writes_its_sum_into_a_given_buffer(kernels, experts, share):
    (gate, g_ref), (up, u_ref), (down, d_ref) = experts
    moe = CpuExperts(kernels, gate, up, down, share=GpuShare("cpu", max_experts=K),
                     balance=ShareBalance(share, fixed=True))
    x, ids, weights = inputs(6)
    out = torch.full((1, D), float("nan"))
    assert moe.compute_shared(x, x, ids, weights, out=out) is out
    assert relative_error(out, moe_reference(x, ids, weights, g_ref, u_ref, d_ref)) < Q8_ACTIVATION_TOL


def test_a_call_that_captured_a_graph_leaves_the_balance_alone(kernels, experts):
    """A launch that captured a CUDA graph (a first expert count) waited for the whole GPU: the
    GPU then looks first whatever the split; the balance learns nothing from it."""
    (gate, _), (up, _), (down, _) = experts
    moe = CpuExperts(kernels, gate, up, down, share=GpuShare("cpu", max_experts=K))
    cpu, gpu_out = torch.zeros(1, D), torch.zeros(1, D)
    moe._combine(cpu, Launched(gpu_out, done=None, captured=True), moe.balance)
    assert moe.balance.share == 0.5
    moe._combine(cpu, Launched(gpu_out, done=None), moe.balance)  # off CUDA: the GPU's part ran first
    assert moe.balance.share > 0.5


def test_closing_the_runner_gives_up_a_wait_for_inputs_that_never_come(experts):
    """A call whose inputs never arrive (a GPU step that failed before its event) must not hang
    the owner's close: the runner gives up the wait when it is freed."""
    (gate, _), (up, _), (down, _) = experts
    runner, never = native.MoeRunner(), Readiness()
    x, ids, weights = inputs(7)
    running = runner.start_after(never.address, 0, x, ids, weights, 2, gate, up, down, 1, empty())
    assert running is not None
    closer = threading.Thread(target=runner.close)
    closer.start()
    closer.join(timeout=10)
    assert not closer.is_alive(), "close() still waits for the call's inputs"
    assert never.polls > 0
