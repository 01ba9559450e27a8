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
    assert set(row["ms"]) == {"bf16", "whole_rows", "split"} and min(row["ms"].values()) > 0
    assert row["relative_error"]["whole_rows"] < 1e-5 and row["relative_error"]["split"] < 1e-5
    assert 1e-4 < row["relative_error"]["bf16"] < 1e-2  # bfloat16 weights round; ours do not
    assert row["bytes"]["bf16"] == 96 * 4096 * 2 > row["bytes"]["split"]
