"""The ggml library, as the `ggml-python` package builds and binds it.

ggml-python compiles ggml from source at install time (-march=native: AVX2/AVX-512/AMX where the
CPU has them) and exposes its C API through ctypes. ctypes releases the GIL for the length of
every C call, so a long kernel call lets other Python threads (the GPU side) run meanwhile.
"""

from __future__ import annotations

import ctypes
import functools

from tandem.errors import KernelError
from tandem.gguf.types import GGMLType

try:
    import ggml as _ggml
except (ImportError, OSError) as exc:  # OSError: the shared library failed to load
    raise KernelError(
        f"the ggml library is unavailable ({exc}); reinstall with `pip install --force-reinstall "
        "--no-binary ggml-python ggml-python==0.0.45` (needs a C compiler and CMake)"
    ) from exc

ggml = _ggml
F32_PTR = ctypes.POINTER(ctypes.c_float)


@functools.cache
def cpu_init() -> None:
    """Fill ggml's CPU lookup tables once (fp16 tables, feature detection)."""
    ggml.ggml_cpu_init()


def float_ptr(address: int):
    return ctypes.cast(ctypes.c_void_p(address), F32_PTR)


@functools.cache
def to_float(t: GGMLType):
    """ggml's C dequantizer for type t, or None where ggml has none (Q8_K, Q8_1, ints)."""
    cpu_init()
    fn = ggml.ggml_get_type_traits(int(t)).contents.to_float
    return fn if fn else None


@functools.cache
def reference_quantizer(t: GGMLType):
    """ggml's row quantizer for types that ggml_quantize_chunk does not take (Q8_K, Q8_1)."""
    cpu_init()
    fn = ggml.ggml_get_type_traits_cpu(int(t)).contents.from_float
    if not fn:
        fn = ggml.ggml_get_type_traits(int(t)).contents.from_float_ref
    return fn if fn else None
