"""Continuous batching over one loaded model: many sequences share every forward pass.

Requests arrive from any thread (the HTTP server's); one engine thread runs the loop
    admit waiting requests into free cache slots -> schedule -> one forward -> sample
and hands each request its tokens through a thread-safe queue. Steps that only decode replay
CUDA graphs instead of an eager pass (runtime.decode_graphs; eager passes cost ~2.5 ms of host
time per layer on the GPU machine): one sequence alone its slot's own graphs (as `tandem chat`
decodes), several one set over all slots. A slot keeps the token ids whose KV it holds, and a
new request takes the free slot sharing the longest prefix with its prompt (a repeated system
prompt or a growing chat history is not recomputed).
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from tandem.errors import TandemError
from tandem.models.decoder import Segment
from tandem.runtime.kv_cache import ContextFull
from tandem.runtime.sampler import Sampler, SamplingParams
from tandem.runtime.scheduler import Scheduler, SeqState, common_prefix

log = logging.getLogger(__name__)


class QueueFull(TandemError):
    """Too many requests waiting; try again later (HTTP 429)."""


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    stop_ids: set[int]
    id: str
    # ("token", (id, logprobs | None)) | ("done", finish_reason) | ("error", exception)
    events: queue.Queue = field(default_factory=queue.Queue)
    on_event: object = None  # callable(kind, value) instead of the queue (e.g. into asyncio)
    top_logprobs: int | None = None  # None: no logprobs; N: the chosen token's and the top N
    cancelled: threading.Event = field(default_factory=threading.Event)
    generated: list[int] = field(default_factory=list)
    state: SeqState | None = None
    sampler: Sampler | None = None
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    finish_reason: str | None = None

    def tokens(self, timeout: float | None = None):
        """Iterate the token ids as they come (blocking); ends with the request."""
        while True:
            kind, value = self.events.get(timeout=timeout)
            if kind == "token":
                yield value[0]
            elif kind == "error":
                raise value
            else:
                self.finish_reason = value
                return


@dataclass
class DecodeSteps:
    """Steps in which every row decoded one token (no prompt in them) of one row count: how
    many, their seconds, and the routed experts' bytes they read (each call's distinct experts
    once: what the decode roofline counts)."""

    steps: int = 0
    seconds: float = 0.0
    expert_bytes: int = 0


@dataclass
class Metrics:
    requests: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0
    busy_s: float = 0.0
    decode_steps: dict[int, DecodeSteps] = field(default_factory=dict)  # by rows


class Engine:
    def __init__(self, llm, max_batch: int = 8, max_waiting: int = 64, token_budget: int = 256):
        self.llm = llm
        self.scheduler = Scheduler(max_batch, token_budget, max_waiting)
        self.slot_caches: list = [None] * max_batch  # allocated on first use
        # decode steps as CUDA graphs, where the model allows: per slot for one sequence
        # alone, and one set over all slots for several
        self.slot_graphs: list = [None] * max_batch
        self.batch_graphs = None
        self.slot_tokens: list[list[int]] = [[] for _ in range(max_batch)]
        self.requests: dict[str, Request] = {}
        self.metrics = Metrics()
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="tandem-engine", daemon=True)
        self._thread.start()

    # -- API for any thread -----------------------------------------------------------------
    def submit(self, prompt: list[int], params: SamplingParams,
               stop_ids: set[int] = frozenset(), on_event=None,
               top_logprobs: int | None = None) -> Request:
        if not prompt:
            raise TandemError("empty prompt")
        if len(prompt) >= self.llm.ctx_size:
            raise ContextFull(f"the prompt has {len(prompt)} tokens; the context holds "
                              f"{self.llm.ctx_size} (prompt and answer together)")
        req = Request(list(prompt), params, set(stop_ids), id=f"req-{next(self._ids)}",
                      on_event=on_event, top_logprobs=top_logprobs)
        req.sampler = Sampler(params)
        req.state = SeqState(req.id, len(prompt))
        with self._cond:
            if not self.scheduler.can_accept():
                raise QueueFull(f"{len(self.scheduler.waiting)} requests are waiting; "
                                "try again later")
            self.requests[req.id] = req
            self.scheduler.add(req.state)
            self.metrics.requests += 1
            self._cond.notify()
        return req

    def cancel(self, req: Request) -> None:
        req.cancelled.set()
        with self._cond:
            self._cond.notify()

    def stats(self) -> dict:
        with self._cond:
            return {"waiting": len(self.scheduler.waiting), "running": len(self.scheduler.running),
                    "slots": self.scheduler.n_slots,
                    "kv_tokens": sum(len(t) for t in self.slot_tokens),
                    "kv_capacity_tokens": self.scheduler.n_slots * self.llm.ctx_size}

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=30)

    # -- the engine thread ----------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self.scheduler.running and not self.scheduler.waiting:
                    self._cond.wait()
                if self._stop:
                    return
                self._drop_cancelled()
                self._admit()
                step = self.scheduler.schedule()
            if step.work:
                self._run(step)

    def _drop_cancelled(self) -> None:
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            req = self.requests[seq.id]
            if req.cancelled.is_set():
                self._finish(req, "cancelled")

    def _admit(self) -> None:
        """Waiting sequences into free slots; one whose slot cannot be set up (its KV cache
        not allocated: out of memory, say) fails alone, the others go on."""
        while True:
            try:
                self.scheduler.admit(self._choose_slot)
                return
            except _AdmitError as exc:  # the scheduler had taken it off the waiting list
                log.error("admitting %s failed: %s", exc.seq.id, exc.__cause__)
                exc.seq.finished = True
                req = self.requests.pop(exc.seq.id)
                _send(req, "error", exc.__cause__)

    def _choose_slot(self, seq: SeqState, free: list[int]) -> tuple[int, int]:
        prompt = self.requests[seq.id].prompt
        best, reuse = free[0], -1
        for slot in free:
            n = common_prefix(self.slot_tokens[slot], prompt, limit=len(prompt) - 1)
            if n > reuse:
                best, reuse = slot, n
        if self.slot_caches[best] is None:
            try:
                self.slot_caches[best] = self.llm.new_cache()
            except Exception as exc:
                raise _AdmitError(seq) from exc
        self.slot_tokens[best] = self.slot_tokens[best][:reuse]
        return best, reuse

    def _run(self, step) -> None:
        tokens, segments, plan = [], [], []
        for seq, n in step.work:
            req = self.requests[seq.id]
            if seq.prefilling:
                start = seq.cached
                chunk = req.prompt[start:start + n]
            else:
                start = seq.prompt_len + len(req.generated) - 1
                chunk = req.generated[-1:]
            tokens += chunk
            segments.append(Segment(self.slot_caches[seq.slot], start, len(chunk)))
            plan.append((req, chunk))
        decode_only = not any(seq.prefilling for seq, _ in step.work)
        began, read_before = time.perf_counter(), self.llm.expert_bytes_read
        try:
            with torch.inference_mode():
                logits = self._decode_with_graphs(step.work, tokens, segments) if decode_only else None
                if logits is None:
                    logits = self.llm.model(torch.tensor(tokens), segments, last_only=True)
        except Exception as exc:  # a failed step fails its requests, not the server
            log.exception("engine step failed")
            with self._cond:
                for req, _ in plan:
                    _send(req, "error", exc)
                    self._finish(req, None)
            return
        if decode_only and logits.is_cuda:  # the head's GPU work in the step's time (sampling waits anyway)
            torch.cuda.synchronize(logits.device)
        took = time.perf_counter() - began
        self.metrics.busy_s += took
        self.metrics.steps += 1
        if decode_only:
            steps = self.metrics.decode_steps.setdefault(len(step.work), DecodeSteps())
            steps.steps += 1
            steps.seconds += took
            steps.expert_bytes += self.llm.expert_bytes_read - read_before
        with self._cond:
            for row, (req, chunk) in enumerate(plan):
                seq = req.state
                self.slot_tokens[seq.slot] += chunk
                if seq.prefilling:
                    seq.cached += len(chunk)
                    self.metrics.prompt_tokens += len(chunk)
                    if seq.prefilling:
                        continue  # more of the prompt to read before the first token
                if req.cancelled.is_set():
                    self._finish(req, "cancelled")
                    continue
                try:
                    self._emit(req, logits[row])
                except Exception as exc:  # e.g. logits a sampler refuses: this request fails
                    log.exception("choosing the next token failed")
                    _send(req, "error", exc)
                    self._finish(req, None)

    def _decode_with_graphs(self, work, tokens: list[int], segments: list[Segment]) -> torch.Tensor | None:
        """Logits [len(work), vocab] of a step that only decodes, through graph replays; None
        where the model decodes eagerly."""
        if not self.llm.decodes_in_graphs:
            return None
        slots = [seq.slot for seq, _ in work]
        if len(slots) == 1:
            if self.slot_graphs[slots[0]] is None:
                self.slot_graphs[slots[0]] = self.llm.decode_graphs_for(self.slot_caches[slots[0]])
            return self.slot_graphs[slots[0]].step(tokens, [segments[0].start])
        if self.batch_graphs is None:  # over every slot, so that its graphs never change
            self.slot_caches = [c if c is not None else self.llm.new_cache() for c in self.slot_caches]
            self.batch_graphs = self.llm.decode_graphs_for(*self.slot_caches)
        # idle slots decode token 0 at the last cache row: no prefix that is reused reaches it
        # (a prompt is shorter than the context), and their rows are not read
        all_tokens, positions = [0] * len(self.slot_caches), [self.llm.ctx_size - 1] * len(self.slot_caches)
        for slot, token, segment in zip(slots, tokens, segments, strict=True):
            all_tokens[slot], positions[slot] = token, segment.start
        return self.batch_graphs.step(all_tokens, positions, active=slots)[slots]

    def _emit(self, req: Request, logits: torch.Tensor) -> None:
        token = req.sampler(logits, req.prompt + req.generated)
        req.generated.append(token)
        if req.first_token is None:
            req.first_token = time.perf_counter()
        self.metrics.generated_tokens += 1
        info = None
        if req.top_logprobs is not None:
            logp = torch.log_softmax(logits.float().cpu(), dim=-1)
            top = logp.topk(req.top_logprobs) if req.top_logprobs else None
            info = {"logprob": float(logp[token]),
                    "top": [] if top is None else list(zip(top.indices.tolist(), top.values.tolist(),
                                                           strict=True))}
        _send(req, "token", (token, info))
        position = req.state.prompt_len + len(req.generated)
        if token in req.stop_ids:
            self._finish(req, "stop")
        elif len(req.generated) >= req.params.max_new_tokens or position >= self.llm.ctx_size:
            self._finish(req, "length")

    def _finish(self, req: Request, reason: str | None) -> None:
        self.scheduler.finish(req.state)
        self.requests.pop(req.id, None)
        if reason is not None:
            _send(req, "done", reason)


class _AdmitError(Exception):
    """A sequence's slot could not be set up (the cause chained)."""

    def __init__(self, seq: SeqState):
        super().__init__(seq.id)
        self.seq = seq


def _send(req: Request, kind: str, value) -> None:
    if req.on_event is not None:
        req.on_event(kind, value)
    else:
        req.events.put((kind, value))


