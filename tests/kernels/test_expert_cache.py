"""The most used experts kept in VRAM for the GPU share (kernels.expert_cache): which experts
it holds as usage moves, that the share reads them from there, and that results stay those of
the float oracle. Off CUDA the "VRAM" is CPU memory; the logic is the same."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from expert_checks import moe_reference, routing, ud_iq1_s_experts
from logit_checks import relative_error
from tandem.kernels.cpu import CpuKernels
from tandem.kernels.expert_cache import REFRESH_EVERY, SWAPS_PER_REFRESH, LayerCache, layer_capacities
from tandem.kernels.experts import CpuExperts
from tandem.kernels.gpu_share import GpuShare, ShareBalance, split

N_EXPERT, N_FF, D, K = 16, 256, 256, 4
Q8_ACTIVATION_TOL = 0.03


@pytest.fixture(scope="module")
def experts():
    return ud_iq1_s_experts(N_EXPERT, N_FF, D, seed=21)


def _drive(cache: LayerCache, usage: dict[int, int], refreshes: int) -> list[list[tuple[int, int]]]:
    """`refreshes` refresh periods of calls, expert e chosen in usage[e] of every 4 calls."""
    swaps = []
    for call in range(refreshes * REFRESH_EVERY):
        swaps.append(cache.note([e for e, every in usage.items() if call % 4 < every]))
    return [s for s in swaps if s]


def test_a_layer_cache_follows_the_most_used_experts(experts):
    cache = LayerCache([q for q, _ in experts], capacity=3, device=torch.device("cpu"))
    swaps = _drive(cache, {5: 4, 7: 3, 2: 2, 9: 1}, refreshes=2)
    assert all(len(s) <= SWAPS_PER_REFRESH for s in swaps)
    assert set(cache.row_of) == {5, 7, 2} and sorted(cache.row_of.values()) == [0, 1, 2]
    _drive(cache, {11: 4, 12: 4, 13: 4, 5: 1}, refreshes=3)  # the text moved on
    assert set(cache.row_of) == {11, 12, 13}
    assert sorted(cache.row_of.values()) == [0, 1, 2]  # rows reused, none lost


def test_the_budget_is_split_evenly_over_layers(experts):
    three = [q for q, _ in experts]
    per_expert = sum(w.expert_bytes() for w in three)
    assert layer_capacities([three, three], 10 * per_expert) == [5, 5]
    assert layer_capacities([three], 1000 * per_expert) == [N_EXPERT]  # no more than there are
    assert layer_capacities([three], 0) == [0]


def test_split_takes_resident_experts_first_and_keeps_the_limit():
    ids = torch.tensor([[0, 1, 2, 3]])
    assert split(ids, 0, resident={2})[0] == [2]
    assert split(ids, 2, resident={3})[0] == [3, 0, 1]
    assert split(ids, 9, resident={3}, limit=2)[0] == [3, 0]


def test_the_share_reads_resident_experts_from_the_cache(experts):
    (gate, _), (up, _), (down, _) = experts
    x = torch.randn(1, D, generator=torch.Generator().manual_seed(2))
    ids, weights = torch.tensor([[1, 4, 6, 9]]), torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    plain = GpuShare("cpu", max_experts=K).launch(x, ids, weights, [1, 4, 6, 9], gate, up, down).out
    share = GpuShare("cpu", max_experts=K)
    share.keep_in_vram([(gate, up, down)], 4 * sum(w.expert_bytes() for w in (gate, up, down)))
    for _ in range(2 * REFRESH_EVERY):
        share.note_usage(torch.tensor([[4, 9]]), gate)
    assert share.resident(gate) == {4, 9}
    cached = share.launch(x, ids, weights, [1, 4, 6, 9], gate, up, down).out
    assert torch.equal(cached, plain)  # the same bytes, from VRAM
    for rows in share._caches[id(gate)].rows:
        rows.zero_()  # now the cached copies differ from the file: the share must show it
    assert relative_error(share.launch(x, ids, weights, [1, 4, 6, 9], gate, up, down).out, plain) > 0.05
    assert share.counts == Counter(from_cache=4, from_file=4)  # two calls: 4 and 9 cached, 1 and 6 not


def test_decode_with_a_cache_stays_correct_while_it_refreshes(experts):
    (gate, g_ref), (up, u_ref), (down, d_ref) = experts
    share = GpuShare("cpu", max_experts=2 * K, experts_per_token=K)
    share.keep_in_vram([(gate, up, down)], 3 * sum(w.expert_bytes() for w in (gate, up, down)))
    with CpuKernels() as kernels:
        moe = CpuExperts(kernels, gate, up, down, share=share, balance=ShareBalance(0.25, fixed=True))
        for step in range(3 * REFRESH_EVERY):
            ids, weights = routing(1, k=K, n_expert=N_EXPERT, seed=step % 5)  # 5 routings over and over
            x = torch.randn(1, D, generator=torch.Generator().manual_seed(step))
            ours = moe.collect(moe.submit(x, ids, weights))
            expected = moe_reference(x, ids, weights, g_ref, u_ref, d_ref)
            assert relative_error(ours, expected) < Q8_ACTIVATION_TOL
    assert len(share.resident(gate)) == 3


def test_prefetched_experts_are_read_from_vram_for_their_layer_only(experts):
    """TANDEM_SHARE_PREFETCH: experts copied ahead of a layer's call are resident for that
    layer (the share reads them from their rows: spoiling the rows shows), not for another,
    and the next prefetch replaces them."""
    (gate, _), (up, _), (down, _) = experts
    x = torch.randn(1, D, generator=torch.Generator().manual_seed(3))
    ids, weights = torch.tensor([[1, 4, 6, 9]]), torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    plain = GpuShare("cpu", max_experts=K).launch(x, ids, weights, [1, 4, 6, 9], gate, up, down).out
    share = GpuShare("cpu", max_experts=K)
    share.prefetch((gate, up, down), [9, 4, 12])  # off: prefetch_rows is 0
    assert share.resident(gate) == set()
    share.prefetch_rows = 2
    share.prefetch((gate, up, down), [9, 4, 12])  # the two most likely
    assert share.resident(gate) == {9, 4}
    other_layer = (up, gate, down)  # another layer's tensors (its gate is `up` here)
    assert share.resident(up) == set()
    assert torch.equal(share.launch(x, ids, weights, [1, 4, 6, 9], gate, up, down).out, plain)
    for rows in share._ahead.rows:
        rows.zero_()  # the prefetched copies now differ from the file: the share must show it
    assert relative_error(share.launch(x, ids, weights, [1, 4, 6, 9], gate, up, down).out, plain) > 0.05
    share.prefetch(other_layer, [3])
    assert share.resident(gate) == set() and share.resident(up) == {3}
    assert torch.equal(share.launch(x, ids, weights, [1, 4, 6, 9], gate, up, down).out, plain)
    # 9 and 4 taken from their prefetch twice; 3 prefetched for the other layer, not taken
    assert share.counts == Counter(prefetched=3, from_prefetch=4, from_file=8)


def test_decode_with_prefetches_stays_correct_whether_they_hit_or_miss(experts):
    (gate, g_ref), (up, u_ref), (down, d_ref) = experts
    share = GpuShare("cpu", max_experts=2 * K, experts_per_token=K)
    share.prefetch_rows = 3
    with CpuKernels() as kernels:
        moe = CpuExperts(kernels, gate, up, down, share=share, balance=ShareBalance(0.25, fixed=True))
        for step in range(12):
            ids, weights = routing(1, k=K, n_expert=N_EXPERT, seed=step)
            guess = ids[0].tolist() if step % 2 else [(e + 1) % N_EXPERT for e in ids[0].tolist()]
            share.prefetch((gate, up, down), guess)  # right on odd steps, wrong on even ones
            x = torch.randn(1, D, generator=torch.Generator().manual_seed(step))
            ours = moe.collect(moe.submit(x, ids, weights))
            expected = moe_reference(x, ids, weights, g_ref, u_ref, d_ref)
            assert relative_error(ours, expected) < Q8_ACTIVATION_TOL
    assert share.counts["prefetched"] == 36
    assert share.counts["from_prefetch"] >= 18  # all three on each odd step (resident go first)
