"""Dequantize ggml blocks with torch ops, on whatever device holds the bytes (the GPU, for
expert weights streamed there during long prompts).

Covers the types the routed experts of published DeepSeek GGUFs use: the k-quants, Q8_0 and
the IQ1/IQ2 grids of Unsloth's dynamic quants. The arithmetic follows gguf-py's numpy
dequantizers step for step, so float32 results equal them exactly. Grid types decode through
one table lookup per 8 weights: the tables fold the IQ1 delta and the IQ2 signs into the grid
rows, which leaves one gather and one multiply on the full-size data.
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import torch
from gguf import quants

from tandem.errors import KernelError, first_line
from tandem.gguf.types import GGMLType, block_bytes, tensor_bytes
from tandem.kernels import compiling

log = logging.getLogger(__name__)
T = GGMLType
QK = 256  # weights per block in every type here except Q8_0


def dequantize(raw: torch.Tensor, t: GGMLType, shape: tuple[int, ...],
               dtype: torch.dtype = torch.float32, compiled: bool = False) -> torch.Tensor:
    """`shape` values of type `t` from the bytes `raw` (uint8, any device), as `dtype` there.

    `compiled`: through torch.compile, which fuses the steps into one kernel per type (on the
    GPU machine ~25x faster than the eager ops for IQ1_S; the first call compiles, seconds);
    eager if compiling fails here."""
    if t not in _DECODERS:
        raise KernelError(f"no torch dequantizer for type {t.name} (have: "
                          f"{', '.join(x.name for x in _DECODERS)})")
    need = tensor_bytes(t, shape)
    if raw.dtype != torch.uint8 or raw.numel() != need:
        raise KernelError(f"{t.name} tensor of shape {list(shape)} needs {need} uint8 bytes, got "
                          f"{raw.numel()} of {raw.dtype}")
    blocks = raw.reshape(-1, block_bytes(t))
    grid = _tables(blocks.device)[_GRIDS[t]] if t in _GRIDS else None
    if compiled and (t, dtype) not in _eager_only:
        try:
            return _compiled(t, dtype)(blocks, grid).reshape(shape)
        except Exception as exc:  # no triton, no C compiler, an unsupported device ...
            log.warning("torch.compile of the %s dequantizer failed (%s); eager ops from now on",
                        t.name, first_line(exc))
            _eager_only.add((t, dtype))
    return _decode(t, dtype, blocks, grid).reshape(shape)


def supports(t: GGMLType) -> bool:
    return t in _DECODERS


def grid_table(t: GGMLType, device: torch.device | str) -> torch.Tensor | None:
    """The lookup table type `t` decodes through (None for types without a grid)."""
    return _tables(torch.device(device))[_GRIDS[t]] if t in _GRIDS else None


def values(raw: torch.Tensor, t: GGMLType, grid: torch.Tensor | None) -> torch.Tensor:
    """float32 [blocks, values per block] from raw bytes (uint8, whole blocks, unchecked), `grid` from
    grid_table: the bare decoder, for callers that fuse it into their own compiled function."""
    return _DECODERS[t](raw.reshape(-1, block_bytes(t)), grid)


def _decode(t: GGMLType, dtype: torch.dtype, blocks: torch.Tensor, grid: torch.Tensor | None) -> torch.Tensor:
    return _DECODERS[t](blocks, grid).to(dtype)


@functools.cache
def _compiled(t: GGMLType, dtype: torch.dtype):
    # dynamic: one kernel for every block count (chunks hold different numbers of experts)
    return compiling.compiled(functools.partial(_decode, t, dtype), dynamic=True)


_eager_only: set[tuple[GGMLType, torch.dtype]] = set()


# -- field readers -------------------------------------------------------------------------
def _f16(b: torch.Tensor, at: int) -> torch.Tensor:
    """The fp16 at byte `at` of each block, as float32 [N, 1]."""
    return b[:, at : at + 2].contiguous().view(torch.float16).float()


def _u16(b: torch.Tensor, at: int, count: int) -> torch.Tensor:
    """`count` little-endian uint16 from byte `at`, as int32 [N, count]."""
    pairs = b[:, at : at + 2 * count].int().view(-1, count, 2)
    return pairs[..., 0] | (pairs[..., 1] << 8)


def _u32(b: torch.Tensor, at: int, count: int) -> torch.Tensor:
    """`count` little-endian uint32 from byte `at`, as int64 [N, count]."""
    quads = b[:, at : at + 4 * count].long().view(-1, count, 4)
    return quads[..., 0] | (quads[..., 1] << 8) | (quads[..., 2] << 16) | (quads[..., 3] << 24)


def _steps(count: int, step: int, device, dtype=torch.uint8) -> torch.Tensor:
    """0, step, 2 step, ...: shift amounts, made on the device (a host tensor would cost a
    synchronizing copy per call)."""
    return torch.arange(0, count * step, step, dtype=dtype, device=device)


# -- k-quants and Q8_0 ---------------------------------------------------------------------
def _q8_0(b: torch.Tensor, grid: None) -> torch.Tensor:
    return _f16(b, 0) * b[:, 2:34].contiguous().view(torch.int8).float()


def _k_scale_min(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: d times the eight 6-bit sub-block scales and dmin times the eight mins (packed
    in bytes 4..15), as [N, 8, 1] float32."""
    n = b.shape[0]
    s = b[:, 4:16].int().view(-1, 3, 4)
    d, m, m_d = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return (_f16(b, 0) * sc.float()).view(n, 8, 1), (_f16(b, 2) * mn.float()).view(n, 8, 1)


def _nibbles(codes: torch.Tensor) -> torch.Tensor:
    """128 bytes of 4-bit codes, per 32 bytes first the low nibbles then the high: [N, 8, 32]."""
    n = codes.shape[0]
    return ((codes.view(n, 4, 1, 32) >> _steps(2, 4, codes.device).view(1, 1, 2, 1)) & 0x0F).view(n, 8, 32)


def _q4_k(b: torch.Tensor, grid: None) -> torch.Tensor:
    d, dm = _k_scale_min(b)
    return (d * _nibbles(b[:, 16:144]).float() - dm).view(-1, QK)


def _q5_k(b: torch.Tensor, grid: None) -> torch.Tensor:
    n = b.shape[0]
    d, dm = _k_scale_min(b)
    high = (b[:, 16:48].view(n, 1, 32) >> _steps(8, 1, b.device).view(1, 8, 1)) & 1
    return (d * (_nibbles(b[:, 48:176]) | (high << 4)).float() - dm).view(n, QK)


def _q6_k(b: torch.Tensor, grid: None) -> torch.Tensor:
    n = b.shape[0]
    d = (_f16(b, 208) * b[:, 192:208].contiguous().view(torch.int8).float()).view(n, 16, 1)
    low = (b[:, 0:128].view(n, 2, 1, 64) >> _steps(2, 4, b.device).view(1, 1, 2, 1)) & 0x0F
    high = (b[:, 128:192].view(n, 2, 1, 32) >> _steps(4, 2, b.device).view(1, 1, 4, 1)) & 3
    q = (low.view(n, 8, 32) | (high.view(n, 8, 32) << 4)).to(torch.int8) - 32
    return (d * q.view(n, 16, 16).float()).view(n, QK)


def _q2_k(b: torch.Tensor, grid: None) -> torch.Tensor:
    n = b.shape[0]
    scales = b[:, 0:16]
    dl = (_f16(b, 80) * (scales & 0x0F).float()).view(n, 16, 1)
    ml = (_f16(b, 82) * (scales >> 4).float()).view(n, 16, 1)
    q = (b[:, 16:80].view(n, 2, 1, 32) >> _steps(4, 2, b.device).view(1, 1, 4, 1)) & 3
    return (dl * q.view(n, 16, 16).float() - ml).view(n, QK)


def _q3_k(b: torch.Tensor, grid: None) -> torch.Tensor:
    n = b.shape[0]
    low_sc = (b[:, 96:104].view(n, 1, 8) >> _steps(2, 4, b.device).view(1, 2, 1)).reshape(n, 16)
    high_sc = (b[:, 104:108].view(n, 1, 4) >> _steps(4, 2, b.device).view(1, 4, 1)).reshape(n, 16)
    scales = ((low_sc & 0x0F) | ((high_sc & 3) << 4)).to(torch.int8) - 32
    dl = (_f16(b, 108) * scales.float()).view(n, 16, 1)
    low = (b[:, 32:96].view(n, 2, 1, 32) >> _steps(4, 2, b.device).view(1, 1, 4, 1)) & 3
    high = (b[:, 0:32].view(n, 1, 32) >> _steps(8, 1, b.device).view(1, 8, 1)) & 1
    # The high bit *clears* the -4 offset: q = low - 4 where the mask bit is 0.
    q = low.view(n, 16, 16).to(torch.int8) - ((high.view(n, 16, 16) ^ 1) << 2).to(torch.int8)
    return (dl * q.float()).view(n, QK)


# -- grid types ------------------------------------------------------------------------------
@functools.cache
def _tables(device: torch.device) -> dict[str, torch.Tensor]:
    """Grid rows with the IQ1 delta or the IQ2 sign patterns folded in, float32 on `device`."""
    iq1 = _grid(quants.IQ1_S)  # [2048, 8] in {-1, 0, 1}; IQ1_M shares it
    delta = np.float32(quants.IQ1_S.delta)
    iq1_rows = np.concatenate([iq1 + delta, iq1 - delta])  # row g + 2048 * (delta negative)
    iq2 = _grid(quants.IQ2_XXS)  # [256, 8]
    ksigns = np.frombuffer(quants.IQ2_XXS.ksigns, dtype=np.uint8)  # 128 sign patterns
    signs = np.where((ksigns[:, None] >> np.arange(8)) & 1, np.float32(-1), np.float32(1))
    iq2_rows = (iq2[:, None, :] * signs[None, :, :]).reshape(-1, 8)  # row g * 128 + s
    return {name: torch.from_numpy(np.ascontiguousarray(rows)).to(device)
            for name, rows in (("iq1", iq1_rows), ("iq2xxs", iq2_rows))}


def _grid(kind) -> np.ndarray:
    kind.init_grid()
    return kind.grid.reshape(kind.grid_shape).astype(np.float32)


def _iq1_s_fields(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block the scale of each 32 weights [N, 8] and the grid row of each 8 [N, 8, 4]
    (rows 2048.. hold the negative delta)."""
    n = b.shape[0]
    qh = _u16(b, 34, 8)  # [N, 8]: 3 scale bits, delta sign, 4 x 3 high index bits
    dl = _f16(b, 0) * (2 * ((qh >> 12) & 7) + 1).float()  # [N, 8]
    high = (qh.view(n, 8, 1) >> _steps(4, 3, b.device, torch.int32)) & 7
    index = b[:, 2:34].int().view(n, 8, 4) | (high << 8)
    index += 2048 * ((qh >> 15) & 1).view(n, 8, 1)
    return dl, index


def _iq1_s(b: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    dl, index = _iq1_s_fields(b)
    rows = grid[index.long()]  # [N, 8, 4, 8]
    return (dl.view(n, 8, 1, 1) * rows).view(n, QK)


def iq1_s_products(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Every IQ1_S grid row (deltas folded in; grid_table(IQ1_S)) against every 8 values of x
    [K]: float32 [K / 8, 4096]. With these, an IQ1_S row's dot product with x is one lookup per
    8 weights (iq1_s_row_dots) instead of 8 multiplies: 15 MB for R1's 7168, which a GPU's L2
    holds. (The grid comes in as an argument: torch.compile would break its graph on the
    numpy that builds the table.)"""
    return x.float().view(-1, 8) @ grid.T


def iq1_s_row_dots(raw: torch.Tensor, products: torch.Tensor) -> torch.Tensor:
    """Dot products of IQ1_S rows (raw bytes, rows of K / 256 blocks) with the x behind
    `products` (iq1_s_products(x)): float32 [rows]."""
    groups = products.shape[0]  # K / 8
    b = raw.reshape(-1, block_bytes(T.IQ1_S))
    n = b.shape[0]
    dl, index = _iq1_s_fields(b)
    # which 8 values of x group g of sub-block s of block i faces: (i mod K/256) * 32 + 4 s + g
    first = (torch.arange(n, device=b.device) % (groups // 32)) * 32
    at = (first.view(n, 1, 1) + _steps(32, 1, b.device, torch.int64).view(1, 8, 4)) * products.shape[1]
    looked_up = products.reshape(-1)[at + index.long()]  # [N, 8, 4]
    return (dl.view(n, 8, 1) * looked_up).sum(dim=(1, 2)).view(-1, groups // 32).sum(dim=1)


def _iq1_m(b: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    sc = _u16(b, 48, 4)  # [N, 4]; their top nibbles hold the block's fp16 scale
    bits = (sc[:, 0] >> 12) | ((sc[:, 1] >> 8) & 0xF0) | ((sc[:, 2] >> 4) & 0xF00) | (sc[:, 3] & 0xF000)
    d = torch.where(bits >= 0x8000, bits - 0x10000, bits).to(torch.int16).view(torch.float16).float()
    scales = (sc.view(n, 4, 1) >> _steps(4, 3, b.device, torch.int32)) & 7
    dl = d.view(n, 1) * (2 * scales.view(n, 16) + 1).float()  # one scale per 16 weights
    qh = (b[:, 32:48].int().view(n, 16, 1) >> _steps(2, 4, b.device, torch.int32)).view(n, 32)
    index = b[:, 0:32].int() | ((qh & 7) << 8)
    index += 2048 * ((qh >> 3) & 1)
    rows = grid[index.long()]  # [N, 32, 8]
    return (dl.view(n, 16, 1, 1) * rows.view(n, 16, 2, 8)).view(n, QK)


def _iq2_xxs(b: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    words = _u32(b, 2, 16).view(n, 8, 2)  # per 32 weights: 4 grid bytes, then signs + scale
    meta = words[..., 1]
    db = _f16(b, 0) * (0.5 + (meta >> 28).float()) * 0.25  # [N, 8]
    signs = (meta.view(n, 8, 1) >> _steps(4, 7, b.device, torch.int64)) & 0x7F
    index = b[:, 2:66].view(n, 8, 8)[..., :4].long() * 128 + signs  # grid bytes: the first word's
    rows = grid[index]  # [N, 8, 4, 8]
    return (db.view(n, 8, 1, 1) * rows).view(n, QK)


_GRIDS = {T.IQ1_S: "iq1", T.IQ1_M: "iq1", T.IQ2_XXS: "iq2xxs"}  # which table each grid type reads
_DECODERS = {
    T.Q8_0: _q8_0, T.Q2_K: _q2_k, T.Q3_K: _q3_k, T.Q4_K: _q4_k, T.Q5_K: _q5_k, T.Q6_K: _q6_k,
    T.IQ1_S: _iq1_s, T.IQ1_M: _iq1_m, T.IQ2_XXS: _iq2_xxs,
}
