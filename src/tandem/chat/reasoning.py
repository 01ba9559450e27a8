"""Reasoning models write `<think> ... </think>` before the answer; split the two."""

from __future__ import annotations

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def split_reasoning(text: str, forced_open: bool = False) -> tuple[str, str]:
    """(reasoning, answer). With `forced_open` the prompt already ended in <think>, so the
    text starts inside the reasoning even though the model never wrote the opening tag."""
    stripped = text.lstrip()
    opened = forced_open or stripped.startswith(THINK_OPEN)
    if stripped.startswith(THINK_OPEN):
        text = stripped[len(THINK_OPEN):]
    if THINK_CLOSE in text:
        reasoning, answer = text.split(THINK_CLOSE, 1)
        return reasoning.strip(), answer.lstrip()
    if opened:
        return text.strip(), ""  # still thinking (or cut off by max_new_tokens)
    return "", text


class ReasoningStream:
    """Routes streamed text to 'reasoning' or 'answer' as the tags go by."""

    def __init__(self, forced_open: bool = False):
        self.state = "reasoning" if forced_open else "start"
        self.pending = ""

    def feed(self, piece: str) -> list[tuple[str, str]]:
        self.pending += piece
        out: list[tuple[str, str]] = []
        while self.pending:
            if self.state == "start":
                head = self.pending.lstrip()
                if THINK_OPEN.startswith(head) and len(head) < len(THINK_OPEN):
                    return out  # could still become <think>
                if head.startswith(THINK_OPEN):
                    self.pending = head[len(THINK_OPEN):]
                    self.state = "reasoning"
                else:
                    self.state = "answer"
            elif self.state == "reasoning":
                at = self.pending.find(THINK_CLOSE)
                if at >= 0:
                    out.append(("reasoning", self.pending[:at]))
                    self.pending = self.pending[at + len(THINK_CLOSE):].lstrip("\n")
                    self.state = "answer"
                    continue
                keep = _partial_suffix(self.pending, THINK_CLOSE)
                emit = self.pending[: len(self.pending) - keep]
                if emit:
                    out.append(("reasoning", emit))
                self.pending = self.pending[len(emit):]
                return out
            else:
                out.append(("answer", self.pending))
                self.pending = ""
        return out

    def flush(self) -> list[tuple[str, str]]:
        kind = "answer" if self.state in ("answer", "start") else "reasoning"
        out = [(kind, self.pending)] if self.pending else []
        self.pending = ""
        return out


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a beginning of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
