"""The FastAPI application: health, metrics, auth, and the two APIs."""

from __future__ import annotations

import threading

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from tandem.server import errors, ollama_api, openai_api
from tandem.server.errors import error_body
from tandem.server.state import ServerConfig, ServerState

OPEN_PATHS = {"/health", "/api/version", "/metrics"}


def create_app(config: ServerConfig, load_in_background: bool = True) -> FastAPI:
    state = ServerState(config)
    app = FastAPI(title="tandem", version="0.1.0")
    app.state.tandem = state
    errors.install(app)

    @app.middleware("http")
    async def auth(request: Request, call_next):
        key = state.config.api_key
        if key and request.url.path not in OPEN_PATHS:
            given = request.headers.get("authorization", "")
            if given != f"Bearer {key}":
                return JSONResponse(error_body("invalid or missing API key", "authentication_error",
                                               code="invalid_api_key"), 401)
        return await call_next(request)

    @app.get("/health")
    async def health():
        if state.ready:
            return {"status": "ok", "model": state.name}
        status = "error" if state.error else "loading"
        return JSONResponse({"status": status, "error": state.error}, 503)

    @app.get("/metrics")
    async def metrics():
        lines = ["# TYPE tandem_requests_total counter",
                 f"tandem_requests_total {state.counters['requests']}"]
        if state.ready:
            m, s = state.engine.metrics, state.engine.stats()
            rate = m.generated_tokens / m.busy_s if m.busy_s else 0.0
            lines += [
                "# TYPE tandem_prompt_tokens_total counter", f"tandem_prompt_tokens_total {m.prompt_tokens}",
                "# TYPE tandem_generated_tokens_total counter",
                f"tandem_generated_tokens_total {m.generated_tokens}",
                "# TYPE tandem_generation_tokens_per_second gauge",
                f"tandem_generation_tokens_per_second {rate:.3f}",
                "# TYPE tandem_engine_steps_total counter", f"tandem_engine_steps_total {m.steps}",
                "# TYPE tandem_queue_length gauge", f"tandem_queue_length {s['waiting']}",
                "# TYPE tandem_running_requests gauge", f"tandem_running_requests {s['running']}",
                "# TYPE tandem_kv_cache_tokens gauge", f"tandem_kv_cache_tokens {s['kv_tokens']}",
                "# TYPE tandem_kv_cache_capacity_tokens gauge",
                f"tandem_kv_cache_capacity_tokens {s['kv_capacity_tokens']}",
            ]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    app.include_router(openai_api.make_router(state))
    app.include_router(ollama_api.make_router(state))
    if load_in_background:
        threading.Thread(target=state.load, name="tandem-load", daemon=True).start()
    else:
        state.load()
    return app
