"""Token embedding read from the quantized table in place: only the looked-up rows are
dequantized. R1's table is 129280 x 7168: 3.7 GB as float32, ~0.5 GB in the file."""

from __future__ import annotations

import torch
from torch import nn

from tandem.gguf.types import row_bytes
from tandem.kernels.dequant import dequantize
from tandem.kernels.tensors import QuantTensor


class QuantEmbedding(nn.Module):
    def __init__(self, table: QuantTensor):
        super().__init__()
        self.table = table
        self.n_rows, self.dim = table.shape
        self.row_bytes = row_bytes(table.ggml_type, self.dim)
        self._rows = table.data.reshape(self.n_rows, self.row_bytes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        picked = self._rows[tokens.cpu().numpy()]  # [T, row_bytes], a copy of just these rows
        return dequantize(picked.reshape(-1), self.table.ggml_type, (len(picked), self.dim))


class DenseEmbedding(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.weight[tokens.to(self.weight.device)].float()
