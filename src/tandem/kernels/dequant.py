"""Dequantize stored tensor bytes of any ggml type to float32.

Uses ggml's own C dequantizers, split over threads (each C call releases the GIL), so a 1 GB
tensor set converts in seconds. The two activation types ggml has no dequantizer for (Q8_K,
Q8_1) and the integer types are decoded here with torch/numpy.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from tandem.errors import GGUFError
from tandem.gguf.types import NUMPY_DTYPES, GGMLType, block_bytes, block_size, tensor_bytes
from tandem.kernels.ggml_lib import float_ptr, to_float

CHUNK_ELEMENTS = 1 << 20  # per C call; large enough that the Python overhead vanishes

_pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="tandem-dequant")


def dequantize(raw: np.ndarray, t: GGMLType, shape: tuple[int, ...]) -> torch.Tensor:
    """float32 tensor of logical `shape` from the stored bytes `raw` of ggml type `t`."""
    expected = tensor_bytes(t, shape)
    if raw.nbytes != expected:
        raise GGUFError(f"{t.name} tensor of shape {list(shape)} needs {expected} bytes, "
                        f"got {raw.nbytes}")
    raw = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    if t in NUMPY_DTYPES:
        values = raw.view(NUMPY_DTYPES[t]).astype(np.float32)
        return torch.from_numpy(values).reshape(shape)
    if t == GGMLType.Q8_K:
        return _dequantize_q8_k(raw).reshape(shape)
    if t == GGMLType.Q8_1:
        return _dequantize_q8_1(raw).reshape(shape)
    fn = to_float(t)
    if fn is None:
        raise GGUFError(f"ggml has no dequantizer for type {t.name}")
    out = torch.empty(int(np.prod(shape, dtype=np.int64)), dtype=torch.float32)
    _run_chunks(fn, raw, out, t)
    return out.reshape(shape)


def _run_chunks(fn, raw: np.ndarray, out: torch.Tensor, t: GGMLType) -> None:
    bs, bb = block_size(t), block_bytes(t)
    n = out.numel()
    step = max(bs, CHUNK_ELEMENTS // bs * bs)
    src, dst = raw.ctypes.data, out.data_ptr()

    def convert(start: int) -> None:
        count = min(step, n - start)
        fn(src + start // bs * bb, float_ptr(dst + 4 * start), count)

    if n <= step:  # one chunk (an embedding row per decode step): no hand-off to the pool
        convert(0)
        return
    list(_pool.map(convert, range(0, n, step)))


def _dequantize_q8_k(raw: np.ndarray) -> torch.Tensor:
    # block_q8_K: float d; int8 qs[256]; int16 bsums[16]  (292 bytes)
    blocks = torch.from_numpy(raw.reshape(-1, 292))
    d = blocks[:, :4].contiguous().view(torch.float32)  # [B, 1]
    qs = blocks[:, 4:260].contiguous().view(torch.int8).float()
    return (d * qs).reshape(-1)


def _dequantize_q8_1(raw: np.ndarray) -> torch.Tensor:
    # block_q8_1: half d; half s (= d * sum(qs)); int8 qs[32]  (36 bytes)
    blocks = torch.from_numpy(raw.reshape(-1, 36))
    d = blocks[:, :2].contiguous().view(torch.float16).float()
    qs = blocks[:, 4:].contiguous().view(torch.int8).float()
    return (d * qs).reshape(-1)
