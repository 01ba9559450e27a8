"""Real `tandem serve` processes on free loopback ports, for the API tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

API_KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model, *args: str, api_key: str | None = API_KEY):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "tandem.cli", "serve", "--model", str(model),
                   "--port", str(self.port), *args]
        if api_key:
            command += ["--api-key", api_key]
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # exact texts are the CPU path's
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
        self.api_key = api_key
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        saw_loading = False
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.process.stdout.read()}")
            try:
                r = httpx.get(self.url + "/health", timeout=2)
                if r.status_code == 200:
                    self.saw_loading = saw_loading
                    return
                saw_loading |= r.status_code == 503
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError("server did not become ready")

    def metric(self, name: str) -> float:
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"{name} missing from /metrics")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()


@pytest.fixture(scope="session")
def smol_server(smollm2_gguf):
    server = Server(smollm2_gguf, "--ctx-size", "512", "--max-batch-size", "16",
                    "--served-model-name", "smollm2")
    server.wait_ready()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def deepseek_server(hf_models, tmp_path_factory):
    """A tiny DeepSeek-V3 (random weights, ggml CPU experts) with a DeepSeek-style vocabulary
    and R1-like chat template; every answer starts inside <think> (--force_think true)."""
    from hf_tiny import BASE, R1_TEMPLATE, deepseek_vocabulary
    from tandem.convert import convert

    _, vocab = deepseek_vocabulary(BASE["vocab_size"])
    vocab["tokenizer.chat_template"] = R1_TEMPLATE
    path = convert(hf_models["qlora-groups2-dense1"], tmp_path_factory.mktemp("ds") / "tiny-r1.gguf",
                   recipe="q8_0", metadata=vocab)[0]
    server = Server(path, "--ctx-size", "256", "--force_think", "true", api_key=None)
    server.wait_ready()
    yield server
    server.stop()
