"""One-token decode steps of DeepSeek models as CUDA graphs, split at the CPU experts.

Eager decode launches ~70 small kernels per layer from Python, and at batch 1 the GPU idles
between them: on the GPU machine the non-expert part of a step took ~2.5 ms per layer while the
GPU worked ~0.2 ms of it. Here a step is a few graph replays. The step is cut at each MoE layer:

    segment i:   x + routed_{i-1} + shared_{i-1} -> layers ... -> MoE i's input h, routing;
                 h, expert ids and weights copied to pinned host memory
    side i:      MoE i's shared expert (and with a prefetch the next MoE's router on h: its
                 likely picks), its own graph, running on the GPU while ...
    CPU:         ... the routed experts of MoE i run on the CPU (GIL released), or a share
                 of them on the GPU too (kernels.gpu_share: its own graphs, per expert count);
                 one sequence's CPU part is posted to the kernels' runner before segment i
                 ends, and starts as soon as the routing is in (CpuExperts.start_early)

and the last segment ends with the head. Tensors that cross a cut live in static buffers.
Attention reads the cache up to a bucket length, masked past the current position, so one set
of graphs serves a whole bucket. Buckets double from `bucket` up to the cache length (at most
twice the attention work, a handful of buckets even at 128K) and are all captured at the first
step, so no later step pays for a capture.

One object steps B sequences at once (the server's slots, each with its own cache): one token
each, the projections batched, attention per sequence inside the graphs. A step may leave
sequences out (`active`): their rows still run on the GPU (cheap, and the graphs fixed) at a
harmless position, but the routed experts are computed for the active rows only.
With `capture=False` the same segments run eagerly (CPU tests of the step logic).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from tandem.errors import first_line
from tandem.kernels import compiling
from tandem.kernels.experts import CpuExperts, EarlyStart
from tandem.models.decoder import Decoder
from tandem.models.deepseek_v3 import MLAttention, MoE

BUCKET = 512
# TANDEM_COMPILE_DECODE (default on CUDA; 0: off, 1: on anywhere): each block's pieces of a
# step through torch.compile, fusing the small elementwise kernels (norms, rope, masks, dtype
# conversions: about half of a ~0.41 ms MoE-layer segment on the GPU machine) before the graphs
# capture them. One compile per piece, bucket and batch size serves every layer (their modules
# differ only in their tensors). Run z: segments 0.22-0.27 ms against 0.38. Run A, A/B rounds
# (tok/s, each a median of 3) with the share's Triton kernels (their default too): UD-IQ1_S
# 62.2 against 58.4 and 56.6 against 51.4, Q4_K_M 95.0 against 92.7 and 94.4 against 87.7;
# alone, UD-IQ1_S 59.6 against 56.8. Each process compiles them at its first steps (inductor's
# cache on disk shortens it after the first).
# Off the GPU the eager pieces: nothing measured says compiling pays there.
COMPILE_ENV = "TANDEM_COMPILE_DECODE"
RECOMPILE_LIMIT = 64  # buckets x batch sizes x piece kinds
log = logging.getLogger(__name__)
# Other threads may use CUDA during a capture (the GPU share pins and compiles on its own):
# only this thread's unsafe calls break it
CAPTURE_MODE = "thread_local"


@dataclass
class Cut:
    """Blocks [first, last] of one segment; `moe` ends it when set (with its buffers)."""

    first: int
    last: int
    moe: MoE | None = None
    host: dict[str, torch.Tensor] = field(default_factory=dict)  # h, ids, weights (pinned)
    shared: torch.Tensor | None = None  # the shared expert's output
    routed: torch.Tensor | None = None  # the routed experts' output, back on the GPU


def _attention_step(block, x: torch.Tensor, position: torch.Tensor, kvs: list, length: int) -> torch.Tensor:
    return x + block.attn.decode(block.attn_norm(x), position, kvs, length)


def _dense_ffn_step(block, x: torch.Tensor) -> torch.Tensor:
    return x + block.ffn(block.ffn_norm(x))


def _moe_entry(block, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The MoE input and its routing."""
    h = block.ffn_norm(x)
    return (h, *block.ffn.choose(h))


def _head(model: Decoder, x: torch.Tensor) -> torch.Tensor:
    return model.lm_head(model.norm(x))


@dataclass(frozen=True)
class StepPieces:
    """The pieces a segment is made of: eager, or each through torch.compile."""

    attention: Callable = _attention_step
    dense_ffn: Callable = _dense_ffn_step
    moe_entry: Callable = _moe_entry
    head: Callable = _head

    @classmethod
    def compiled(cls) -> StepPieces:
        return cls(*(compiling.compiled(fn, dynamic=False, variants=RECOMPILE_LIMIT)
                     for fn in (_attention_step, _dense_ffn_step, _moe_entry, _head)))


def pieces_for(device: torch.device) -> StepPieces:
    """The compiled pieces on CUDA (or anywhere with COMPILE_ENV=1), unless COMPILE_ENV=0."""
    setting = os.environ.get(COMPILE_ENV, "")
    compiled = setting == "1" or (setting != "0" and device.type == "cuda")
    return StepPieces.compiled() if compiled else StepPieces()


def _prefetches(moe: MoE) -> bool:
    """Whether `moe`'s routed experts have a GPU share that prefetches."""
    share = getattr(moe.experts, "share", None)
    return share is not None and share.prefetch_rows > 0


def bucket_lengths(first: int, ctx: int) -> list[int]:
    """first, 2 first, 4 first, ... while below ctx, then ctx."""
    lengths, length = [], first
    while length < ctx:
        lengths.append(length)
        length *= 2
    return [*lengths, ctx]


def supported(model: Decoder) -> bool:
    """MLA attention in every block, routed experts on the CPU, the rest on one CUDA device."""
    if not isinstance(model, Decoder) or not torch.cuda.is_available():
        return False
    devices = {p.device for name, p in model.named_parameters()}
    if len(devices) != 1 or next(iter(devices)).type != "cuda":
        return False
    for block in model.blocks:
        if not isinstance(getattr(block, "attn", None), MLAttention):
            return False
        if isinstance(block.ffn, MoE) and not isinstance(block.ffn.experts, CpuExperts):
            return False
    return True


class DecodeGraphs:
    def __init__(self, model: Decoder, sequences: Sequence[Sequence], device: torch.device,
                 capture: bool = True, bucket: int = BUCKET, pieces: StepPieces | None = None):
        """`sequences`: each sequence's caches (one per layer), B >= 1 of them. `pieces`: the
        segments' building blocks (default: pieces_for(device))."""
        self.model = model
        self.pieces = pieces or pieces_for(device)
        self.caches = [list(layer) for layer in zip(*sequences, strict=True)]  # per layer: B caches
        self.capture = capture
        d, b = model.norm.weight.shape[0], len(sequences)
        pinned = capture and device.type == "cuda"
        self.device = device
        # inference tensors like every step's own (steps run in inference mode): compiled pieces
        # see one kind of input in every layer, so they compile once
        with torch.inference_mode():
            self.x_in = torch.zeros(b, d, device=device)  # the embedded tokens
            self.x = torch.zeros(b, d, device=device)  # the residual stream at a cut
            self.h = torch.zeros(b, d, device=device)  # the MoE input at a cut (for a GPU share)
            self.position = torch.zeros(b, dtype=torch.long, device=device)
            self.logits = torch.zeros(b, model.lm_head.out_features, device=device)
            self.cuts = self._cuts(model, b, d, pinned)
        self.buckets = bucket_lengths(bucket, self.caches[0][0].latent.shape[0])
        self._graphs: dict[int, list[tuple[torch.cuda.CUDAGraph, torch.cuda.CUDAGraph | None]]] = {}
        self._pool = None
        self._ready = torch.cuda.Event() if pinned else None
        self._predicted = torch.cuda.Event() if pinned else None  # the side work's picks are in

    @staticmethod
    def _cuts(model: Decoder, b: int, d: int, pinned: bool) -> list[Cut]:
        cuts, first = [], 0
        for i, block in enumerate(model.blocks):
            if isinstance(block.ffn, MoE):
                moe, k = block.ffn, block.ffn.c.n_expert_used
                device = moe.router.device
                host = {"h": torch.zeros(b, d, pin_memory=pinned),
                        "ids": torch.zeros(b, k, dtype=torch.long, pin_memory=pinned),
                        "weights": torch.zeros(b, k, pin_memory=pinned)}
                shared = torch.zeros(b, d, device=device) if moe.shared is not None else None
                cuts.append(Cut(first, i, moe, host, shared, torch.zeros(b, d, device=device)))
                first = i + 1
        cuts.append(Cut(first, len(model.blocks) - 1))
        if b == 1:  # one sequence: each MoE cut predicts the next one's experts for a prefetch
            for cut, after in zip(cuts, cuts[1:], strict=False):
                if after.moe is not None and _prefetches(after.moe):
                    cut.host["ahead"] = torch.zeros(1, after.moe.c.n_expert_used, dtype=torch.long,
                                                    pin_memory=pinned)
        return cuts

    # -- one step --------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, tokens: Sequence[int], positions: Sequence[int],
             active: Sequence[int] | None = None) -> torch.Tensor:
        """Logits [B, vocab] (a static buffer: read it before the next step) for tokens[b] at
        positions[b] of sequence b; the caller keeps positions < the caches' length. `active`:
        the rows that count (default all); the others' positions should be where a stray cache
        write harms nothing (the last row: a prefix that is reused never reaches it)."""
        model = self.model
        rows = list(range(len(tokens))) if active is None else sorted(active)
        self.x_in.copy_(model.embed(torch.tensor(list(tokens))) * model.embed_scale)
        self.position.copy_(torch.tensor(list(positions)))
        length = next(b for b in self.buckets if b > max(positions[r] for r in rows))
        if self.capture and not self._graphs:
            self._capture_all()
        graphs = self._graphs.get(length)
        for i, cut in enumerate(self.cuts):
            if graphs is None:
                self._segment(i, length)
            else:
                graphs[i][0].replay()
            if cut.moe is None:
                continue
            early = None
            if graphs is None:
                self._side(i)
            else:
                self._ready.record()  # the host buffers are filled once the segment is done
                early = self._start_early(cut, rows)
                if graphs[i][1] is not None:
                    graphs[i][1].replay()  # the GPU computes the side work meanwhile
                    if "ahead" in cut.host:
                        self._predicted.record()
                self._ready.synchronize()
            self._routed(cut, rows, early, then=lambda i=i: self._prefetch(i + 1))
        return self.logits

    def _start_early(self, cut: Cut, rows: list[int]) -> EarlyStart | None:
        """One sequence's routed experts on the CPU posted before the segment is done: the
        kernels' runner waits for the `_ready` event itself (CpuExperts.start_early; None where
        that does not apply). `_ready` is recorded again only after this call was waited for."""
        if len(rows) != 1 or cut.host["ids"].shape[0] != 1:
            return None
        host = cut.host
        return cut.moe.experts.start_early(host["h"], host["ids"], host["weights"], self._ready)

    def _prefetch(self, i: int) -> None:
        """Copy the experts the cut before predicted for MoE i into VRAM (GPU share's prefetch;
        TANDEM_SHARE_PREFETCH). Queued once the MoE before has queued its own copies: the copy
        engine, idle after them, brings these in while that MoE's kernels, the CPU's experts
        and segment i run. (The prediction, in the side graph queued before those copies, is
        done by then: waiting for it costs nothing.)"""
        ahead = self.cuts[i - 1].host.get("ahead")  # None where no prefetch was predicted
        if ahead is not None:
            if self._predicted is not None:
                self._predicted.synchronize()
            experts = self.cuts[i].moe.experts
            experts.share.prefetch((experts.gate, experts.up, experts.down), ahead[0].tolist())

    def _routed(self, cut: Cut, rows: list[int], early: EarlyStart | None = None, then=None) -> None:
        """The routed experts of the active rows into cut.routed (the others keep stale rows).
        `early`: their CPU part already posted (_start_early). `then`: run once the GPU's part
        is queued (or at once without one)."""
        experts, host = cut.moe.experts, cut.host
        every = len(rows) == host["h"].shape[0]
        h, ids, weights = (host[k] if every else host[k][rows] for k in ("h", "ids", "weights"))
        if early is not None or experts.shares(len(rows)):  # some experts on the GPU, the rest on the CPU
            on_device = self.h if every else self.h[rows]
            out = experts.compute_shared(on_device, h, ids, weights, after_launch=then, early=early,
                                         out=cut.routed if every else None)
        else:
            if then is not None:
                then()
            out = experts.compute(h, ids, weights)
        if not every:
            cut.routed[rows] = out.to(self.device, non_blocking=True)
        elif out is not cut.routed:  # a shared call writes it itself
            cut.routed.copy_(out, non_blocking=True)

    def _segment(self, i: int, length: int) -> None:
        cut, model = self.cuts[i], self.model
        if i == 0:
            x = self.x_in
        else:
            before = self.cuts[i - 1]
            x = self.x + before.routed + (before.shared if before.shared is not None else 0)
        pieces = self.pieces
        for j in range(cut.first, cut.last + 1):
            block = model.blocks[j]
            x = pieces.attention(block, x, self.position, self.caches[j], length)
            if j == cut.last and cut.moe is not None:
                h, ids, weights = pieces.moe_entry(block, x)
                self.x.copy_(x)
                self.h.copy_(h)
                cut.host["h"].copy_(h, non_blocking=True)
                cut.host["ids"].copy_(ids, non_blocking=True)
                cut.host["weights"].copy_(weights, non_blocking=True)
                return
            x = pieces.dense_ffn(block, x)
        self.logits.copy_(pieces.head(model, x))

    def _side(self, i: int) -> None:
        """MoE cut i's GPU work beside its routed experts: the shared expert, and with a
        prefetch the next MoE's router on this one's input (its likely picks: off the segment,
        which the CPU's part waits for)."""
        cut = self.cuts[i]
        if cut.shared is not None:
            cut.shared.copy_(cut.moe.shared(self._input_of(cut)))
        if "ahead" in cut.host:
            cut.host["ahead"].copy_(self.cuts[i + 1].moe.choose(self.h)[0], non_blocking=True)

    def _input_of(self, cut: Cut) -> torch.Tensor:
        """The MoE input, recomputed on the GPU from the saved residual (no host round trip)."""
        return self.model.blocks[cut.last].ffn_norm(self.x)

    # -- capture ---------------------------------------------------------------------------
    def _capture_all(self) -> None:
        """Every bucket's graphs; from eager pieces where compiling the pieces fails (their
        first calls, in the warm-up before each capture: no compiler, an unsupported GPU ...)."""
        try:
            for b in self.buckets:
                self._capture(b)
        except Exception as exc:
            if self.pieces == StepPieces():
                raise
            log.warning("compiling the decode steps' pieces failed (%s): eager pieces from now on "
                        "(%s=0 skips compiling)", first_line(exc), COMPILE_ENV)
            self.pieces, self._graphs, self._pool = StepPieces(), {}, None
            for b in self.buckets:
                self._capture(b)

    def _capture(self, length: int) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside capture: cuBLAS handles, workspaces
            for i, cut in enumerate(self.cuts):
                self._segment(i, length)
                if cut.moe is not None:
                    self._side(i)
        torch.cuda.current_stream().wait_stream(stream)
        graphs = []
        for i, cut in enumerate(self.cuts):
            main = torch.cuda.CUDAGraph()
            with torch.cuda.graph(main, pool=self._pool, capture_error_mode=CAPTURE_MODE):
                self._segment(i, length)
            self._pool = main.pool()
            side = None
            if cut.moe is not None and (cut.shared is not None or "ahead" in cut.host):
                side = torch.cuda.CUDAGraph()
                with torch.cuda.graph(side, pool=self._pool, capture_error_mode=CAPTURE_MODE):
                    self._side(i)
            graphs.append((main, side))
        self._graphs[length] = graphs
