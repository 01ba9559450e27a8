"""QuantTensor: a weight in its stored ggml type, in memory tandem does not copy."""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from tandem.errors import KernelError
from tandem.gguf.types import GGMLType, tensor_bytes


@dataclass(frozen=True, eq=False)
class QuantTensor:
    """Stored bytes plus their type and logical shape.

    `shape` is logical (numpy order): (rows, row length) for a matrix, (experts, rows, row
    length) for stacked experts. `data` keeps the bytes alive; usually a view of the mmap.
    """

    ggml_type: GGMLType
    shape: tuple[int, ...]
    data: np.ndarray

    def __post_init__(self):
        need = tensor_bytes(self.ggml_type, self.shape)
        if self.data.nbytes != need:
            raise KernelError(f"{self.ggml_type.name} tensor of shape {list(self.shape)} needs "
                              f"{need} bytes, got {self.data.nbytes}")
        if not self.data.flags.c_contiguous:
            raise KernelError("QuantTensor data must be contiguous")

    @classmethod
    def from_gguf(cls, model, name: str) -> QuantTensor:
        """The tensor `name` of an open GGUFModel, zero copy."""
        info = model.info(name)
        return cls(info.ggml_type, info.shape, model.raw(name))

    @functools.cached_property
    def address(self) -> int:
        """Where the bytes start (numpy's ctypes lookup costs ~3 us; the bytes never move)."""
        return self.data.ctypes.data

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def expert_bytes(self) -> int:
        """Bytes of one expert's matrix (stacked tensors only)."""
        return self.nbytes // self.shape[0]

    @functools.cached_property
    def per_expert(self) -> torch.Tensor:
        """The stored bytes as uint8 [experts, bytes per expert], no copy (stacked tensors)."""
        with warnings.catch_warnings():  # a read-only mmap: torch warns; readers only read
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(self.data.reshape(self.shape[0], -1))


def activation_rows(x: torch.Tensor, width: int, name: str) -> torch.Tensor:
    """x as the CPU kernels take it: [T, width] float32, contiguous, in CPU memory."""
    if x.dim() != 2 or x.shape[1] != width:
        raise KernelError(f"{name} must be [T, {width}], got {list(x.shape)}")
    return as_cpu(x, torch.float32)


def as_cpu(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t as a contiguous CPU tensor of dtype: itself when it is one already (the MoE op's
    arguments pass two checks a call; each conversion, even a no-op, costs ~1 us)."""
    if t.dtype == dtype and t.device.type == "cpu" and t.is_contiguous() and not t.requires_grad:
        return t
    return t.detach().to("cpu", dtype).contiguous()
