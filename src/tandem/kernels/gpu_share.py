"""A share of each decoded token's routed experts on the GPU, computed while the CPU does the rest.

At batch 1 tandem's CPU kernels are bound by their arithmetic, not by RAM: on the GPU machine
the IQ1_S experts are read at ~35 GB/s of the ~100 GB/s the RAM delivers. The GPU's copy
engine can use the rest without taking a CPU core. The file mapping under the experts is
registered with CUDA (page-locked, read-only), so a chosen expert's bytes go from it straight
to the GPU by DMA: 53 GB/s on the GPU machine's PCIe 5 link, against 5 GB/s from unregistered
memory. There compiled kernels dequantize and multiply them. Meanwhile the CPU computes the
batch's other experts; the skipped slots are marked SKIPPED_SLOT for it.

    host:         ids -> split: n experts to the GPU (queued first), the rest to the CPU kernels
    copy stream:  mapped file -> device slots, 3 copies per run of consecutive experts, in two
                  halves
    GPU stream:   per half, once its bytes are in: fused dequantize + multiply (gate, up, SiLU,
                  down, routing weights); IQ1_S rows through a table of grid-row products.
                  Compiled with static shapes per expert count before the share starts, and
                  replayed as CUDA graphs: a few microseconds of host time per half
    CPU threads:  the other experts (kernels.native) on the caller's thread, meanwhile; then
                  the two results are added

How many experts go to the GPU is balanced per layer (`ShareBalance`): after each call, the
side that finished last gets a smaller share next time.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch._dynamo
import torch.nn.functional as F

from tandem.errors import KernelError
from tandem.gguf.types import GGMLType
from tandem.kernels import torch_dequant
from tandem.kernels.cpu import SKIPPED_SLOT
from tandem.kernels.page_in import PAGE, page_ranges, physical_ram
from tandem.kernels.streamed import consecutive_runs
from tandem.kernels.tensors import QuantTensor

log = logging.getLogger(__name__)

MAX_TOKENS = 1  # decode at batch 1; batches of several tokens stay on the CPU (measured slower)
STEP = 0.02  # change of a layer's share per call
RAM_RESERVE = 8 << 30  # bytes of RAM left unpinned: the process and the system need some
CUDA_HOST_REGISTER_READ_ONLY = 8  # cudaHostRegisterReadOnly: the file is mapped read-only
RECOMPILE_LIMIT = 64  # compiled variants of the share's kernels: type mixes x expert counts


class ShareBalance:
    """The fraction of a layer's experts that go to the GPU. `take` turns it into whole experts
    by error diffusion (0.55 of 8 experts: 4 and 5 alternating, 4.4 on average); `update` moves
    it toward the point where both sides finish together."""

    def __init__(self, share: float = 0.5, fixed: bool = False):
        if not 0.0 <= share <= 1.0:
            raise KernelError(f"GPU expert share must lie in [0, 1], got {share}")
        self.share, self.fixed = share, fixed
        self._carry = 0.0

    def take(self, n: int) -> int:
        """How many of n experts go to the GPU this time."""
        want = self.share * n + self._carry
        taken = min(n, int(want))
        self._carry = want - taken
        return taken

    def update(self, gpu_first: bool) -> None:
        """After a call: did the GPU finish before the CPU?"""
        if not self.fixed:
            self.share = min(1.0, max(0.0, self.share + (STEP if gpu_first else -STEP)))


class PinnedMappings:
    """Pages under `arrays` (views of read-only file mappings) registered with CUDA, so copies
    from them are DMA transfers. Registering maps and locks every page: the file's bytes must
    fit in RAM. Raises KernelError naming the reason when it cannot."""

    def __init__(self, arrays: Iterable[np.ndarray], ram: int | None = None):
        self.ranges: list[tuple[int, int]] = []
        spans = [(start, -(-length // PAGE) * PAGE) for start, length in page_ranges(arrays)]
        total = sum(length for _, length in spans)
        limit = (physical_ram() if ram is None else ram) - RAM_RESERVE
        if total > limit:
            raise KernelError(f"{total / 2**30:.1f} GiB of expert weights would not fit in RAM "
                              f"({limit / 2**30:.1f} GiB may be locked); not pinning them")
        cudart = torch.cuda.cudart()
        for start, length in spans:
            rc = cudart.cudaHostRegister(start, length, CUDA_HOST_REGISTER_READ_ONLY)
            if int(rc) != 0:
                self.close()
                raise KernelError(f"cudaHostRegister of {length / 2**20:.0f} MiB of mapped "
                                  f"weights failed: {rc}")
            self.ranges.append((start, length))
        self.bytes = total

    def close(self) -> None:
        cudart = torch.cuda.cudart()
        for start, _ in self.ranges:
            cudart.cudaHostUnregister(start)
        self.ranges = []


@dataclass
class Launched:
    """The GPU part of one call: its result [1, d] float32 (valid in stream order) and the
    event that marks it done (None off CUDA)."""

    out: torch.Tensor
    done: torch.cuda.Event | None


class GpuShare:
    """Computes the experts it is given on `device`, their weights copied from the mapped file.
    One object serves all layers (one set of device slots, one copy stream)."""

    def __init__(self, device: torch.device | str, max_experts: int):
        self.device = _indexed(torch.device(device))
        self.max_experts = max_experts
        self.cuda = self.device.type == "cuda"
        self.ready = threading.Event()  # set when the weights are pinned (at once off CUDA)
        self.skipped: str | None = None  # why the share is off, if it is
        self._pinning_ended = threading.Event()
        self._pins: PinnedMappings | None = None
        self._slots: torch.Tensor | None = None
        self.graphs = True  # replay the kernels as CUDA graphs (False: launch them each call)
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._pool = None  # the graphs' memory pool, shared (they replay one after another)
        self._buffers: dict[str, torch.Tensor] = {}  # fixed ones the graphs use: x, weight, out
        if self.cuda:
            self._copy_stream = torch.cuda.Stream(self.device)
            self._consumed = torch.cuda.Event()  # the last call's kernels have read the slots
            self._copied = [torch.cuda.Event(), torch.cuda.Event()]  # each half's bytes are in
        else:
            self.ready.set()
            self._pinning_ended.set()

    # -- setup -----------------------------------------------------------------------------
    def pin(self, arrays: Sequence[np.ndarray], experts: Sequence[Sequence[QuantTensor]] = (),
            ram: int | None = None) -> None:
        """Register the mapped weights with CUDA and compile the kernels for the layers'
        `experts` (gate, up, down per layer) on a background thread; the share starts once that
        is done (`ready`). On failure the share stays off, the reason in `skipped`."""
        if not self.cuda:
            return

        def run():
            try:
                self._pins = PinnedMappings(arrays, ram)
                log.info("GPU expert share: %.1f GiB of mapped experts pinned", self._pins.bytes / 2**30)
                self._compile(experts)
                self.ready.set()
            except KernelError as exc:
                self._turn_off(str(exc))
            except Exception as exc:  # torch.compile failed here: no triton, no compiler ...
                self._turn_off(f"compiling its kernels failed ({_first_line(exc)})")
            finally:
                self._pinning_ended.set()

        threading.Thread(target=run, name="tandem-pin", daemon=True).start()

    def _compile(self, experts: Sequence[Sequence[QuantTensor]]) -> None:
        """Compile the kernels of every expert count a half can hold for every mix of types the
        layers have, on zeros, before the share starts (a few seconds each on the GPU machine;
        compiled during decode they would stall tokens)."""
        kinds = {(tuple(w.ggml_type for w in mats), tuple(w.expert_bytes() for w in mats), mats[0].shape[-1])
                 for mats in experts if all(torch_dequant.supports(w.ggml_type) for w in mats)}
        with torch.cuda.stream(torch.cuda.Stream(self.device)), torch.inference_mode():
            for types, sizes, d in sorted(kinds):
                grids = [torch_dequant.grid_table(t, self.device) for t in types]
                for n in range(1, self._half_capacity + 1):
                    parts = [torch.zeros(n, size, dtype=torch.uint8, device=self.device) for size in sizes]
                    zeros = torch.zeros(d, device=self.device), torch.zeros(n, device=self.device)
                    _experts_fn(*types, True)(*parts, *zeros, *grids)
            torch.cuda.current_stream(self.device).synchronize()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the pinning has ended (either way); True if the share is on."""
        self._pinning_ended.wait(timeout)
        return self.ready.is_set()

    def _turn_off(self, reason: str) -> None:
        self.skipped = reason
        self.ready.clear()
        log.warning("GPU expert share off: %s", reason)

    def serves(self, device: torch.device | str) -> bool:
        """Whether `device` is this share's GPU ("cuda" and "cuda:0" may name the same one)."""
        return _indexed(torch.device(device)) == self.device

    def wants(self, n_tokens: int, *weights: QuantTensor) -> bool:
        return (self.ready.is_set() and 0 < n_tokens <= MAX_TOKENS
                and all(torch_dequant.supports(w.ggml_type) for w in weights))

    def close(self) -> None:
        self._pinning_ended.wait()  # a registration still under way would outlive the mapping
        if self._pins is not None:
            if self.cuda:
                torch.cuda.synchronize(self.device)  # no copy may still read the pages
            self._pins.close()
            self._pins = None
        self.ready.clear()

    # -- one call --------------------------------------------------------------------------
    @torch.inference_mode()
    def launch(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, experts: list[int],
               gate: QuantTensor, up: QuantTensor, down: QuantTensor) -> Launched:
        """Queue sum over the slots j with ids[0, j] in `experts` of
        weights[0, j] * down_e(silu(gate_e x) * up_e x) on the device, for one token: x [1, d]
        there, ids and weights [1, k] on the host. Returns without waiting.

        Two halves: the second half's bytes cross PCIe while the first half is computed."""
        experts = sorted(experts)
        if not experts or len(experts) > self.max_experts:
            raise KernelError(f"the GPU share takes 1..{self.max_experts} experts, got {len(experts)}")
        if x.shape[0] != 1 or ids.shape[0] != 1:
            raise KernelError(f"the GPU share takes one token, got {x.shape[0]}")
        weight_of = dict(zip(ids[0].tolist(), weights[0].tolist(), strict=True))
        half = (len(experts) + 1) // 2
        groups = [experts[:half], experts[half:]] if len(experts) > 1 else [experts]
        tensors = (gate, up, down)
        types = tuple(w.ggml_type for w in tensors)
        sizes = tuple(w.expert_bytes() for w in tensors)
        grids = [torch_dequant.grid_table(t, self.device) for t in types]
        slots = self._ensure_slots(2 * self._half_capacity * sum(sizes))
        host_weight = torch.zeros(2, self._half_capacity, dtype=torch.float32, pin_memory=self.cuda)
        for region, group in enumerate(groups):
            host_weight.numpy()[region, : len(group)] = [weight_of[e] for e in group]
        weight = self._buffer("weight", (2, self._half_capacity))
        weight.copy_(host_weight, non_blocking=True)  # pinned: no wait for the GPU
        xv = self._buffer("x", (x.shape[-1],))
        xv.copy_(x.reshape(-1))
        parts = [self._parts(slots, region, len(group), sizes) for region, group in enumerate(groups)]
        copied = self._upload(groups, tensors, parts)
        stream = torch.cuda.current_stream(self.device) if self.cuda else None
        outs = []
        for region, group in enumerate(groups):
            if stream is not None:
                stream.wait_event(copied[region])  # this half's bytes are in
            args = (*parts[region], xv, weight[region, : len(group)], *grids)
            outs.append(self._compute(types, (sizes, len(group), region), args))
        out = outs[0] + outs[1] if len(outs) == 2 else outs[0].clone()  # the outputs get reused
        done = None
        if stream is not None:
            self._consumed.record(stream)
            done = torch.cuda.Event()
            done.record(stream)
        return Launched(out.view(1, -1), done)

    @property
    def _half_capacity(self) -> int:
        return (self.max_experts + 1) // 2

    def _parts(self, slots: torch.Tensor, region: int, n: int, sizes: Sequence[int]) -> list[torch.Tensor]:
        """The slots of n experts of one half (region 0 or 1): one [n, bytes] view per matrix,
        each at a fixed address (a captured graph reads them there)."""
        offset = region * self._half_capacity * sum(sizes)
        parts = []
        for size in sizes:
            parts.append(slots[offset : offset + n * size].view(n, size))
            offset += self._half_capacity * size
        return parts

    def _upload(self, groups: list[list[int]], tensors: Sequence[QuantTensor],
                parts: list[list[torch.Tensor]]) -> list[torch.cuda.Event]:
        """Copy each group's bytes into its parts, on the copy stream: one event per group
        marks its bytes in (none off CUDA, where the copies are done on return)."""
        if not self.cuda:
            for group, group_parts in zip(groups, parts, strict=True):
                self._copy(group, tensors, group_parts)
            return []
        self._copy_stream.wait_event(self._consumed)  # the last call's kernels are done with the slots
        with torch.cuda.stream(self._copy_stream):
            for group, group_parts, event in zip(groups, parts, self._copied, strict=False):
                self._copy(group, tensors, group_parts)
                event.record(self._copy_stream)
        return self._copied[: len(groups)]

    def _compute(self, types: tuple[GGMLType, ...], key: tuple, args: tuple) -> torch.Tensor:
        """The experts of one half: [d] float32, by a CUDA graph replay on CUDA."""
        if not self.cuda:
            return _experts_fn(*types, False)(*args)
        try:
            if not self.graphs:
                return _experts_fn(*types, True)(*args)
            graph = self._graphs.get((types, *key)) or self._capture(types, key, args)
            graph.replay()
            return self._buffer("out", (2, args[3].shape[0]))[key[-1]]
        except Exception as exc:  # torch.compile failed here: no triton, no compiler ...
            self._turn_off(f"compiling its kernels failed ({_first_line(exc)})")
            return _experts_fn(*types, False)(*args)  # eager, this once

    def _capture(self, types: tuple[GGMLType, ...], key: tuple, args: tuple):
        """A CUDA graph of the compiled kernels for one half's expert count and region: one
        replay instead of ~9 launches through torch.compile's wrapper (~0.9 ms of host time
        per call on the GPU machine). It reads the fixed slots and buffers and writes its
        result to row `region` of the "out" buffer: outside the graphs' shared pool, where a
        later capture could put its scratch."""
        fn = _experts_fn(*types, True)
        out = self._buffer("out", (2, args[3].shape[0]))[key[-1]]
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):  # compiles for this shape outside the capture
            fn(*args)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            out.copy_(fn(*args))
        self._pool = graph.pool()
        self._graphs[(types, *key)] = graph
        return graph

    def _buffer(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """A float32 buffer on the device, kept across calls (graphs captured on it)."""
        buffer = self._buffers.get(name)
        if buffer is None or tuple(buffer.shape) != shape:
            buffer = self._buffers[name] = torch.zeros(shape, device=self.device)
            self._graphs.clear()
        return buffer

    def _copy(self, experts: list[int], tensors: Sequence[QuantTensor], parts: list[torch.Tensor]) -> None:
        for w, part in zip(tensors, parts, strict=True):
            source, row = w.per_expert, 0
            for first, count in consecutive_runs(experts):
                part[row : row + count].copy_(source[first : first + count], non_blocking=True)
                row += count

    def _ensure_slots(self, nbytes: int) -> torch.Tensor:
        if self._slots is None or self._slots.numel() < nbytes:
            if self._slots is not None and self.cuda:
                torch.cuda.current_stream(self.device).synchronize()
            self._slots = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            self._graphs.clear()  # they read the old slots
        return self._slots


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _indexed(device: torch.device) -> torch.device:
    """`device` with its index: "cuda" is the current CUDA device."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def split(ids: torch.Tensor, n_gpu_experts: int) -> tuple[list[int], torch.Tensor]:
    """The experts for the GPU (those with the fewest tokens, the cheapest there) and the ids
    for the CPU, the GPU's slots marked SKIPPED_SLOT. ids [T, k] on the host. (Python lists:
    a decode step has 8 ids, and tensor ops cost ~10x more per call at that size.)"""
    rows = ids.tolist()
    counts = Counter(e for row in rows for e in row)
    gpu = sorted(counts, key=lambda e: (counts[e], e))[:n_gpu_experts]
    if not gpu:
        return [], ids
    chosen = set(gpu)
    cpu_ids = [[SKIPPED_SLOT if e in chosen else e for e in row] for row in rows]
    return gpu, torch.tensor(cpu_ids, dtype=ids.dtype)


def _rows_times(raw: torch.Tensor, t: GGMLType, grid, x: torch.Tensor, products) -> torch.Tensor:
    """n experts' matrices (raw bytes [n, bytes], rows of len(x)) times x [K]: [n, rows]."""
    n = raw.shape[0]
    if t == GGMLType.IQ1_S:  # one table lookup per 8 weights (torch_dequant.iq1_s_products)
        return torch_dequant.iq1_s_row_dots(raw, products).view(n, -1)
    return (torch_dequant.values(raw, t, grid).view(n, -1, x.shape[0]) * x).sum(-1)


def _experts(types: tuple[GGMLType, GGMLType, GGMLType], gate_raw: torch.Tensor, up_raw: torch.Tensor,
             down_raw: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, gate_grid, up_grid,
             down_grid) -> torch.Tensor:
    """n experts (raw bytes [n, bytes] each) on one token x [d] with routing weights [n]:
    sum_e weight_e * down_e(silu(gate_e x) * up_e x), [d] float32. Products and sums, not
    matmuls, so that torch.compile fuses the dequantization into reduction kernels that read
    only the quantized bytes."""
    gate_type, up_type, down_type = types
    products = None
    if GGMLType.IQ1_S in (gate_type, up_type):
        products = torch_dequant.iq1_s_products(x, gate_grid if gate_type == GGMLType.IQ1_S else up_grid)
    h = F.silu(_rows_times(gate_raw, gate_type, gate_grid, x, products)) * _rows_times(
        up_raw, up_type, up_grid, x, products)  # [n, ff]
    n, d = down_raw.shape[0], x.shape[0]
    down = torch_dequant.values(down_raw, down_type, down_grid).view(n, d, -1)
    return ((down * h[:, None, :]).sum(-1) * weight[:, None]).sum(0)


@functools.cache
def _experts_fn(gate_type: GGMLType, up_type: GGMLType, down_type: GGMLType, compiled: bool):
    fn = functools.partial(_experts, (gate_type, up_type, down_type))
    if not compiled:
        return fn
    # Static shapes: a kernel set per expert count, each up to 2.4x faster than one set for all
    # counts (4 IQ1_S experts: 0.34 against 0.81 ms on the GPU machine; dynamic shapes leave
    # the reductions' block sizes unknown). That is more than the 8 variants dynamo keeps of
    # one function by default; past them it would silently run the slow eager ops.
    dynamo = torch._dynamo.config
    dynamo.recompile_limit = max(dynamo.recompile_limit, RECOMPILE_LIMIT)
    return torch.compile(fn, dynamic=False)
