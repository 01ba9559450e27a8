"""tandem's own CPU kernels (csrc/experts.c): the routed experts of one MoE layer and a plain
quantized matmul, for the types of DeepSeek GGUFs' experts: IQ1_S and IQ2_XXS (where ggml's CPU
kernels leave most of the RAM bandwidth unused) and Q4_K / Q6_K (Q4_K_M files). The C library
is built at install time; the AVX-512 paths are chosen at run time, portable C serves every
other CPU. Calls go through ctypes, which releases the GIL.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import threading
import weakref

import numpy as np
import torch
from gguf import quants

from tandem.errors import KernelError
from tandem.gguf.types import GGMLType
from tandem.kernels.env import env_int
from tandem.kernels.tensors import QuantTensor, activation_rows, as_cpu

BLOCK = 256  # every type here quantizes rows in blocks of 256 values
# Environment variables that pick kernel variants at load, for A/B benchmarks: TANDEM_AMX=0 keeps
# the AVX-512 GEMMs on an AMX CPU; TANDEM_TOKEN_BLOCK sets (token, slot) pairs per prefill task;
# TANDEM_GEMM_MIN_PAIRS the fewest pairs of an expert that take the GEMM path (default 7 on AMX, 16);
# TANDEM_PIN_THREADS=1 keeps each worker thread of the kernels on one CPU; TANDEM_RUNNER_SPIN_US
# how long the runner thread and its caller spin before they sleep (default 2000; 0: at once).
KERNEL_ENV = ("TANDEM_AMX", "TANDEM_TOKEN_BLOCK", "TANDEM_GEMM_MIN_PAIRS", "TANDEM_PIN_THREADS",
              "TANDEM_RUNNER_SPIN_US")
RUNNER_SPIN_US = 2000  # csrc/runner.c's default


@functools.cache
def _lib() -> ctypes.CDLL:
    spec = importlib.util.find_spec("tandem.kernels._experts")
    if spec is None or spec.origin is None:
        raise KernelError("tandem's CPU kernel library is not built; reinstall tandem with "
                          "`pip install -e .` (needs a C compiler)")
    lib = ctypes.CDLL(spec.origin)
    ptr, i32 = ctypes.c_void_p, ctypes.c_int
    lib.tandem_set_tables.argtypes = [ptr, ptr]
    lib.tandem_type_support.argtypes = [i32]
    lib.tandem_use_fast.argtypes = [i32]
    lib.tandem_use_amx.argtypes = [i32]
    lib.tandem_set_token_block.argtypes = [i32]
    lib.tandem_set_gemm_min_pairs.argtypes = [i32]
    lib.tandem_pin_threads.argtypes = [i32]
    lib.tandem_moe_work_bytes.argtypes = [i32, i32, i32, i32]
    lib.tandem_moe_work_bytes.restype = ctypes.c_size_t
    lib.tandem_silu_mul.argtypes = [ptr, ptr, i32, i32]
    lib.tandem_matmul.argtypes = [ptr, i32, i32, i32, ptr, i32, ptr, i32]
    lib.tandem_moe.argtypes = [ptr, i32, i32, ptr, ptr, i32, ptr, i32, ptr, i32, ptr, i32, i32, i32, ptr, i32]
    lib.tandem_runner_new.restype = ptr
    lib.tandem_runner_start.argtypes = [ptr, *lib.tandem_moe.argtypes]
    lib.tandem_runner_start_after.argtypes = [ptr, ptr, ptr, ptr, i32, ptr, i32, ptr, ptr, i32, ptr, i32, ptr,
                                              i32, ptr, i32, i32, i32, ptr, i32, ptr, ptr]
    lib.tandem_runner_wait_copies.argtypes = [ptr]
    lib.tandem_runner_wait.argtypes = [ptr]
    lib.tandem_runner_free.argtypes = [ptr]
    lib.tandem_runner_seconds.argtypes = [ptr]
    lib.tandem_runner_seconds.restype = ctypes.c_double
    lib.tandem_runner_set_spin_ns.argtypes = [ctypes.c_longlong]
    iq1s = _grid_bytes(quants.IQ1_S, offset=1)  # the kernel stores g+1 in {0, 1, 2}
    iq2xxs = _grid_bytes(quants.IQ2_XXS, offset=0)
    lib.tandem_set_tables(iq1s.ctypes.data, iq2xxs.ctypes.data)
    amx, pin = os.environ.get("TANDEM_AMX"), os.environ.get("TANDEM_PIN_THREADS")
    if amx == "0":
        lib.tandem_use_amx(0)
    if token_block := env_int("TANDEM_TOKEN_BLOCK", minimum=1):
        lib.tandem_set_token_block(token_block)
    if gemm_min_pairs := env_int("TANDEM_GEMM_MIN_PAIRS", minimum=1):
        lib.tandem_set_gemm_min_pairs(gemm_min_pairs)
    if pin == "1":
        lib.tandem_pin_threads(1)
    lib.tandem_runner_set_spin_ns(env_int("TANDEM_RUNNER_SPIN_US", default=RUNNER_SPIN_US) * 1000)
    return lib


def _grid_bytes(kind, offset: int) -> np.ndarray:
    """gguf-py's decoded grid of `kind` (rows of 8 values) as bytes, one per value."""
    kind.init_grid()
    grid = kind.grid.reshape(kind.grid_shape) + offset
    return np.ascontiguousarray(grid.astype(np.uint8))


@functools.cache  # asked at every MoE call: ~1 us a type through ctypes
def supports(t: GGMLType) -> bool:
    """Whether tandem has a kernel of its own for weights of type t."""
    return _lib().tandem_type_support(int(t)) > 0


def vectorized(t: GGMLType) -> bool:
    """Whether that kernel is vectorized on this CPU (else: portable C, correct but slow)."""
    return _lib().tandem_type_support(int(t)) == 2


def use_vectorized(on: bool) -> bool:
    """Switch between the vectorized and the portable kernels (tests compare both); returns
    the previous setting."""
    return bool(_lib().tandem_use_fast(int(on)))


def use_amx(on: bool) -> bool:
    """Run the prefill GEMMs of IQ1_S and IQ2_XXS experts on AMX tiles (on by default where the
    CPU has them; TANDEM_AMX=0 turns them off) or on AVX-512; returns the previous setting."""
    return bool(_lib().tandem_use_amx(int(on)))


def set_token_block(pairs: int) -> int:
    """(token, slot) pairs per prefill task, 16..128 (default 128; TANDEM_TOKEN_BLOCK sets it at
    load, for A/B benchmarks); returns the previous value."""
    return int(_lib().tandem_set_token_block(int(pairs)))


def set_gemm_min_pairs(pairs: int) -> int:
    """The fewest (token, slot) pairs of one expert in a task that take the GEMM path instead of
    the per-token tile kernels, 1..16 for every pass, or 0 for the defaults: 7 for a pass on AMX
    tiles, 16 on AVX-512 (TANDEM_GEMM_MIN_PAIRS sets it at load, for A/B runs of a few decode
    streams); returns the previous value."""
    return int(_lib().tandem_set_gemm_min_pairs(int(pairs)))


def pin_threads(on: bool) -> bool:
    """Keep each worker thread of the kernels' parallel regions on one CPU of the process's
    affinity set (the caller's thread stays free; TANDEM_PIN_THREADS=1 turns it on at load, for
    A/B runs), or let them move again; returns the previous setting."""
    old = int(_lib().tandem_pin_threads(int(on)))
    if old < 0:
        raise KernelError("could not read this process's CPU affinity")
    return bool(old)


def amx_available() -> bool:
    """Whether this CPU (and kernel) lets tandem's kernels use AMX tiles."""
    return bool(_lib().tandem_amx_available())


def moe_work_bytes(n_tokens: int, k: int, d: int, n_ff: int) -> int:
    """Bytes of work buffers the MoE op keeps per calling thread after a batch of n_tokens
    (quantized inputs and hidden rows, gate, up and down results; kept between calls)."""
    return int(_lib().tandem_moe_work_bytes(n_tokens, k, d, n_ff))


def matmul(weight: QuantTensor, x: torch.Tensor, n_threads: int) -> torch.Tensor:
    """x [T, K] float32 times weight [N, K] transposed: [T, N] float32."""
    n, k = _matrix_shape(weight)
    x = activation_rows(x, k, "x")
    out = torch.empty(x.shape[0], n, dtype=torch.float32)
    if x.shape[0]:
        _check(_lib().tandem_matmul(weight.address, int(weight.ggml_type), n, k, x.data_ptr(), x.shape[0],
                                    out.data_ptr(), n_threads), "matmul", weight)
    return out


def moe(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate: QuantTensor, up: QuantTensor,
        down: QuantTensor, n_threads: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """The routed experts: sum_k w[t,k] * down_e(silu(gate_e x_t) * up_e x_t), e = ids[t,k].
    Shapes (and `out`) as CpuKernels.moe, which checks them before it calls here."""
    call = _MoeCall(x, ids, weights, gate, up, down, n_threads, out)
    if call.tokens:
        _check(_lib().tandem_moe(*call.args), "moe", gate)
    return call.out


class _MoeCall:
    """One call's arguments to the C op, and the tensors they point into (kept alive here)."""

    copies = None  # no GPU share copies ride on a call with its inputs in (_AfterCall's may)

    def __init__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate: QuantTensor,
                 up: QuantTensor, down: QuantTensor, n_threads: int, out: torch.Tensor | None):
        n_expert, n_ff, d = gate.shape
        self.x = activation_rows(x, d, "x")
        self.tokens, k = ids.shape
        self.ids = as_cpu(ids, torch.int32)
        self.weights = as_cpu(weights, torch.float32)
        self.out = torch.empty(self.tokens, d, dtype=torch.float32) if out is None else out
        self.gate = gate
        self.args = (self.x.data_ptr(), self.tokens, d, self.ids.data_ptr(), self.weights.data_ptr(), k,
                     gate.address, int(gate.ggml_type), up.address, int(up.ggml_type),
                     down.address, int(down.ggml_type), n_expert, n_ff, self.out.data_ptr(), n_threads)


class ShareCopies(ctypes.Structure):
    """csrc/runner.c's share_copies: a GPU share's copies that the runner queues for a call
    started in advance, through CUDA runtime functions given by address (gpu_share builds it).
    Matrix m (gate, up, down) of expert e lies at src[m] + e * size[m]; half h's slot row i at
    dst[h][m] + i * size[m]; events[h] is recorded on `stream` after half h's copies."""

    _fields_ = [("copy", ctypes.c_void_p), ("record", ctypes.c_void_p), ("set_device", ctypes.c_void_p),
                ("stream", ctypes.c_void_p), ("events", ctypes.c_void_p * 2), ("src", ctypes.c_void_p * 3),
                ("size", ctypes.c_longlong * 3), ("dst", (ctypes.c_void_p * 3) * 2), ("device", ctypes.c_int)]


class _AfterCall:
    """A call started before its inputs are in (MoeRunner.start_after): the tensors the runner
    reads and writes, kept alive here, and the int32 ids it writes for the op."""

    def __init__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate: QuantTensor,
                 out: torch.Tensor, copies: ShareCopies | None = None, resident: torch.Tensor | None = None):
        self.x, self.source_ids, self.weights, self.gate, self.out = x, ids, weights, gate, out
        self.copies, self.resident = copies, resident
        self.ids = torch.empty(ids.shape, dtype=torch.int32)
        self.tokens = 1  # always one token (MoeRunner._post: a call with tokens is posted)


RUNNER_BUSY = -4  # csrc/runner.c: a call started before the last one was waited for
RUNNER_CANCELLED = -7  # csrc/runner.c's CANCELLED: the runner closed before the call's inputs came


class MoeRunner:
    """A thread of the C library that runs one `moe` call at a time while the caller goes on
    (csrc/runner.c): the GPU share's launch runs in Python meanwhile, which a Python thread
    could not, needing the GIL the launch holds."""

    def __init__(self):
        handle = _lib().tandem_runner_new()
        if not handle:
            raise KernelError("could not start the CPU kernels' runner thread")
        self._handle = handle
        self._running: weakref.ref[RunningMoe] | None = None  # the last call, while its owner holds it
        self._lock = threading.Lock()  # one start at a time
        # the thread ends with this object (after any call under way)
        self._finalizer = weakref.finalize(self, _lib().tandem_runner_free, handle)

    def start(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate: QuantTensor,
              up: QuantTensor, down: QuantTensor, n_threads: int,
              out: torch.Tensor | None = None) -> RunningMoe | None:
        """`moe` with these arguments started on the runner's thread; None when the runner is
        still busy with a call not yet waited for (the caller then runs it itself)."""
        def post(call: _MoeCall) -> int:
            return _lib().tandem_runner_start(self._handle, *call.args) if call.tokens else 0
        return self._post(lambda: _MoeCall(x, ids, weights, gate, up, down, n_threads, out), post)

    def start_after(self, ready: int, event: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                    n_skip: int, gate: QuantTensor, up: QuantTensor, down: QuantTensor, n_threads: int,
                    out: torch.Tensor, copies: ShareCopies | None = None,
                    resident: torch.Tensor | None = None) -> RunningMoe | None:
        """`moe` of one token started on the runner's thread before its inputs are in: the
        thread polls `ready(event)` (a C function's address, e.g. the CUDA runtime's
        cudaEventQuery, and its argument) until it returns 0 (600, cudaErrorNotReady, while
        waiting; else the call fails), then skips the slots of the experts flagged in
        `resident` (uint8 [n_expert], nonzero: held in VRAM by the GPU share; None: none) and of
        the `n_skip` lowest other ids in `ids` ([1, k] int64: a GPU share's part), queues
        `copies` of those n_skip experts (if given, only without `resident`; then
        RunningMoe.copies_queued says how that went) and runs. x [1, d] and weights [1, k]
        float32, out [1, d] float32: contiguous host buffers that the caller keeps valid until
        the result. None when the runner is still busy."""
        n_expert, n_ff, d = gate.shape
        k = ids.shape[-1]
        for name, t, shape, dtype in (("x", x, (1, d), torch.float32), ("ids", ids, (1, k), torch.int64),
                                      ("weights", weights, (1, k), torch.float32),
                                      ("out", out, (1, d), torch.float32)):
            if (tuple(t.shape) != shape or t.dtype != dtype or t.device.type != "cpu"
                    or not t.is_contiguous()):
                raise KernelError(f"{name} must be a contiguous {dtype} {list(shape)} CPU tensor, got "
                                  f"{t.dtype} {list(t.shape)} on {t.device}")
        if not 0 <= n_skip <= k:
            raise KernelError(f"a split in advance skips 0..{k} of {k} slots, got {n_skip}")
        if resident is not None:
            if (tuple(resident.shape) != (n_expert,) or resident.dtype != torch.uint8
                    or resident.device.type != "cpu" or not resident.is_contiguous()):
                raise KernelError(f"resident must be a contiguous uint8 [{n_expert}] CPU tensor, got "
                                  f"{resident.dtype} {list(resident.shape)} on {resident.device}")
            if copies is not None:
                raise KernelError("share copies take the n_skip lowest ids: not with experts held in VRAM")
        def post(call: _AfterCall) -> int:
            return _lib().tandem_runner_start_after(
                self._handle, ready, event, ids.data_ptr(), n_skip, x.data_ptr(), d, call.ids.data_ptr(),
                weights.data_ptr(), k, gate.address, int(gate.ggml_type), up.address, int(up.ggml_type),
                down.address, int(down.ggml_type), n_expert, n_ff, out.data_ptr(), n_threads,
                ctypes.byref(call.copies) if call.copies is not None else None,
                resident.data_ptr() if resident is not None else None)
        return self._post(lambda: _AfterCall(x, ids, weights, gate, out, copies, resident), post)

    def _post(self, make_call, post) -> RunningMoe | None:
        """A call made by `make_call()` and handed to the thread by `post(call)` (its return
        code): None while the last call is not yet waited for, or when the thread says busy.
        A call of no tokens is not posted (post returns 0 for it) and has nothing to wait for."""
        with self._lock:
            last = self._running() if self._running is not None else None
            if last is not None and not last.waited:
                return None
            call = make_call()
            if post(call) == RUNNER_BUSY:
                return None
            running = RunningMoe(self if call.tokens else None, call)
            self._running = weakref.ref(running)
            return running

    def wait(self) -> int:
        """Wait for the call last started: its return code (0 when none, or closed)."""
        return _lib().tandem_runner_wait(self._handle) if self._finalizer.alive else 0

    def seconds(self) -> float:
        return _lib().tandem_runner_seconds(self._handle) if self._finalizer.alive else 0.0

    def wait_copies(self) -> int:
        """Wait until the share copies of the call last started are queued: 0, or why not
        (csrc/runner.c; RUNNER_CANCELLED once the runner is closed)."""
        return _lib().tandem_runner_wait_copies(self._handle) if self._finalizer.alive else RUNNER_CANCELLED

    def close(self) -> None:
        self._finalizer()


class RunningMoe:
    """A `moe` call under way on a MoeRunner: `result()` waits for it (as a Future's); then
    `seconds` is how long it ran on the runner's thread."""

    def __init__(self, runner: MoeRunner | None, call: _MoeCall):
        self._runner, self._call = runner, call
        self.waited = runner is None  # nothing to wait for: no tokens
        self.seconds = 0.0
        self._rc = 0
        # dropped unwaited (an exception between start and result): the runner waits for the
        # call then, its buffers kept until it ends, and takes the next one
        self._dropped = None if self.waited else weakref.finalize(self, _wait_dropped, runner, call)

    def copies_queued(self) -> int:
        """For a call started with share copies: wait until the runner has queued them (it
        does before the op; microseconds once the inputs are in) and return 0, or the code of
        what failed (a CUDA error, or the call's own failure before them)."""
        if self._call.copies is None or self._runner is None:
            raise KernelError("this CPU call carries no GPU share copies")
        return self._runner.wait_copies()

    def result(self) -> torch.Tensor:
        if not self.waited:
            self.waited = True
            self._dropped.detach()
            self._rc = self._runner.wait()
            self.seconds = self._runner.seconds()
        _check(self._rc, "moe", self._call.gate)  # a failed call raises at every result()
        return self._call.out


def _wait_dropped(runner: MoeRunner, call: _MoeCall) -> None:
    """A RunningMoe's finalizer: `call` (its buffers) lives until the runner is done with it."""
    runner.wait()


def silu_mul(g: torch.Tensor, u: torch.Tensor, vectorized: bool = True) -> torch.Tensor:
    """silu(g) * u as the MoE op computes its hidden values (float32, numel a multiple of 16),
    vectorized (AVX-512) or portable. For tests."""
    if g.shape != u.shape or g.numel() % 16:
        raise KernelError(f"silu_mul takes two tensors of one shape, 16k values, "
                          f"got {list(g.shape)} and {list(u.shape)}")
    out = g.to(torch.float32).contiguous().clone()
    u = u.to(torch.float32).contiguous()
    if _lib().tandem_silu_mul(out.data_ptr(), u.data_ptr(), out.numel(), int(vectorized)):
        raise KernelError("no vectorized SiLU on this CPU")
    return out


def fits(*tensors: QuantTensor) -> bool:
    """Whether these weights can go through tandem's kernels: own types, rows of whole blocks."""
    return all(supports(w.ggml_type) and w.shape[-1] % BLOCK == 0 for w in tensors)


def _matrix_shape(weight: QuantTensor) -> tuple[int, int]:
    if len(weight.shape) != 2:
        raise KernelError(f"matmul takes a 2-D weight, got shape {list(weight.shape)}")
    if not fits(weight):
        raise KernelError(f"tandem has no CPU kernel for {weight.ggml_type.name} rows of {weight.shape[1]}")
    return weight.shape


def _check(rc: int, op: str, weight: QuantTensor) -> None:
    reasons = {-1: f"unsupported type {weight.ggml_type.name} or shape {list(weight.shape)}",
               -2: "out of memory", -3: "an expert id out of range",
               -5: "a token chose one expert twice (a split fixed in advance takes distinct experts)",
               -6: "waiting for its inputs failed (the readiness query returned an error)",
               RUNNER_CANCELLED: "the runner was closed while it waited for the call's inputs"}
    if rc != 0:
        raise KernelError(f"tandem CPU {op} failed: {reasons.get(rc, f'code {rc}')}")
