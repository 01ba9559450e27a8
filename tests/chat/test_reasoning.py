"""Splitting reasoning from the answer, whole and streamed."""

from __future__ import annotations

import pytest

from tandem.chat.reasoning import ReasoningStream, split_reasoning

CASES = [
    ("<think>\nplan it\n</think>\n\nThe answer.", False, ("plan it", "The answer.")),
    ("plan it\n</think>\n\nThe answer.", True, ("plan it", "The answer.")),  # opening tag forced
    ("still thinking", True, ("still thinking", "")),  # cut off before </think>
    ("Just an answer.", False, ("", "Just an answer.")),
    ("<think>\n\n</think>\n\nQuick.", False, ("", "Quick.")),
]


@pytest.mark.parametrize("text,forced,expected", CASES)
def test_split(text, forced, expected):
    assert split_reasoning(text, forced_open=forced) == expected


@pytest.mark.parametrize("text,forced,expected", CASES)
@pytest.mark.parametrize("step", [1, 2, 3, 7])
def test_stream_gives_the_same_split(text, forced, expected, step):
    stream = ReasoningStream(forced_open=forced)
    parts = []
    for i in range(0, len(text), step):  # tags arrive cut at every possible point
        parts += stream.feed(text[i:i + step])
    parts += stream.flush()
    reasoning = "".join(t for k, t in parts if k == "reasoning").strip()
    answer = "".join(t for k, t in parts if k == "answer").strip()
    assert (reasoning, answer) == expected
