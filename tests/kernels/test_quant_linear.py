"""QuantLinear (weights kept in their ggml type, dequantized on the fly) against gguf-py's
dequantization of the same bytes, multiplied in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from expert_checks import make_weight
from tandem.errors import KernelError
from tandem.gguf.types import GGMLType
from tandem.kernels import quant_linear
from tandem.kernels.quant_linear import QuantLinear

TYPES = [T.Q8_0, T.Q4_K, T.Q6_K, T.Q5_K, T.IQ2_XXS, T.IQ1_S]


def _layer(t: T, out_features: int = 48, in_features: int = 512, device: str = "cpu"):
    weight, reference = make_weight(t, (out_features, in_features), np.random.default_rng(int(t)))
    raw = torch.from_numpy(np.asarray(weight.data).copy()).to(device)
    return QuantLinear(raw, GGMLType(int(t)), (out_features, in_features)), reference.double()


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("shape", [(1,), (3,), (40,), (2, 5)], ids=str)  # decode rows, a prompt, 3-D
def test_the_product_equals_gguf_py_weights_times_x(t, shape):
    layer, reference = _layer(t)
    x = torch.randn(*shape, 512, generator=torch.Generator().manual_seed(1))
    ours = layer(x)
    assert ours.dtype == torch.float32 and ours.shape == (*shape, 48)
    expected = x.double() @ reference.T
    torch.testing.assert_close(ours.double(), expected, rtol=1e-4, atol=1e-4)


def test_long_inputs_dequantize_the_weight_a_bounded_slice_at_a_time(monkeypatch):
    """Prompts copy PROMPT_ROWS weight rows at a time (the head has 129K): slices of 20, 20
    and 8 rows give the whole product."""
    monkeypatch.setattr(quant_linear, "PROMPT_ROWS", 20)
    layer, reference = _layer(T.Q6_K)
    x = torch.randn(40, 512, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(layer(x).double(), x.double() @ reference.T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_the_fused_matvec_sums_the_same_products(t):
    """The form the CUDA path compiles (dequantize and multiply in one reduction), run eagerly."""
    layer, reference = _layer(t)
    x = torch.randn(4, 512, generator=torch.Generator().manual_seed(2))
    ours = quant_linear._matvec(layer.ggml_type, layer.raw, layer.grid, x, layer.out_features)
    torch.testing.assert_close(ours.double(), x.double() @ reference.T, rtol=1e-4, atol=1e-4)


def test_bad_weights_are_refused():
    with pytest.raises(KernelError, match="no torch dequantizer for F16"):
        QuantLinear(torch.zeros(2 * 256 * 2, dtype=torch.uint8), GGMLType.F16, (2, 256))
    with pytest.raises(KernelError, match=r"Q8_0 weight of shape \[2, 256\] needs 544 bytes, got 10"):
        QuantLinear(torch.zeros(10, dtype=torch.uint8), GGMLType.Q8_0, (2, 256))


def _takes_q8(t: T, n_in: int, rows: int) -> bool:
    """Whether the Triton matvec takes kernel q8 here (triton_matvec.kernel_for)."""
    from tandem.kernels import triton_matvec  # imports Triton
    return t in triton_matvec.TYPES and triton_matvec.kernel_for(t, n_in, rows) == "q8"


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["dynamic", "static", "triton"])  # TANDEM_QUANT_STATIC, _TRITON
@pytest.mark.parametrize("rows", [1, 8, 40])  # the compiled matvec, and the bf16 dequantized path
def test_on_the_gpu_the_compiled_matvec_and_the_prompt_path_agree_with_gguf_py(rows, kind, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU")
    if kind == "triton":
        pytest.importorskip("triton")
    monkeypatch.setattr(quant_linear, "STATIC", kind == "static")
    monkeypatch.setattr(quant_linear, "TRITON", kind == "triton")  # Q4_K, Q6_K; Q8_0 compiled
    for t in (T.Q4_K, T.Q6_K, T.Q8_0):
        layer, reference = _layer(t, device="cuda")
        x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(3))
        ours = layer(x.cuda()).cpu().double()
        expected = x.double() @ reference.T
        tol = 1e-4 if rows <= quant_linear.MATVEC_ROWS else 2e-2  # float32 sums; bf16 products
        if kind == "triton" and _takes_q8(t, 512, rows):
            tol = 2e-2  # its activations in 8-bit blocks, as llama.cpp's CUDA matvecs take them
        assert (ours - expected).abs().max() <= tol * expected.abs().max(), t.name
