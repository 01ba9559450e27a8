"""torch dequantizers (the GPU path for streamed experts) against gguf-py's numpy ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants

from tandem.bench.random_blocks import random_blocks
from tandem.errors import KernelError
from tandem.gguf.types import block_size
from tandem.kernels import torch_dequant
from tandem.kernels.quantize import quantize

TYPES = [T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ1_S, T.IQ1_M, T.IQ2_XXS]


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_random_blocks_equal_gguf_py_exactly(t, rng):
    # Random codes reach every grid row, sign pattern and scale bit.
    raw = random_blocks(t, 64, rng).reshape(-1)
    n = 64 * block_size(t)
    ours = torch_dequant.dequantize(torch.from_numpy(raw), t, (4, n // 4))
    ref = quants.dequantize(raw, t).reshape(4, n // 4).astype(np.float32)
    np.testing.assert_array_equal(ours.numpy(), ref)


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_quantized_values_follow_their_input(t, rng):
    values = rng.standard_normal((3, 512)).astype(np.float32)
    raw = torch.from_numpy(quantize(values, t).reshape(-1))
    ours = torch_dequant.dequantize(raw, t, (3, 512), dtype=torch.bfloat16)
    assert ours.dtype == torch.bfloat16 and ours.shape == (3, 512)
    corr = np.corrcoef(ours.float().numpy().reshape(-1), values.reshape(-1))[0, 1]
    assert corr > 0.7, f"{t.name}: corr {corr:.2f}"


def test_unsupported_type_and_wrong_size_are_named():
    with pytest.raises(KernelError, match="no torch dequantizer for type IQ4_XS"):
        torch_dequant.dequantize(torch.zeros(136, dtype=torch.uint8), T.IQ4_XS, (256,))
    with pytest.raises(KernelError, match="Q4_K tensor of shape \\[2, 256\\] needs 288 uint8 bytes, got 144"):
        torch_dequant.dequantize(torch.zeros(144, dtype=torch.uint8), T.Q4_K, (2, 256))


@pytest.mark.cuda
@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_compiled_on_the_gpu_equals_gguf_py(t, rng):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    for n_blocks in (64, 40):  # dynamic shapes: a second block count reuses the kernel
        raw = random_blocks(t, n_blocks, rng).reshape(-1)
        n = n_blocks * block_size(t)
        ours = torch_dequant.dequantize(torch.from_numpy(raw).cuda(), t, (n,), compiled=True)
        ref = quants.dequantize(raw, t).reshape(n).astype(np.float32)
        # Fused kernels may contract a * b - c into one rounding (FMA).
        torch.testing.assert_close(ours.cpu(), torch.from_numpy(ref), rtol=1e-6, atol=1e-7)
    assert (t, torch.float32) not in torch_dequant._eager_only, "fell back to eager ops"


def test_iq1_s_row_dots_through_the_product_table_equal_the_dequantized_rows(rng):
    """One lookup per 8 weights gives what gguf-py's weights give, multiplied in float64."""
    rows, k = 12, 1024
    raw = random_blocks(T.IQ1_S, rows * k // 256, rng)
    weights = torch.from_numpy(quants.dequantize(raw, T.IQ1_S).reshape(rows, k).astype(np.float64))
    x = torch.randn(k, generator=torch.Generator().manual_seed(2))
    grid = torch_dequant.grid_table(T.IQ1_S, "cpu")
    ours = torch_dequant.iq1_s_row_dots(torch.from_numpy(raw), torch_dequant.iq1_s_products(x, grid))
    expected = weights @ x.double()
    scale = float(expected.abs().max())
    torch.testing.assert_close(ours.double(), expected, rtol=1e-4, atol=1e-4 * scale)
    shifted = torch_dequant.iq1_s_row_dots(torch.from_numpy(raw),
                                           torch_dequant.iq1_s_products(x.roll(8), grid))
    assert (shifted.double() - expected).abs().max() > 0.1 * scale  # the positions matter
