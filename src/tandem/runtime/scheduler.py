"""Which sequences run in the next forward pass: plain Python, no torch.

Every running sequence that has finished its prompt decodes one token per step. The remaining
token budget goes to prompts still being read, in arrival order, in chunks, so a long prompt is
spread over several steps and never freezes the streams already running.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class SeqState:
    """What the scheduler knows of a sequence."""

    id: str
    prompt_len: int
    cached: int = 0  # prompt tokens whose KV is in the cache (reused prefix included)
    slot: int | None = None
    finished: bool = False

    @property
    def prefilling(self) -> bool:
        return self.cached < self.prompt_len


@dataclass
class Step:
    """Per sequence, how many of its tokens go into the next forward pass."""

    work: list[tuple[SeqState, int]] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return sum(n for _, n in self.work)


class Scheduler:
    def __init__(self, n_slots: int, token_budget: int = 256, max_waiting: int = 64):
        if n_slots < 1 or token_budget < 1:
            raise ValueError("need at least one slot and a positive token budget")
        self.n_slots, self.token_budget, self.max_waiting = n_slots, token_budget, max_waiting
        self.waiting: deque[SeqState] = deque()
        self.running: list[SeqState] = []

    def can_accept(self) -> bool:
        return len(self.waiting) < self.max_waiting

    def add(self, seq: SeqState) -> None:
        self.waiting.append(seq)

    def free_slots(self) -> list[int]:
        used = {s.slot for s in self.running}
        return [i for i in range(self.n_slots) if i not in used]

    def admit(self, choose_slot) -> list[SeqState]:
        """Move waiting sequences into free slots; `choose_slot(seq, free)` picks one (e.g. the
        slot whose cache shares the longest prefix) and returns (slot, reused_tokens)."""
        admitted = []
        while self.waiting and (free := self.free_slots()):
            seq = self.waiting.popleft()
            seq.slot, seq.cached = choose_slot(seq, free)
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def schedule(self) -> Step:
        step = Step()
        budget = self.token_budget
        for seq in self.running:  # decoding sequences first: one token each
            if not seq.prefilling and not seq.finished:
                step.work.append((seq, 1))
                budget -= 1
        for seq in self.running:  # then prompts, oldest first, as far as the budget goes
            if seq.prefilling and not seq.finished and budget > 0:
                n = min(seq.prompt_len - seq.cached, budget)
                step.work.append((seq, n))
                budget -= n
        return step

    def finish(self, seq: SeqState) -> None:
        seq.finished = True
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)


def common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """Length of the shared start of two token lists, at most `limit`."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y or n >= limit:
            break
        n += 1
    return n
