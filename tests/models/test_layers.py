"""Building blocks against their definitions written out in numpy (float64)."""

from __future__ import annotations

import numpy as np
import torch

from tandem.models.layers import RMSNorm, _pairs_as_complex, rope_pairs


def _rotated_pairs(x: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """(x0 + i x1) e^(i angle) for each adjacent pair, angles [T, D/2] over x [T, ..., D]."""
    pairs = x[..., 0::2] + 1j * x[..., 1::2]
    turn = np.exp(1j * angles).reshape(angles.shape[0], *([1] * (x.ndim - 2)), angles.shape[1])
    rotated = pairs * turn
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = rotated.real, rotated.imag
    return out


def test_rope_pairs_rotates_each_adjacent_pair_in_either_layout():
    rng = np.random.default_rng(0)
    wide = torch.from_numpy(rng.standard_normal((5, 4, 194)).astype(np.float32))
    angles = rng.uniform(-np.pi, np.pi, (5, 32))
    cos, sin = torch.from_numpy(np.cos(angles)).float(), torch.from_numpy(np.sin(angles)).float()
    aligned, shifted = wide[..., 128:192], wide[..., 129:193]  # offset 128: complex view; 129: not
    assert _pairs_as_complex(aligned) and not _pairs_as_complex(shifted)
    for x in (aligned, shifted, wide[:, 0, 64:128], wide[:, 1, 1:65]):  # heads, or one row per token
        ours = rope_pairs(x, cos, sin)
        expected = _rotated_pairs(x.double().numpy(), angles)
        np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_rms_norm_divides_by_the_root_mean_square_and_scales():
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((3, 64)), rng.standard_normal(64)
    expected = x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6) * w
    ours = RMSNorm(torch.from_numpy(w), 1e-6)(torch.from_numpy(x).float())
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-5, atol=1e-5)
