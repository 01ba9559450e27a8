"""`tandem.LLM`: load a GGUF with placement rules, then logits and generation.

    llm = tandem.LLM("DeepSeek-R1-UD-IQ1_S-00001-of-00003.gguf", ctx_size=8192)
    llm.logits([0, 100, 200])                  # float32 [3, vocab]
    llm.generate([0, 100, 200], max_new_tokens=32)  # greedy new token ids
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from tandem.errors import GGUFError, TandemError
from tandem.gguf.model import open_gguf
from tandem.kernels import native
from tandem.kernels.cpu import CpuKernels, resize_openmp_team
from tandem.kernels.env import env_int
from tandem.kernels.gpu_share import TORCH_THREADS_WITH_SHARE, GpuShare, max_experts_for
from tandem.kernels.numa import MODES as NUMA_MODES
from tandem.kernels.page_in import PageIn
from tandem.kernels.streamed import ExpertStreamer, workspace_bytes
from tandem.models.decoder import Segment
from tandem.placement import planner
from tandem.placement.rules import IN_PLACE_KERNELS, Rule, assign, default_rules, load_rules
from tandem.runtime import decode_graphs
from tandem.runtime.architectures import ARCHITECTURES
from tandem.runtime.kv_cache import ContextFull
from tandem.runtime.loader import WeightLoader, check_tensors
from tandem.runtime.sampler import Sampler, SamplingParams
from tandem.runtime.scheduler import common_prefix

log = logging.getLogger(__name__)

DEFAULT_CTX = 4096
# Batches of at least this many tokens compute their routed experts on the GPU, the weights
# streamed there (kernels.streamed); shorter ones on the CPU. Measured on the GPU machine:
# benchmarks/results/gpu_experts_threshold-*.json.
GPU_EXPERTS_FROM = 96
PREFILL_CHUNK = 512
# Prompt tokens per pass where routed experts are read in place: each pass reads (or streams)
# every used expert's weights once, so longer passes read them less often per token. On the
# CPU, 2048 tokens give an R1 expert ~64 tokens on average (a full AMX/GEMM block) against ~16
# at 512.
EXPERT_PREFILL_CHUNK = 2048


class LLM:
    def __init__(self, gguf_path: str | Path, model_path: str | Path | None = None,
                 rules: str | Path | Sequence[Rule] | None = None, *, ctx_size: int | None = None,
                 n_threads: int | None = None, prefill_chunk: int | None = None,
                 kv_dtype: torch.dtype = torch.float32, progress: bool = False,
                 memory_caps: dict[str, int] | None = None, sequences: int = 1,
                 cuda_graphs: bool = True, gpu_experts_from: int | None = None,
                 page_in: bool = True, numa: str | None = None, gpu_expert_share: float | str = "auto",
                 gpu_expert_cache: float = 0.0):
        """`sequences`: how many KV caches of `ctx_size` the memory plan must leave room for
        (the server's --max-batch-size). `cuda_graphs`: replay one-token decode steps as CUDA
        graphs where the model allows (runtime.decode_graphs). `gpu_experts_from`: batches of
        at least this many tokens run the CPU-placed routed experts on the model's GPU, their
        weights streamed over PCIe (None: GPU_EXPERTS_FROM; 0: never; no GPU: never).
        `prefill_chunk`: prompt tokens per forward pass (None: EXPERT_PREFILL_CHUNK where
        routed experts are read in place, on the CPU or streamed; else PREFILL_CHUNK).
        `page_in`: map the pages of the weights read in place (the CPU experts) into the
        process on a background thread (kernels.page_in), so first uses take no page faults;
        `self.page_in.wait()` blocks until that is done; `numa`: "interleave" spreads the pages
        it reads into the page cache over the memory nodes (kernels.numa; two-socket machines).
        `gpu_expert_share`: the fraction of the CPU-placed experts of each decode step computed
        on the model's GPU at the same time, their weights copied from the pinned file mapping
        (kernels.gpu_share); "auto" (default): balanced per layer as it runs; 0: none. It
        stays off without a GPU or where the mapped experts would not fit in RAM (they are
        page-locked); `self.gpu_share.wait()` blocks until they are pinned and its kernels
        compiled.
        `gpu_expert_cache`: GiB of VRAM for each layer's most used experts, which the share
        reads there instead of over PCIe (kernels.expert_cache); needs the share."""
        self.file = open_gguf(gguf_path)
        spec = ARCHITECTURES.get(self.file.architecture)
        if spec is None:
            raise GGUFError(f"{self.file.path}: architecture {self.file.architecture!r} is not "
                            f"supported (supported: {', '.join(sorted(ARCHITECTURES))})")
        self.config = c = spec.config(self.file, model_path)
        if ctx_size is None:
            ctx_size = min(DEFAULT_CTX, c.context_length)
        if not 0 < ctx_size <= c.context_length:
            raise TandemError(f"ctx_size {ctx_size} must lie in 1..{c.context_length} "
                              "(the model's context length)")
        self.ctx_size = ctx_size
        if numa not in (None, *NUMA_MODES):
            raise TandemError(f"numa {numa!r} is not one of {', '.join(NUMA_MODES)} (or none)")
        expected = spec.tensors(c, self.file)
        aliases = spec.aliases(self.file)
        check_tensors(self.file, expected, aliases)

        needed = {name: self.file.tensors[aliases.get(name, name)] for name, _ in expected}
        self.rules = self._rules(rules, needed)
        self.placements = assign({n: t.ggml_type for n, t in needed.items()}, self.rules)
        devices = [self.placements[spec.layer_anchor(i)].device for i in range(c.n_layers)]
        kv_bytes: dict[str, int] = {}
        for d in devices:
            per_layer = spec.cache_layer_bytes(c, ctx_size, kv_dtype) * sequences
            kv_bytes[str(d)] = kv_bytes.get(str(d), 0) + per_layer
        expert_kernels = {p.kernel for n, p in self.placements.items() if "_exps" in n}
        cpu_experts = bool(expert_kernels & set(IN_PLACE_KERNELS))
        streamer = _streamer(devices, gpu_experts_from) if cpu_experts else None
        self.gpu_experts_from = streamer.min_tokens if streamer else 0  # 0: experts stay on the CPU
        share_fraction = _share_fraction(gpu_expert_share)  # None: balanced
        self.gpu_share = _gpu_share(devices, c, share_fraction) if "cpu" in expert_kernels else None
        cache_bytes = _cache_bytes(gpu_expert_cache, self.gpu_share)
        if prefill_chunk is None:
            prefill_chunk = EXPERT_PREFILL_CHUNK if cpu_experts else PREFILL_CHUNK
        if prefill_chunk < 1:
            raise TandemError(f"prefill_chunk must be >= 1 token, got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        workspace = _stream_workspace(streamer, needed, c, prefill_chunk) if streamer else {}
        if self.gpu_share is not None:  # its slots (and prefetch rows): experts' quantized bytes
            expert = max(planner.expert_bytes_per_layer(needed).values(), default=0)
            slots = (self.gpu_share.max_experts + self.gpu_share.prefetch_rows) * expert
            device = str(self.gpu_share.device)
            workspace[device] = workspace.get(device, 0) + slots + cache_bytes
        if "cpu" in expert_kernels:
            # tandem's MoE op keeps its buffers for the longest batch it sees: shorter than the
            # streaming threshold, or a whole prefill pass when nothing streams
            batch = streamer.min_tokens - 1 if streamer else min(prefill_chunk, ctx_size)
            workspace["cpu"] = workspace.get("cpu", 0) + _cpu_expert_workspace(needed, c, batch)
        self.memory = _plan(needed, self.placements, kv_bytes, workspace)
        short = planner.gpu_shortfall(self.memory, memory_caps) if rules is None else None
        if short:  # the default bfloat16 copies do not fit the GPU: keep its weights quantized
            self.rules = default_rules(True, needed, quantized=True)
            self.placements = assign({n: t.ggml_type for n, t in needed.items()}, self.rules)
            self.memory = _plan(needed, self.placements, kv_bytes, workspace)
            log.warning("bfloat16 copies of the GPU's weights would not fit (%s): they stay in the "
                        "file's quant types there, dequantized on the fly (kernel quant)", short)
        planner.check_fits(self.memory, self.rules, memory_caps)

        self.kernels = CpuKernels(n_threads) if cpu_experts else None
        with _progress(progress, sum(t.n_bytes for t in needed.values())) as advance:
            loader = WeightLoader(self.file, self.placements, self.kernels, advance, aliases, streamer,
                                  self.gpu_share, share_fraction)
            self.model = spec.build(self.file, c, loader, devices)
        self.page_in = PageIn([t.data for t in loader.in_place] if page_in else [], numa=numa)
        if self.gpu_share is not None:
            shared = [(e.gate, e.up, e.down) for e in self.routed_experts() if e.share is self.gpu_share]
            self.gpu_share.keep_in_vram(shared, cache_bytes)
            self.gpu_share.pin([t.data for t in loader.in_place], shared)
            # torch's CPU work is small once a GPU runs the dense layers: a small team leaves
            # libgomp's thread count within the CPUs for the runner's (gpu_share.SHARE_ENV)
            torch_threads = env_int("TANDEM_SHARE_TORCH_THREADS", default=TORCH_THREADS_WITH_SHARE)
            if torch_threads:
                resize_openmp_team(torch_threads)
        self._new_cache = lambda: spec.cache(c, ctx_size, devices, kv_dtype)
        self._cache: list | None = None  # this object's own sequence; allocated on first use
        eos = self.file.metadata.get("tokenizer.ggml.eos_token_id")
        self.eos_token_id: int | None = int(eos) if eos is not None else None
        self.last_timings: Timings | None = None
        self._cached_ids: list[int] = []  # token ids whose keys and values the cache holds
        self.cuda_graphs = cuda_graphs
        self._graphs: decode_graphs.DecodeGraphs | None = None  # made at the first decode step

    def new_cache(self) -> list:
        """An empty per-layer KV cache for one more sequence (continuous batching)."""
        return self._new_cache()

    def _rules(self, rules, names) -> list[Rule]:
        if rules is None:
            return default_rules(torch.cuda.is_available(), names)
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
        self._cached_ids = []
        out = [self._forward(chunk, start).cpu() for start, chunk in self._chunks(tokens)]
        self._cached_ids = tokens.tolist()
        return torch.cat(out)

    def generate(self, token_ids: Sequence[int], max_new_tokens: int = 128, *,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int | None = None, stop_token_ids: Sequence[int] | None = None) -> list[int]:
        """New token ids after `token_ids` (temperature 0: greedy); stops at EOS."""
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                max_new_tokens=max_new_tokens,
                                stop_token_ids=tuple(stop_token_ids or ()))
        return list(self.stream(token_ids, params))

    @torch.inference_mode()
    def stream(self, token_ids: Sequence[int], params: SamplingParams) -> Iterator[int]:
        """Yield new token ids one by one; stops at EOS, a stop token, max_new_tokens or the
        context end. The KV cache of the longest prefix shared with the previous call is
        reused, so a growing chat history is not recomputed each turn."""
        tokens = self._check_tokens(token_ids)
        stops = set(params.stop_token_ids)
        if self.eos_token_id is not None:
            stops.add(self.eos_token_id)
        sampler = Sampler(params)
        began = time.perf_counter()
        reuse = common_prefix(self._cached_ids, tokens.tolist(), limit=tokens.numel() - 1)
        self._cached_ids = self._cached_ids[:reuse]
        logits = None
        for start, chunk in self._chunks(tokens[reuse:], offset=reuse):
            logits = self._forward(chunk, start, last_only=True)
        history = tokens.tolist()
        token = sampler(logits[-1], history)  # waits for the GPU
        prefilled = time.perf_counter()
        new, position = [token], tokens.numel()
        self._cached_ids = list(history)
        self.last_timings = Timings(tokens.numel() - reuse, prefilled - began, 0, 0.0)
        try:
            yield token
            while len(new) < params.max_new_tokens and token not in stops and position < self.ctx_size:
                logits = self._decode_step(token, position)
                self._cached_ids.append(token)
                position += 1
                history.append(token)
                token = sampler(logits[-1], history)
                new.append(token)
                self.last_timings = Timings(tokens.numel() - reuse, prefilled - began,
                                            len(new) - 1, time.perf_counter() - prefilled)
                yield token
        finally:
            self.last_timings = Timings(tokens.numel() - reuse, prefilled - began, len(new) - 1,
                                        time.perf_counter() - prefilled)

    def _forward(self, tokens: torch.Tensor, start: int, last_only: bool = False) -> torch.Tensor:
        if self._cache is None:  # the server's engine brings its own caches and never gets here
            self._cache = self.new_cache()
        return self.model(tokens, [Segment(self._cache, start, tokens.numel())], last_only)

    def decode_graphs_for(self, *sequences) -> decode_graphs.DecodeGraphs | None:
        """Decode steps of one token for each of `sequences` (each its caches) as CUDA graphs,
        captured at their first step; None where this model decodes eagerly (`cuda_graphs`
        off, or decode_graphs.supported says no)."""
        if not self.decodes_in_graphs:
            return None
        return decode_graphs.DecodeGraphs(self.model, sequences, next(self.model.parameters()).device)

    @functools.cached_property
    def decodes_in_graphs(self) -> bool:
        """Whether decode steps run as CUDA graphs here (decode_graphs_for gives some)."""
        return self.cuda_graphs and decode_graphs.supported(self.model)

    def _decode_step(self, token: int, position: int) -> torch.Tensor:
        if self.decodes_in_graphs:
            if self._graphs is None:
                self._graphs = self.decode_graphs_for(self._cache)
            return self._graphs.step([token], [position])
        return self._forward(torch.tensor([token]), position)

    def _chunks(self, tokens: torch.Tensor, offset: int = 0):
        for start in range(0, tokens.numel(), self.prefill_chunk):
            yield offset + start, tokens[start : start + self.prefill_chunk]

    def routed_experts(self) -> list:
        """The routed-expert backends of the model's MoE blocks (kernels.experts)."""
        return [b.ffn.experts for b in self.model.blocks if hasattr(getattr(b, "ffn", None), "experts")]

    @property
    def expert_bytes_read(self) -> int:
        """Weight bytes of the distinct routed experts each MoE call used, summed so far (0
        without the CPU kernels)."""
        return self.kernels.expert_bytes_read if self.kernels is not None else 0

    def close(self) -> None:
        self.page_in.close()
        if self.gpu_share is not None:
            self.gpu_share.close()
        if self.kernels is not None:
            self.kernels.close()
        self.file.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()




def _streamer(devices: list[torch.device], min_tokens: int | None) -> ExpertStreamer | None:
    """A streamer for the (first) GPU the layers run on, if any and if wanted."""
    min_tokens = GPU_EXPERTS_FROM if min_tokens is None else min_tokens
    if min_tokens < 0:
        raise TandemError(f"gpu_experts_from must be a token count >= 1 (0: never), got {min_tokens}")
    gpu = next((d for d in devices if d.type == "cuda"), None)
    return ExpertStreamer(gpu, min_tokens) if gpu is not None and min_tokens > 0 else None


def _share_fraction(value: float | str) -> float | None:
    """gpu_expert_share as a fixed fraction, or None for "auto" (balanced)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return None
    try:
        fraction = float(value)
    except ValueError:
        fraction = float("nan")
    if not 0.0 <= fraction <= 1.0:
        raise TandemError(f"gpu_expert_share must be 'auto' or a fraction in [0, 1] (0: off), "
                          f"got {value!r}")
    return fraction


def _cache_bytes(gib: float, share: GpuShare | None) -> int:
    """gpu_expert_cache in bytes; TandemError for a bad value, or a cache without a share."""
    try:
        value = float(gib)
    except (TypeError, ValueError):
        value = float("nan")
    if not value >= 0 or value == float("inf"):
        raise TandemError(f"gpu_expert_cache must be a size in GiB >= 0, got {gib!r}")
    if value and share is None:
        raise TandemError("gpu_expert_cache keeps experts in VRAM for the GPU expert share: turn the "
                          "share on (gpu_expert_share 'auto' or a fraction) on a machine with a GPU")
    return int(value * 2**30)


def _plan(needed: dict, placements: dict, kv_bytes: dict[str, int],
          workspace: dict[str, int]) -> planner.MemoryPlan:
    """The memory plan of these placements: `workspace` plus the quant kernels' prompt copies."""
    workspace = dict(workspace)
    for device, n in planner.quant_copy_bytes(needed, placements).items():
        workspace[device] = workspace.get(device, 0) + n
    return planner.plan_memory(needed, placements, kv_bytes, workspace)


def _gpu_share(devices: list[torch.device], c, fraction: float | None) -> GpuShare | None:
    """A GPU share for the (first) GPU the layers run on, unless there is none or it is off."""
    gpu = next((d for d in devices if d.type == "cuda"), None)
    k = getattr(c, "n_expert_used", 0)
    if gpu is None or fraction == 0.0 or not k:
        return None
    return GpuShare(gpu, max_experts=max_experts_for(k), experts_per_token=k)


def _stream_workspace(streamer: ExpertStreamer, tensors: dict, c, tokens: int) -> dict[str, int]:
    """Device and pinned host bytes the streamer needs for batches of `tokens`, sized by the
    largest layer's experts."""
    shape = _expert_shape(tensors)
    if shape is None:
        return {}
    n_ff, d = shape
    per_layer = planner.expert_bytes_per_layer(tensors)
    device, host = workspace_bytes(max(per_layer.values()), n_ff, d, tokens, c.n_expert_used)
    workspace = {"cpu": host}
    workspace[str(streamer.device)] = workspace.get(str(streamer.device), 0) + device
    return workspace


def _cpu_expert_workspace(tensors: dict, c, tokens: int) -> int:
    """Work buffers of tandem's CPU MoE op (kernels.native) for batches of `tokens`."""
    shape = _expert_shape(tensors)
    if shape is None or tokens < 1:
        return 0
    n_ff, d = shape
    return native.moe_work_bytes(tokens, c.n_expert_used, d, n_ff)


def _expert_shape(tensors: dict) -> tuple[int, int] | None:
    """(n_ff, d) of the routed experts (their gate matrices), None for a dense model."""
    gate = next((info for name, info in tensors.items() if "ffn_gate_exps" in name), None)
    return None if gate is None else tuple(gate.shape[1:])


@dataclass(frozen=True)
class Timings:
    """The last generate call: prompt evaluation (up to the first new token) and decoding."""

    prompt_tokens: int  # evaluated (a reused prefix is not counted)
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
