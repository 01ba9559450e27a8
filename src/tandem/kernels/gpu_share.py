"""A share of each decode step's routed experts on the GPU, computed while the CPU does the rest.

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

Batches of up to MAX_TOKENS tokens (the server's decode steps) share too: the GPU takes the
experts one token chose first, then those several tokens chose (fewest first); each expert's
bytes cross once, and each of its (token, slot) pairs is computed on its own token's x from
them. The halves' pairs are padded up to the counts in ROW_COUNTS (one compiled kernel set
each). The CPU's kernels serve all tokens of an expert from one read of its weights, so the
experts with most tokens are the last the GPU takes.

How many experts go to the GPU is balanced per layer (`ShareBalance`, one for single tokens,
one for batches): after each call, the side that finished last gets a smaller share next time.
With spare VRAM (`keep_in_vram`, kernels.expert_cache) each layer's most used experts stay on
the device: the share takes those first, copying them within VRAM, and balances the others.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from tandem.errors import KernelError, first_line
from tandem.gguf.types import GGMLType
from tandem.kernels import compiling, cudart, native, torch_dequant
from tandem.kernels.cpu import SKIPPED_SLOT
from tandem.kernels.env import env_int, triton_module
from tandem.kernels.expert_cache import LayerCache, layer_capacities
from tandem.kernels.page_in import PAGE, page_ranges, physical_ram
from tandem.kernels.streamed import consecutive_runs
from tandem.kernels.tensors import QuantTensor

log = logging.getLogger(__name__)

# Decode steps of up to this many sequences (the server's batches); longer batches stay on the
# CPU or stream to the GPU whole (kernels.streamed).
MAX_TOKENS = 8
ROW_COUNTS = (1, 2, 4, 8, 16)  # (token, slot) pairs per half the batch kernels are compiled for (padded up)
STEP = 0.02  # change of a layer's share per call
# After this many updates the same way the step doubles, per update, up to MAX_STEP: a share far
# off (run v's profiles began at 0.8-0.92 where 0.56 was right) took ~20 calls a layer to walk
# back at 0.02; near the balance the direction turns every 1-3 calls (runs u/v: 4 in a row twice
# in ~900 updates), so there the step stays 0.02.
RUN_BEFORE_FASTER = 4
MAX_STEP = 0.16
EARLY_UP_TO = 75  # the largest percentage of a token's experts the GPU takes in an early call (SHARE_ENV)
RAM_RESERVE = 8 << 30  # bytes of RAM left unpinned: the process and the system need some
CUDA_HOST_REGISTER_READ_ONLY = 8  # cudaHostRegisterReadOnly: the file is mapped read-only
CUDA_HOST_REGISTER_MAPPED = 2  # cudaHostRegisterMapped: kernels may read the pages themselves
# per pair read in place: 3 matrices' addresses and the token (int64), the weight (float32)
_IN_PLACE_ADDRESSES = 3 * 8
_IN_PLACE_TOKEN = 8
IN_PLACE_ROW_BYTES = _IN_PLACE_ADDRESSES + _IN_PLACE_TOKEN + 4
RECOMPILE_LIMIT = 64  # compiled variants of the share's kernels: type mixes x expert counts
# Order of a shared call: by default the CPU's part starts first, on the kernels' runner thread
# (native.MoeRunner), and the GPU's is launched meanwhile (the launch is ~0.4-1 ms of Python per
# layer that the CPU's part would otherwise wait for). TANDEM_SHARE_CPU_FIRST=0 launches the
# GPU's part first and runs the CPU's after it on the caller's thread, with all the kernels'
# threads (run r on the GPU machine: equal decode once settled, but in 6 of 8 runs a first
# repetition at 14-30 tok/s, and the balance ended at 0.8-0.9 GPU share: the launch's host time
# delays the CPU's part, so the GPU looks faster the more experts it takes).
# TANDEM_SHARE_CPU_THREADS=N: threads of the CPU's part when started first (default: one fewer
# than the kernels', leaving a core to the launch and then to the caller, which spins up to
# 2 ms for the result; as many as the cores oversubscribe them, and every barrier of the op
# waits out a descheduled thread: 2 threads on the dev box's 2 cores took 5.9 ms for an op of
# 0.15 ms).
# TANDEM_SHARE_PREFETCH=N: while a decode segment runs, copy up to N experts that its MoE's
# router was predicted to pick (the router run on the previous MoE's input, in that MoE's side
# graph) into VRAM, when the copy engine idles (runtime.decode_graphs issues it); that MoE takes
# them first, within VRAM, early calls too (the runner skips their slots, then the balance's
# count of the others: its share of k less N; before 93a49cb a prefetch turned the early path
# off). Run E on the GPU machine, UD-IQ1_S, 0/2/3 rows: 63.6 and 59.8 / 67.8 and 55.7 / 58.8 and
# 52.0 tok/s, 89-92% of the prefetched experts used, yet ~4.2 experts a call on the GPU either
# way: the prefetch copies while the calls already keep the RAM ~89% busy. Off.
# TANDEM_SHARE_MAX_EXPERTS=N: slots for a batch's GPU part (default: half of MAX_TOKENS tokens'
# experts, see max_experts_for). TANDEM_SHARE_TRITON (default on; 0: off): UD-IQ1_S and Q4_K_M
# experts through hand-written Triton kernels (kernels.share_triton) instead of the
# torch.compile'd decoders. Run A on the GPU machine, A/B rounds (tok/s, each a median of 3):
# alone, Q4_K_M 96.6 against 95.2 and 95.7 against 87.3, UD-IQ1_S mixed (59.5 against 56.8,
# 56.9 against 58.4, 53.3 against 51.4); with the compiled decode segments (their default too)
# UD-IQ1_S 62.2 against 58.4 and 56.6 against 51.4, Q4_K_M 95.0 against 92.7, 94.4 against 87.7.
# TANDEM_SHARE_TORCH_THREADS=N: once loaded, torch's OpenMP team on the loading thread resized to
# N threads (default TORCH_THREADS_WITH_SHARE; 0 leaves torch's count): torch's CPU ops then
# use N threads (kernels.cpu.resize_openmp_team). libgomp counts every team's threads; once
# torch's 16 and the runner's 15 outnumber the CPUs, the op's waiting threads sleep at every
# barrier. Run t on the GPU machine: the op on the runner 0.32/0.93/1.47 ms for 1/3/5 UD-IQ1_S
# experts with torch's team at 2, 0.49/1.06/1.66 without; decode 49.9 against 48.4 tok/s.
# TANDEM_SHARE_BATCH_PAIRS=1: a batch's share also takes experts that several tokens chose (see
# split). The default from run t to run u; off again since: 8 streams ran 61.9 tok/s in run u's
# side by side against 68.9 in run s, and 60.6 in its A/B against 64.1 and 67.6 without (one run
# against two; not conclusive either way).
# TANDEM_SHARE_SUBMIT_ON_RUNNER=0: the layers' unshared MoE calls (prefill below the streaming
# threshold, batches past MAX_TOKENS, steps before the share is ready) on the kernels' Python
# executor thread, as before run t, instead of the runner (experts.CpuExperts.submit). Each
# thread that runs the op keeps an OpenMP team of its own, which libgomp keeps counting: after
# one short prompt the executor's 15 idle threads would throttle every later decode step.
# TANDEM_SHARE_DIRECT=1: no copies; the hand-written Triton kernels (kernels.share_triton) read
# each expert's bytes where they lie, over PCIe from the pinned file mapping (registered as
# mapped) or in VRAM from a cache or a prefetch, through a table of addresses uploaded with the
# routing weights: one upload and one graph replay a call instead of ~13 copies, their inputs
# and two replays (run u's profile: 0.62 ms of host time a call to launch the GPU's part, and
# 0.27 ms of its span fixed). On the GPU machine (run u) a plain Triton gather read the mapped
# pages at 46-51 GB/s against 53-54 by DMA, but these expert kernels read them at only 21-26 GB/s
# (benchmarks/share_in_place.py): off until they keep more loads in flight. UD-IQ1_S and Q4_K_M
# mixes only; others copy as before.
TORCH_THREADS_WITH_SHARE = 2  # 2, not 1: a one-thread op would not release the team
# TANDEM_SHARE_EARLY (default on; 0: off): a one-token decode step posts each MoE layer's CPU
# part to the kernels' runner before the GPU has computed the layer's routing
# (experts.CpuExperts.start_early): the runner polls the event after the segment, splits by a
# count fixed beforehand (the GPU takes the lowest ids) and starts at once, instead of after the
# caller's wake-up, split and hand-over (run v's profile: split 78 us and start 109 us of host
# time a call before the CPU's op began). Run w on the GPU machine, always early: UD-IQ1_S decode
# 58.0 against 52.9 tok/s (3 rounds, each won), 18.5 against 21.8 ms a token in the profile;
# Q4_K_M 95-98 tok/s once balanced, against 87-95. But both modes began the first repetition
# at a share of ~0.9 (the warm-up's climb), and from there early calls recovered slower: their
# one-expert CPU parts took 0.5-33 ms (a profile stuck at 0.92 for 64 tokens, 32 tok/s). So a
# call starts early only where the GPU takes at most EARLY_UP_TO percent of the experts
# (TANDEM_SHARE_EARLY_UP_TO=N: N percent). Run x had 50: UD-IQ1_S balances at ~0.55, 4 or 5 of 8
# on the GPU, so its calls of 5 went the ordinary way, whose start costs the CPU's side more,
# which pushed the share up: decode 51-56 tok/s against run w's 58-62 always early. Q4_K_M
# balances at ~0.43 (early either way). 75 keeps the climbs' 7 of 8 on the ordinary path and
# the balanced calls early; not measured on the GPU yet.
# TANDEM_SHARE_PRECAPTURE=1 (off): one token's graphs, every expert count and half, captured
# before the share starts instead of at each count's first call, which synchronizes the device
# and empties torch's caches mid-step (see GpuShare._precapture). Run x: no captures during
# decode, but the first repetitions as slow as without (a 308-329 ms step, shares at 0.9), and
# no clear gain (A/B medians 52.3 against 56.0 tok/s UD-IQ1_S, 93.6 against 84.2 Q4_K_M).
# TANDEM_SHARE_RUNNER_COPIES=1 (off): an early call's GPU experts are copied by the kernels'
# runner thread (csrc/runner.c) as soon as the routing is in, before its CPU op, instead of by
# the caller after its wake-up and the launch's Python. In run B's UD-IQ1_S profile the balance
# settled at 3.6 GPU experts of 8 where the two sides' measured rates cross at 4.1: the GPU's
# side started ~0.2 ms after the CPU's. Run C (65d6b0e) on: the balance moved to 5.1 GPU
# experts, the routed calls took 10.3 ms a token against 11.5, but the CPU op 0.32 ms an expert
# against 0.26 (the copies now overlap all of it, both reading the same RAM) and the GPU's part
# became the later one that the next segment waits for: 17.8 ms a token either way, A/B 60.7 and
# 59.9 tok/s against 60.0 and 61.6 (2 rounds). No gain measured, so off.
SHARE_ENV = ("TANDEM_SHARE_CPU_FIRST", "TANDEM_SHARE_CPU_THREADS", "TANDEM_SHARE_PREFETCH",
             "TANDEM_SHARE_MAX_EXPERTS", "TANDEM_SHARE_TRITON", "TANDEM_SHARE_TORCH_THREADS",
             "TANDEM_SHARE_SUBMIT_ON_RUNNER", "TANDEM_SHARE_BATCH_PAIRS", "TANDEM_SHARE_DIRECT",
             "TANDEM_SHARE_EARLY", "TANDEM_SHARE_EARLY_UP_TO", "TANDEM_SHARE_PRECAPTURE",
             "TANDEM_SHARE_RUNNER_COPIES")


def max_experts_for(k: int) -> int:
    """How many experts one call may give the share (its slots; a batch's (token, slot) pairs
    too), for a model choosing k per token: half of MAX_TOKENS tokens' experts (8 streams of R1
    choose ~57 distinct experts a step, ~50 of them by one token only), or
    TANDEM_SHARE_MAX_EXPERTS (k or more)."""
    return env_int("TANDEM_SHARE_MAX_EXPERTS", default=k * MAX_TOKENS // 2, minimum=k)


class ShareBalance:
    """The fraction of a layer's experts that go to the GPU. `take` turns it into whole experts
    by error diffusion (0.55 of 8 experts: 4 and 5 alternating, 4.4 on average); `update` moves
    it toward the point where both sides finish together, faster while it keeps moving one way."""

    def __init__(self, share: float = 0.5, fixed: bool = False):
        if not 0.0 <= share <= 1.0:
            raise KernelError(f"GPU expert share must lie in [0, 1], got {share}")
        self.share, self.fixed = share, fixed
        self._carry = 0.0
        self._run = 0  # updates in a row the same way, signed: + toward the GPU

    def take(self, n: int, commit: bool = True) -> int:
        """How many of n experts go to the GPU this time (`commit` False: what it would be)."""
        want = self.share * n + self._carry
        taken = min(n, int(want))
        if commit:
            self._carry = want - taken
        return taken

    def update(self, gpu_first: bool) -> None:
        """After a call: did the GPU finish before the CPU?"""
        if self.fixed:
            return
        way = 1 if gpu_first else -1
        self._run = self._run + way if self._run * way > 0 else way
        step = min(MAX_STEP, STEP * 2 ** max(0, abs(self._run) - RUN_BEFORE_FASTER))
        self.share = min(1.0, max(0.0, self.share + way * step))


class PinnedMappings:
    """Pages under `arrays` (views of read-only file mappings) registered with CUDA, so copies
    from them are DMA transfers. Registering maps and locks every page: the file's bytes must
    fit in RAM. Raises KernelError naming the reason when it cannot. Whole pages are registered,
    so only mappings will do: a heap array shares its pages with other objects, which CUDA then
    takes for pinned and copies by DMA past the registered end (cudaErrorInvalidValue)."""

    def __init__(self, arrays: Iterable[np.ndarray], ram: int | None = None, mapped: bool = False):
        self.ranges: list[tuple[int, int]] = []
        self._device_starts: list[int] = []  # where kernels read each range (mapped only)
        spans = [(start, -(-length // PAGE) * PAGE) for start, length in page_ranges(arrays)]
        total = sum(length for _, length in spans)
        limit = (physical_ram() if ram is None else ram) - RAM_RESERVE
        if total > limit:
            raise KernelError(f"{total / 2**30:.1f} GiB of expert weights would not fit in RAM "
                              f"({limit / 2**30:.1f} GiB may be locked); not pinning them")
        runtime = torch.cuda.cudart()
        flags = CUDA_HOST_REGISTER_READ_ONLY | (CUDA_HOST_REGISTER_MAPPED if mapped else 0)
        raw = cudart.runtime() if mapped else None
        if mapped and raw is None:
            raise KernelError("kernels reading the mapped weights need cudaHostGetDevicePointer, "
                              "and torch's CUDA runtime library was not found")
        for start, length in spans:
            rc = runtime.cudaHostRegister(start, length, flags)
            if int(rc) != 0:
                self.close()
                raise KernelError(f"cudaHostRegister of {length / 2**20:.0f} MiB of mapped "
                                  f"weights failed: {rc}")
            self.ranges.append((start, length))
            if raw is not None:
                self._device_starts.append(raw.device_pointer(start))
        self.bytes = total

    def device_address(self, host: int) -> int:
        """Where a kernel reads host address `host` of a range registered as mapped."""
        for (start, length), device in zip(self.ranges, self._device_starts, strict=False):
            if start <= host < start + length:
                return device + (host - start)
        raise KernelError(f"address {host:#x} lies in no mapped range the share registered")

    def close(self) -> None:
        runtime = torch.cuda.cudart()
        for start, length in self.ranges:
            rc = runtime.cudaHostUnregister(start)
            if int(rc) != 0:  # still registered: a later registration of these pages would fail
                log.warning("cudaHostUnregister of %.0f MiB of mapped weights failed: %s", length / 2**20, rc)
        self.ranges, self._device_starts = [], []


@dataclass
class Launched:
    """The GPU part of one call: its result [T, d] float32 (valid in stream order), the event
    that marks it done (None off CUDA), and whether the launch captured a CUDA graph (a first
    expert count: the capture synchronized the device and emptied torch's caches, so which
    side finished first says nothing about the split)."""

    out: torch.Tensor
    done: torch.cuda.Event | None
    captured: bool = False


class GpuShare:
    """Computes the experts it is given on `device`, their weights copied from the mapped file.
    One object serves all layers (one set of device slots, one copy stream). `max_experts`:
    how many one call may take (slots); `experts_per_token`: the model's k (one token's calls
    take at most that many)."""

    def __init__(self, device: torch.device | str, max_experts: int, experts_per_token: int | None = None):
        self.device = _indexed(torch.device(device))
        self.max_experts = max_experts
        self.experts_per_token = min(experts_per_token or max_experts, max_experts)
        self.cuda = self.device.type == "cuda"
        self.ready = threading.Event()  # set when the weights are pinned (at once off CUDA)
        self.batches_ready = threading.Event()  # and the kernels for batches compiled
        self.skipped: str | None = None  # why the share is off, if it is
        self._pinning_ended = threading.Event()
        self._pins: PinnedMappings | None = None
        self._slots: torch.Tensor | None = None
        self.graphs = True  # replay the kernels as CUDA graphs (False: launch them each call)
        self.cpu_first = os.environ.get("TANDEM_SHARE_CPU_FIRST") != "0"  # see SHARE_ENV
        self.cpu_threads = env_int("TANDEM_SHARE_CPU_THREADS")  # 0: the default
        self.submit_on_runner = os.environ.get("TANDEM_SHARE_SUBMIT_ON_RUNNER") != "0"  # see SHARE_ENV
        self.prefetch_rows = env_int("TANDEM_SHARE_PREFETCH")  # see SHARE_ENV
        self.early = os.environ.get("TANDEM_SHARE_EARLY") != "0"  # see SHARE_ENV
        self.early_up_to = env_int("TANDEM_SHARE_EARLY_UP_TO", default=EARLY_UP_TO) / 100  # see SHARE_ENV
        self.precapture = os.environ.get("TANDEM_SHARE_PRECAPTURE") == "1"  # see SHARE_ENV
        self.copies_on_runner = os.environ.get("TANDEM_SHARE_RUNNER_COPIES") == "1"  # see SHARE_ENV
        self._runner_plans: dict[tuple[int, int], native.ShareCopies] = {}  # by layer and slots
        self._direct = None  # kernels.share_triton where the kernels read experts in place (SHARE_ENV)
        if os.environ.get("TANDEM_SHARE_DIRECT") == "1":
            self._direct = triton_module("share_triton", "TANDEM_SHARE_DIRECT", "copies to the device")
        self._ahead: _Ahead | None = None  # the experts prefetched for one layer
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self.captures = 0  # graphs captured so far (each at its first call)
        self._pool = None  # the graphs' memory pool, shared (they replay one after another)
        self._buffers: dict[str, torch.Tensor] = {}  # fixed ones the graphs use: x, weight, out
        self._caches: dict[int, LayerCache] = {}  # by id(gate): most used experts in VRAM
        self.cached_bytes = 0
        # experts the calls took from the file, the cache or a prefetch, and experts prefetched:
        # the cache's and the prefetch's hit rates
        self.counts: Counter[str] = Counter()
        # pinned buffers for each call's small inputs, used in turn, each with the event that
        # marks its upload done (a fresh pinned tensor per call cost ~50 us of host time)
        self._staging: dict[str, list[tuple[torch.Tensor, torch.cuda.Event | None]]] = {}
        self._parts_cache: dict[tuple, list[torch.Tensor]] = {}
        if self.cuda:
            self._copy_stream = torch.cuda.Stream(self.device)
            self._consumed = torch.cuda.Event()  # the last call's kernels have read the slots
            self._copied = [torch.cuda.Event(), torch.cuda.Event()]  # each half's bytes are in
        else:
            self.ready.set()
            self.batches_ready.set()
            self._pinning_ended.set()

    # -- setup -----------------------------------------------------------------------------
    def pin(self, arrays: Sequence[np.ndarray], experts: Sequence[Sequence[QuantTensor]] = (),
            ram: int | None = None) -> None:
        """Register the mapped weights with CUDA and compile the kernels for the layers'
        `experts` (gate, up, down per layer) on a background thread: single tokens share once
        their kernels are compiled (`ready`), batches once theirs are too (`batches_ready`).
        On failure the share stays off, the reason in `skipped`."""
        if not self.cuda:
            return

        def run():
            try:
                self._pins = PinnedMappings(arrays, ram, mapped=self._direct is not None)
                log.info("GPU expert share: %.1f GiB of mapped experts pinned%s", self._pins.bytes / 2**30,
                         ", read in place by its kernels" if self._direct is not None else "")
                kinds = _kinds(experts)
                self._compile(kinds, batched=False)
                if self.precapture:
                    self._precapture(kinds)
                self.ready.set()  # one token's steps share from here on; batches once compiled too
                self._compile(kinds, batched=True)
                self.batches_ready.set()
            except KernelError as exc:
                self._turn_off(str(exc))
            except Exception as exc:  # torch.compile failed here: no triton, no compiler ...
                self._turn_off(f"compiling its kernels failed ({first_line(exc)})")
            finally:
                self._pinning_ended.set()

        threading.Thread(target=run, name="tandem-pin", daemon=True).start()

    def _compile(self, kinds: set[tuple], batched: bool) -> None:
        """Compile the kernels of every expert count a half may get for every mix of types the
        layers have (`_kinds`), on zeros, before the share starts (a few seconds each on the GPU
        machine; compiled during decode they would stall tokens)."""
        with torch.cuda.stream(torch.cuda.Stream(self.device)), torch.inference_mode():
            for types, sizes, d in sorted(kinds):
                if self._reads_in_place(types, sizes, d):
                    self._compile_direct(types, sizes, d, batched)
                    continue
                grids = [torch_dequant.grid_table(t, self.device) for t in types]
                for n in self._counts(batched):
                    rows = self._half_capacity if batched else n  # a batch's pairs index its half's slots
                    parts = [torch.zeros(rows, size, dtype=torch.uint8, device=self.device) for size in sizes]
                    _experts_fn(*types, batched, True)(*parts, *self._zero_inputs(batched, n, d), *grids)
            torch.cuda.current_stream(self.device).synchronize()

    def _precapture(self, kinds: set[tuple]) -> None:
        """Capture the graphs of one token's calls, every expert count of each half for every
        mix of types, before the share starts (TANDEM_SHARE_PRECAPTURE=1), on the buffers the
        calls use (launch, _inputs). Batches' graphs stay captured at their first call: by then
        one token's calls may run, and two threads must not capture into one pool at once. A
        failure leaves the rest to those first calls."""
        copied = [kind for kind in kinds if not self._reads_in_place(*kind)]
        if not copied:
            return
        capacity = self._half_capacity
        try:
            with torch.cuda.stream(torch.cuda.Stream(self.device)), torch.inference_mode():
                slots = self._ensure_slots(max(2 * capacity * sum(sizes) for _, sizes, _ in copied))
                for types, sizes, d in sorted(copied):
                    fn = _experts_fn(*types, False, True)
                    grids = [torch_dequant.grid_table(t, self.device) for t in types]
                    x_in, weights = self._buffer("x", (d,)), self._buffer("staged", (3, 2, capacity))[0]
                    for n in self._counts(False):
                        for region in (0, 1):
                            key = _graph_key(types, False, (tuple(sizes), n, region))
                            if key not in self._graphs:
                                parts = self._parts(slots, region, n, sizes)
                                args = (*parts, x_in, weights[region, :n], *grids)
                                self._capture(key, fn, args, self._out(False, d)[region])
        except Exception as exc:  # any failure: the first calls capture, as without this
            log.warning("GPU expert share: capturing its graphs ahead failed (%s); they are "
                        "captured at their first calls", first_line(exc))

    def _counts(self, batched: bool) -> list[int]:
        """The expert counts a half may get: exact for one token, padded up for batches."""
        if batched:
            return [n for n in ROW_COUNTS if n < self._half_capacity] + [self._half_capacity]
        return list(range(1, (self.experts_per_token + 1) // 2 + 1))

    def _direct_counts(self, batched: bool) -> list[int]:
        """The pair counts a call reading in place may get (one launch, no halves): exact for
        one token, padded up for batches."""
        if batched:
            return [n for n in ROW_COUNTS if n < self.max_experts] + [self.max_experts]
        return list(range(1, self.experts_per_token + 1))

    def _compile_direct(self, types: tuple[GGMLType, ...], sizes: Sequence[int], d: int,
                        batched: bool) -> None:
        """Compile the in-place kernels for every pair count, on an all-zero expert (Triton
        specializes on some counts: 1, multiples of 16)."""
        zeros = functools.partial(torch.zeros, device=self.device)
        expert = [zeros(size, dtype=torch.uint8) for size in sizes]
        for n in self._direct_counts(batched):
            at = torch.tensor([[w.data_ptr()] * n for w in expert], dtype=torch.int64, device=self.device)
            if batched:
                self._direct.experts_at(types, at, tuple(sizes), zeros(MAX_TOKENS, d), zeros(n),
                                        zeros(n, dtype=torch.long), MAX_TOKENS)
            else:
                self._direct.experts_at(types, at, tuple(sizes), zeros(d), zeros(n))

    def _reads_in_place(self, types: tuple[GGMLType, ...], sizes: Sequence[int], d: int) -> bool:
        """Whether this layer's experts are read where they lie (TANDEM_SHARE_DIRECT=1, a mix
        the Triton kernels take in whole tiles)."""
        return self._direct is not None and all(self._direct.fits_sizes(types, sizes[0], d, rows)
                                                for rows in (1, MAX_TOKENS))

    def _zero_inputs(self, batched: bool, n: int, d: int) -> tuple[torch.Tensor, ...]:
        zeros = functools.partial(torch.zeros, device=self.device)
        if batched:  # x rows, each pair's slot and token, its weight
            return zeros(MAX_TOKENS, d), zeros(n, dtype=torch.long), zeros(n, dtype=torch.long), zeros(n)
        return zeros(d), zeros(n)

    def keep_in_vram(self, layers: Sequence[Sequence[QuantTensor]], budget_bytes: int) -> int:
        """Keep each layer's most used experts (gate, up, down per layer) in `budget_bytes` of
        the device's memory (kernels.expert_cache); the bytes taken."""
        taken = 0
        for three, capacity in zip(layers, layer_capacities(layers, budget_bytes), strict=True):
            if capacity:
                self._caches[id(three[0])] = LayerCache(three, capacity, self.device)
                taken += capacity * sum(w.expert_bytes() for w in three)
        self.cached_bytes += taken
        return taken

    def resident(self, gate: QuantTensor) -> set[int]:
        """The experts of `gate`'s layer held in VRAM now (its cache, and what was prefetched
        for it)."""
        return _in_vram(*self.held(gate))

    def event_query(self, event: torch.cuda.Event) -> tuple[int, int] | None:
        """(the CUDA runtime's cudaEventQuery, `event`'s handle) for a C thread that waits on
        it (CpuKernels.start_moe_after); None off CUDA, without the runtime library, or before
        the event was recorded."""
        raw = cudart.runtime() if self.cuda else None
        handle = getattr(event, "cuda_event", 0)
        return (raw.event_query, handle) if raw is not None and handle else None

    def runner_copies(self, tensors: Sequence[QuantTensor], d: int) -> native.ShareCopies | None:
        """The copies of an early call (one token; gate, up, down of a layer, rows of d) for the
        kernels' runner to queue once the routing is in (csrc/runner.c's share_copies; launch
        with the call as `premade` then). None where the share does not copy so: off CUDA,
        without TANDEM_SHARE_RUNNER_COPIES=1, no runtime library, experts read in place or held
        in VRAM, or before the first call made the copy events. Queues the copy stream's wait
        for the last call's kernels, which the runner's copies follow."""
        raw = cudart.runtime() if self.cuda and self.copies_on_runner else None
        types, sizes = tuple(w.ggml_type for w in tensors), tuple(w.expert_bytes() for w in tensors)
        events = [event.cuda_event for event in self._copied] if raw is not None else []
        if (raw is None or not all(events) or self._reads_in_place(types, sizes, d)
                or any(self.held(tensors[0]))):
            return None
        slots = self._ensure_slots(2 * self._half_capacity * sum(sizes))
        key = (id(tensors[0]), slots.data_ptr())
        plan = self._runner_plans.get(key)
        if plan is None:
            parts = [self._parts(slots, region, self._half_capacity, sizes) for region in (0, 1)]
            plan = self._runner_plans[key] = native.ShareCopies(
                raw.memcpy_async, raw.event_record, raw.set_device, self._copy_stream_handle, tuple(events),
                tuple(w.address for w in tensors), sizes,
                tuple(tuple(part.data_ptr() for part in half) for half in parts), self.device.index)
        self._copy_stream.wait_event(self._consumed)
        return plan

    def held(self, gate: QuantTensor) -> tuple[LayerCache | None, _Ahead | None]:
        """Where `gate`'s layer has experts in VRAM: its cache, and a prefetch made for it."""
        ahead = self._ahead if self._ahead is not None and self._ahead.layer == id(gate) else None
        return self._caches.get(id(gate)), ahead

    def prefetch(self, tensors: Sequence[QuantTensor], experts: Iterable[int]) -> None:
        """Copy up to `prefetch_rows` of `experts` (gate, up, down of one layer; most likely
        first) into VRAM on the copy stream, ahead of that layer's next call, which takes them
        first. Replaces what an earlier call prefetched (for any layer): queued after the copies
        that read it."""
        if self.prefetch_rows <= 0 or not self.ready.is_set():
            return
        gate = tensors[0]
        cache = self._caches.get(id(gate))
        cached = set(cache.row_of) if cache is not None else set()  # copied within VRAM anyway
        chosen = [e for e in dict.fromkeys(experts) if e not in cached][: self.prefetch_rows]
        sizes = [w.expert_bytes() for w in tensors]
        ahead = self._ahead
        if ahead is None or any(r.shape[1] < n for r, n in zip(ahead.rows, sizes, strict=True)):
            if ahead is not None and self.cuda:
                self._copy_stream.synchronize()  # no queued copy reads the rows given back
            ahead = self._ahead = _Ahead([torch.empty(self.prefetch_rows, n, dtype=torch.uint8,
                                                      device=self.device) for n in sizes])
        ahead.layer, ahead.row_of = id(gate), {e: row for row, e in enumerate(chosen)}
        self.counts["prefetched"] += len(chosen)
        self._after_reads_of_rows()
        with self._on_copy_stream():  # queued after the copies that read the rows
            for w, rows in zip(tensors, ahead.rows, strict=True):
                for row, e in enumerate(chosen):
                    self._from_file(rows, row, w, e, 1)

    def note_usage(self, ids: torch.Tensor, gate: QuantTensor) -> None:
        """Count the experts a call of `gate`'s layer chose; at a refresh, copy the newly most
        used into VRAM (on the copy stream: in order with the slot copies that read them)."""
        cache = self._caches.get(id(gate))
        if cache is None:
            return
        swaps = cache.note(set(ids.flatten().tolist()))
        if not swaps:
            return
        self._after_reads_of_rows()
        with self._on_copy_stream():
            for expert, row in swaps:
                for w, rows in zip(cache.tensors, cache.rows, strict=True):
                    self._from_file(rows, row, w, expert, 1)

    def _after_reads_of_rows(self) -> None:
        """Copies into cache or prefetch rows next wait for the last call's kernels where
        those read the rows themselves (in place); copies of them into slots are ordered on
        the copy stream anyway."""
        if self.cuda and self._direct is not None:
            self._copy_stream.wait_event(self._consumed)

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
        ready = self.ready.is_set() and (n_tokens == 1 or self.batches_ready.is_set())
        return (ready and 0 < n_tokens <= MAX_TOKENS
                and all(torch_dequant.supports(w.ggml_type) for w in weights))

    def close(self) -> None:
        self._pinning_ended.wait()  # a registration still under way would outlive the mapping
        if self._pins is not None:
            if self.cuda:
                torch.cuda.synchronize(self.device)  # no copy may still read the pages
            self._pins.close()
            self._pins = None
        self.ready.clear()
        self.batches_ready.clear()

    # -- one call --------------------------------------------------------------------------
    @torch.inference_mode()
    def launch(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, experts: list[int],
               gate: QuantTensor, up: QuantTensor, down: QuantTensor,
               premade: native.RunningMoe | None = None) -> Launched:
        """Queue, for each token t, the sum over its slots j with ids[t, j] in `experts` of
        weights[t, j] * down_e(silu(gate_e x_t) * up_e x_t) on the device: x [T, d] there, ids
        and weights [T, k] on the host. Returns without waiting.

        Two halves: the second half's bytes cross PCIe while the first half is computed. Each
        expert's bytes are copied once; in a batch its (token, slot) pairs index them.
        `premade`: the early CPU call whose runner queues these copies (runner_copies)."""
        experts = sorted(experts)
        n_tokens = x.shape[0]
        if not experts or len(experts) > self.max_experts:
            raise KernelError(f"the GPU share takes 1..{self.max_experts} experts, got {len(experts)}")
        if not 0 < n_tokens <= MAX_TOKENS or ids.shape[0] != n_tokens:
            raise KernelError(f"the GPU share takes 1..{MAX_TOKENS} tokens, got {n_tokens} "
                              f"(ids for {ids.shape[0]})")
        pairs = _pairs(ids, weights, experts)
        tensors = (gate, up, down)
        types = tuple(w.ggml_type for w in tensors)
        sizes = tuple(w.expert_bytes() for w in tensors)
        captures = self.captures
        in_place = self._reads_in_place(types, sizes, x.shape[-1])
        if in_place:
            launched = self._launch_in_place(x, n_tokens > 1, experts, pairs, tensors, types, sizes)
        else:
            launched = self._launch_copied(x, n_tokens > 1, experts, pairs, tensors, types, sizes, premade)
        launched.captured = self.captures > captures
        return launched

    def _launch_copied(self, x: torch.Tensor, batched: bool, experts: list[int],
                       pairs: dict[int, list[tuple[int, float]]], tensors: Sequence[QuantTensor],
                       types: tuple[GGMLType, ...], sizes: tuple[int, ...],
                       premade: native.RunningMoe | None = None) -> Launched:
        """launch's GPU part for experts copied into the device slots: the copies in two halves
        (queued here, or by the runner of a `premade` call), then each half's kernels once its
        bytes are in."""
        pair_counts = {e: len(p) for e, p in pairs.items()}
        groups = _halves(experts, pair_counts, self._half_capacity)
        if groups is None:
            raise KernelError(f"{sum(pair_counts.values())} pairs of {len(experts)} experts "
                              f"do not fit two halves of {self._half_capacity} slots")
        grids = [torch_dequant.grid_table(t, self.device) for t in types]
        slots = self._ensure_slots(2 * self._half_capacity * sum(sizes))
        # one token: a slot per expert, exact counts; a batch: pair counts padded up, the
        # experts in the first rows of the half's slots (the pairs index them)
        counts = [self._padded(sum(pair_counts[e] for e in group), batched) for group in groups]
        rows = [self._half_capacity if batched else n for n in counts]
        parts = [self._parts(slots, region, n, sizes) for region, n in enumerate(rows)]
        # the copies first: the GPU's part ends after them, the inputs are staged meanwhile
        copied = self._premade_copies(premade, experts, len(groups)) if premade is not None else None
        if copied is None:
            copied = self._upload(groups, tensors, parts)
        x_in, per_half = self._inputs(x, groups, pairs, batched)
        stream = torch.cuda.current_stream(self.device) if self.cuda else None
        outs = []
        for region, n in enumerate(counts):
            if stream is not None:
                stream.wait_event(copied[region])  # this half's bytes are in
            args = (*parts[region], x_in, *(t[region, :n] for t in per_half), *grids)
            outs.append(self._compute(types, batched, (sizes, n, region), args))
        out = outs[0] + outs[1] if len(outs) == 2 else outs[0].clone()  # the outputs get reused
        return Launched(out.view(1, -1) if not batched else out[: x.shape[0]], self._done(stream))

    def _premade_copies(self, premade: native.RunningMoe, experts: list[int],
                        n_groups: int) -> list[torch.cuda.Event] | None:
        """The copy events of the n_groups halves the runner of `premade` queued (the same
        halves as _halves makes of one token's experts: runner_copies), once it has; None where
        it failed (a CUDA error turns runner copies off, with a warning) and the caller copies
        instead."""
        rc = premade.copies_queued()
        if rc == 0:
            self._count_sources(experts, None, None)
            return self._copied[:n_groups]
        if rc > 0:  # a CUDA error code; negative ones are the call's own failure, raised at its result
            self.copies_on_runner = False
            log.warning("GPU expert share: the CPU runner's copies failed (CUDA error %d); the caller "
                        "copies from now on", rc)
        return None

    def _done(self, stream: torch.cuda.Stream | None) -> torch.cuda.Event | None:
        """After a call's kernels on `stream`: mark the slots and rows they read as consumed
        (the next copies into them wait for it) and return the event of their end (None off
        CUDA)."""
        if stream is None:
            return None
        self._consumed.record(stream)
        done = torch.cuda.Event()
        done.record(stream)
        return done

    def _launch_in_place(self, x: torch.Tensor, batched: bool, experts: list[int],
                         pairs: dict[int, list[tuple[int, float]]], tensors: Sequence[QuantTensor],
                         types: tuple[GGMLType, ...], sizes: tuple[int, ...]) -> Launched:
        """launch, the kernels reading each expert where it lies (TANDEM_SHARE_DIRECT): one
        upload of the pairs' addresses, tokens and weights, then one launch (a graph replay)."""
        where = self._addresses(experts, tensors)
        listed = [(where[e], token, weight) for e in experts for token, weight in pairs[e]]
        if len(listed) > self.max_experts:  # before padding: no padded count would hold them
            raise KernelError(f"{len(listed)} (token, expert) pairs exceed the share's {self.max_experts}")
        count = len(listed) if not batched else next(c for c in self._direct_counts(True) if c >= len(listed))
        capacity = self.max_experts
        host, uploaded = self._next_staging("in place", (capacity * IN_PLACE_ROW_BYTES,), torch.uint8)
        at, tokens, weight = (view.numpy() for view in _in_place_views(host, capacity))
        rows = listed + [(listed[0][0], 0, 0.0)] * (count - len(listed))  # padding: readable bytes, weight 0
        at[:, :count] = np.array([addresses for addresses, _, _ in rows], dtype=np.int64).T
        tokens[:count] = [token for _, token, _ in rows]
        weight[:count] = [w for _, _, w in rows]
        staged = self._buffer("in place", tuple(host.shape), torch.uint8)
        staged.copy_(host, non_blocking=True)
        if uploaded is not None:
            uploaded.record()
        at_d, tokens_d, weight_d = _in_place_views(staged, capacity)
        x_in = self._x_input(x, batched)
        stream = torch.cuda.current_stream(self.device) if self.cuda else None
        if stream is not None and any(self.held(tensors[0])):
            stream.wait_stream(self._copy_stream)  # a cache swap's or a prefetch's bytes are in
        args = (types, at_d[:, :count], sizes, x_in, weight_d[:count],
                tokens_d[:count] if batched else None, MAX_TOKENS if batched else 1)
        out = self._compute_in_place(("in place", types, sizes, count, batched), args)
        # cloned: the graph's output is reused; cache swaps and prefetches wait for _consumed
        return Launched(out[: x.shape[0]].clone(), self._done(stream))

    def _compute_in_place(self, key: tuple, args: tuple) -> torch.Tensor:
        """share_triton.experts_at(*args): [T, d], by a CUDA graph replay on CUDA."""
        if not self.cuda or not self.graphs:
            return self._direct.experts_at(*args)
        rows, d = args[-1], args[3].shape[-1]
        out = self._buffer(f"out {rows}", (rows, d))
        graph = self._graphs.get(key) or self._capture(key, self._direct.experts_at, args, out)
        graph.replay()
        return out

    def _addresses(self, experts: list[int], tensors: Sequence[QuantTensor]) -> dict[int, list[int]]:
        """Where the kernels read each expert's gate, up and down bytes: rows of the layer's
        cache or a prefetch in VRAM, else the file mapping (its device address)."""
        cache, ahead = self.held(tensors[0])
        self._count_sources(experts, cache, ahead)
        where = {}
        for e in experts:
            if cache is not None and e in cache.row_of:
                where[e] = [rows[cache.row_of[e]].data_ptr() for rows in cache.rows]
            elif ahead is not None and e in ahead.row_of:
                where[e] = [rows[ahead.row_of[e]].data_ptr() for rows in ahead.rows]
            else:
                where[e] = [self._device_address(w.address + e * w.expert_bytes()) for w in tensors]
        return where

    def _device_address(self, host: int) -> int:
        return self._pins.device_address(host) if self._pins is not None else host  # off CUDA: the host's

    def _count_sources(self, experts: list[int], cache: LayerCache | None, ahead: _Ahead | None) -> None:
        """Count where a call's experts came from: the cache's and the prefetch's hit rates."""
        if cache is None and ahead is None:
            self.counts["from_file"] += len(experts)
            return
        row_of = cache.row_of if cache is not None else {}
        from_cache = sum(e in row_of for e in experts)
        from_ahead = sum(e in ahead.row_of and e not in row_of for e in experts) if ahead else 0
        self.counts.update(from_cache=from_cache, from_prefetch=from_ahead,
                           from_file=len(experts) - from_cache - from_ahead)

    def _padded(self, n: int, batched: bool) -> int:
        return next(c for c in self._counts(batched) if c >= n) if batched else n

    def _inputs(self, x: torch.Tensor, groups: list[list[int]], pairs: dict[int, list[tuple[int, float]]],
                batched: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The kernels' inputs in fixed buffers (captured graphs read them there): x (one
        token's [d], or a batch's rows [MAX_TOKENS, d]) and the per-half ones [2, capacity]:
        for batches each pair's slot (its expert's row) and token, then its routing weight (0
        where a half is padded)."""
        capacity = self._half_capacity
        # one upload for all: the weights, and the slots and tokens as floats (small integers, exact)
        host, uploaded = self._next_staging("inputs", (3, 2, capacity))
        values = host.numpy()
        values.fill(0.0)  # padded pairs: weight 0, slot 0, token 0
        for region, group in enumerate(groups):
            listed = [(row, token, weight) for row, e in enumerate(group) for token, weight in pairs[e]]
            values[0, region, : len(listed)] = [weight for _, _, weight in listed]
            values[1, region, : len(listed)] = [row for row, _, _ in listed]
            values[2, region, : len(listed)] = [token for _, token, _ in listed]
        staged = self._buffer("staged", (3, 2, capacity))
        staged.copy_(host, non_blocking=True)  # pinned: no wait for the GPU
        if uploaded is not None:
            uploaded.record()
        x_in = self._x_input(x, batched)
        if not batched:
            return x_in, [staged[0]]
        indices = self._buffer("pair_indices", (2, 2, capacity), torch.long)  # slots, tokens
        indices.copy_(staged[1:])
        return x_in, [indices[0], indices[1], staged[0]]

    def _x_input(self, x: torch.Tensor, batched: bool) -> torch.Tensor:
        """x in the fixed buffer the graphs read: one token's [d], or a batch's rows
        [MAX_TOKENS, d] (rows past the batch keep stale values; no pair points at them)."""
        if not batched:
            xv = self._buffer("x", (x.shape[-1],))
            xv.copy_(x.reshape(-1))
            return xv
        rows = self._buffer("x_rows", (MAX_TOKENS, x.shape[-1]))
        rows[: x.shape[0]].copy_(x)
        return rows

    def _next_staging(self, name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32
                      ) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """A pinned host buffer of `name` whose last upload is done, and its event (two used
        in turn)."""
        if name not in self._staging:
            self._staging[name] = [(torch.zeros(shape, dtype=dtype, pin_memory=self.cuda),
                                    torch.cuda.Event() if self.cuda else None) for _ in range(2)]
        buffers = self._staging[name]
        buffers.append(buffers.pop(0))
        host, uploaded = buffers[-1]
        if uploaded is not None:
            uploaded.synchronize()  # queued two calls ago: long done in practice
        return host, uploaded

    @property
    def _half_capacity(self) -> int:
        return (self.max_experts + 1) // 2

    def _parts(self, slots: torch.Tensor, region: int, n: int, sizes: Sequence[int]) -> list[torch.Tensor]:
        """The slots of n experts of one half (region 0 or 1): one [n, bytes] view per matrix,
        each at a fixed address (a captured graph reads them there). Kept per shape until the
        slots are reallocated (making the views cost ~15 us a call)."""
        key = (region, n, tuple(sizes))
        parts = self._parts_cache.get(key)
        if parts is None:
            offset = region * self._half_capacity * sum(sizes)
            parts = []
            for size in sizes:
                parts.append(slots[offset : offset + n * size].view(n, size))
                offset += self._half_capacity * size
            self._parts_cache[key] = parts
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
        # copies within VRAM (from a cache or a prefetch) go through torch: on the copy stream
        within_vram = any(self.held(tensors[0]))
        with self._on_copy_stream(within_vram):
            for group, group_parts, event in zip(groups, parts, self._copied, strict=False):
                self._copy(group, tensors, group_parts)
                event.record(self._copy_stream)
        return self._copied[: len(groups)]

    def _compute(self, types: tuple[GGMLType, ...], batched: bool, key: tuple, args: tuple) -> torch.Tensor:
        """The experts of one half: [d] (one token) or [MAX_TOKENS, d] float32, by a CUDA
        graph replay on CUDA."""
        if not self.cuda:
            return _experts_fn(*types, batched, False)(*args)
        try:
            if not self.graphs:
                return _experts_fn(*types, batched, True)(*args)
            graph_key, out = _graph_key(types, batched, key), self._out(batched, args[3].shape[-1])[key[-1]]
            graph = self._graphs.get(graph_key) or self._capture(
                graph_key, _experts_fn(*types, batched, True), args, out)
            graph.replay()
            return out
        except Exception as exc:  # torch.compile failed here: no triton, no compiler ...
            self._turn_off(f"compiling its kernels failed ({first_line(exc)})")
            return _experts_fn(*types, batched, False)(*args)  # eager, this once

    def _out(self, batched: bool, d: int) -> torch.Tensor:
        return self._buffer("out_rows", (2, MAX_TOKENS, d)) if batched else self._buffer("out", (2, d))

    def _capture(self, key: tuple, fn, args: tuple, out: torch.Tensor) -> torch.CUDAGraph:
        """A CUDA graph of fn(*args) (the compiled kernels for one half's expert count and
        region, or the in-place kernels for one pair count): one replay instead of ~9 launches
        through torch.compile's wrapper (~0.9 ms of host time per call on the GPU machine). It
        reads the fixed slots and buffers and writes its result to `out`: outside the graphs'
        shared pool, where a later capture could put its scratch."""
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
        self._graphs[key] = graph
        self.captures += 1
        return graph

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A buffer on the device, kept across calls (graphs captured on it)."""
        buffer = self._buffers.get(name)
        if buffer is None or tuple(buffer.shape) != shape:
            if buffer is not None:  # graphs captured on the old one would read freed memory
                self._graphs.clear()
            buffer = self._buffers[name] = torch.zeros(shape, dtype=dtype, device=self.device)
        return buffer

    def _copy(self, experts: list[int], tensors: Sequence[QuantTensor], parts: list[torch.Tensor]) -> None:
        """Each expert's bytes into its slot row: from VRAM where the layer's cache or a
        prefetch holds it, else from the mapped file (one copy per run of consecutive experts)."""
        cache, ahead = self.held(tensors[0])
        row_of = cache.row_of if cache is not None else {}
        in_vram = _in_vram(cache, ahead)
        runs = consecutive_runs(experts)
        self._count_sources(experts, cache, ahead)
        for m, (w, part) in enumerate(zip(tensors, parts, strict=True)):
            row, size = 0, w.expert_bytes()
            for first, count in runs:
                if not in_vram or not any(e in in_vram for e in range(first, first + count)):
                    self._from_file(part, row, w, first, count)
                    row += count
                    continue
                for e in range(first, first + count):
                    if e in row_of:
                        part[row].copy_(cache.rows[m][row_of[e]], non_blocking=True)
                    elif ahead is not None and e in ahead.row_of:
                        part[row].copy_(ahead.rows[m][ahead.row_of[e], :size], non_blocking=True)
                    else:
                        self._from_file(part, row, w, e, 1)
                    row += 1

    def _from_file(self, rows: torch.Tensor, row: int, w: QuantTensor, first: int, count: int) -> None:
        """Experts first..first+count-1 of `w` from the mapped file into rows row.. of `rows`
        (uint8 [n, >= bytes per expert] on the device, one expert per row), queued on the copy
        stream: through the CUDA runtime directly (~4 us of host time a copy, not ~25; the
        address computed, not sliced) where it is found, else torch's copy, which needs the
        copy stream current (`_on_copy_stream`)."""
        size = w.expert_bytes()
        if count > 1 and rows.stride(0) != size:
            raise KernelError(f"{count} experts of {size} bytes do not lie back to back in rows "
                              f"of {rows.stride(0)} bytes")
        raw = cudart.runtime() if self.cuda else None
        if raw is None:
            rows[row : row + count, :size].copy_(w.per_expert[first : first + count].reshape(count, size),
                                                 non_blocking=True)
            return
        raw.copy_to_device(rows.data_ptr() + row * rows.stride(0), w.address + first * size, count * size,
                           self._copy_stream_handle)

    def _on_copy_stream(self, within_vram: bool = False):
        """The copy stream as torch's current one where torch copies will run: copies within
        VRAM, or all of them without the runtime for direct ones; a no-op off CUDA."""
        if self.cuda and (within_vram or cudart.runtime() is None):
            return torch.cuda.stream(self._copy_stream)
        return contextlib.nullcontext()

    @functools.cached_property
    def _copy_stream_handle(self) -> int:
        return self._copy_stream.cuda_stream

    def _ensure_slots(self, nbytes: int) -> torch.Tensor:
        if self._slots is None or self._slots.numel() < nbytes:
            if self._slots is not None and self.cuda:
                torch.cuda.current_stream(self.device).synchronize()
            self._slots = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            self._graphs.clear()  # they read the old slots
            self._parts_cache.clear()
        return self._slots


def _graph_key(types: tuple[GGMLType, ...], batched: bool, key: tuple) -> tuple:
    """Which captured graph a half's call replays: its types, one token or a batch, and `key`
    (bytes per expert, expert count, half)."""
    return (types, batched, *key)


def _in_place_views(buffer: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The in-place launch's inputs in one uint8 buffer (one upload): addresses [3, capacity]
    and tokens [capacity] int64, weights [capacity] float32."""
    tokens_at = _IN_PLACE_ADDRESSES * capacity
    weights_at = tokens_at + _IN_PLACE_TOKEN * capacity
    at = buffer[:tokens_at].view(torch.int64).view(3, capacity)
    tokens = buffer[tokens_at:weights_at].view(torch.int64)
    return at, tokens, buffer[weights_at : IN_PLACE_ROW_BYTES * capacity].view(torch.float32)


@dataclass
class _Ahead:
    """Experts copied into VRAM ahead of one layer's call: one row per expert and matrix."""

    rows: list[torch.Tensor]
    layer: int | None = None  # id of that layer's gate tensor
    row_of: dict[int, int] = field(default_factory=dict)


def _in_vram(cache: LayerCache | None, ahead: _Ahead | None) -> set[int]:
    """The experts a layer's cache and a prefetch made for it hold in VRAM."""
    return (cache.row_of.keys() if cache else set()) | (ahead.row_of.keys() if ahead else set())


def _kinds(experts: Sequence[Sequence[QuantTensor]]) -> set[tuple]:
    """The layers' mixes of (types, bytes per expert, rows' length) the share's kernels take."""
    return {(tuple(w.ggml_type for w in mats), tuple(w.expert_bytes() for w in mats), mats[0].shape[-1])
            for mats in experts if all(torch_dequant.supports(w.ggml_type) for w in mats)}


def _indexed(device: torch.device) -> torch.device:
    """`device` with its index: "cuda" is the current CUDA device."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def split(ids: torch.Tensor, n_gpu_experts: int, resident: set[int] = frozenset(),
          limit: int | None = None, shared_experts: bool | None = None) -> tuple[list[int], torch.Tensor]:
    """Experts for the GPU: those `resident` in VRAM, then up to n others; experts that one
    token chose, and with `shared_experts` (default: TANDEM_SHARE_BATCH_PAIRS=1) then those
    several tokens chose, fewest tokens first: the GPU computes such an expert once per token
    from one copy of its bytes, while the CPU serves all its tokens from one read (the GPU
    idled more than half of an 8-stream call in run t without them, yet 8 streams did not run
    faster with them in run u). At most `limit` of their
    (token, slot) pairs in all. And the ids for the CPU, the GPU's slots marked SKIPPED_SLOT.
    ids [T, k] on the host. (Python lists: a decode step has 8 ids, and tensor ops cost ~10x
    more per call at that size.)"""
    rows = ids.tolist()
    if len(rows) == 1 and not resident and len(set(rows[0])) == len(rows[0]):
        # one token's distinct experts, one pair each: the order below is by id, and any n up
        # to the limit fits the halves (a decode step's split in a third of the time)
        gpu = sorted(rows[0])[: n_gpu_experts if limit is None else min(n_gpu_experts, limit)]
    else:
        gpu = _batch_split(rows, n_gpu_experts, resident, limit, shared_experts)
    if not gpu:
        return [], ids
    chosen = set(gpu)
    cpu_ids = [[SKIPPED_SLOT if e in chosen else e for e in row] for row in rows]
    return gpu, torch.from_numpy(np.array(cpu_ids, dtype=np.int64)).to(ids.dtype)


def _batch_split(rows: list[list[int]], n_gpu_experts: int, resident: set[int], limit: int | None,
                 shared_experts: bool | None) -> list[int]:
    """split's choice of GPU experts for any batch (see split)."""
    if shared_experts is None:
        shared_experts = os.environ.get("TANDEM_SHARE_BATCH_PAIRS") == "1"
    counts = Counter(e for row in rows for e in row)
    order = sorted(counts, key=lambda e: (e not in resident, counts[e], e))
    if not shared_experts:
        order = [e for e in order if counts[e] == 1]
    gpu, pairs, others = [], 0, 0
    for e in order:
        if e not in resident and others == n_gpu_experts:
            break
        if limit is not None and pairs + counts[e] > limit:
            continue  # a smaller one may still fit
        gpu.append(e)
        pairs += counts[e]
        others += e not in resident
    if limit is not None:  # the pairs must also fit the two halves of the slots (GpuShare.launch)
        while gpu and _halves(gpu, counts, (limit + 1) // 2) is None:
            gpu.pop()  # the last taken: the most tokens
    return gpu


def _pairs(ids: torch.Tensor, weights: torch.Tensor,
           experts: list[int]) -> dict[int, list[tuple[int, float]]]:
    """Each of `experts`' (token, routing weight) pairs; KernelError for one no token chose."""
    pairs = {e: [] for e in experts}
    for t, (row, row_weights) in enumerate(zip(ids.tolist(), weights.tolist(), strict=True)):
        for e, w in zip(row, row_weights, strict=True):
            if e in pairs:
                pairs[e].append((t, w))
    unused = [e for e in experts if not pairs[e]]
    if unused:
        raise KernelError(f"the GPU share was given experts {unused} that no token chose")
    return pairs


def _halves(experts: list[int], sizes: dict[int, int], capacity: int) -> list[list[int]] | None:
    """`experts` in two sorted groups whose pair counts (`sizes`) are as equal as whole experts
    allow, each at most `capacity` pairs (one group for a single expert): cut where the sorted
    list balances best (runs of consecutive experts stay whole: fewer copies), else placed
    largest first into the emptier group. None if they do not fit."""
    experts = sorted(experts)
    if len(experts) == 1:
        return [experts] if sizes[experts[0]] <= capacity else None
    total, best, best_gap, first = sum(sizes[e] for e in experts), None, None, 0
    for cut in range(1, len(experts)):
        first += sizes[experts[cut - 1]]
        gap = abs(2 * first - total)
        if first <= capacity and total - first <= capacity and (best is None or gap <= best_gap):
            best, best_gap = cut, gap  # ties: the larger first group, as its copies go first
    if best is not None:
        return [experts[:best], experts[best:]]
    groups, filled = ([], []), [0, 0]
    for e in sorted(experts, key=lambda e: -sizes[e]):
        side = min((0, 1), key=lambda i: filled[i])
        if filled[side] + sizes[e] > capacity:
            return None  # the emptier group has no room: neither has
        groups[side].append(e)
        filled[side] += sizes[e]
    return [sorted(groups[0]), sorted(groups[1])]


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


def _expert_rows(types: tuple[GGMLType, GGMLType, GGMLType], gate_raw: torch.Tensor, up_raw: torch.Tensor,
                 down_raw: torch.Tensor, x_rows: torch.Tensor, slots: torch.Tensor, tokens: torch.Tensor,
                 weight: torch.Tensor, gate_grid, up_grid, down_grid) -> torch.Tensor:
    """n pairs: the expert in row slots[i] of the raw bytes ([rows, bytes] each) on row
    tokens[i] of x_rows [T, d] with routing weight weight[i]: their sum per row, [T, d]
    float32. Each pair has its own x, so IQ1_S rows dequantize like the other types (one table
    of products per token would not stay in L2). A padded pair (weight 0) adds exactly 0,
    whatever stale bytes its slot holds."""
    gate_type, up_type, down_type = types
    gate_raw, up_raw, down_raw = gate_raw[slots], up_raw[slots], down_raw[slots]  # fused loads when compiled
    n = down_raw.shape[0]
    xs = x_rows[tokens]  # [n, d]

    def times(raw, t, grid, v):  # [n, rows, len(v)] weights times each expert's vector v [n, len]
        return (torch_dequant.values(raw, t, grid).view(n, -1, v.shape[1]) * v[:, None, :]).sum(-1)

    h = F.silu(times(gate_raw, gate_type, gate_grid, xs)) * times(up_raw, up_type, up_grid, xs)
    y = torch.where(weight[:, None] != 0, times(down_raw, down_type, down_grid, h) * weight[:, None], 0.0)
    return torch.zeros_like(x_rows).index_add_(0, tokens, y)


@functools.cache
def _experts_fn(gate_type: GGMLType, up_type: GGMLType, down_type: GGMLType, batched: bool, compiled: bool):
    fn = functools.partial(_expert_rows if batched else _experts, (gate_type, up_type, down_type))
    if not compiled:
        return fn
    # Static shapes: a kernel set per expert count, each up to 2.4x faster than one set for all
    # counts (4 IQ1_S experts: 0.34 against 0.81 ms on the GPU machine; dynamic shapes leave
    # the reductions' block sizes unknown). That is more than the 8 variants dynamo keeps of
    # one function by default; past them it would silently run the slow eager ops.
    compiled_fn = compiling.compiled(fn, dynamic=False, variants=RECOMPILE_LIMIT)
    types = (gate_type, up_type, down_type)
    setting = os.environ.get("TANDEM_SHARE_TRITON", "")
    if setting == "0":
        return compiled_fn
    share_triton = triton_module("share_triton", "TANDEM_SHARE_TRITON", "the compiled kernels",
                                 asked=setting == "1")
    if share_triton is None or types not in share_triton.MIXES:
        return compiled_fn
    written = share_triton.expert_rows if batched else share_triton.experts
    failed = []  # the written kernels failed here once: the compiled ones from then on

    def triton_where_it_fits(gate_raw, up_raw, down_raw, x, *rest):
        if not failed and share_triton.fits(types, gate_raw, x):
            try:
                return written(types, gate_raw, up_raw, down_raw, x, *rest)
            except Exception as exc:  # Triton's compiler failed here (an old driver, ...)
                failed.append(exc)
                log.warning("GPU expert share: its Triton kernels failed (%s); the compiled ones "
                            "instead (TANDEM_SHARE_TRITON=0 skips them)", first_line(exc))
        return compiled_fn(gate_raw, up_raw, down_raw, x, *rest)
    return triton_where_it_fits
