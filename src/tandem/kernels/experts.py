"""Routed-expert backends for the MoE seam: submit the routed experts, collect the result.

`CpuExperts` runs them on the CPU (tandem's kernels or ggml's), reading the quantized weights
in place; the caller's device keeps working (shared expert) until it collects. Given an
`ExpertStreamer`, batches long enough go to the GPU instead, their weights streamed there. `TorchExperts`
computes them with dequantized weights in torch, on any device: the reference, and the
fallback for rules that put experts on a GPU.
"""

from __future__ import annotations

from concurrent.futures import Future

import torch
import torch.nn.functional as F

from tandem.kernels.cpu import CpuKernels
from tandem.kernels.streamed import ExpertStreamer
from tandem.kernels.tensors import QuantTensor


class CpuExperts:
    def __init__(self, kernels: CpuKernels, gate: QuantTensor, up: QuantTensor, down: QuantTensor,
                 own_kernels: bool = True, streamer: ExpertStreamer | None = None):
        self.kernels, self.gate, self.up, self.down = kernels, gate, up, down
        self.own_kernels = own_kernels  # tandem's kernels where they cover the types, else ggml
        self.streamer = streamer

    def submit(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> Future | torch.Tensor:
        if self.streamer is not None and self.streamer.wants(x.shape[0], self.gate, self.up, self.down):
            return self.streamer.moe(x, ids, weights, self.gate, self.up, self.down)  # queued there
        out = None
        if x.is_cuda:
            # Through pinned memory both ways: a fresh pageable copy of a 2048-token batch (59 MB)
            # took ~45 ms down and ~13 ms up on the GPU machine (page faults, staged copies),
            # more than a tenth of a CPU-only prefill layer.
            x, out = _pinned_copy(x), torch.empty(x.shape, dtype=torch.float32, pin_memory=True)
        else:
            x = x.detach().to("cpu", torch.float32)
        return self.kernels.submit_moe(x, ids.cpu(), weights.cpu(), self.gate, self.up, self.down,
                                       own=self.own_kernels, out=out)

    def collect(self, handle: Future | torch.Tensor) -> torch.Tensor:
        return handle.result() if isinstance(handle, Future) else handle

    def compute(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The same, on the calling thread (CPU tensors in, CPU tensor out)."""
        return self.kernels.moe(x, ids, weights, self.gate, self.up, self.down, own=self.own_kernels)


def _pinned_copy(x: torch.Tensor) -> torch.Tensor:
    """A float32 copy of GPU tensor x in pinned host memory (torch caches these blocks)."""
    host = torch.empty(x.shape, dtype=torch.float32, pin_memory=True)
    host.copy_(x.detach())
    return host


class TorchExperts:
    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor):
        self.gate, self.up, self.down = gate, up, down  # [E, ff, d], [E, ff, d], [E, d, ff]

    def submit(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        device, dtype = self.gate.device, self.gate.dtype
        x = x.to(device, torch.float32)
        ids, weights = ids.to(device), weights.to(device, torch.float32)
        out = torch.zeros_like(x)
        for e in ids.unique().tolist():
            tokens, slots = (ids == e).nonzero(as_tuple=True)
            h = x[tokens].to(dtype)
            y = F.linear(F.silu(F.linear(h, self.gate[e])) * F.linear(h, self.up[e]), self.down[e])
            out.index_add_(0, tokens, y.float() * weights[tokens, slots, None])
        return out

    def collect(self, handle: torch.Tensor) -> torch.Tensor:
        return handle
