"""Routed-expert backends for the MoE seam: submit the routed experts, collect the result.

`CpuExperts` runs them on the CPU (tandem's kernels or ggml's), reading the quantized weights
in place; the caller's device keeps working (shared expert) until it collects. Given an
`ExpertStreamer`, batches long enough go to the GPU instead, their weights streamed there.
Given a `GpuShare`, short batches (decode) send a balanced share of their experts to the GPU
and compute the rest on the CPU at the same time. `TorchExperts` computes them with
dequantized weights in torch, on any device: the reference, and the fallback for rules that
put experts on a GPU.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tandem.kernels import native
from tandem.kernels.cpu import CpuKernels
from tandem.kernels.gpu_share import GpuShare, Launched, ShareBalance, split
from tandem.kernels.streamed import ExpertStreamer
from tandem.kernels.tensors import QuantTensor


@dataclass
class _SharedCall:
    """A split call between submit and collect: the GPU's part queued, the CPU's to run."""

    cpu: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | native.RunningMoe | None  # x (host),
    # ids, weights; or the CPU's part already running on the kernels' runner (share.cpu_first)
    gpu: Launched | None
    balance: ShareBalance  # the one that chose the split, told who finished first


@dataclass
class EarlyStart:
    """One token's shared call whose CPU part was posted before its routing was in
    (CpuExperts.start_early): the GPU takes the experts it holds in VRAM (`resident`, a
    prefetch) and the `n_gpu` lowest other ids, fixed then; the CPU's part on the runner."""

    n_gpu: int
    cpu: native.RunningMoe
    balance: ShareBalance
    copies: bool = False  # the runner queues the GPU's copies too (GpuShare.runner_copies)
    resident: frozenset[int] = frozenset()


class CpuExperts:
    def __init__(self, kernels: CpuKernels, gate: QuantTensor, up: QuantTensor, down: QuantTensor,
                 own_kernels: bool = True, streamer: ExpertStreamer | None = None,
                 share: GpuShare | None = None, balance: ShareBalance | None = None):
        self.kernels, self.gate, self.up, self.down = kernels, gate, up, down
        self.own_kernels = own_kernels  # tandem's kernels where they cover the types, else ggml
        self.streamer = streamer
        # the GPU share needs tandem's kernels: ggml's cannot skip the GPU's slots
        self.share = share if own_kernels and native.fits(gate, up, down) else None
        self.balance = balance or ShareBalance()  # this layer's share of experts on the GPU
        # the same for batches of several tokens (other costs on both sides: its own balance)
        self.batch_balance = ShareBalance(self.balance.share, self.balance.fixed)
        self._early_buffer: torch.Tensor | None = None  # what early CPU parts write (start_early)
        self._resident_flags = torch.zeros(gate.shape[0], dtype=torch.uint8)  # start_early's, per expert

    def shares(self, n_tokens: int) -> bool:
        """Whether a batch of `n_tokens` splits its experts between the GPU and the CPU."""
        return self.share is not None and self.share.wants(n_tokens, self.gate, self.up, self.down)

    def submit(self, x: torch.Tensor, ids: torch.Tensor,
               weights: torch.Tensor) -> Future | native.RunningMoe | torch.Tensor | _SharedCall:
        if self.streamer is not None and self.streamer.wants(x.shape[0], self.gate, self.up, self.down):
            return self.streamer.moe(x, ids, weights, self.gate, self.up, self.down)  # queued there
        if self.shares(x.shape[0]) and self.share.serves(x.device):
            return self._submit_shared(x, ids.cpu(), weights.cpu())
        out = None
        if x.is_cuda:
            # Through pinned memory both ways: a fresh pageable copy of a 2048-token batch (59 MB)
            # took ~45 ms down and ~13 ms up on the GPU machine (page faults, staged copies),
            # more than a tenth of a CPU-only prefill layer.
            x, out = _pinned_copy(x), torch.empty(x.shape, dtype=torch.float32, pin_memory=True)
        else:
            x = x.detach().to("cpu", torch.float32)
        ids, weights = ids.cpu(), weights.cpu()
        running = self._start_on_runner(x, ids, weights, out)
        if running is not None:
            return running
        return self.kernels.submit_moe(x, ids, weights, self.gate, self.up, self.down,
                                       own=self.own_kernels, out=out)

    def collect(self, handle: Future | native.RunningMoe | torch.Tensor | _SharedCall) -> torch.Tensor:
        if isinstance(handle, _SharedCall):
            return self._collect_shared(handle)
        return handle.result() if isinstance(handle, Future | native.RunningMoe) else handle

    def compute_shared(self, x: torch.Tensor, x_host: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                       after_launch=None, early: EarlyStart | None = None,
                       out: torch.Tensor | None = None) -> torch.Tensor:
        """The same with a share on the GPU (when `shares`), waiting for both: x on the share's
        device and its copy x_host (pinned), ids and weights on the host. Result on the device,
        in `out` if given. `after_launch`: called once the GPU's part is queued, before the
        CPU's runs. `early`: the CPU's part already posted by `start_early` on these buffers."""
        call = self._submit_shared(x, ids, weights, x_host) if early is None else self._submit_early(
            x, ids, weights, early)
        if after_launch is not None:
            after_launch()
        return self._collect_shared(call, out)

    def start_early(self, x_host: torch.Tensor, ids_host: torch.Tensor, weights_host: torch.Tensor,
                    inputs_in: torch.cuda.Event) -> EarlyStart | None:
        """Post one token's CPU part before its routing is in host memory: the runner waits
        for `inputs_in` (recorded after the GPU work that writes the pinned buffers x_host,
        ids_host [1, k] int64, weights_host), then runs the experts the GPU does not take.
        The split is fixed now, as `split` makes it: the GPU takes the experts prefetched into
        VRAM for this layer that the token chose, then by count the balance's share of the
        others (of k less the prefetched, as many as a good prediction leaves), the lowest ids.
        Pass the result to `compute_shared` with the same buffers once they are in. None where
        this does not apply (TANDEM_SHARE_EARLY=0, no CUDA runtime to query the event, a layer
        with a cache of experts in VRAM, a share above the share's early_up_to, or the runner
        busy): then call compute_shared without it."""
        share = self.share
        query = share.event_query(inputs_in) if share is not None and share.early else None
        if query is None or ids_host.shape[0] != 1 or not self.shares(1):
            return None
        cache, ahead = share.held(self.gate)
        if cache is not None:  # many experts, few of them chosen: the count would not say how many
            return None
        resident = frozenset(ahead.row_of) if ahead is not None else frozenset()
        k = ids_host.shape[1]
        others = max(0, k - len(resident))
        n_gpu = self.balance.take(others, commit=False)
        if n_gpu > share.early_up_to * others:  # a share climbing: the ordinary path recovers (SHARE_ENV)
            return None
        copies = (share.runner_copies((self.gate, self.up, self.down), x_host.shape[-1])
                  if n_gpu and not resident else None)
        cpu = self.kernels.start_moe_after(*query, x_host, ids_host, weights_host, n_gpu, self.gate, self.up,
                                           self.down, out=self._early_out(x_host),
                                           n_threads=self._runner_threads(), copies=copies,
                                           resident=self._flags(resident) if resident else None)
        if cpu is None:
            return None
        self.balance.take(others)
        return EarlyStart(n_gpu, cpu, self.balance, copies is not None, resident)

    def _flags(self, experts: frozenset[int]) -> torch.Tensor:
        """The runner's per-expert flags of `experts` (one buffer per layer: a layer's next
        early call is posted only after this one was waited for)."""
        flags = self._resident_flags
        flags.zero_()
        flags[list(experts)] = 1
        return flags

    def _early_out(self, x_host: torch.Tensor) -> torch.Tensor:
        """The pinned buffer an early CPU part writes, one per layer: its upload is queued
        before the next token's GPU work, which the next early part waits for."""
        if self._early_buffer is None or self._early_buffer.shape != x_host.shape:
            self._early_buffer = self._host_out(x_host)
        return self._early_buffer

    # -- split between the GPU and the CPU ---------------------------------------------------
    def _split(self, ids: torch.Tensor) -> tuple[list[int], torch.Tensor, int, ShareBalance]:
        """The GPU's experts (those held in VRAM first), the CPU's ids (the GPU's slots
        skipped), the count of experts and the balance that chose."""
        balance = self.balance if ids.shape[0] == 1 else self.batch_balance
        self.share.note_usage(ids, self.gate)  # may bring the most used experts into VRAM
        chosen, resident = set(ids.flatten().tolist()), self.share.resident(self.gate)
        n_other = balance.take(len(chosen - resident))  # the balance shares the others
        gpu_experts, cpu_ids = split(ids, n_other, resident, limit=self.share.max_experts)
        return gpu_experts, cpu_ids, len(chosen), balance

    def _start_on_runner(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                         out: torch.Tensor | None = None) -> native.RunningMoe | None:
        """An unshared call of a layer with a share, started on the kernels' runner, whose
        OpenMP team the shared calls use: a second team (the executor's, the caller's) would
        stay counted by libgomp and throttle the op's threads (gpu_share.SHARE_ENV). None where
        that does not apply or the runner is busy."""
        if self.share is None or not self.share.submit_on_runner:
            return None
        return self.kernels.start_moe(x, ids, weights, self.gate, self.up, self.down, out=out,
                                      n_threads=self._runner_threads())

    def _runner_threads(self) -> int:
        """Threads of an op on the kernels' runner: one fewer than the kernels' (a core for the
        caller, which launches GPU work meanwhile), or TANDEM_SHARE_CPU_THREADS."""
        return self.share.cpu_threads or self.kernels.n_threads - 1

    def _launch(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                gpu_experts: list[int], premade: native.RunningMoe | None = None) -> Launched | None:
        if not gpu_experts:
            return None
        self.kernels.count_read(len(gpu_experts), self.gate, self.up, self.down)
        return self.share.launch(x, ids, weights, gpu_experts, self.gate, self.up, self.down, premade)

    def _host_out(self, x_host: torch.Tensor) -> torch.Tensor:
        """Where the CPU's part goes: pinned memory when it is uploaded to a GPU."""
        return torch.empty(x_host.shape, dtype=torch.float32, pin_memory=self.share.cuda)

    def _submit_shared(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                       x_host: torch.Tensor | None = None) -> _SharedCall:
        """Start the CPU's part on the kernels' runner thread (share.cpu_first, the default),
        then queue the GPU's part (copies and graph replays: ~0.4-1 ms of host time a layer);
        without cpu_first, or with ggml's kernels, the CPU's part runs in collect, on the
        caller's thread. (Started on a Python executor thread instead, decode was 7-13% slower
        on the GPU machine: the hand-over needed the GIL that the launch holds.)"""
        gpu_experts, cpu_ids, distinct, balance = self._split(ids)
        cpu = None
        if len(gpu_experts) < distinct:
            if x_host is None:  # copied down before the GPU's queue grows: the copy waits for it
                x_host = _pinned_copy(x) if x.is_cuda else x.detach().to(torch.float32)
            cpu = (x_host, cpu_ids, weights)
            if self.share.cpu_first and gpu_experts:
                started = self.kernels.start_moe(x_host, cpu_ids, weights, self.gate, self.up, self.down,
                                                 out=self._host_out(x_host), n_threads=self._runner_threads())
                cpu = started or cpu  # the runner busy (another thread's call): run in collect
        return _SharedCall(cpu, self._launch(x, ids, weights, gpu_experts), balance)

    def _submit_early(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                      early: EarlyStart) -> _SharedCall:
        """The GPU's part of an early-started call: the experts the runner skipped (held in
        VRAM, then the lowest others)."""
        gpu_experts, _ = split(ids, early.n_gpu, early.resident, limit=self.share.max_experts)
        # the CPU's experts, known only now (start_moe_after leaves them to its caller)
        self.kernels.count_read(ids.shape[1] - len(gpu_experts), self.gate, self.up, self.down)
        launched = self._launch(x, ids, weights, gpu_experts, early.cpu if early.copies else None)
        return _SharedCall(early.cpu, launched, early.balance)

    def _collect_shared(self, call: _SharedCall, out: torch.Tensor | None = None) -> torch.Tensor:
        cpu = None
        if isinstance(call.cpu, native.RunningMoe):
            cpu = call.cpu.result()
        elif call.cpu is not None:
            x_host, cpu_ids, weights = call.cpu
            cpu = self.kernels.moe(x_host, cpu_ids, weights, self.gate, self.up, self.down, own=True,
                                   out=self._host_out(x_host))
        return self._combine(cpu, call.gpu, call.balance, out)

    def _combine(self, cpu: torch.Tensor | None, gpu: Launched | None, balance: ShareBalance,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        """The two parts added on the share's device (into `out` if given: one upload and one
        kernel, where a new sum costs two allocations and its copy a third kernel); the
        balance learns who finished first (not after a graph capture, which waited for the GPU:
        the first calls of new expert counts voted for the GPU regardless, each moving the share
        up to a count not captured yet)."""
        if gpu is None or cpu is None:
            balance.update(gpu_first=gpu is None)  # an idle side asks for more
        elif not gpu.captured:  # both worked: who was done first? (off CUDA the GPU's part ran first)
            balance.update(gpu_first=gpu.done is None or gpu.done.query())
        if out is not None and cpu is not None:
            out.copy_(cpu, non_blocking=True)  # pinned: an upload, no kernel
            return out.add_(gpu.out) if gpu is not None else out
        if out is not None:
            return out.copy_(gpu.out)
        if gpu is None:
            return cpu.to(self.share.device, non_blocking=True)
        if cpu is None:
            return gpu.out
        return gpu.out + cpu.to(self.share.device, non_blocking=True)

    def compute(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The same, waiting for it (CPU tensors in, CPU tensor out): on the calling thread, or
        on the runner for a layer with a share."""
        running = self._start_on_runner(x, ids, weights)
        if running is not None:
            return running.result()
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
