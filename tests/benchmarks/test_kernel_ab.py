"""benchmarks/kernel_ab.py: two builds of the CPU kernels in one process, on small matrices,
against gguf-py's dequantizer (so the harness times the product it claims to)."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")


@pytest.fixture(scope="module")
def libs(kernel_ab, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kernel_ab")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=kernel_ab.ROOT, capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    cflags = [f for f in kernel_ab.CFLAGS if not f.startswith("-O")] + ["-O0"]  # a third of the build time
    here = kernel_ab.sources_in(kernel_ab.ROOT / kernel_ab.CSRC)
    return {"base": kernel_ab.build(kernel_ab.sources_at("HEAD"), tmp / "base", cflags),
            "test": kernel_ab.build(here, tmp / "test", cflags)}


def test_both_builds_compute_the_product_in_rounds(kernel_ab, libs, monkeypatch):
    monkeypatch.setattr(kernel_ab, "SHAPES", {"iq1_s": (T.IQ1_S, 48, 512), "iq2_xxs": (T.IQ2_XXS, 40, 256)})
    rng = np.random.default_rng(1)
    cases = [kernel_ab.MatrixCase(kind, n, 2, list(libs), rng)
             for kind in ("iq1_s", "iq2_xxs") for n in (1, 5)]
    kernel_ab.run_rounds(libs, cases, rounds=3)
    for case in cases:
        weight = quants.dequantize(case.weight.reshape(-1), case.qtype).reshape(case.rows, case.k)
        expected = case.x.astype(np.float64) @ weight.T.astype(np.float64)
        for name in libs:
            got = case.outs[name].astype(np.float64)
            # the kernels round activations to 8 bits per 256 values (ggml's Q8_K)
            assert np.abs(got - expected).max() < 0.03 * np.abs(expected).max(), (case.kind, name)
            assert len(case.times[name]) == 3 and min(case.times[name]) > 0
        row = case.summary()
        assert row["max_abs_difference_over_max"] < 1e-5
        assert row["base_ms_min"] <= row["base_ms_median"]


def test_the_expert_case_runs_the_moe_op(kernel_ab, libs, monkeypatch):
    monkeypatch.setattr(kernel_ab, "EXPERT", (T.IQ1_S, T.IQ1_S, T.IQ2_XXS, 256, 512))
    rng = np.random.default_rng(2)
    cases = [kernel_ab.ExpertCase("expert", n, 2, list(libs), rng) for n in (1, 9)]  # 9: the GEMM path
    kernel_ab.run_rounds(libs, cases, rounds=2)
    for case in cases:
        gate, up, down = (quants.dequantize(m.reshape(-1), t).astype(np.float64)
                          for m, t in zip(case.matrices, case.types, strict=True))
        x = case.x.astype(np.float64)
        g, u = x @ gate.reshape(256, 512).T, x @ up.reshape(256, 512).T
        expected = (g / (1 + np.exp(-g)) * u) @ down.reshape(512, 256).T
        for name in libs:
            got = case.outs[name].astype(np.float64)
            assert np.abs(got - expected).max() < 0.05 * np.abs(expected).max(), (case.n_tok, name)
        assert case.summary()["max_abs_difference_over_max"] < 1e-5


def test_the_layer_case_spreads_each_token_over_k_experts_of_the_pool(kernel_ab, libs, monkeypatch):
    """Each call: every token on K_ROUTED experts of the pool at weight 1/K_ROUTED, the next call
    on the next ones; the pool repeats one expert, so each token's output is that expert's."""
    monkeypatch.setattr(kernel_ab, "EXPERT", (T.IQ1_S, T.IQ1_S, T.IQ2_XXS, 256, 512))
    monkeypatch.setattr(kernel_ab, "POOL_EXPERTS", 5)
    monkeypatch.setattr(kernel_ab, "K_ROUTED", 3)
    case = kernel_ab.LayerCase("layer", 2, 2, list(libs), np.random.default_rng(3))
    seen = []
    for name in ("base", "test", "base"):
        case.call(name, libs[name], keep=True)
        seen.append(case.ids.copy())
    assert [ids.tolist() for ids in seen] == [[[0, 1, 2], [3, 4, 0]], [[1, 2, 3], [4, 0, 1]],
                                              [[2, 3, 4], [0, 1, 2]]]
    one = [quants.dequantize(m[: m.shape[0] // 5].reshape(-1), t).astype(np.float64)
           for m, t in zip(case.matrices, case.types, strict=True)]
    x = case.x.astype(np.float64)
    g, u = x @ one[0].reshape(256, 512).T, x @ one[1].reshape(256, 512).T
    expected = (g / (1 + np.exp(-g)) * u) @ one[2].reshape(512, 256).T
    for name in libs:
        got = case.outs[name].astype(np.float64)
        assert np.abs(got - expected).max() < 0.05 * np.abs(expected).max(), name
