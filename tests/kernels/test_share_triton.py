"""The share's hand-written Triton kernels (UD-IQ1_S and Q4_K_M experts, one token and
batches) against gguf-py's dequantized weights in float32. They run on a GPU, or on the CPU
under Triton's interpreter (TRITON_INTERPRET=1, slow); skipped where neither is available."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from expert_checks import make_weight
from logit_checks import relative_error

share_triton = pytest.importorskip("tandem.kernels.share_triton", exc_type=ImportError)
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not INTERPRETED,
                                reason="needs an NVIDIA GPU or TRITON_INTERPRET=1")
N, N_FF, D = 3, 256, 512  # experts; rows of gate/up (and width of down); their width


MIXES = {"ud-iq1_s": (T.IQ1_S, T.IQ1_S, T.IQ2_XXS), "q4_k_m": (T.Q4_K, T.Q4_K, T.Q6_K)}


@pytest.fixture(scope="module", params=list(MIXES))
def mix(request):
    """The mix's types and its gate, up and down experts with their float references."""
    types = MIXES[request.param]
    rng = np.random.default_rng(7)
    shapes = [(N, N_FF, D), (N, N_FF, D), (N, D, N_FF)]
    return types, [make_weight(t, shape, rng) for t, shape in zip(types, shapes, strict=True)]


def _raw(w) -> torch.Tensor:
    return w.per_expert.reshape(N, -1).to(DEVICE)


def test_gate_up_and_down_meet_the_float_weights(mix):
    types, ((gate, g_ref), (up, u_ref), (down, d_ref)) = mix
    x = torch.randn(D, generator=torch.Generator().manual_seed(3))
    weight = torch.tensor([0.5, 0.3, 0.2])
    h = share_triton.gate_up(types, _raw(gate), _raw(up), x.to(DEVICE)).cpu()
    h_ref = torch.nn.functional.silu(g_ref @ x) * (u_ref @ x)  # [N, N_FF]
    assert relative_error(h, h_ref) < 1e-5  # float32 both: only the summation order differs
    y = share_triton.down(types, _raw(down), h_ref.to(DEVICE), weight.to(DEVICE)).cpu()
    y_ref = sum(weight[e] * (d_ref[e] @ h_ref[e]) for e in range(N))
    assert relative_error(y, y_ref) < 1e-5
    wrong = sum(weight[e] * (d_ref[(e + 1) % N] @ h_ref[e]) for e in range(N))
    assert relative_error(wrong, y_ref) > 0.5  # the reference tells experts apart


def test_the_whole_step_as_the_share_calls_it(mix):
    types, ((gate, g_ref), (up, u_ref), (down, d_ref)) = mix
    x = torch.randn(D, generator=torch.Generator().manual_seed(4))
    weight = torch.tensor([0.2, 0.7, 0.1])
    ours = share_triton.experts(types, _raw(gate), _raw(up), _raw(down), x.to(DEVICE),
                                weight.to(DEVICE), None, None, None).cpu()
    expected = sum(weight[e] * (d_ref[e] @ (torch.nn.functional.silu(g_ref[e] @ x) * (u_ref[e] @ x)))
                   for e in range(N))
    assert relative_error(ours, expected) < 1e-5
    assert share_triton.fits(types, _raw(gate), x)
    assert not share_triton.fits(types, _raw(gate)[:, :-1], x)  # not whole rows
    assert not share_triton.fits(types, _raw(gate), torch.zeros(D + 8))  # rows not of whole blocks
    assert not share_triton.fits((T.Q8_0, T.Q8_0, T.Q8_0), _raw(gate), x)  # not a mix it has


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the stale slot, interpreted
def test_a_batch_adds_each_expert_to_its_own_tokens_row(mix):
    """As gpu_share's batch kernels: pair i, the expert in slot slots[i] on row tokens[i] of x
    (8 rows, as MAX_TOKENS), summed per row; one expert may serve several tokens; a padded pair
    (weight 0, whatever bytes its slot holds) adds nothing."""
    types, ((gate, g_ref), (up, u_ref), (down, d_ref)) = mix
    x = torch.randn(8, D, generator=torch.Generator().manual_seed(5))
    slots = torch.tensor([0, 1, 0, 2])
    tokens = torch.tensor([5, 0, 3, 5])
    weight = torch.tensor([0.5, 0.25, 0.75, 0.0])  # the last: a padded pair
    stale = _raw(gate).clone()
    stale[2, :2] = torch.tensor([0x00, 0x7C], dtype=torch.uint8)  # a scale (d) of +inf: h not finite
    ours = share_triton.expert_rows(types, stale, _raw(up), _raw(down), x.to(DEVICE), slots.to(DEVICE),
                                    tokens.to(DEVICE), weight.to(DEVICE)).cpu()
    expected = torch.zeros(8, D)
    for e, t, w in zip(slots.tolist(), tokens.tolist(), weight.tolist(), strict=True):
        h = torch.nn.functional.silu(g_ref[e] @ x[t]) * (u_ref[e] @ x[t])
        expected[t] += w * (d_ref[e] @ h)
    assert ours.shape == (8, D)
    assert relative_error(ours, expected) < 1e-5
    assert torch.equal(ours[1], torch.zeros(D))  # rows no expert chose stay zero


def test_gather_copies_experts_back_to_back_and_the_kernels_read_them_there(mix):
    """gather: experts 2 and 0 (addresses of their three matrices) into one scratch, each
    expert's bytes back to back; the kernels read the copies as the originals, in tiles of 16
    rows or of 4 (more programs, for reads over PCIe)."""
    types, ((gate, g_ref), (up, u_ref), (down, d_ref)) = mix
    raws = [_raw(w) for w in (gate, up, down)]
    chosen = torch.tensor([2, 0], device=DEVICE)
    at = torch.stack([share_triton.addresses(raw, chosen) for raw in raws])
    sizes = tuple(raw.shape[1] for raw in raws)
    scratch = torch.full((2 * sum(sizes),), 255, dtype=torch.uint8, device=DEVICE)
    copied = share_triton.gather(at, sizes, scratch)
    for i, e in enumerate(chosen.tolist()):
        expected = torch.cat([raw[e] for raw in raws])
        assert torch.equal(scratch[i * sum(sizes):(i + 1) * sum(sizes)], expected)
    x = torch.randn(D, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    weight = torch.tensor([0.6, 0.4], device=DEVICE)
    there = share_triton.experts_at(types, copied, sizes, x, weight)
    assert torch.equal(there, share_triton.experts_at(types, at, sizes, x, weight))
    xc = x.cpu()
    reference = sum(w * (d_ref[e] @ (torch.nn.functional.silu(g_ref[e] @ xc) * (u_ref[e] @ xc)))
                    for e, w in zip(chosen.tolist(), weight.tolist(), strict=True))
    assert relative_error(share_triton.experts_at(types, copied, sizes, x, weight, rows=4)[0].cpu(),
                          reference) < 1e-5
    with pytest.raises(ValueError, match="whole int64 words"):
        share_triton.gather(at, sizes, scratch[: sum(sizes)])  # room for one expert only
