"""`tandem.LLM`: load a GGUF with placement rules, then logits and generation.

    llm = tandem.LLM("DeepSeek-R1-UD-IQ1_S-00001-of-00003.gguf", ctx_size=8192)
    llm.logits([0, 100, 200])                  # float32 [3, vocab]
    llm.generate([0, 100, 200], max_new_tokens=32)  # greedy new token ids
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from tandem.errors import GGUFError, TandemError
from tandem.gguf import deepseek2
from tandem.gguf.config import DeepSeek2Config
from tandem.gguf.model import open_gguf
from tandem.kernels.cpu import CpuKernels
from tandem.models import hf_config
from tandem.placement import planner
from tandem.placement.rules import Rule, assign, default_rules, load_rules
from tandem.runtime.kv_cache import ContextFull, LatentKVCache
from tandem.runtime.loader import WeightLoader, build_deepseek, check_tensors
from tandem.runtime.sampler import sample

log = logging.getLogger(__name__)

R1_GROUPS = (8, 4)  # DeepSeek-R1/V3: 256 experts in 8 groups, pick from the best 4
DEFAULT_CTX = 4096


class LLM:
    def __init__(self, gguf_path: str | Path, model_path: str | Path | None = None,
                 rules: str | Path | Sequence[Rule] | None = None, *, ctx_size: int | None = None,
                 n_threads: int | None = None, prefill_chunk: int = 512,
                 kv_dtype: torch.dtype = torch.float32, progress: bool = False,
                 memory_caps: dict[str, int] | None = None):
        self.file = open_gguf(gguf_path)
        if self.file.architecture != deepseek2.ARCH:
            raise GGUFError(f"{self.file.path}: architecture {self.file.architecture!r} is not "
                            f"supported by tandem.LLM yet (supported: {deepseek2.ARCH})")
        self.config = _with_groups(self._config(model_path))
        if ctx_size is None:
            ctx_size = min(DEFAULT_CTX, self.config.context_length)
        if not 0 < ctx_size <= self.config.context_length:
            raise TandemError(f"ctx_size {ctx_size} must lie in 1..{self.config.context_length} "
                              "(the model's context length)")
        self.ctx_size, self.prefill_chunk = ctx_size, prefill_chunk
        c = self.config
        split_kv_b = "blk.0.attn_kv_b.weight" not in self.file.tensors
        expected = deepseek2.tensor_shapes(c, split_kv_b)
        check_tensors(self.file, expected)

        self.rules = self._rules(rules)
        needed = {name: self.file.tensors[name] for name, _ in expected}
        self.placements = assign({n: t.ggml_type for n, t in needed.items()}, self.rules)
        devices = [self.placements[f"blk.{i}.attn_kv_a_mqa.weight"].device for i in range(c.n_layers)]
        kv_bytes = LatentKVCache.bytes_per_device(ctx_size, c.kv_lora_rank, c.qk_rope_head_dim,
                                                  devices, kv_dtype)
        self.memory = planner.plan_memory(needed, self.placements, kv_bytes)
        planner.check_fits(self.memory, self.rules, memory_caps)

        uses_ggml = any(p.kernel == "ggml" for p in self.placements.values())
        self.kernels = CpuKernels(n_threads) if uses_ggml else None
        with _progress(progress, sum(t.n_bytes for t in needed.values())) as advance:
            loader = WeightLoader(self.file, self.placements, self.kernels, advance)
            self.model = build_deepseek(self.file, c, loader, devices)
        self.cache = LatentKVCache(ctx_size, c.kv_lora_rank, c.qk_rope_head_dim, devices, kv_dtype)
        eos = self.file.metadata.get("tokenizer.ggml.eos_token_id")
        self.eos_token_id: int | None = int(eos) if eos is not None else None
        self.last_timings: Timings | None = None

    # -- setup ---------------------------------------------------------------------------
    def _config(self, model_path) -> DeepSeek2Config:
        config = self.file.config
        if model_path is None:
            return config
        path = Path(model_path).expanduser()
        hf = hf_config.config_from_hf(hf_config.read_config_json(path), str(path))
        merged, filled = hf_config.merge(config, hf, str(self.file.path), str(path))
        for name in filled:
            log.info("%s from %s: %s", name, path, getattr(merged, name))
        return merged

    def _rules(self, rules) -> list[Rule]:
        if rules is None:
            return default_rules(torch.cuda.is_available())
        if isinstance(rules, str | Path):
            return load_rules(rules)
        return list(rules)

    # -- inference -----------------------------------------------------------------------
    def _check_tokens(self, token_ids: Sequence[int]) -> torch.Tensor:
        tokens = torch.as_tensor(list(token_ids), dtype=torch.long)
        if tokens.numel() == 0:
            raise TandemError("no tokens given")
        if int(tokens.min()) < 0 or int(tokens.max()) >= self.config.n_vocab:
            raise TandemError(f"token ids must lie in 0..{self.config.n_vocab - 1}")
        if tokens.numel() > self.ctx_size:
            raise ContextFull(f"{tokens.numel()} tokens exceed the context size {self.ctx_size}")
        return tokens

    @torch.inference_mode()
    def logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """float32 [T, vocab]: the next-token logits after each prefix of a fresh sequence."""
        tokens = self._check_tokens(token_ids)
        out = [self.model(chunk, start, self.cache.layers).cpu()
               for start, chunk in self._chunks(tokens)]
        return torch.cat(out)

    @torch.inference_mode()
    def generate(self, token_ids: Sequence[int], max_new_tokens: int = 128, *,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int | None = None, stop_token_ids: Sequence[int] | None = None) -> list[int]:
        """New token ids after `token_ids` (temperature 0: greedy); stops at EOS."""
        tokens = self._check_tokens(token_ids)
        stops = set(stop_token_ids or ())
        if self.eos_token_id is not None:
            stops.add(self.eos_token_id)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        began = time.perf_counter()
        logits = None
        for start, chunk in self._chunks(tokens):
            logits = self.model(chunk, start, self.cache.layers, last_only=True)
        new = [sample(logits[-1], temperature, top_k, top_p, generator)]  # waits for the GPU
        prefilled = time.perf_counter()
        position = tokens.numel()
        while len(new) < max_new_tokens and new[-1] not in stops and position < self.ctx_size:
            logits = self.model(torch.tensor([new[-1]]), position, self.cache.layers)
            new.append(sample(logits[-1], temperature, top_k, top_p, generator))
            position += 1
        self.last_timings = Timings(tokens.numel(), prefilled - began, len(new) - 1,
                                    time.perf_counter() - prefilled)
        return new

    def _chunks(self, tokens: torch.Tensor):
        for start in range(0, tokens.numel(), self.prefill_chunk):
            yield start, tokens[start : start + self.prefill_chunk]

    def close(self) -> None:
        if self.kernels is not None:
            self.kernels.close()
        self.file.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _with_groups(c: DeepSeek2Config) -> DeepSeek2Config:
    """Group-routing keys from the file or config.json, else R1's, said in the log."""
    if c.n_group is not None and c.topk_group is not None:
        return c
    n_group, topk_group = R1_GROUPS if c.n_expert % R1_GROUPS[0] == 0 else (1, 1)
    log.warning("neither the GGUF nor --model_path gives expert_group_count/"
                "expert_group_used_count; using DeepSeek-R1's n_group=%d, topk_group=%d",
                n_group, topk_group)
    return replace(c, n_group=n_group, topk_group=topk_group)


@dataclass(frozen=True)
class Timings:
    """The last generate call: prompt evaluation (up to the first new token) and decoding."""

    prompt_tokens: int
    prompt_s: float
    decoded_tokens: int  # tokens after the first
    decode_s: float

    @property
    def prompt_tok_per_s(self) -> float:
        return self.prompt_tokens / self.prompt_s if self.prompt_s else 0.0

    @property
    def decode_tok_per_s(self) -> float:
        return self.decoded_tokens / self.decode_s if self.decode_s else 0.0


class _progress:
    """A rich progress bar over weight bytes while loading, or nothing."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total = enabled, total

    def __enter__(self):
        if not self.enabled:
            return lambda n: None
        from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

        self.bar = Progress("loading weights", BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                            transient=True)
        self.bar.start()
        task = self.bar.add_task("load", total=self.total)
        return lambda n: self.bar.update(task, advance=n)

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.stop()
