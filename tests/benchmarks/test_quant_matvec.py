"""benchmarks/quant_matvec.py: one shape timed in CUDA graphs, each variant's products checked
against float64 products of the dequantized weight (on a GPU only)."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

pytest.importorskip("triton")
pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("t", [T.Q4_K, T.Q6_K], ids=lambda t: t.name)
def test_one_shape_is_timed_and_every_variant_meets_the_float_products(quant_matvec, t):
    row = quant_matvec.measure(96, 4096, t, rows=2, calls=3, rng=np.random.default_rng(0))
    assert row["splits"] > 1  # 16 blocks, 6 row programs: the split path is the one timed
    assert set(row["ms"]) == {"bf16", "whole_rows", "split", "q8", "default"} and min(row["ms"].values()) > 0
    assert max(row["relative_error"][k] for k in ("whole_rows", "split")) < 1e-5
    assert 1e-3 < row["relative_error"]["q8"] < 2e-2  # its 8-bit activations
    # the default kernel for 2 input rows: values (q8 serves single rows only), exact
    assert row["relative_error"]["default"] < 1e-5
    assert 1e-4 < row["relative_error"]["bf16"] < 1e-2  # bfloat16 weights round; ours do not
    assert row["bytes"]["bf16"] == 96 * 4096 * 2 > row["bytes"]["split"]


def test_the_sweep_names_the_fastest_settings(quant_matvec, monkeypatch):
    """A few of the sweep's settings (each compiles its kernels): every one timed and exact."""
    sweep = quant_matvec.SWEEP
    monkeypatch.setattr(quant_matvec, "SWEEP", [sweep[0], sweep[-5], sweep[-1]])
    row = quant_matvec.measure(96, 4096, T.Q4_K, rows=1, calls=3, rng=np.random.default_rng(1), sweep=True)
    swept = {quant_matvec.sweep_name(kernel, settings) for kernel, settings in quant_matvec.SWEEP}
    assert swept == {"values-r8-w2", "q8-r128-w8", "q8-s4"} and swept <= set(row["ms"])
    assert row["fastest_values"].startswith("values") and row["fastest_q8"].startswith("q8")
    assert row["relative_error"]["values-r8-w2"] < 1e-5
    assert max(row["relative_error"][k] for k in swept if k.startswith("q8")) < 2e-2
