"""The OpenAI API, through the official `openai` client (sync and async) and plain httpx."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

openai = pytest.importorskip("openai")  # a test dependency; absent on the GPU machine

QUESTION = [{"role": "user", "content": "Explain what a GPU is in one sentence."}]


@pytest.fixture(scope="module")
def client(smol_server):
    return openai.OpenAI(api_key=smol_server.api_key, base_url=smol_server.url + "/v1")


def test_models(client):
    assert [m.id for m in client.models.list().data] == ["smollm2"]


def test_stream_equals_non_stream_at_temperature_0(client):
    whole = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0,
                                           max_tokens=60)
    answer = whole.choices[0].message.content
    assert "Graphics Processing Unit" in answer and whole.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(model="smollm2", messages=QUESTION,
                                                 temperature=0, max_tokens=60, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == answer
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_usage_counts_equal_the_tokenizer(client, smol_server):
    r = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0,
                                       max_tokens=60, logprobs=True)
    rendered = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                "Hugging Face<|im_end|>\n<|im_start|>user\nExplain what a GPU is in one "
                "sentence.<|im_end|>\n<|im_start|>assistant\n")
    tokens = httpx.post(smol_server.url + "/tokenize", json={"content": rendered},
                        headers=smol_server.headers).json()["tokens"]
    assert r.usage.prompt_tokens == len(tokens)
    assert r.usage.completion_tokens == len(r.choices[0].logprobs.content)
    text = "".join(t.token for t in r.choices[0].logprobs.content)
    assert text == r.choices[0].message.content
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_seed_determinism_and_n(client):
    kwargs = dict(model="smollm2", messages=[{"role": "user", "content": "Tell me a story."}],
                  temperature=1.0, max_tokens=30)
    a = client.chat.completions.create(seed=5, **kwargs).choices[0].message.content
    b = client.chat.completions.create(seed=5, **kwargs).choices[0].message.content
    c = client.chat.completions.create(seed=6, **kwargs).choices[0].message.content
    assert a == b != c
    two = client.chat.completions.create(seed=5, n=2, **kwargs)
    assert [ch.index for ch in two.choices] == [0, 1]
    assert two.choices[0].message.content == a


def test_stop_and_max_tokens(client):
    r = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0,
                                       stop=["Processing"])
    assert r.choices[0].message.content == "A GPU (Graphics " and r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0,
                                       max_completion_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_async_client_stream(smol_server):
    async def run():
        client = openai.AsyncOpenAI(api_key=smol_server.api_key, base_url=smol_server.url + "/v1")
        stream = await client.chat.completions.create(model="smollm2", messages=QUESTION,
                                                      temperature=0, max_tokens=60, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    assert "Graphics Processing Unit" in asyncio.run(run())


def test_completions_and_detokenize(client, smol_server):
    r = client.completions.create(model="smollm2", prompt="The capital of France is",
                                  temperature=0, max_tokens=5)
    assert "Paris" in r.choices[0].text
    tokens = httpx.post(smol_server.url + "/tokenize", json={"content": "Hello world"},
                        headers=smol_server.headers).json()["tokens"]
    back = httpx.post(smol_server.url + "/detokenize", json={"tokens": tokens},
                      headers=smol_server.headers).json()["content"]
    assert back == "Hello world"


def test_errors_in_openai_shape(client, smol_server):
    url, headers = smol_server.url + "/v1/chat/completions", smol_server.headers
    bad_json = httpx.post(url, content=b"{not json",
                          headers=headers | {"content-type": "application/json"})
    assert bad_json.status_code == 400 and bad_json.json()["error"]["code"] == "invalid_json"
    for body, param in [({"messages": []}, "messages"),
                        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
                        ({"messages": [{"content": "no role"}]}, "messages.0"),
                        ({"messages": QUESTION, "temperature": -1}, "temperature")]:
        r = httpx.post(url, json=body, headers=headers)
        assert r.status_code == 400, body
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["param"] == param
    with pytest.raises(openai.NotFoundError, match="model 'gpt-4' not found"):
        client.chat.completions.create(model="gpt-4", messages=QUESTION)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(api_key="wrong", base_url=smol_server.url + "/v1").models.list()


def test_prompt_longer_than_the_context_fails_before_the_stream(smol_server):
    long = [{"role": "user", "content": "word " * 2000}]
    with httpx.stream("POST", smol_server.url + "/v1/chat/completions", headers=smol_server.headers,
                      json={"messages": long, "stream": True}) as r:
        assert r.status_code == 400
        assert r.headers["content-type"].startswith("application/json")
        r.read()
        assert r.json()["error"]["code"] == "exceed_context_size_error"


def test_disconnect_cancels_and_frees(smol_server):
    metrics = smol_server.url + "/metrics"
    with httpx.stream("POST", smol_server.url + "/v1/chat/completions", headers=smol_server.headers,
                      json={"messages": [{"role": "user", "content": "Write a long essay."}],
                            "max_tokens": 400, "stream": True}) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
    # the client is gone mid-answer: the engine drops the request instead of finishing it
    for _ in range(50):
        text = httpx.get(metrics).text
        if "tandem_running_requests 0" in text:
            break
        time.sleep(0.1)
    assert "tandem_running_requests 0" in text
    assert httpx.get(smol_server.url + "/health").status_code == 200


def test_async_client_non_stream_and_prefix_reuse(smol_server):
    system = [{"role": "system", "content": "You are terse. " * 40}]

    async def run():
        client = openai.AsyncOpenAI(api_key=smol_server.api_key, base_url=smol_server.url + "/v1")
        answers = []
        for q in ("Name a color.", "Name a fruit."):
            r = await client.chat.completions.create(
                model="smollm2", messages=system + [{"role": "user", "content": q}],
                temperature=0, max_tokens=8)
            answers.append(r)
        return answers

    before = smol_server.metric("tandem_prompt_tokens_total")
    first, second = asyncio.run(run())
    evaluated = smol_server.metric("tandem_prompt_tokens_total") - before
    assert first.choices[0].message.content and second.choices[0].message.content
    # the long shared system prompt was computed once: its KV was reused for the second request
    assert evaluated < first.usage.prompt_tokens + second.usage.prompt_tokens - 100

