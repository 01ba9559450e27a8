"""Routed experts of long batches on the GPU, their weights streamed from the mapped file.

With hundreds of tokens in a batch the CPU kernels are compute-bound, while one pass over the
chosen experts' bytes serves every token: copy those bytes to the GPU and compute there. One
MoE layer, a few experts (a chunk) at a time, through two slots:

    host thread:    mmap -> pinned slot (torch's threaded copy), then queue the upload
    copy stream:    pinned slot -> GPU slot (waits until the GPU is done with that slot)
                    or, where the mapping itself is pinned (registered with CUDA for the GPU
                    share), mmap -> GPU slot directly: a DMA, no host copy
    compute stream: dequantize the slot to bf16 (torch.compile'd); grouped matmuls over the
                    chunk's tokens

The host launches chunk i's GPU work (asynchronous) before it copies chunk i + 1, so memcpy,
PCIe transfer and GPU math overlap with one Python thread. Only experts that some token chose
are copied. On a CPU device the same code runs without streams or pinned memory (tests).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from tandem.kernels import torch_dequant
from tandem.kernels.tensors import QuantTensor

log = logging.getLogger(__name__)

EXPERTS_PER_CHUNK = 8  # R1: ~0.7 GB of bf16 weights per chunk, 76-220 MB of quantized bytes
SLOTS = 2


def workspace_bytes(expert_bytes: int, n_ff: int, d: int, tokens: int, k: int,
                    experts_per_chunk: int = EXPERTS_PER_CHUNK) -> tuple[int, int]:
    """(device bytes, pinned host bytes) that streaming batches of `tokens` needs, for experts of
    `expert_bytes` (gate + up + down, quantized) and shape n_ff x d: the two slots, one chunk of
    bf16 weights, the batch's sorted rows with their intermediates, and the float32 output."""
    slots = SLOTS * experts_per_chunk * expert_bytes
    chunk_weights = experts_per_chunk * 3 * n_ff * d * 2
    rows = tokens * k * (2 * d + 3 * 2 * n_ff + 4 * d) + 4 * tokens * d
    return slots + chunk_weights + rows, slots


class ExpertStreamer:
    def __init__(self, device: torch.device | str, min_tokens: int,
                 experts_per_chunk: int = EXPERTS_PER_CHUNK, dtype: torch.dtype = torch.bfloat16):
        """Batches of at least `min_tokens` tokens go to `device` (see `wants`)."""
        self.device = torch.device(device)
        self.min_tokens, self.experts_per_chunk, self.dtype = min_tokens, experts_per_chunk, dtype
        self.cuda = self.device.type == "cuda"
        # chunks copied straight from a pinned mapping, and through the staging slots
        self.chunks = {"direct": 0, "staged": 0}
        self._host: list[torch.Tensor] = []  # staging slots (pinned on CUDA)
        self._dev: list[torch.Tensor] = []  # the same slots on the device
        if self.cuda:
            self._copy_stream = torch.cuda.Stream(self.device)
            self._copied = [torch.cuda.Event() for _ in range(SLOTS)]
            self._consumed = [torch.cuda.Event() for _ in range(SLOTS)]

    def wants(self, n_tokens: int, *weights: QuantTensor) -> bool:
        """Whether a batch of `n_tokens` over these expert tensors should stream."""
        return n_tokens >= self.min_tokens and all(torch_dequant.supports(w.ggml_type) for w in weights)

    @torch.inference_mode()
    def moe(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
            gate: QuantTensor, up: QuantTensor, down: QuantTensor) -> torch.Tensor:
        """sum_k w[t,k] * down_e(silu(gate_e x_t) * up_e x_t), e = ids[t,k]: [T, d] float32 on
        the streamer's device. Shapes as CpuKernels.moe (the caller checked them)."""
        n_expert, _, d = gate.shape
        t, k = ids.shape
        ids = ids.to(self.device).reshape(-1)
        order = torch.argsort(ids, stable=True)  # assignments grouped by expert
        counts = torch.bincount(ids, minlength=n_expert).tolist()  # the layer's one host sync
        used = [e for e, c in enumerate(counts) if c]
        chunks = [used[i : i + self.experts_per_chunk] for i in range(0, len(used), self.experts_per_chunk)]
        rows = _Rows(x.to(self.device, self.dtype), weights.to(self.device, torch.float32), order, k,
                     counts, chunks)
        out = torch.zeros(t, d, dtype=torch.float32, device=self.device)
        tensors = (gate, up, down)
        self._ensure_slots(self.experts_per_chunk * sum(w.expert_bytes() for w in tensors))
        # pinned by the GPU share (once its background registration is done): DMA from it
        direct = self.cuda and all(w.per_expert.is_pinned() for w in tensors)
        stage = self._upload if direct else self._stage
        stage(0, chunks[0], tensors)
        for i, chunk in enumerate(chunks):
            self._compute(i % SLOTS, i, chunk, tensors, rows, out)
            if i + 1 < len(chunks):
                stage((i + 1) % SLOTS, chunks[i + 1], tensors)
        self.chunks["direct" if direct else "staged"] += len(chunks)
        return out

    # -- the pipeline ------------------------------------------------------------------------
    def _stage(self, slot: int, chunk: list[int], tensors: Sequence[QuantTensor]) -> None:
        """Copy the chunk's bytes into `slot`'s host side (layout of _chunk_runs), then upload."""
        host = self._host[slot]
        if self.cuda:
            self._copied[slot].synchronize()  # the slot's previous upload has left the host
        end = 0
        for offset, source in _chunk_runs(chunk, tensors):
            end = offset + source.numel()
            host[offset:end].copy_(source)
        if self.cuda:
            with torch.cuda.stream(self._copy_stream):
                self._copy_stream.wait_event(self._consumed[slot])  # the GPU is done with it
                self._dev[slot][:end].copy_(host[:end], non_blocking=True)
                self._copied[slot].record()

    def _upload(self, slot: int, chunk: list[int], tensors: Sequence[QuantTensor]) -> None:
        """Copy the chunk's bytes from the pinned mapping straight into the device `slot` (layout
        of _chunk_runs), on the copy stream."""
        dev = self._dev[slot]
        with torch.cuda.stream(self._copy_stream):
            self._copy_stream.wait_event(self._consumed[slot])  # the GPU is done with it
            for offset, source in _chunk_runs(chunk, tensors):
                dev[offset : offset + source.numel()].copy_(source, non_blocking=True)
            self._copied[slot].record()

    def _compute(self, slot: int, index: int, chunk: list[int], tensors: Sequence[QuantTensor],
                 rows: _Rows, out: torch.Tensor) -> None:
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self._copied[slot])
        raw, offset, mats = self._dev[slot], 0, []
        for w in tensors:
            size = len(chunk) * w.expert_bytes()
            mats.append(torch_dequant.dequantize(raw[offset : offset + size], w.ggml_type,
                                                 (len(chunk), *w.shape[1:]), self.dtype,
                                                 compiled=self.cuda))
            offset += size
        gate, up, down = mats  # [c, ff, d], [c, ff, d], [c, d, ff]
        lo, hi, ends = rows.span(index)
        xs = rows.x[lo:hi]
        h = F.silu(_grouped_mm(xs, gate, ends)) * _grouped_mm(xs, up, ends)
        y = _grouped_mm(h, down, ends)
        out.index_add_(0, rows.token[lo:hi], y.float() * rows.weight[lo:hi, None])
        if self.cuda:
            self._consumed[slot].record()

    # -- buffers ---------------------------------------------------------------------------
    def _ensure_slots(self, nbytes: int) -> None:
        if self._host and self._host[0].numel() >= nbytes:
            return
        self._host = self._dev = []  # drop the old slots before taking bigger ones
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()
            self._copy_stream.synchronize()
            self._host = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(SLOTS)]
            self._dev = [torch.empty(nbytes, dtype=torch.uint8, device=self.device) for _ in range(SLOTS)]
        else:
            self._host = self._dev = [torch.empty(nbytes, dtype=torch.uint8) for _ in range(SLOTS)]
        log.debug("expert streaming: %d slots of %.0f MB on %s", SLOTS, nbytes / 1e6, self.device)


class _Rows:
    """A layer's token-expert assignments sorted by expert: the token rows (in the compute
    dtype), their routing weights and source tokens; per chunk, its rows and the end of each of
    its experts' rows (all chunks' ends go to the device in one copy: a copy per chunk would
    wait for the GPU each time)."""

    def __init__(self, x: torch.Tensor, weights: torch.Tensor, order: torch.Tensor, k: int,
                 counts: list[int], chunks: list[list[int]]):
        self.token = order // k
        self.x = x[self.token]
        self.weight = weights.reshape(-1)[order]
        self.spans: list[tuple[int, int, int, int]] = []  # rows lo, hi; ends first, last
        ends: list[int] = []
        lo = 0
        for chunk in chunks:
            first, total = len(ends), 0
            for e in chunk:
                total += counts[e]
                ends.append(total)
            self.spans.append((lo, lo + total, first, len(ends)))
            lo += total
        self.ends = torch.tensor(ends, dtype=torch.int32).to(x.device)

    def span(self, index: int) -> tuple[int, int, torch.Tensor]:
        """Rows [lo, hi) of chunk `index` and its experts' row ends, counted from lo."""
        lo, hi, first, last = self.spans[index]
        return lo, hi, self.ends[first:last]


def _chunk_runs(chunk: list[int], tensors: Sequence[QuantTensor]):
    """A slot's layout: the chunk's gate bytes, then up's, then down's, expert after expert;
    (offset in the slot, the file's bytes) per run of consecutive experts of each matrix."""
    offset = 0
    for w in tensors:
        size = w.expert_bytes()
        for first, count in consecutive_runs(chunk):
            yield offset, w.per_expert[first : first + count].reshape(-1)
            offset += count * size


def consecutive_runs(ids: list[int]) -> list[tuple[int, int]]:
    """Sorted ids as (first, count) runs of consecutive values: one copy per run."""
    runs: list[tuple[int, int]] = []
    for e in ids:
        if runs and runs[-1][0] + runs[-1][1] == e:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((e, 1))
    return runs


def _grouped_mm(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Rows of x [n, in] times w[g] [out, in] transposed, where group g owns rows
    ends[g-1]..ends[g]: [n, out]. One grouped GEMM where torch has it for this device."""
    global _GROUPED
    if _GROUPED is not None:
        try:
            return _GROUPED(x, w.transpose(1, 2), offs=ends)
        except (RuntimeError, NotImplementedError) as exc:
            log.warning("grouped matmul unavailable here (%s); looping over experts", exc)
            _GROUPED = None
    out, start = [], 0
    for g, end in enumerate(ends.tolist()):
        out.append(x[start:end] @ w[g].T)
        start = end
    return torch.cat(out)


_GROUPED = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
