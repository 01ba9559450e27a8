"""Quantize float32 rows to any ggml type with ggml's own quantizers.

Used to write test and synthetic model files; the inference path never quantizes weights.
"""

from __future__ import annotations

import ctypes

import numpy as np

from tandem.errors import KernelError
from tandem.gguf.types import GGMLType, row_bytes
from tandem.kernels.ggml_lib import cpu_init, float_ptr, ggml, reference_quantizer

# Types ggml_quantize_chunk handles; it aborts the process on any other.
_CHUNK_TYPE_NAMES = (
    "F32 F16 BF16 Q1_0 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 MXFP4 NVFP4 Q2_K Q3_K Q4_K Q5_K Q6_K TQ1_0 TQ2_0 "
    "IQ2_XXS IQ2_XS IQ3_XXS IQ3_S IQ2_S IQ1_S IQ1_M IQ4_NL IQ4_XS"
)
CHUNK_TYPES = frozenset(GGMLType[n] for n in _CHUNK_TYPE_NAMES.split())


def requires_imatrix(t: GGMLType) -> bool:
    return bool(ggml.ggml_quantize_requires_imatrix(int(t)))


def quantize(values: np.ndarray, t: GGMLType, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Rows of `values` ([rows, n_per_row] float32) as ggml type `t`: uint8 [rows, row_bytes].

    `imatrix` ([n_per_row], importance per column) steers the IQ/K quantizers; the types that
    cannot do without one (IQ1_S, IQ2_XXS, IQ2_XS) get a uniform one when none is given.
    """
    values = np.ascontiguousarray(values, dtype=np.float32)
    if values.ndim == 1:
        values = values[None, :]
    rows, n_per_row = values.reshape(-1, values.shape[-1]).shape
    out = np.empty((rows, row_bytes(t, n_per_row)), dtype=np.uint8)
    cpu_init()
    if t in CHUNK_TYPES:
        if imatrix is None and requires_imatrix(t):
            imatrix = np.ones(n_per_row, dtype=np.float32)
        imat = None
        if imatrix is not None:
            imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
            if imatrix.shape != (n_per_row,):
                raise KernelError(f"imatrix has shape {imatrix.shape}, expected ({n_per_row},)")
            imat = float_ptr(imatrix.ctypes.data)
        ggml.ggml_quantize_chunk(int(t), float_ptr(values.ctypes.data),
                                 ctypes.c_void_p(out.ctypes.data), 0, rows, n_per_row, imat)
        return out
    fn = reference_quantizer(t)
    if fn is None:
        raise KernelError(f"ggml cannot quantize to {t.name}")
    fn(float_ptr(values.ctypes.data), ctypes.c_void_p(out.ctypes.data), values.size)
    return out
