"""What the server holds: the model (loaded in the background), engine, tokenizer, template."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tandem.chat.template import ChatTemplate, prompt_ids, template_for
from tandem.server.errors import APIError
from tandem.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class ServerConfig:
    model: Path
    model_path: Path | None = None
    served_model_name: str | None = None
    api_key: str | None = None
    max_batch_size: int = 8
    max_queue: int = 64
    ctx_size: int | None = None
    n_threads: int | None = None
    rules: Path | None = None
    force_think: bool = False
    gpu_experts_from: int | None = None  # None: LLM's default
    gpu_expert_share: float | str = "auto"  # balanced (LLM's default); 0: off
    gpu_expert_cache: float = 0.0  # GiB of VRAM for the most used experts
    numa: str | None = None  # "interleave": expert pages spread over the memory nodes


@dataclass
class ServerState:
    config: ServerConfig
    llm: object = None
    engine: object = None
    tokenizer: Tokenizer | None = None
    template: ChatTemplate | None = None
    error: str | None = None
    loaded_at: float = 0.0
    load_s: float = 0.0
    counters: dict = field(default_factory=lambda: {"requests": 0, "errors": 0})
    _ready: threading.Event = field(default_factory=threading.Event)

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    @property
    def name(self) -> str:
        if self.config.served_model_name:
            return self.config.served_model_name
        stem = Path(self.config.model).name
        return stem.removesuffix(".gguf")

    @property
    def ollama_name(self) -> str:
        return self.name if ":" in self.name else f"{self.name}:latest"

    def load(self) -> None:
        """Runs in a background thread; /health answers 503 until it is done."""
        from tandem.runtime import heap
        from tandem.runtime.engine import Engine
        from tandem.runtime.llm import LLM

        began = time.perf_counter()
        try:
            c = self.config
            self.llm = LLM(c.model, model_path=c.model_path, rules=c.rules, ctx_size=c.ctx_size,
                           n_threads=c.n_threads, sequences=c.max_batch_size,
                           gpu_experts_from=c.gpu_experts_from, gpu_expert_share=c.gpu_expert_share,
                           gpu_expert_cache=c.gpu_expert_cache, numa=c.numa)
            meta = self.llm.file.metadata
            self.tokenizer = Tokenizer.from_gguf(meta, str(self.llm.file.path))
            self.template = template_for(meta, self.tokenizer)
            self.engine = Engine(self.llm, max_batch=c.max_batch_size, max_waiting=c.max_queue)
            heap.settle(self.llm.gpu_share)  # no full garbage collection walks the model mid-step
            self.loaded_at = time.time()
            self.load_s = time.perf_counter() - began
            self._ready.set()
        except Exception as exc:  # keep serving /health with the reason
            log.exception("loading %s failed", self.config.model)
            self.error = f"{type(exc).__name__}: {exc}"

    def require_ready(self) -> None:
        if not self.ready:
            message = f"model failed to load: {self.error}" if self.error else "model is loading"
            raise APIError(503, message, "server_error", code="model_not_ready")

    def check_model(self, requested: str | None) -> None:
        names = {self.name, self.ollama_name, self.name.split(":")[0]}
        if requested and requested not in names:
            raise APIError(404, f"model {requested!r} not found; this server has {self.name!r}",
                           "not_found_error", "model", "model_not_found")

    def chat_prompt(self, messages: list[dict], force_think: bool) -> list[int]:
        return prompt_ids(self.template, self.tokenizer, messages, force_think)

    def digest(self) -> str:
        path = Path(self.llm.file.path)
        return hashlib.sha256(f"{path.resolve()}:{path.stat().st_size}".encode()).hexdigest()

    def details(self) -> dict:
        from tandem.inspect import human_count

        mix: dict[str, int] = {}
        n_params = 0
        for t in self.llm.file.tensors.values():
            mix[t.ggml_type.name] = mix.get(t.ggml_type.name, 0) + t.n_bytes
            n_params += t.n_elements
        arch = self.llm.file.architecture
        return {"parent_model": "", "format": "gguf", "family": arch, "families": [arch],
                "parameter_size": human_count(n_params).replace(" ", ""),
                "quantization_level": max(mix, key=mix.get)}

    def size(self) -> int:
        return sum(p.stat().st_size for p in self.llm.file.files)
