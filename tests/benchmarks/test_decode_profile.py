"""The decode profile's summary of shared calls by their split (benchmarks/decode_profile.py)."""

from __future__ import annotations

import pytest


def call(gpu: int, k: int = 8, call_ms: float | None = None) -> dict:
    """A shared call of k experts, gpu of them on the GPU: the CPU op 0.1 + 0.3 ms an expert,
    the GPU's part 0.1 + 0.2 ms an expert."""
    found = {"gpu": gpu, "distinct": k, "cpu_ms": 0.1 + 0.3 * (k - gpu), "gpu_ms": 0.1 + 0.2 * gpu}
    if call_ms is not None:
        found["call_ms"] = call_ms
    return found


def test_sides_fit_both_lines_and_price_whole_experts(decode_profile):
    calls = [call(4, call_ms=1.4), call(5, call_ms=1.2)] * 3
    found = decode_profile.sides(calls)
    rows = {row["gpu_experts"]: row for row in found["by_gpu_experts"]}
    assert rows[4]["calls"] == 3 and rows[4]["cpu_experts"] == 4
    assert rows[4]["cpu_op_ms"] == pytest.approx(1.3) and rows[4]["gpu_span_ms"] == pytest.approx(0.9)
    assert rows[5]["call_ms"] == pytest.approx(1.2)
    assert found["cpu_line_ms"]["per_expert"] == pytest.approx(0.3)
    assert found["gpu_line_ms"]["fixed"] == pytest.approx(0.1)
    # 0.1 + 0.3 (8 - n) = 0.1 + 0.2 n at n = 4.8: 1.06 ms; whole: 5 on the GPU, 1.1 ms
    assert found["crossing_gpu_experts"] == pytest.approx(4.8)
    assert found["crossing_ms"] == pytest.approx(1.06)
    assert found["best_whole_split_ms"] == pytest.approx(1.1)
    assert found["slower_side_as_run_ms"] == pytest.approx((1.3 + 1.1) / 2)  # 4 and 5 alternating


def test_no_lines_from_one_split_or_untimed_calls(decode_profile):
    found = decode_profile.sides([call(4)] * 3 + [{"gpu": 5, "distinct": 8}])
    assert [row["gpu_experts"] for row in found["by_gpu_experts"]] == [4]  # the untimed call left out
    assert found["by_gpu_experts"][0]["call_ms"] is None
    assert "crossing_ms" not in found
    assert decode_profile.sides([]) == {"by_gpu_experts": []}
