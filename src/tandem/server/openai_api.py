"""OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions, /tokenize,
/detokenize."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from tandem.runtime.sampler import SamplingParams
from tandem.server import generation as gen
from tandem.server.errors import APIError


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown fields are accepted and ignored

    model: str | None = None
    messages: Any = None
    stream: bool = False
    stream_options: dict | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, lt=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=16)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    reasoning_format: str = "deepseek"  # "deepseek": reasoning_content; "none": inline <think>
    force_think: bool | None = None


class CompletionRequest(ChatRequest):
    prompt: str | list[int] | None = None


def sampling(state, body: ChatRequest) -> SamplingParams:
    stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    base = SamplingParams.defaults_for(state.llm.file.metadata)
    try:
        return base.updated(
            temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
            presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
            repetition_penalty=body.repetition_penalty, seed=body.seed, stop=tuple(stop),
            max_new_tokens=body.max_completion_tokens or body.max_tokens or 2048)
    except Exception as exc:
        raise APIError(400, str(exc)) from None


def make_router(state) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/models")
    async def models():
        state.require_ready()
        return {"object": "list", "data": [{"id": state.name, "object": "model",
                                            "created": int(state.loaded_at), "owned_by": "tandem"}]}

    @router.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        state.require_ready()
        state.check_model(body.model)
        messages = gen.normalize_messages(body.messages)
        force = state.config.force_think if body.force_think is None else body.force_think
        prompt = state.chat_prompt(messages, force)
        return await _complete(state, body, prompt, force, chat=True)

    @router.post("/v1/completions")
    async def completions(body: CompletionRequest):
        state.require_ready()
        state.check_model(body.model)
        if body.prompt is None or body.prompt == "" or body.prompt == []:
            raise APIError(400, "prompt must be a non-empty string or token list", param="prompt")
        prompt = (state.tokenizer.encode(body.prompt) if isinstance(body.prompt, str)
                  else list(body.prompt))
        return await _complete(state, body, prompt, False, chat=False)

    @router.post("/tokenize")
    async def tokenize(request: Request):
        state.require_ready()
        data = await gen.read_json(request)
        content = data.get("content", data.get("prompt"))
        if not isinstance(content, str):
            raise APIError(400, "content must be a string", param="content")
        return {"tokens": state.tokenizer.encode(content, add_bos=bool(data.get("add_special", False)))}

    @router.post("/detokenize")
    async def detokenize(request: Request):
        state.require_ready()
        data = await gen.read_json(request)
        tokens = data.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise APIError(400, "tokens must be a list of integers", param="tokens")
        if any(t < 0 or t >= state.tokenizer.vocab_size for t in tokens):
            raise APIError(400, "token id out of range", param="tokens")
        return {"content": state.tokenizer.decode(tokens)}

    return router




async def _complete(state, body: ChatRequest, prompt: list[int], force: bool, chat: bool):
    params = sampling(state, body)
    split = chat and body.reasoning_format != "none"
    top = (body.top_logprobs or 0) if body.logprobs else None
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    state.counters["requests"] += 1
    runs = []
    for i in range(body.n):  # n choices: n requests, batched by the engine
        seed = None if params.seed is None else params.seed + i
        outcome = gen.Outcome()
        pieces = gen.generate(state, prompt, params.updated(seed=seed) if seed is not None else params,
                              split=split, forced_open=force, top_logprobs=top, outcome=outcome)
        runs.append((pieces, outcome))
    if body.stream:
        first = [await gen.prime(p) for p, _ in runs]  # errors (context, queue) before any byte
        return StreamingResponse(_sse(state, body, runs, first, rid, created, chat),
                                 media_type="text/event-stream")
    choices = []
    for i, (pieces, outcome) in enumerate(runs):
        await gen.collect(pieces, outcome)
        choices.append(_choice(i, outcome, chat, top is not None))
    usage = _usage(runs)
    return {"id": rid, "object": "chat.completion" if chat else "text_completion",
            "created": created, "model": state.name, "choices": choices, "usage": usage}




def _choice(i: int, o: gen.Outcome, chat: bool, with_logprobs: bool) -> dict:
    logprobs = {"content": o.logprobs} if with_logprobs else None
    if not chat:
        return {"index": i, "text": o.content, "finish_reason": o.finish_reason, "logprobs": logprobs}
    message = {"role": "assistant", "content": o.content}
    if o.reasoning:
        message["reasoning_content"] = o.reasoning
    return {"index": i, "message": message, "finish_reason": o.finish_reason, "logprobs": logprobs}


def _usage(runs) -> dict:
    prompt = runs[0][1].prompt_tokens
    completion = sum(o.completion_tokens for _, o in runs)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


async def _sse(state, body, runs, first, rid, created, chat):
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices, usage=None):
        data = {"id": rid, "object": kind, "created": created, "model": state.name, "choices": choices}
        if usage is not None:
            data["usage"] = usage
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    def delta(i, piece: gen.Piece):
        field = "reasoning_content" if piece.kind == "reasoning" else "content"
        logprobs = {"content": piece.logprobs} if body.logprobs else None
        if chat:
            return {"index": i, "delta": {field: piece.text}, "finish_reason": None, "logprobs": logprobs}
        return {"index": i, "text": piece.text, "finish_reason": None, "logprobs": logprobs}

    try:
        for i, (pieces, outcome) in enumerate(runs):
            if chat:
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                              "finish_reason": None, "logprobs": None}])
            if first[i] is not None:
                yield chunk([delta(i, first[i])])
            async for piece in pieces:
                yield chunk([delta(i, piece)])
            end = {"index": i, "finish_reason": outcome.finish_reason, "logprobs": None}
            end |= {"delta": {}} if chat else {"text": ""}
            yield chunk([end])
        if (body.stream_options or {}).get("include_usage"):
            yield chunk([], _usage(runs))
        yield "data: [DONE]\n\n"
    finally:
        for pieces, _ in runs:  # a client that went away cancels what is still running
            await pieces.aclose()
