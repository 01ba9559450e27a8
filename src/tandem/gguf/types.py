"""ggml tensor types: names, block geometry and byte sizes.

The tables themselves come from the `gguf` package; this module only answers the questions
the rest of tandem asks, with errors that name the type.
"""

from __future__ import annotations

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from tandem.errors import GGUFError

GGMLType = GGMLQuantizationType

# Plain element types whose bytes numpy can read directly (no blocks).
NUMPY_DTYPES = {
    GGMLType.F32: "float32",
    GGMLType.F16: "float16",
    GGMLType.F64: "float64",
    GGMLType.I8: "int8",
    GGMLType.I16: "int16",
    GGMLType.I32: "int32",
    GGMLType.I64: "int64",
}


def ggml_type(value: int | str | GGMLType) -> GGMLType:
    """The ggml type for an enum value, a number or a name such as 'q4_k' or 'IQ1_S'."""
    if isinstance(value, GGMLType):
        return value
    if isinstance(value, str):
        try:
            return GGMLType[value.strip().upper()]
        except KeyError:
            known = ", ".join(t.name for t in GGMLType)
            raise GGUFError(f"unknown ggml type name {value!r}; known: {known}") from None
    try:
        return GGMLType(int(value))
    except ValueError:
        raise GGUFError(f"unknown ggml type id {value}") from None


# gguf-py still lists Q8_1 with its old 40-byte float layout; ggml has stored it as two halves
# and 32 int8 (36 bytes) since 2023. Q8_1 is an activation type that no published file stores.
BLOCK_GEOMETRY = {**GGML_QUANT_SIZES, GGMLType.Q8_1: (32, 36)}
ACTIVATION_ONLY = frozenset({GGMLType.Q8_1})


def block_size(t: GGMLType) -> int:
    """Elements per block (1 for plain types)."""
    return BLOCK_GEOMETRY[t][0]


def block_bytes(t: GGMLType) -> int:
    """Bytes per block."""
    return BLOCK_GEOMETRY[t][1]


def row_bytes(t: GGMLType, n_elements: int) -> int:
    """Bytes of `n_elements` consecutive values of type t; they must fill whole blocks."""
    bs, bb = BLOCK_GEOMETRY[t]
    if n_elements % bs:
        raise GGUFError(f"{t.name} stores blocks of {bs} values; a row of {n_elements} does not fit")
    return n_elements // bs * bb


def tensor_bytes(t: GGMLType, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of logical shape (rows..., row length), rows stored contiguously."""
    n_rows = 1
    for d in shape[:-1]:
        n_rows *= d
    return n_rows * row_bytes(t, shape[-1] if shape else 1)


def bits_per_weight(t: GGMLType) -> float:
    bs, bb = BLOCK_GEOMETRY[t]
    return bb * 8 / bs
