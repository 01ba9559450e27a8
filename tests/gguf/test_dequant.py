"""Dequantization of every ggml type against independent references.

Data comes from ggml's own quantizers; the reference is the `gguf` package's numpy
dequantizer, or, for the three types it lacks, a numpy decoder written here from the block
layouts in ggml-common.h.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants

from tandem.gguf.types import block_size
from tandem.kernels.dequant import dequantize
from tandem.kernels.quantize import quantize

PLAIN_INTS = {T.I8: np.int8, T.I16: np.int16, T.I32: np.int32, T.I64: np.int64, T.F64: np.float64}
OWN_REFERENCE = {T.Q8_K, T.Q8_1, T.Q1_0}  # gguf-py has no dequantizer for these
QUANT_TYPES = [t for t in T if t not in PLAIN_INTS]


def _numpy_reference(raw: np.ndarray, t: T) -> np.ndarray:
    if t == T.Q8_K:  # float d; int8 qs[256]; int16 bsums[16]
        b = raw.reshape(-1, 292)
        d = b[:, :4].copy().view(np.float32)
        return (d * b[:, 4:260].view(np.int8)).reshape(-1)
    if t == T.Q8_1:  # half d; half s; int8 qs[32]
        b = raw.reshape(-1, 36)
        d = b[:, :2].copy().view(np.float16).astype(np.float32)
        return (d * b[:, 4:].view(np.int8)).reshape(-1)
    if t == T.Q1_0:  # half d; 128 sign bits, LSB first: bit set -> +d, else -d
        b = raw.reshape(-1, 18)
        d = b[:, :2].copy().view(np.float16).astype(np.float32)
        bits = np.unpackbits(b[:, 2:], axis=1, bitorder="little").astype(np.float32)
        return (d * (2 * bits - 1)).reshape(-1)
    return quants.dequantize(raw, t).reshape(-1)


@pytest.mark.parametrize("t", QUANT_TYPES, ids=lambda t: t.name)
def test_equals_reference_on_ggml_quantized_data(t, rng):
    row = 2 * max(256, block_size(t))
    values = rng.standard_normal((6, row)).astype(np.float32)
    values[0] *= 20  # rows of very different scale exercise the per-block scales
    raw = quantize(values, t).reshape(-1)
    ours = dequantize(raw, t, (6, row)).numpy()
    ref = _numpy_reference(raw, t).reshape(6, row).astype(np.float32)
    np.testing.assert_array_equal(ours, ref)
    # Not vacuous: the quantized values follow the input (IQ1_S/TQ are coarse, so loosely).
    corr = np.corrcoef(ours.reshape(-1), values.reshape(-1))[0, 1]
    assert corr > 0.7, f"{t.name} dequantized values do not follow the input (corr {corr:.2f})"


@pytest.mark.parametrize("t", list(PLAIN_INTS), ids=lambda t: t.name)
def test_plain_integer_and_f64_types(t, rng):
    values = rng.integers(-100, 100, size=(3, 5)).astype(PLAIN_INTS[t])
    ours = dequantize(values.view(np.uint8).reshape(-1), t, (3, 5))
    np.testing.assert_array_equal(ours.numpy(), values.astype(np.float32))


def test_multithreaded_chunks_cover_large_tensors(rng):
    # Bigger than several CHUNK_ELEMENTS, with an odd row count: every chunk boundary is hit.
    rows, row = 4099, 1024
    values = rng.standard_normal((rows, row)).astype(np.float32)
    raw = quantize(values, T.Q4_K).reshape(-1)
    ours = dequantize(raw, T.Q4_K, (rows, row)).numpy()
    np.testing.assert_array_equal(ours, quants.dequantize(raw, T.Q4_K).reshape(rows, row))


def test_wrong_byte_count_is_reported(rng):
    from tandem.errors import GGUFError

    raw = quantize(rng.standard_normal((2, 256)).astype(np.float32), T.Q4_K).reshape(-1)
    with pytest.raises(GGUFError, match="Q4_K tensor of shape \\[3, 256\\] needs"):
        dequantize(raw, T.Q4_K, (3, 256))
