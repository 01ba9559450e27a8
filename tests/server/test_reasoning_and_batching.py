"""Reasoning split on a DeepSeek-style model, continuous batching, loading state."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

openai = pytest.importorskip("openai")  # a test dependency; absent on the GPU machine

PROMPTS = [f"Give me one fact about the number {i}." for i in range(16)]


def test_forced_thinking_splits_reasoning_from_content(deepseek_server):
    client = openai.OpenAI(api_key="none", base_url=deepseek_server.url + "/v1")
    kwargs = dict(model="tiny-r1", messages=[{"role": "user", "content": "Hello there"}],
                  temperature=0, max_tokens=24)
    whole = client.chat.completions.create(**kwargs)
    message = whole.choices[0].message
    reasoning = message.model_extra["reasoning_content"]
    # Random weights never write </think>: everything after the forced <think> is reasoning.
    assert reasoning and message.content == ""
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    streamed = "".join(c.choices[0].delta.model_extra.get("reasoning_content") or ""
                       for c in chunks if c.choices)
    assert streamed.strip() == reasoning
    assert all(not (c.choices and c.choices[0].delta.content) for c in chunks)
    inline = client.chat.completions.create(extra_body={"reasoning_format": "none"}, **kwargs)
    assert inline.choices[0].message.content.startswith("<think>\n")
    assert reasoning in inline.choices[0].message.content
    ollama = httpx.post(deepseek_server.url + "/api/chat", timeout=60, json={
        "model": "tiny-r1", "stream": False, "think": True, "options": {"temperature": 0, "num_predict": 24},
        "messages": [{"role": "user", "content": "Hello there"}]}).json()
    assert ollama["message"]["thinking"] == reasoning


def test_sixteen_concurrent_streams_equal_one_at_a_time(smol_server):
    client = openai.OpenAI(api_key=smol_server.api_key, base_url=smol_server.url + "/v1")

    def ask(prompt: str, stream: bool) -> str:
        kwargs = dict(model="smollm2", messages=[{"role": "user", "content": prompt}],
                      temperature=0, max_tokens=32)
        if not stream:
            return client.chat.completions.create(**kwargs).choices[0].message.content
        return "".join(c.choices[0].delta.content or ""
                       for c in client.chat.completions.create(stream=True, **kwargs) if c.choices)

    alone = [ask(p, stream=False) for p in PROMPTS]
    steps_before = smol_server.metric("tandem_generated_tokens_total")
    with ThreadPoolExecutor(max_workers=16) as pool:
        together = list(pool.map(lambda p: ask(p, stream=True), PROMPTS))
    assert together == alone
    assert len(set(alone)) > 8  # sixteen different answers, not one repeated
    assert smol_server.metric("tandem_generated_tokens_total") > steps_before


def test_batching_shares_forward_passes(deepseek_server):
    """Concurrent requests on the MoE model take fewer steps than tokens they produce."""
    client = openai.OpenAI(api_key="none", base_url=deepseek_server.url + "/v1")
    before = deepseek_server.metric("tandem_generated_tokens_total")
    steps_before = deepseek_server.metric("tandem_engine_steps_total")

    def ask(i):
        return client.chat.completions.create(
            model="tiny-r1", messages=[{"role": "user", "content": f"Number {i}"}],
            temperature=0, max_tokens=16).usage.completion_tokens

    with ThreadPoolExecutor(max_workers=8) as pool:
        produced = sum(pool.map(ask, range(8)))
    assert deepseek_server.metric("tandem_generated_tokens_total") - before == produced
    steps = deepseek_server.metric("tandem_engine_steps_total") - steps_before
    assert steps < produced / 2  # eight streams shared most forward passes


def test_health_is_503_until_the_model_loads(tmp_path):
    pytest.importorskip("fastapi")
    from starlette.testclient import TestClient

    from tandem.server.app import create_app
    from tandem.server.state import ServerConfig

    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + bytes(10))
    app = create_app(ServerConfig(model=broken), load_in_background=False)
    with TestClient(app) as http:
        r = http.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "error"
        assert "truncated" in r.json()["error"] or "damaged" in r.json()["error"]
        r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready"

