"""A small ggml compute graph whose inputs and outputs live in caller-owned memory.

Built once per shape, then run many times: each run only re-points the external tensors at the
new buffers. Weights are external too, read in place from the memory-mapped GGUF file.
"""

from __future__ import annotations

import ctypes

import numpy as np

from tandem.errors import KernelError
from tandem.gguf.types import GGMLType
from tandem.kernels.ggml_lib import cpu_init, ggml

GGML_STATUS_SUCCESS = 0


class Graph:
    """Two ggml contexts: `ext` describes outside memory (no_alloc), `ops` holds results."""

    def __init__(self, ops_bytes: int, max_tensors: int = 64):
        cpu_init()
        overhead = ggml.ggml_tensor_overhead()
        self.ext = ggml.ggml_init(ggml.ggml_init_params(
            mem_size=overhead * max_tensors, mem_buffer=None, no_alloc=True))
        graph_bytes = ggml.ggml_graph_overhead()
        self.ops = ggml.ggml_init(ggml.ggml_init_params(
            mem_size=ops_bytes + overhead * max_tensors + graph_bytes + (1 << 16),
            mem_buffer=None, no_alloc=False))
        if not self.ext or not self.ops:
            raise KernelError(f"ggml could not allocate {ops_bytes} bytes for a graph")
        self.graph = None
        self._plan = None
        self._work = None

    def external(self, t: GGMLType, ne: list[int]):
        """A tensor of type t and ggml dims `ne` (fastest first) whose data is set per run."""
        ne = [int(n) for n in ne]
        if len(ne) == 1:
            return ggml.ggml_new_tensor_1d(self.ext, int(t), *ne)
        if len(ne) == 2:
            return ggml.ggml_new_tensor_2d(self.ext, int(t), *ne)
        return ggml.ggml_new_tensor_3d(self.ext, int(t), *ne)

    def output(self, result, ne: list[int]):
        """Finish the graph with a float32 copy of `result` (dims `ne`) into outside memory.

        Returns the tensor to `point` at the output buffer: ggml_cpy writes through a view of
        the destination made at build time, so that view is what has to be re-pointed."""
        dest = self.external(GGMLType.F32, ne)
        copy = ggml.ggml_cpy(self.ops, result, dest)
        self.graph = ggml.ggml_new_graph(self.ops)
        ggml.ggml_build_forward_expand(self.graph, copy)
        return copy

    def plan(self, n_threads: int, threadpool) -> None:
        plan = ggml.ggml_graph_plan(self.graph, n_threads, threadpool)
        self._work = np.empty(max(plan.work_size, 1), dtype=np.uint8)
        plan.work_data = ctypes.cast(self._work.ctypes.data, ctypes.POINTER(ctypes.c_uint8))
        self._plan = plan

    def compute(self) -> None:
        status = ggml.ggml_graph_compute(self.graph, ctypes.byref(self._plan))
        if status != GGML_STATUS_SUCCESS:
            raise KernelError(f"ggml graph compute failed with status {status}")

    def free(self) -> None:
        for ctx in (self.ops, self.ext):
            if ctx:
                ggml.ggml_free(ctx)
        self.ops = self.ext = None


def point(tensor, address: int) -> None:
    """Make an external tensor read or write memory at `address`."""
    tensor.contents.data = address
