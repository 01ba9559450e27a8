"""Random but valid quantized blocks, written directly instead of quantizing random floats.

Quantizing tens of GB of floats to IQ types takes hours; the kernels read random blocks at the
same speed. Codes are random bytes (every bit pattern is a valid grid index or sign mask in
these formats); only the fp16 scales are replaced, by small finite values, so every block
dequantizes to finite weights. Types with an offset (a min: Q4_1, Q5_1, Q2_K, Q4_K, Q5_K) get
the min that centres their codes, as trained weights are: with random mins every weight leans
one way, and a model of such matrices multiplies its activations up to overflow (TQ2_0 loses
its unused code +2 for the same reason). Then the scales are set so that weights spread as
trained ones do (std WEIGHT_STD), whatever the type's code and sub-scale ranges.
"""

from __future__ import annotations

import numpy as np
from gguf import quants

from tandem.gguf.types import GGMLType, block_bytes

T = GGMLType

# Byte offsets of the fp16 scale fields ("d", "dmin", "m") inside one block, from ggml-common.h.
FP16_SCALES: dict[GGMLType, tuple[int, ...]] = {
    T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q8_0: (0,),
    T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,),
    T.IQ2_XXS: (0,), T.IQ2_XS: (0,), T.IQ2_S: (0,), T.IQ3_XXS: (0,), T.IQ3_S: (0,),
    T.IQ1_S: (0,), T.IQ4_NL: (0,), T.IQ4_XS: (0,), T.TQ1_0: (52,), T.TQ2_0: (64,),
}
IQ1_M_SCALES = 48  # 4 uint16 whose top nibbles together hold the block's fp16 scale
PLAIN = {T.F32: np.float32, T.F16: np.float16, T.BF16: None}

SCALE_LOW, SCALE_HIGH = 2.0**-12, 2.0**-9
WEIGHT_STD = 0.02  # about 1/sqrt(fan-in) of a 2K-7K wide layer, as in trained checkpoints
MEAN_CODE = {T.Q4_1: 7.5, T.Q5_1: 15.5, T.Q2_K: 1.5, T.Q4_K: 7.5, T.Q5_K: 15.5}  # of uniform codes


def can_fill(t: GGMLType) -> bool:
    return t in FP16_SCALES or t in PLAIN or t == T.IQ1_M


def random_blocks(t: GGMLType, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """n_blocks random valid blocks of type t as uint8 [n_blocks, block_bytes]."""
    if t in PLAIN:
        return _random_plain(t, n_blocks, rng)
    blocks = rng.integers(0, 256, size=(n_blocks, block_bytes(t)), dtype=np.uint8)
    if t == T.IQ1_M:
        scale = _scales(n_blocks, rng).view(np.uint16)
        sc = blocks[:, IQ1_M_SCALES:IQ1_M_SCALES + 8].view(np.uint16)  # [n, 4]
        for i in range(4):
            nibble = (scale >> (4 * i)) & 0xF
            sc[:, i] = (sc[:, i] & 0x0FFF) | (nibble << 12)
        return blocks
    for offset in FP16_SCALES[t]:
        blocks[:, offset:offset + 2] = _scales(n_blocks, rng).view(np.uint8).reshape(-1, 2)
    if t in MEAN_CODE:
        _centre(t, blocks)
    if t == T.TQ2_0:  # 2-bit codes 0..2 are -1, 0, 1; random bytes also hold 3 (+2): make it 1 (0)
        qs = blocks[:, :64]
        both = qs & (qs >> 1) & 0x55
        blocks[:, :64] = qs & ~(both << 1)
    _rescale(t, blocks)
    return blocks


def _rescale(t: GGMLType, blocks: np.ndarray) -> None:
    """Multiply every fp16 scale field so the weights' std is WEIGHT_STD (measured on a sample
    through gguf-py's dequantizer)."""
    std = float(quants.dequantize(blocks[:64].reshape(-1), t).std())
    if std == 0:
        return
    factor = np.float32(WEIGHT_STD / std)
    for offset in FP16_SCALES[t]:
        scaled = blocks[:, offset:offset + 2].copy().view(np.float16).astype(np.float32) * factor
        blocks[:, offset:offset + 2] = scaled.astype(np.float16).view(np.uint8)


def _centre(t: GGMLType, blocks: np.ndarray) -> None:
    """Mins equal to the mean code times the scale, per block or sub-block: zero-mean weights."""
    d_at, min_at = FP16_SCALES[t]
    d = blocks[:, d_at:d_at + 2].copy().view(np.float16).astype(np.float32)
    if t in (T.Q4_1, T.Q5_1):  # w = d*q + m
        blocks[:, min_at:min_at + 2] = (-MEAN_CODE[t] * d).astype(np.float16).view(np.uint8)
        return
    # k-quants: w = d*sc_j*q - dmin*m_j; with m_j = sc_j and dmin = mean * d each sub-block centres
    blocks[:, min_at:min_at + 2] = (MEAN_CODE[t] * d).astype(np.float16).view(np.uint8)
    if t == T.Q2_K:  # a byte per sub-block: scale in the low nibble, min in the high one
        blocks[:, 0:16] = (blocks[:, 0:16] & 0x0F) * 0x11
    else:  # Q4_K/Q5_K: 12 bytes of 6-bit scales and mins (ggml's get_scale_min_k4)
        s = blocks[:, 4:16]
        s[:, 4:8] = s[:, 0:4]
        s[:, 8:12] = (s[:, 8:12] & 0x0F) * 0x11


def _scales(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(SCALE_LOW, SCALE_HIGH, size=n).astype(np.float16)


def _random_plain(t: GGMLType, n: int, rng: np.random.Generator) -> np.ndarray:
    values = rng.standard_normal(n, dtype=np.float32) * np.float32(0.02)
    if t == T.BF16:  # bf16 is the top half of a float32 (truncation is fine for noise)
        return (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(n, 2)
    return values.astype(PLAIN[t]).view(np.uint8).reshape(n, -1)
