"""The Ollama API as Open WebUI's Ollama connection calls it, through httpx."""

from __future__ import annotations

import json

import httpx


def get(server, path):
    return httpx.get(server.url + path, headers=server.headers, timeout=60)


def post(server, path, body, **kw):
    return httpx.post(server.url + path, json=body, headers=server.headers, timeout=120, **kw)


def test_version_tags_ps_show(smol_server):
    version = get(smol_server, "/api/version").json()["version"]
    assert all(part.isdigit() for part in version.split("."))
    models = get(smol_server, "/api/tags").json()["models"]
    assert len(models) == 1
    m = models[0]
    assert m["name"] == m["model"] == "smollm2:latest"
    assert m["size"] > 90_000_000 and len(m["digest"]) == 64 and "T" in m["modified_at"]
    assert m["details"]["family"] == "llama" and m["details"]["quantization_level"] == "Q4_1"
    assert m["details"]["parameter_size"] == "134.52M"
    assert get(smol_server, "/api/ps").json()["models"][0]["name"] == "smollm2:latest"
    show = post(smol_server, "/api/show", {"model": "smollm2"}).json()
    assert "im_start" in show["template"] and show["details"]["format"] == "gguf"


def test_chat_streams_ndjson_and_matches_non_stream(smol_server):
    body = {"model": "smollm2:latest", "options": {"temperature": 0, "num_predict": 40},
            "messages": [{"role": "user", "content": "Explain what a GPU is in one sentence."}]}
    with httpx.stream("POST", smol_server.url + "/api/chat", json=body, headers=smol_server.headers,
                      timeout=120) as r:
        assert r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert all(not line["done"] for line in lines[:-1]) and lines[-1]["done"]
    final = lines[-1]
    assert final["done_reason"] == "stop"
    for counter in ("total_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count",
                    "eval_duration"):
        assert isinstance(final[counter], int) and final[counter] > 0
    streamed = "".join(line["message"]["content"] for line in lines)
    whole = post(smol_server, "/api/chat", body | {"stream": False}).json()
    assert whole["message"]["content"] == streamed
    assert "Graphics Processing Unit" in streamed
    assert final["eval_count"] == whole["eval_count"]


def test_generate(smol_server):
    r = post(smol_server, "/api/generate", {"model": "smollm2", "prompt": "The capital of France is",
                                            "raw": True, "stream": False,
                                            "options": {"temperature": 0, "num_predict": 5}}).json()
    assert "Paris" in r["response"] and r["done"] and r["done_reason"] in ("stop", "length")
    unknown = post(smol_server, "/api/generate", {"model": "llama3", "prompt": "hi"})
    assert unknown.status_code == 404
