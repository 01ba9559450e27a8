"""The Triton matvec for Q4_K / Q6_K weights against gguf-py's dequantized weights in float32.
On a GPU, or on the CPU under Triton's interpreter (TRITON_INTERPRET=1); skipped otherwise."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants

from expert_checks import make_weight
from logit_checks import relative_error

triton_matvec = pytest.importorskip("tandem.kernels.triton_matvec", exc_type=ImportError)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs an NVIDIA GPU or TRITON_INTERPRET=1")


@pytest.mark.parametrize("kernel", triton_matvec.KERNELS)
@pytest.mark.parametrize("t", [T.Q4_K, T.Q6_K], ids=lambda t: t.name)
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("n_in, splits", [(512, None), (4864, None), (4864, 1), (4864, 5)],
                         ids=["whole-rows", "split-k", "one-run", "uneven-runs"])
def test_matvec_meets_the_dequantized_weights(kernel, t, m, n_in, splits):
    """Kernel q8 multiplies the weights with the activations in 8-bit blocks of 32: there the
    reference takes x as gguf's Q8_0 quantizes it (with the block scale in float32, as the
    kernel keeps it), and the float activations' products lie ~0.5% away."""
    rng = np.random.default_rng(int(t) + m)
    weight, reference = make_weight(t, (40, n_in), rng)  # 40 rows: the last tile partly empty
    raw = torch.from_numpy(np.asarray(weight.data)).reshape(-1).to(DEVICE)
    x = torch.randn(m, n_in, generator=torch.Generator().manual_seed(m))
    y = triton_matvec.matvec(raw, t, x.to(DEVICE), 40, splits, kernel).cpu()
    assert y.shape == (m, 40)
    seen = q8_0(x) if kernel == "q8" else x
    expected = seen @ reference.T
    assert relative_error(y, expected) < 1e-5
    assert relative_error(x @ reference.roll(1, dims=0).T, expected) > 0.5  # rows told apart
    if seen is not x:
        assert 1e-3 < relative_error(y, x @ reference.T) < 2e-2


def q8_0(x: torch.Tensor) -> torch.Tensor:
    """x as gguf-py's Q8_0 quantizes it, each block's 32 bytes times max |x| / 127 in float32."""
    blocks = quants.quantize(x.numpy(), T.Q8_0).reshape(x.shape[0], -1, 34)
    q = blocks[:, :, 2:].copy().view(np.int8).astype(np.float32)
    scale = np.abs(x.numpy().reshape(x.shape[0], -1, 32)).max(-1, keepdims=True) / np.float32(127)
    return torch.from_numpy((q * scale).reshape(x.shape))


def test_few_rows_split_their_blocks_and_many_rows_do_not():
    assert triton_matvec.splits_for(40, 4864) == 4864 // 256 // triton_matvec.MIN_SPLIT_BLOCKS  # 19 blocks: 4
    assert triton_matvec.splits_for(576, 7168) > 1  # R1's kv_a: 36 row programs alone
    assert triton_matvec.splits_for(129280, 7168) == 1  # the head: rows enough
    assert triton_matvec.splits_for(40, 512) == 1  # two blocks
    assert triton_matvec.splits_for(7168, 2048) == 1  # R1's shared down: 8 blocks, short walks


def test_supports():
    assert triton_matvec.supports(T.Q4_K, 7168, 1) and triton_matvec.supports(T.Q6_K, 2048, 8)
    assert not triton_matvec.supports(T.Q8_0, 7168, 1)
    assert not triton_matvec.supports(T.Q4_K, 7168, 9)  # more rows than a decode step's
    assert not triton_matvec.supports(T.Q4_K, 0, 1)  # no blocks to split


@pytest.mark.parametrize("t", [T.Q4_K, T.Q6_K], ids=lambda t: t.name)
@pytest.mark.parametrize("rows_per_program, m", [(16, 1), (64, 3)])
def test_q8_kernel_tiles(t, rows_per_program, m):
    """Kernel q8 at other tile heights than its default (40 rows: 3 programs, or 1 partly empty)."""
    rng = np.random.default_rng(11)
    weight, reference = make_weight(t, (40, 1024), rng)
    raw = torch.from_numpy(np.asarray(weight.data)).reshape(-1).to(DEVICE)
    x = torch.randn(m, 1024, generator=torch.Generator().manual_seed(5))
    y = triton_matvec.matvec(raw, t, x.to(DEVICE), 40, kernel="q8", rows_per_program=rows_per_program).cpu()
    assert relative_error(y, q8_0(x) @ reference.T) < 1e-5


def test_one_row_takes_q8_where_its_rows_are_long_enough_unless_a_kernel_is_set(monkeypatch):
    monkeypatch.setattr(triton_matvec, "KERNEL", None)
    assert triton_matvec.kernel_for(T.Q4_K, 512) == triton_matvec.kernel_for(T.Q6_K, 7168) == "q8"
    assert triton_matvec.kernel_for(T.Q6_K, 512) == "values"  # kv_b's rows: 2 blocks
    assert triton_matvec.kernel_for(T.Q4_K, 7168, rows=8) == "values"
    monkeypatch.setattr(triton_matvec, "KERNEL", "values")  # TANDEM_QUANT_MATVEC=values
    assert triton_matvec.kernel_for(T.Q4_K, 7168) == triton_matvec.kernel_for(T.Q6_K, 7168) == "values"


def test_an_unknown_kernel_is_named():
    with pytest.raises(ValueError, match="'bytes' is not one of values, q8"):
        triton_matvec.matvec(torch.zeros(144, dtype=torch.uint8), T.Q4_K, torch.zeros(1, 256), 1,
                             kernel="bytes")
