"""Write a GGUF file or split set one tensor at a time, with the `gguf` package's writer.

Only one tensor's bytes are in memory at once, so files far larger than RAM can be written.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from gguf import GGUFWriter

from tandem.errors import TandemError
from tandem.gguf.types import GGMLType, tensor_bytes

TensorSpec = tuple[str, tuple[int, ...], GGMLType]  # name, logical shape, stored type
Producer = Callable[[str, tuple[int, ...], GGMLType], np.ndarray]  # -> stored bytes


def write_gguf(out: str | Path, arch: str, metadata: dict[str, object],
               tensors: Iterable[TensorSpec], produce: Producer, *, split_max_size: int = 0,
               split_max_tensors: int = 0,
               on_tensor: Callable[[str, int], None] | None = None) -> list[Path]:
    """Write the tensors (bytes from `produce`, called in order) and metadata; returns paths."""
    out = Path(out)
    if out.suffix != ".gguf":
        raise TandemError(f"{out}: output name must end in .gguf")
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = list(tensors)
    writer = GGUFWriter(out, arch, split_max_size=split_max_size,
                        split_max_tensors=split_max_tensors)
    for key, value in metadata.items():
        _add_kv(writer, key, value)
    for name, shape, t in tensors:
        byte_shape = (*shape[:-1], tensor_bytes(t, shape[-1:]))
        writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), tensor_bytes(t, shape), t)
    paths = writer.format_shard_names(out)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, shape, t in tensors:
        data = np.ascontiguousarray(produce(name, shape, t)).view(np.uint8).reshape(-1)
        if data.nbytes != tensor_bytes(t, shape):
            raise TandemError(f"{name}: produced {data.nbytes} bytes, {t.name} {list(shape)} "
                              f"needs {tensor_bytes(t, shape)}")
        writer.write_tensor_data(data)
        if on_tensor:
            on_tensor(name, data.nbytes)
    writer.close()
    return paths


def _add_kv(writer: GGUFWriter, key: str, value: object) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, list | tuple):
        writer.add_array(key, list(value))
    else:
        writer.add_string(key, str(value))
