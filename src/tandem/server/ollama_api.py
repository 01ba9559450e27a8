"""Ollama-compatible routes, as Open WebUI's Ollama connection calls them."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from tandem.runtime.sampler import SamplingParams
from tandem.server import generation as gen
from tandem.server.errors import APIError

VERSION = "0.6.8"  # the Ollama API version these routes follow
OPTIONS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
           "seed": "seed", "num_predict": "max_new_tokens", "repeat_penalty": "repetition_penalty",
           "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty"}


def make_router(state) -> APIRouter:
    router = APIRouter()

    def model_entry() -> dict:
        modified = datetime.fromtimestamp(state.llm.file.path.stat().st_mtime, UTC)
        return {"name": state.ollama_name, "model": state.ollama_name,
                "modified_at": modified.isoformat(), "size": state.size(),
                "digest": state.digest(), "details": state.details()}

    @router.get("/api/version")
    async def version():
        return {"version": VERSION}

    @router.get("/api/tags")
    async def tags():
        state.require_ready()
        return {"models": [model_entry()]}

    @router.get("/api/ps")
    async def ps():
        state.require_ready()
        entry = model_entry() | {"expires_at": "2099-01-01T00:00:00Z", "size_vram": 0}
        return {"models": [entry]}

    @router.post("/api/show")
    async def show(request: Request):
        state.require_ready()
        data = await gen.read_json(request)
        state.check_model(data.get("model") or data.get("name"))
        meta = state.llm.file.metadata
        info = {k: v for k, v in meta.items() if not isinstance(v, list)}
        return {"modelfile": f"FROM {state.llm.file.path}", "parameters": "",
                "template": meta.get("tokenizer.chat_template", ""), "details": state.details(),
                "model_info": info, "capabilities": ["completion"],
                "modified_at": model_entry()["modified_at"]}

    @router.post("/api/chat")
    async def chat(request: Request):
        state.require_ready()
        data = await gen.read_json(request)
        state.check_model(data.get("model"))
        messages = gen.normalize_messages(data.get("messages"))
        think = bool(data.get("think")) or state.config.force_think
        prompt = state.chat_prompt(messages, force_think=think)
        return await _respond(state, data, prompt, chat=True, think=think)

    @router.post("/api/generate")
    async def generate(request: Request):
        state.require_ready()
        data = await gen.read_json(request)
        state.check_model(data.get("model"))
        text = data.get("prompt")
        if not isinstance(text, str):
            raise APIError(400, "prompt must be a string", param="prompt")
        if not text:  # Ollama answers an empty prompt by loading the model: it is loaded
            return {"model": state.ollama_name, "created_at": _now(), "response": "",
                    "done": True, "done_reason": "load"}
        if data.get("raw"):
            prompt = state.tokenizer.encode(text)
        else:
            messages = ([{"role": "system", "content": data["system"]}] if data.get("system") else [])
            prompt = state.chat_prompt(messages + [{"role": "user", "content": text}],
                                       force_think=bool(data.get("think")))
        return await _respond(state, data, prompt, chat=False, think=bool(data.get("think")))

    return router




def _now() -> str:
    return datetime.now(UTC).isoformat()


def _params(state, data: dict) -> SamplingParams:
    options = data.get("options") or {}
    if not isinstance(options, dict):
        raise APIError(400, "options must be an object", param="options")
    changes = {OPTIONS[k]: v for k, v in options.items() if k in OPTIONS}
    stop = options.get("stop")
    if stop:
        changes["stop"] = tuple([stop] if isinstance(stop, str) else stop)
    changes.setdefault("max_new_tokens", 2048)
    if changes.get("max_new_tokens", 0) < 0:  # Ollama: -1 means no limit
        changes["max_new_tokens"] = state.llm.ctx_size
    try:
        return SamplingParams.defaults_for(state.llm.file.metadata).updated(**changes)
    except Exception as exc:
        raise APIError(400, str(exc)) from None


async def _respond(state, data: dict, prompt: list[int], chat: bool, think: bool):
    params = _params(state, data)
    outcome = gen.Outcome()
    state.counters["requests"] += 1
    began = time.perf_counter_ns()
    pieces = gen.generate(state, prompt, params, split=True, forced_open=think,
                          top_logprobs=None, outcome=outcome)

    def line(piece: gen.Piece | None, done: bool) -> dict:
        body = {"model": state.ollama_name, "created_at": _now()}
        text = piece.text if piece else ""
        if chat:
            message = {"role": "assistant", "content": text if (piece and piece.kind == "content") else ""}
            if piece and piece.kind == "reasoning" and think:
                message["thinking"] = text
            body["message"] = message
        else:
            body["response"] = text if (piece and piece.kind == "content") else ""
            if piece and piece.kind == "reasoning" and think:
                body["thinking"] = text
        body["done"] = done
        if done:
            total = time.perf_counter_ns() - began
            body |= {"done_reason": outcome.finish_reason, "total_duration": total,
                     "load_duration": 0, "prompt_eval_count": outcome.prompt_tokens,
                     "prompt_eval_duration": int(outcome.prompt_s * 1e9),
                     "eval_count": outcome.completion_tokens,
                     "eval_duration": max(total - int(outcome.prompt_s * 1e9), 0)}
        return body

    if data.get("stream", True):
        first = await gen.prime(pieces)

        async def ndjson():
            try:
                if first is not None:
                    yield json.dumps(line(first, False), ensure_ascii=False) + "\n"
                async for piece in pieces:
                    yield json.dumps(line(piece, False), ensure_ascii=False) + "\n"
                yield json.dumps(line(None, True), ensure_ascii=False) + "\n"
            finally:
                await pieces.aclose()

        return StreamingResponse(ndjson(), media_type="application/x-ndjson")
    await gen.collect(pieces, outcome)
    final = line(None, True)
    if chat:
        final["message"] = {"role": "assistant", "content": outcome.content}
        if think and outcome.reasoning:
            final["message"]["thinking"] = outcome.reasoning
    else:
        final["response"] = outcome.content
        if think and outcome.reasoning:
            final["thinking"] = outcome.reasoning
    return final


