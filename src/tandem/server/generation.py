"""From API messages to tokens and back: prompt building, the engine bridge into asyncio,
streamed text with reasoning split, stop strings and usage. Shared by both APIs."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from tandem.chat.reasoning import THINK_CLOSE, THINK_OPEN, ReasoningStream
from tandem.runtime.engine import QueueFull
from tandem.runtime.kv_cache import ContextFull
from tandem.runtime.sampler import SamplingParams
from tandem.server.errors import APIError
from tandem.tokenizer import StreamDecoder

ROLES = {"system", "user", "assistant", "tool", "developer"}
_THINK_BLOCK = re.compile(re.escape(THINK_OPEN) + r".*?" + re.escape(THINK_CLOSE), re.DOTALL)


def normalize_messages(messages) -> list[dict]:
    """Check roles and contents; text parts joined; earlier reasoning dropped from history."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise APIError(400, f"messages[{i}] needs a role", param=f"messages.{i}")
        role = m["role"]
        if role not in ROLES:
            raise APIError(400, f"messages[{i}].role {role!r} is not one of {sorted(ROLES)}",
                           param=f"messages.{i}.role")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise APIError(400, f"messages[{i}].content: only text parts are supported",
                                   param=f"messages.{i}.content")
                parts.append(str(part.get("text", "")))
            content = "".join(parts)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string or a list of text parts",
                           param=f"messages.{i}.content")
        if role == "developer":
            role = "system"
        if role == "assistant":  # DeepSeek-R1: earlier reasoning does not go back in
            content = _THINK_BLOCK.sub("", content).lstrip()
        out.append({"role": role, "content": content})
    return out


@dataclass
class Piece:
    kind: str  # "reasoning" | "content"
    text: str
    logprobs: list = field(default_factory=list)


@dataclass
class Outcome:
    reasoning: str = ""
    content: str = ""
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list = field(default_factory=list)
    prompt_s: float = 0.0
    total_s: float = 0.0


async def generate(state, prompt_ids: list[int], params: SamplingParams, *, split: bool,
                   forced_open: bool, top_logprobs: int | None,
                   outcome: Outcome) -> AsyncIterator[Piece]:
    """Stream pieces of one completion; `outcome` is filled as it goes (usage, finish)."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    stops = state.tokenizer.stop_ids() | set(params.stop_token_ids)
    try:
        req = state.engine.submit(
            prompt_ids, params, stops, top_logprobs=top_logprobs,
            on_event=lambda k, v: loop.call_soon_threadsafe(events.put_nowait, (k, v)))
    except ContextFull as exc:
        raise APIError(400, str(exc), code="exceed_context_size_error") from None
    except QueueFull as exc:
        raise APIError(429, str(exc), "rate_limit_error", code="queue_full") from None
    outcome.prompt_tokens = len(prompt_ids)
    decoder = StreamDecoder(state.tokenizer)
    router = ReasoningStream(forced_open=forced_open) if split else None
    held = ""  # decoded text not yet sent: it could be the start of a stop string
    started = loop.time()
    done = False
    try:
        if forced_open and not split:
            yield Piece("content", THINK_OPEN + "\n")
        while True:
            kind, value = await events.get()
            if kind == "error":
                raise APIError(500, f"generation failed: {value}", "server_error")
            if kind == "done":
                outcome.finish_reason = "length" if value == "length" else "stop"
                done = True
                break
            token, info = value
            if outcome.completion_tokens == 0:
                outcome.prompt_s = loop.time() - started
            if token in stops:
                continue
            outcome.completion_tokens += 1
            logprobs = [_logprob_entry(state.tokenizer, token, info)] if info is not None else []
            outcome.logprobs += logprobs
            candidate = held + decoder.push(token)
            hit = _stop_hit(candidate, params.stop)
            if hit is not None:
                for p in _route(router, candidate[:hit], logprobs):
                    yield p
                held = ""
                outcome.finish_reason = "stop"
                break
            keep = _stop_prefix(candidate, params.stop)
            held = candidate[len(candidate) - keep:]
            for p in _route(router, candidate[:len(candidate) - keep], logprobs):
                yield p
        for p in _route(router, held, []):
            yield p
        if router is not None:
            for kind_, rest in router.flush():
                yield Piece("content" if kind_ == "answer" else "reasoning", rest)
    finally:
        if not done:
            state.engine.cancel(req)  # client gone, stop string, or error: free the slot
        outcome.total_s = loop.time() - started


def _route(router, piece: str, logprobs: list):
    if not piece:
        return []
    if router is None:
        return [Piece("content", piece, logprobs)]
    return [Piece("content" if k == "answer" else "reasoning", t, logprobs)
            for k, t in router.feed(piece) if t]


def _stop_hit(text: str, stops) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


def _stop_prefix(text: str, stops) -> int:
    """Length of the longest end of `text` that begins some stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


def _logprob_entry(tokenizer, token: int, info: dict) -> dict:
    def text_of(i: int) -> str:
        return tokenizer.decode([i])

    return {"token": text_of(token), "logprob": info["logprob"],
            "bytes": list(text_of(token).encode()),
            "top_logprobs": [{"token": text_of(i), "logprob": lp,
                              "bytes": list(text_of(i).encode())} for i, lp in info["top"]]}


async def collect(pieces: AsyncIterator[Piece], outcome: Outcome) -> Outcome:
    async for p in pieces:
        if p.kind == "reasoning":
            outcome.reasoning += p.text
        else:
            outcome.content += p.text
    outcome.reasoning = outcome.reasoning.strip()
    return outcome


async def read_json(request) -> dict:
    """The request body as a JSON object, or a 400 saying what is wrong with it."""
    try:
        data = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"invalid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the body must be a JSON object")
    return data


async def prime(pieces: AsyncIterator[Piece]) -> Piece | None:
    """Run a generation up to its first piece, so that request errors (context, queue) surface
    as HTTP errors before a streaming response has sent any byte."""
    try:
        return await pieces.__anext__()
    except StopAsyncIteration:
        return None
