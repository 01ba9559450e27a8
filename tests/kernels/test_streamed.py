"""Routed experts streamed to a device and computed there (ExpertStreamer), against the float
MoE oracle on gguf-py's dequantized weights. On the CPU the streaming logic is the same minus
pinned memory and CUDA streams; the GPU run is marked cuda."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from expert_checks import make_weight, moe_reference, routing
from tandem.kernels.gpu_share import PinnedMappings
from tandem.kernels.streamed import ExpertStreamer, consecutive_runs
from tandem.kernels.tensors import QuantTensor

RECIPES = {"ud-iq1_s": (T.IQ1_S, T.IQ1_S, T.IQ2_XXS), "q4_k_m": (T.Q4_K, T.Q4_K, T.Q6_K)}
N_EXPERT, N_FF, D = 10, 512, 256


def _experts(types, rng):
    made = [make_weight(t, shape, rng) for t, shape in
            zip(types, [(N_EXPERT, N_FF, D), (N_EXPERT, N_FF, D), (N_EXPERT, D, N_FF)], strict=True)]
    return [q for q, _ in made], [ref for _, ref in made]


def _mapped(quant, folder):
    """The weights in files, mapped read-only as the loader maps a GGUF. Registration pins whole
    pages: heap arrays share theirs with other objects (x, say), which CUDA would then take for
    pinned, copying them by DMA past the registered end (cudaErrorInvalidValue)."""
    mapped = []
    for i, q in enumerate(quant):
        path = folder / f"w{i}.bin"
        q.data.tofile(path)
        mapped.append(QuantTensor(q.ggml_type, q.shape, np.memmap(path, dtype=np.uint8, mode="r")))
    return mapped


def _check(device, recipe, rng, n_tokens=37, per_chunk=3, pinned_in=None):
    quant, ref = _experts(RECIPES[recipe], rng)
    pinned = pinned_in is not None
    if pinned:
        quant = _mapped(quant, pinned_in)
    x = torch.randn(n_tokens, D, generator=torch.Generator().manual_seed(1))
    ids, weights = routing(n_tokens, k=3, n_expert=N_EXPERT - 2)  # experts 8, 9 never chosen
    ids[ids == 4] = 5  # a gap inside the used ids: two runs per chunk
    streamer = ExpertStreamer(device, min_tokens=1, experts_per_chunk=per_chunk)
    # registered with CUDA as the GPU share does with the file mapping: DMA straight from it
    pins = PinnedMappings([q.data for q in quant]) if pinned else None
    try:
        # Twice: the second call reuses the slots (and, on a GPU, their events).
        for _ in range(2):
            out = streamer.moe(x.to(device), ids.to(device), weights.to(device), *quant)
        if pinned:
            torch.cuda.synchronize()  # before the pages are unregistered
    finally:
        if pins is not None:
            pins.close()
    assert streamer.chunks["direct" if pinned else "staged"] > 0
    assert streamer.chunks["staged" if pinned else "direct"] == 0
    expected = moe_reference(x, ids, weights, *ref)
    assert out.device.type == torch.device(device).type and out.dtype == torch.float32
    err = (out.cpu() - expected).norm() / expected.norm()
    assert err < 0.02, f"relative error {err:.4f}"  # bf16 weights and activations


@pytest.mark.parametrize("recipe", RECIPES)
def test_streamed_experts_match_the_float_reference_on_cpu(recipe, rng):
    _check("cpu", recipe, rng)


@pytest.mark.cuda
@pytest.mark.parametrize("pinned", [False, True], ids=["staged", "from-pinned-mapping"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_streamed_experts_match_the_float_reference_on_gpu(recipe, pinned, rng, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    _check("cuda", recipe, rng, n_tokens=300, per_chunk=2, pinned_in=tmp_path if pinned else None)


def test_wants_long_batches_of_supported_types_only(rng):
    quant, _ = _experts(RECIPES["ud-iq1_s"], rng)
    streamer = ExpertStreamer("cpu", min_tokens=64)
    assert streamer.wants(64, *quant) and not streamer.wants(63, *quant)
    odd, _ = make_weight(T.IQ4_XS, (N_EXPERT, N_FF, D), rng)  # no torch dequantizer (yet)
    assert not streamer.wants(512, odd, *quant[1:])


def test_runs_group_consecutive_ids():
    assert consecutive_runs([0, 1, 2, 5, 7, 8]) == [(0, 3), (5, 1), (7, 2)]
    assert consecutive_runs([]) == []
