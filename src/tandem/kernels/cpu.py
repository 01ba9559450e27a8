"""Quantized matmul and the routed-experts MoE op on the CPU, through ggml.

One `CpuKernels` object owns a ggml thread pool (persistent; settable thread count) and a cache
of built graphs, one per op and shape. Calls release the GIL for their whole length, and
`submit_moe` runs the op on a dedicated thread so the caller (the GPU side) keeps working and
waits only when it needs the result.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from tandem.errors import KernelError
from tandem.gguf.types import GGMLType
from tandem.kernels import native
from tandem.kernels.ggml_lib import cpu_init, ggml
from tandem.kernels.graph import Graph, point
from tandem.kernels.tensors import QuantTensor, activation_rows, as_cpu

MAX_CACHED_GRAPHS = 32
SKIPPED_SLOT = -1  # expert id of a slot that moe() leaves out (experts.c's SKIPPED_SLOT)
F32 = GGMLType.F32
I32 = GGMLType.I32


def default_threads() -> int:
    """CPUs this process may run on (its affinity mask, e.g. as limited by taskset)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, usable or 1)


def resize_openmp_team(n_threads: int) -> None:
    """This thread's OpenMP team resized to `n_threads` (torch's CPU ops use that many from
    now on). torch and tandem's kernels share one libgomp, which counts the threads of every
    team in the process, and once they outnumber the CPUs its waiting threads spin ~100 times,
    then sleep: every barrier of a MoE op on the runner's team would need wake-ups. One
    parallel torch op on n_threads makes libgomp release the team's other threads (a
    one-thread op would not: n_threads >= 2 does)."""
    if n_threads < 1:
        raise KernelError(f"thread count must be >= 1, got {n_threads}")
    torch.set_num_threads(n_threads)
    torch.ones(1 << 24).sum()


@functools.cache  # asked at every MoE call (three types): ~0.7 us each through ggml's traits
def supports_matmul(t: GGMLType) -> bool:
    """Whether ggml's CPU backend has a dot product for weights of type t."""
    cpu_init()
    return bool(ggml.ggml_get_type_traits_cpu(int(t)).contents.vec_dot)


class CpuKernels:
    def __init__(self, n_threads: int | None = None):
        self.expert_bytes_read = 0  # weight bytes of the distinct experts all moe calls used
        self._lock = threading.Lock()
        self._graphs: OrderedDict[tuple, tuple[Graph, dict]] = OrderedDict()
        self._threadpool = None
        self._n_threads = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tandem-moe")
        self._runner: native.MoeRunner | None = None  # started with the first start_moe
        self.set_threads(n_threads or default_threads())

    # -- threads ---------------------------------------------------------------------------
    @property
    def n_threads(self) -> int:
        return self._n_threads

    def set_threads(self, n_threads: int) -> None:
        """Use `n_threads` threads from now on (the pool is rebuilt, cached graphs replanned)."""
        if n_threads < 1:
            raise KernelError(f"thread count must be >= 1, got {n_threads}")
        with self._lock:
            cpu_init()
            if self._threadpool is not None:
                ggml.ggml_threadpool_free(self._threadpool)
            params = ggml.ggml_threadpool_params_default(n_threads)
            self._threadpool = ggml.ggml_threadpool_new(ctypes.byref(params))
            if not self._threadpool:
                raise KernelError(f"ggml could not start a pool of {n_threads} threads")
            self._n_threads = n_threads
            for graph, _ in self._graphs.values():
                graph.plan(n_threads, self._threadpool)

    # -- ops -------------------------------------------------------------------------------
    def matmul(self, weight: QuantTensor, x: torch.Tensor) -> torch.Tensor:
        """x [T, K] float32 times weight [N, K] (any ggml type) transposed: [T, N] float32."""
        if len(weight.shape) != 2:
            raise KernelError(f"matmul takes a 2-D weight, got shape {list(weight.shape)}")
        n, k = weight.shape
        x = activation_rows(x, k, "x")
        _check_matmul_type(weight.ggml_type, "weight")
        t = x.shape[0]
        out = torch.empty(t, n, dtype=torch.float32)
        key = ("matmul", t, weight.address, weight.ggml_type, weight.shape)
        graph, ext = self._graph(key, lambda: _build_matmul(weight, t))
        with self._lock:
            point(ext["x"], x.data_ptr())
            point(ext["out"], out.data_ptr())
            graph.compute()
        return out

    def moe(self, x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor,
            gate: QuantTensor, up: QuantTensor, down: QuantTensor, own: bool = True,
            out: torch.Tensor | None = None, n_threads: int | None = None) -> torch.Tensor:
        """Routed experts: sum_k w[t,k] * down_e(silu(gate_e x_t) * up_e x_t), e = ids[t,k].

        x [T, d] float32; expert_ids [T, k] integer; expert_weights [T, k] float; gate and up
        [E, n_ff, d], down [E, d, n_ff], each in its own ggml type. Returns [T, d] float32, in
        `out` if given (contiguous float32 on the CPU, e.g. pinned for a fast upload).
        `own`: tandem's kernels where they cover all three types (tandem.kernels.native), else
        (or when False) ggml's. A slot whose id is SKIPPED_SLOT adds nothing (own kernels only):
        its expert is computed elsewhere (kernels.gpu_share). `n_threads`: fewer threads than
        the pool's for this call (own kernels only), leaving cores to other work.
        """
        x, ids, weights, out, own, distinct = self._checked(x, expert_ids, expert_weights, gate, up, down,
                                                            own, out)
        if x.shape[0] == 0:
            return out
        self.count_read(distinct, gate, up, down)
        if own:
            return native.moe(x, ids, weights, gate, up, down, self._threads(n_threads), out=out)
        key = ("moe", x.shape[0], ids.shape[1], gate.address, up.address, down.address)
        graph, ext = self._graph(key, lambda: _build_moe(gate, up, down, x.shape[0], ids.shape[1]))
        with self._lock:
            point(ext["x"], x.data_ptr())
            point(ext["ids"], ids.data_ptr())
            point(ext["w"], weights.data_ptr())
            point(ext["out"], out.data_ptr())
            graph.compute()
        return out

    def start_moe(self, x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor,
                  gate: QuantTensor, up: QuantTensor, down: QuantTensor, out: torch.Tensor | None = None,
                  n_threads: int | None = None) -> native.RunningMoe | None:
        """`moe` with tandem's own kernels, started on the kernels' runner thread (a C thread:
        it needs no GIL to start, see native.MoeRunner) and returning at once; `result()` of
        what it returns waits. None when the weights need ggml's kernels or the runner is still
        busy with an earlier call: the caller then calls `moe` itself."""
        x, ids, weights, out, own, distinct = self._checked(x, expert_ids, expert_weights, gate, up, down,
                                                            True, out)
        if not own:
            return None
        if self._runner is None:
            self._runner = native.MoeRunner()
        running = self._runner.start(x, ids, weights, gate, up, down, self._threads(n_threads), out)
        if running is not None:
            self.count_read(distinct, gate, up, down)
        return running

    def start_moe_after(self, ready: int, event: int, x: torch.Tensor, expert_ids: torch.Tensor,
                        expert_weights: torch.Tensor, n_skip: int, gate: QuantTensor, up: QuantTensor,
                        down: QuantTensor, out: torch.Tensor, n_threads: int | None = None,
                        copies: native.ShareCopies | None = None,
                        resident: torch.Tensor | None = None) -> native.RunningMoe | None:
        """`start_moe` for one token whose inputs are still being written: the runner waits
        until `ready(event)` returns 0 (native.MoeRunner.start_after), then leaves the slots of
        the experts flagged in `resident` (uint8 per expert: held in VRAM) and of the `n_skip`
        lowest other ids to the GPU share and runs the rest. The buffers (x [1, d], expert_ids
        [1, k] int64, expert_weights [1, k], out [1, d]; host memory the GPU writes) must stay
        valid until the result. None when tandem's kernels do not cover the types or the runner
        is busy. `copies`: a GPU share's copies the runner queues first
        (native.MoeRunner.start_after). The caller counts the experts this reads (count_read)
        once it knows the split."""
        _check_experts(gate, up, down)
        if not native.fits(gate, up, down):
            return None
        if self._runner is None:
            self._runner = native.MoeRunner()
        return self._runner.start_after(ready, event, x, expert_ids, expert_weights, n_skip, gate, up,
                                        down, self._threads(n_threads), out, copies, resident)

    def count_read(self, distinct: int, *experts: QuantTensor) -> None:
        """Add `distinct` experts' bytes of these matrices to expert_bytes_read."""
        self.expert_bytes_read += distinct * sum(w.expert_bytes() for w in experts)

    def _threads(self, n_threads: int | None) -> int:
        return self._n_threads if n_threads is None else max(1, min(n_threads, self._n_threads))

    def _checked(self, x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor,
                 gate: QuantTensor, up: QuantTensor, down: QuantTensor, own: bool, out: torch.Tensor | None):
        """moe's arguments checked and converted: x, ids (int32), weights (float32), out, whether
        tandem's own kernels run it, and the count of distinct experts."""
        n_expert, n_ff, d = _check_experts(gate, up, down)
        x = activation_rows(x, d, "x")
        t = x.shape[0]
        if expert_ids.dim() != 2 or expert_ids.shape[0] != t:
            raise KernelError(f"expert_ids must be [T={t}, k], got {list(expert_ids.shape)}")
        k = expert_ids.shape[1]
        if tuple(expert_weights.shape) != (t, k):
            raise KernelError(f"expert_weights must be [{t}, {k}], got {list(expert_weights.shape)}")
        ids = as_cpu(expert_ids, torch.int32)
        lowest, highest, distinct = _id_stats(ids)
        if t and (lowest < SKIPPED_SLOT or highest >= n_expert):
            raise KernelError(f"expert ids must lie in [0, {n_expert}) (or be {SKIPPED_SLOT}: "
                              f"skipped), got {lowest}..{highest}")
        own = own and native.fits(gate, up, down)
        if not own and t and bool((ids == SKIPPED_SLOT).any()):
            raise KernelError(f"skipped slots (id {SKIPPED_SLOT}) need tandem's own kernels; "
                              f"ggml's cannot skip ({gate.ggml_type.name}/{up.ggml_type.name}/"
                              f"{down.ggml_type.name} experts)")
        weights = as_cpu(expert_weights, torch.float32)
        if out is None:
            out = torch.empty(t, d, dtype=torch.float32)
        elif (tuple(out.shape) != (t, d) or out.dtype != torch.float32 or out.device.type != "cpu"
              or not out.is_contiguous()):
            raise KernelError(f"out must be a contiguous float32 [{t}, {d}] CPU tensor, got "
                              f"{out.dtype} {list(out.shape)} on {out.device}")
        return x, ids, weights, out, own, distinct

    def submit_moe(self, *args, **kwargs) -> Future:
        """`moe` on the kernels' own thread; the Future holds the [T, d] result."""
        return self._executor.submit(self.moe, *args, **kwargs)

    # -- plumbing --------------------------------------------------------------------------
    def _graph(self, key: tuple, build) -> tuple[Graph, dict]:
        with self._lock:
            entry = self._graphs.get(key)
            if entry is not None:
                self._graphs.move_to_end(key)
                return entry
            entry = build()
            entry[0].plan(self._n_threads, self._threadpool)
            self._graphs[key] = entry
            while len(self._graphs) > MAX_CACHED_GRAPHS:
                _, (old, _) = self._graphs.popitem(last=False)
                old.free()
            return entry

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        if self._runner is not None:
            self._runner.close()  # after the call under way, if any
        with self._lock:
            for graph, _ in self._graphs.values():
                graph.free()
            self._graphs.clear()
            if self._threadpool is not None:
                ggml.ggml_threadpool_free(self._threadpool)
                self._threadpool = None

    def __enter__(self) -> CpuKernels:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


SMALL_IDS = 256  # up to this many ids (decode steps): Python's min/max/set beat torch's ops


def _id_stats(ids: torch.Tensor) -> tuple[int, int, int]:
    """Smallest and largest id, and how many distinct experts (SKIPPED_SLOT not counted). A
    decode step's 8 ids take ~3 us this way against ~50 us through torch's reductions."""
    if ids.numel() == 0:
        return 0, 0, 0
    if ids.numel() <= SMALL_IDS:
        values = ids.view(-1).tolist()
        return min(values), max(values), len(set(values) - {SKIPPED_SLOT})
    return int(ids.min()), int(ids.max()), int((ids.unique() >= 0).sum())


def _check_matmul_type(t: GGMLType, what: str) -> None:
    if not supports_matmul(t):
        raise KernelError(f"{what} type {t.name} has no CPU matmul kernel in ggml")


def _check_experts(gate: QuantTensor, up: QuantTensor, down: QuantTensor) -> tuple[int, int, int]:
    for name, w in (("gate", gate), ("up", up), ("down", down)):
        if len(w.shape) != 3:
            raise KernelError(f"{name} experts must be [E, rows, cols], got {list(w.shape)}")
        _check_matmul_type(w.ggml_type, f"{name} experts")
    n_expert, n_ff, d = gate.shape
    if up.shape != gate.shape or down.shape != (n_expert, d, n_ff):
        raise KernelError(f"expert shapes disagree: gate {list(gate.shape)}, up {list(up.shape)}, "
                          f"down {list(down.shape)} (want down [{n_expert}, {d}, {n_ff}])")
    return n_expert, n_ff, d


def _build_matmul(weight: QuantTensor, t: int) -> tuple[Graph, dict]:
    n, k = weight.shape
    graph = Graph(ops_bytes=4 * n * t)
    w = graph.external(weight.ggml_type, [k, n])
    point(w, weight.address)
    x = graph.external(F32, [k, t])
    y = ggml.ggml_mul_mat(graph.ops, w, x)  # [n, t]
    out = graph.output(y, [n, t])
    return graph, {"x": x, "out": out}


def _build_moe(gate: QuantTensor, up: QuantTensor, down: QuantTensor, t: int, k: int):
    """llama.cpp's MoE FFN: mul_mat_id groups the T*k rows by expert, so one pass over each
    chosen expert's weights serves every token that picked it."""
    n_expert, n_ff, d = gate.shape
    floats = 3 * n_ff * k * t + 2 * d * k * t + k * d * t
    graph = Graph(ops_bytes=4 * floats + 64 * 256)
    ops = graph.ops
    w_gate = graph.external(gate.ggml_type, [d, n_ff, n_expert])
    w_up = graph.external(up.ggml_type, [d, n_ff, n_expert])
    w_down = graph.external(down.ggml_type, [n_ff, d, n_expert])
    for tensor, q in ((w_gate, gate), (w_up, up), (w_down, down)):
        point(tensor, q.address)
    x = graph.external(F32, [d, 1, t])
    ids = graph.external(I32, [k, t])
    w = graph.external(F32, [1, k, t])

    g = ggml.ggml_mul_mat_id(ops, w_gate, x, ids)  # [n_ff, k, t]
    u = ggml.ggml_mul_mat_id(ops, w_up, x, ids)  # [n_ff, k, t]
    h = ggml.ggml_swiglu_split(ops, g, u)  # silu(g) * u
    y = ggml.ggml_mul_mat_id(ops, w_down, h, ids)  # [d, k, t]
    y = ggml.ggml_mul(ops, y, w)  # scale each expert's output by its routing weight
    nb1, nb2 = y.contents.nb[1], y.contents.nb[2]
    total = ggml.ggml_view_2d(ops, y, d, t, nb2, 0)
    for slot in range(1, k):
        total = ggml.ggml_add(ops, total, ggml.ggml_view_2d(ops, y, d, t, nb2, slot * nb1))
    out = graph.output(total, [d, t])
    return graph, {"x": x, "ids": ids, "w": w, "out": out}
