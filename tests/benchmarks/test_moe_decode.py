"""benchmarks/moe_decode.py: the op timed as a shared decode call leaves it (slots skipped,
idle gaps, the runner thread), on small experts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "moe_decode.py"


@pytest.fixture
def small(moe_decode, monkeypatch):
    monkeypatch.setattr(moe_decode, "N_EXPERT", 16)
    monkeypatch.setattr(moe_decode, "D_MODEL", 256)
    monkeypatch.setattr(moe_decode, "N_FF", 512)
    moe_decode.recipe_experts.cache_clear()
    yield moe_decode
    moe_decode.recipe_experts.cache_clear()


@pytest.mark.parametrize("runner", [False, True])
@pytest.mark.parametrize("cpu_experts", [3, 8])
def test_the_op_counts_only_the_experts_it_computes(small, cpu_experts, runner):
    row, = small.run("ud-iq1_s", "tandem", [1], tokens=2, steps=4, warmup=1, pool=16,
                     cpu_experts=cpu_experts, gap_ms=0.5, runner=runner)
    # two tokens, each its own choice of cpu_experts of the 16: the distinct ones per step
    assert cpu_experts <= row["distinct_experts_per_step"] <= 2 * cpu_experts
    gate, up, down = small.recipe_experts("ud-iq1_s")
    per_expert = gate.expert_bytes() + up.expert_bytes() + down.expert_bytes()
    assert row["expert_bytes_per_step"] == pytest.approx(row["distinct_experts_per_step"] * per_expert)
    assert (row["cpu_experts"], row["gap_ms"], row["runner"]) == (cpu_experts, 0.5, runner)
    assert row["median_ms"] > 0
    if runner:  # the op's own time on the runner: part of the call's
        assert 0 < row["median_op_ms_on_runner"] <= row["median_ms"]
    else:
        assert row["median_op_ms_on_runner"] is None


@pytest.mark.parametrize(("args", "reason"), [(["--cpu-experts", "4"], "only tandem's kernels"),
                                              (["--runner"], "tandem's kernels only"),
                                              (["--cpu-experts", "9"], "takes 1..8"),
                                              (["--pool", "3"], "--pool takes 8..256")])
def test_bad_settings_are_refused_with_the_reason(args, reason):
    done = subprocess.run([sys.executable, str(SCRIPT), "--kernels", "ggml", *args],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and reason in done.stderr


def test_gemm_thresholds_alternate_in_one_run_and_the_given_one_comes_back(small):
    from tandem.kernels import native

    before = native.set_gemm_min_pairs(3)  # as TANDEM_GEMM_MIN_PAIRS=3 at load would
    try:
        rows = small.run("ud-iq1_s", "tandem", [1], tokens=4, steps=2, warmup=1, pool=8,
                         gemm_min_pairs=[0, 1])
        assert [r["gemm_min_pairs"] for r in rows] == [0, 1]  # one row per setting
        assert all(r["median_ms"] > 0 and r["distinct_experts_per_step"] == 8 for r in rows)
        assert native.set_gemm_min_pairs(before) == 3  # the threshold given put back, not the default
    finally:
        native.set_gemm_min_pairs(before)
