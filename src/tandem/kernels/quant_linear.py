"""A linear layer whose weight stays in its ggml type on its device, dequantized on the fly.

For the GPU part of a hybrid model (attention, dense layers, shared experts, head) this keeps
the file's bytes: a UD-IQ1_S R1 stores these in Q4_K-Q8_0 (0.5-1 byte per weight) where
bfloat16 copies take 2, and decode reads every byte of them for every token. Inputs of up to
MATVEC_ROWS rows (decode steps, a few sequences) take one fused dequantize-multiply on CUDA: the
dequantizer (kernels.torch_dequant) and the products in one function that torch.compile turns
into a reduction over the quantized bytes. Longer inputs (prompts) dequantize the weight to
bfloat16, PROMPT_ROWS rows at a time, for normal matmuls; off CUDA every call does so in float32.
"""

from __future__ import annotations

import functools
import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

from tandem.errors import KernelError, first_line
from tandem.gguf.types import GGMLType, tensor_bytes
from tandem.kernels import compiling, torch_dequant
from tandem.kernels.env import triton_module

MATVEC_ROWS = 16  # input rows up to which the fused dequantize-multiply runs (CUDA)
PROMPT_ROWS = 4096  # weight rows dequantized at a time for longer inputs (the head: 129K rows)
RECOMPILE_LIMIT = 64
# For A/B runs: TANDEM_QUANT_STATIC=1 compiles the matvec with static shapes, one kernel set per
# weight type, shape and row count (the GPU share's kernels ran up to 2.4x faster so); by
# default dynamo makes the shapes dynamic once it has seen a second one, one set for all.
# Q4_K and Q6_K weights go through a hand-written Triton matvec (kernels.triton_matvec) where
# Triton imports, for up to its MAX_INPUT_ROWS rows: at R1's shapes on the GPU machine 4-15x
# faster than the compiled one and within 1.6x of cuBLAS on bfloat16 copies (run r,
# benchmarks/results/logs/quant-matvec-20261128r.log). TANDEM_QUANT_TRITON=0: the compiled one;
# TANDEM_QUANT_MATVEC sends every call through one Triton kernel (default: by type, row length
# and input rows, kernels.triton_matvec.kernel_for).
QUANT_ENV = ("TANDEM_QUANT_STATIC", "TANDEM_QUANT_TRITON", "TANDEM_QUANT_MATVEC")
STATIC = os.environ.get("TANDEM_QUANT_STATIC") == "1"
TRITON = os.environ.get("TANDEM_QUANT_TRITON") != "0"

log = logging.getLogger(__name__)


class QuantLinear(nn.Module):
    """y = x W^T for W [out, in] stored as `raw` (uint8, on its device) of `ggml_type`; float32
    out. Same call as models.layers.Linear."""

    def __init__(self, raw: torch.Tensor, ggml_type: GGMLType, shape: tuple[int, int]):
        super().__init__()
        if not torch_dequant.supports(ggml_type):
            raise KernelError(f"no torch dequantizer for {ggml_type.name}: keep this weight dense")
        if raw.dtype != torch.uint8 or raw.numel() != tensor_bytes(ggml_type, shape):
            raise KernelError(f"{ggml_type.name} weight of shape {list(shape)} needs "
                              f"{tensor_bytes(ggml_type, shape)} bytes, got {raw.numel()} of {raw.dtype}")
        self.register_buffer("raw", raw.reshape(-1), persistent=False)
        grid = torch_dequant.grid_table(ggml_type, raw.device)
        self.register_buffer("grid", grid, persistent=False)
        self.ggml_type = ggml_type
        self.out_features, self.in_features = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.raw.device, torch.float32)
        rows = x.reshape(-1, self.in_features)
        cuda = self.raw.is_cuda
        written = _triton_matvec() if cuda and TRITON and self.ggml_type not in _no_triton else None
        if written is not None and written.supports(self.ggml_type, self.in_features, rows.shape[0]):
            try:
                out = written.matvec(self.raw, self.ggml_type, rows, self.out_features)
                return out.reshape(*x.shape[:-1], self.out_features)
            except Exception as exc:  # Triton's compiler failed here (an old driver, ...)
                log.warning("the Triton %s matvec failed (%s); the compiled one from now on",
                            self.ggml_type.name, first_line(exc))
                _no_triton.add(self.ggml_type)
        if cuda and rows.shape[0] <= MATVEC_ROWS and self.ggml_type not in _eager_only:
            try:
                out = _compiled_matvec(STATIC)(self.ggml_type, self.raw, self.grid, rows, self.out_features)
                return out.reshape(*x.shape[:-1], self.out_features)
            except Exception as exc:  # no triton, no compiler ...
                log.warning("compiling the %s matvec failed (%s); dequantized weights from now on",
                            self.ggml_type.name, first_line(exc))
                _eager_only.add(self.ggml_type)
        dtype = torch.bfloat16 if cuda else torch.float32
        row_bytes = tensor_bytes(self.ggml_type, (1, self.in_features))
        parts = []
        for first in range(0, self.out_features, PROMPT_ROWS):  # a bounded copy at a time
            n = min(PROMPT_ROWS, self.out_features - first)
            weight = torch_dequant.dequantize(self.raw[first * row_bytes : (first + n) * row_bytes],
                                              self.ggml_type, (n, self.in_features), dtype=dtype,
                                              compiled=cuda)
            parts.append(F.linear(rows.to(dtype), weight))
        out = (parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)).float()
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.ggml_type.name}"


def _matvec(ggml_type: GGMLType, raw: torch.Tensor, grid: torch.Tensor | None, x: torch.Tensor,
            out_features: int) -> torch.Tensor:
    """x [M, in] times the dequantized weight, summed in float32: [M, out]. Products and sums,
    not a matmul, so that the compiled form reads only the quantized bytes."""
    weight = torch_dequant.values(raw, ggml_type, grid).view(out_features, -1)
    return (weight[None] * x[:, None, :]).sum(-1)


@functools.cache
def _compiled_matvec(static: bool):
    # a variant per type, weight shape and row count
    return compiling.compiled(_matvec, dynamic=False if static else None, variants=RECOMPILE_LIMIT)


_eager_only: set[GGMLType] = set()
_no_triton: set[GGMLType] = set()  # types whose Triton matvec failed: compiled from then on


@functools.cache
def _triton_matvec():
    """kernels.triton_matvec, or None where Triton is missing (a warning, once, when
    TANDEM_QUANT_TRITON=1 asked for it)."""
    return triton_module("triton_matvec", "TANDEM_QUANT_TRITON", "the compiled matvec",
                         asked=os.environ.get("TANDEM_QUANT_TRITON") == "1")
