"""`tandem bench`: prefill and decode speed, time to first token, memory, and decode against the
RAM-bandwidth roofline of the routed experts. Warm-up runs are excluded; medians are reported."""

from __future__ import annotations

import dataclasses
import os
import resource
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tandem.bench import machine, others
from tandem.kernels import compiling, gpu_share, native, quant_linear
from tandem.models.deepseek_v3 import ROUTE_ENV
from tandem.placement.planner import expert_bytes_per_layer
from tandem.runtime import decode_graphs, heap
from tandem.runtime.engine import DecodeSteps, Engine
from tandem.runtime.sampler import SamplingParams

# how the CPU kernels' OpenMP threads wait between calls and where they run (libgomp reads these)
OPENMP_ENV = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_PROC_BIND", "OMP_PLACES")


@dataclass
class BenchConfig:
    model: Path
    prompt_lengths: list[int] = field(default_factory=lambda: [128, 1024])
    streams: list[int] = field(default_factory=lambda: [1, 4])
    new_tokens: int = 32
    repetitions: int = 3
    ctx_size: int | None = None
    n_threads: int | None = None
    rules: Path | None = None
    gpu_experts_from: int | None = None  # None: LLM's default
    gpu_expert_share: float | str = "auto"  # balanced (LLM's default); 0: off
    gpu_expert_cache: float = 0.0  # GiB of VRAM for the most used experts
    numa: str | None = None  # "interleave": expert pages spread over the memory nodes


def _memory_kb(key: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def expert_bytes_per_token(llm) -> int:
    """Bytes of routed-expert weights one token reads: k experts x (gate+up+down) per MoE layer."""
    k = getattr(llm.config, "n_expert_used", 0)
    return k * sum(expert_bytes_per_layer(llm.file.tensors).values())


def routing_spread(llm, tokens: list[int]) -> dict | None:
    """How a prompt's tokens spread over each MoE layer's experts (one prefill of `tokens`):
    distinct experts chosen, and the share of all picks that the 8 most chosen took. A trained
    model spreads them (load-balanced); caches, prefetching and batching gain where it does
    not. None for a model without routed experts."""
    from tandem.models.deepseek_v3 import MoE

    moes = [b.ffn for b in llm.model.blocks if isinstance(getattr(b, "ffn", None), MoE)]
    if not moes:
        return None
    picks: list[list[torch.Tensor]] = [[] for _ in moes]
    for moe, chosen in zip(moes, picks, strict=True):
        def recorded(x, choose=moe.choose, chosen=chosen):
            ids, weights = choose(x)
            chosen.append(ids.flatten().cpu())
            return ids, weights
        moe.choose = recorded  # this instance only, for one prefill
    try:
        llm.generate(tokens, 1)
    finally:
        for moe in moes:
            del moe.choose
    counts = [torch.bincount(torch.cat(chosen), minlength=moe.c.n_expert).sort(descending=True).values
              for moe, chosen in zip(moes, picks, strict=True)]
    return {"tokens": len(tokens), "experts": moes[0].c.n_expert,
            "distinct_per_layer": [int((c > 0).sum()) for c in counts],
            "top8_share_per_layer": [round(float(c[:8].sum() / c.sum()), 3) for c in counts]}


def _page_faults() -> int:
    """Minor and major page faults of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt + usage.ru_majflt


def _decode_steps(engine: Engine, rows: int) -> DecodeSteps:
    """A copy of the engine's tally of decode-only steps with `rows` rows."""
    return dataclasses.replace(engine.metrics.decode_steps.get(rows, DecodeSteps()))


def _rates(after: DecodeSteps, before: DecodeSteps, rows: int) -> dict:
    """Steps, tok/s and routed experts' GB/s of the decode-only steps between two tallies."""
    steps, seconds = after.steps - before.steps, after.seconds - before.seconds
    read = after.expert_bytes - before.expert_bytes
    return {"steps": steps, "tok_per_s": rows * steps / seconds if seconds else 0.0,
            "expert_gb_per_s": read / seconds / 1e9 if seconds else 0.0}


def _step_ms(tokens) -> list[float]:
    """Milliseconds from each token of `tokens` to the next (one decode step each)."""
    times, last = [], time.perf_counter()
    for _ in tokens:
        now = time.perf_counter()
        times.append((now - last) * 1e3)
        last = now
    return times


def _step_summary(runs: list[list[float]]) -> dict:
    """Per repetition: the median and the slowest decode step (ms) and the slowest's index."""
    runs = [run or [0.0] for run in runs]
    return {"median": [statistics.median(run) for run in runs], "max": [max(run) for run in runs],
            "slowest_step": [run.index(max(run)) for run in runs]}


def _share_record(llm) -> dict:
    """Whether decode split its experts with the GPU, and the layers' shares at the end."""
    share = llm.gpu_share
    if share is None:
        return {"on": False, "why_off": "no GPU, or turned off"}
    sharing = _sharing(llm)
    return {"on": share.ready.is_set(), "batches_on": share.batches_ready.is_set(),
            "why_off": share.skipped, "cuda_graphs": share.graphs,
            "cpu_part_first": share.cpu_first,  # the order of a shared call (TANDEM_SHARE_CPU_FIRST)
            "layer_shares_at_end": [round(e.balance.share, 3) for e in sharing],
            "batch_layer_shares_at_end": [round(e.batch_balance.share, 3) for e in sharing],
            "cache_gib": round(share.cached_bytes / 2**30, 3),
            "experts_in_vram_at_end": [len(share.resident(e.gate)) for e in sharing],
            "experts_taken": dict(share.counts),  # from the file, the cache, a prefetch
            "prefetch_hit_rate": (share.counts["from_prefetch"] / share.counts["prefetched"]
                                  if share.counts["prefetched"] else None)}


def _sharing(llm) -> list:
    """The layers' routed experts that split their calls with the GPU."""
    return [e for e in llm.routed_experts() if getattr(e, "share", None) is not None]


def _share_captures(llm) -> int:
    """CUDA graphs the GPU share has captured so far (each at the first call of an expert
    count: a synchronize and emptied caches in the middle of a decode step)."""
    return llm.gpu_share.captures if llm.gpu_share is not None else 0


def _mean_share(llm) -> float | None:
    """The one-token balance's GPU share averaged over the sharing layers (None: no share)."""
    shares = [e.balance.share for e in _sharing(llm)]
    return round(sum(shares) / len(shares), 3) if shares else None


def _streamed_chunks(llm) -> dict[str, int]:
    """Chunks of experts long prompts streamed to the GPU: straight from the pinned mapping
    ("direct") or through the staging slots."""
    streamers = {id(e.streamer): e.streamer for e in llm.routed_experts()
                 if getattr(e, "streamer", None) is not None}
    return {kind: sum(s.chunks[kind] for s in streamers.values()) for kind in ("direct", "staged")}


def run(cfg: BenchConfig, progress=print) -> dict:
    from tandem.runtime.llm import LLM

    anon_before = _memory_kb("RssAnon")
    began = time.perf_counter()
    llm = LLM(cfg.model, rules=cfg.rules, ctx_size=cfg.ctx_size, n_threads=cfg.n_threads,
              gpu_experts_from=cfg.gpu_experts_from, gpu_expert_share=cfg.gpu_expert_share,
              gpu_expert_cache=cfg.gpu_expert_cache, numa=cfg.numa)
    load_s = time.perf_counter() - began
    llm.page_in.wait()  # measure steps, not first touches of pages (see kernels.page_in)
    page_in_s = time.perf_counter() - began - load_s
    share_wait_s = 0.0
    if llm.gpu_share is not None:  # its experts pinned and kernels compiled (or why it is off)
        llm.gpu_share.wait()
        share_wait_s = time.perf_counter() - began - load_s - page_in_s
        state = "on" if llm.gpu_share.ready.is_set() else f"off ({llm.gpu_share.skipped})"
        progress(f"GPU expert share {state}, ready {share_wait_s:.1f} s after the page-in")
    vocab = llm.config.n_vocab
    gen = torch.Generator().manual_seed(0)

    def prompt(n: int) -> list[int]:
        return torch.randint(10, vocab, (n,), generator=gen).tolist()

    results: dict = {"load_s": load_s, "page_in_s": page_in_s, "page_in_method": llm.page_in.method,
                     "page_in_skipped": llm.page_in.skipped, "page_in_numa": llm.page_in.numa_note,
                     "prefill": [], "decode": []}
    params = SamplingParams(temperature=0, max_new_tokens=cfg.new_tokens)
    # Warm-up: first allocations, kernels, CUDA graphs (page faults are gone: paged in above).
    fitting = [n for n in cfg.prompt_lengths if n + cfg.new_tokens <= llm.ctx_size]
    warm = prompt(max([8, *fitting]))
    results["routing"] = routing_spread(llm, warm)  # what the figures below were measured on
    began = time.perf_counter()
    llm.generate(warm, 4)
    # a cold process compiles its decode pieces and captures every context bucket's graphs here
    results["warmup_s"] = time.perf_counter() - began
    progress(f"warm-up (first prompt and decode steps, graphs captured) {results['warmup_s']:.1f} s")
    frozen = heap.settle()  # after the warm-up's captures: no full collection walks all that
    for n in cfg.prompt_lengths:
        if n not in fitting:
            progress(f"skip prompt length {n}: the context holds {llm.ctx_size}")
            continue
        runs, decoded, faults, shares, steps, captures, meanwhile = [], 0, 0, [], [], [], []
        for _ in range(cfg.repetitions):
            tokens = llm.stream(prompt(n), params)
            next(tokens)  # the prompt is in
            before, captured = _page_faults(), _share_captures(llm)
            with others.WhatElseRan() as seen:
                steps.append(_step_ms(tokens))
            meanwhile.append(seen.found)
            decoded += len(steps[-1])
            faults += _page_faults() - before
            captures.append(_share_captures(llm) - captured)
            runs.append(llm.last_timings)
            shares.append(_mean_share(llm))
        prefill = statistics.median(r.prompt_tok_per_s for r in runs)
        ttft = statistics.median(r.prompt_s for r in runs)
        decode = statistics.median(r.decode_tok_per_s for r in runs)
        results["prefill"].append({"prompt_tokens": n, "tok_per_s": prefill, "ttft_s": ttft})
        # page faults while decoding: ~0 once the in-place weights are paged in (else each
        # first read of an expert's page pays one; see kernels.page_in)
        results["decode"].append({"streams": 1, "context": n, "tok_per_s": decode,
                                  "runs_tok_per_s": [r.decode_tok_per_s for r in runs],  # the spread
                                  # the layers' mean GPU share of experts after each repetition
                                  "runs_gpu_share": shares,
                                  # the share's graphs captured while decoding (first expert counts)
                                  "runs_share_graph_captures": captures,
                                  # a slow repetition: all steps slower, or a few long stalls?
                                  "runs_step_ms": _step_summary(steps),
                                  # what else ran: Python's collections (a full one stalls a
                                  # step), torch.compile's compiles, our threads' and other
                                  # processes' CPU time, the kernel's memory work
                                  **{f"runs_{part}": [seen[part] for seen in meanwhile]
                                     for part in ("gc", "compiles", "cpu", "vm_events")},
                                  "page_faults_per_token": faults / max(decoded, 1)})
        full = [ms for seen in meanwhile for ms in seen["gc"]["full_ms"]]
        progress(f"prompt {n:5d}: prefill {prefill:8.1f} tok/s, first token {ttft:.3f} s, "
                 f"decode {decode:6.2f} tok/s"
                 + (f" ({len(full)} full garbage collections, longest {max(full):.0f} ms)" if full else ""))
    engine = Engine(llm, max_batch=max(cfg.streams))

    try:
        for streams in cfg.streams:
            if streams == 1:
                continue
            tps, expert_rates, decode_steps = [], [], []
            for _ in range(cfg.repetitions):
                t0 = time.perf_counter()
                read_before, steps_before = llm.expert_bytes_read, _decode_steps(engine, streams)
                reqs = [engine.submit(prompt(16), params) for _ in range(streams)]  # mostly decode
                produced = sum(len(list(r.tokens(timeout=600))) for r in reqs)
                elapsed = time.perf_counter() - t0
                tps.append(produced / elapsed)
                read = llm.expert_bytes_read - read_before
                expert_rates.append(read / elapsed / 1e9)  # distinct experts' bytes per second
                decode_steps.append(_rates(_decode_steps(engine, streams), steps_before, streams))
            rate = statistics.median(tps)
            # the steps in which all streams decoded (no prompt in them): what the streams'
            # roofline counts; the whole run's figures include the prompts' steps and the ramp
            steps_rate = statistics.median(r["tok_per_s"] for r in decode_steps)
            results["decode"].append({"streams": streams, "context": 16, "tok_per_s": rate,
                                      "runs_tok_per_s": tps,
                                      "expert_gb_per_s": statistics.median(expert_rates),
                                      "decode_steps_tok_per_s": steps_rate,
                                      "decode_steps_expert_gb_per_s": statistics.median(
                                          r["expert_gb_per_s"] for r in decode_steps),
                                      "runs_decode_steps": decode_steps})
            progress(f"{streams} streams: {rate:.2f} tok/s together, {steps_rate:.2f} in the steps "
                     f"where all {streams} decode")
    finally:
        engine.close()
    bandwidth = machine.ram_read_gbps()
    per_token = expert_bytes_per_token(llm)
    single = next((d["tok_per_s"] for d in results["decode"] if d["streams"] == 1), 0.0)
    results |= {
        "gpu_experts_from": llm.gpu_experts_from,
        "gpu_expert_share": {**_share_record(llm), "ready_after_page_in_s": share_wait_s},
        "streamed_chunks": _streamed_chunks(llm),
        "prefill_chunk": llm.prefill_chunk,
        "gc_frozen": frozen,  # objects alive after the warm-up skipped by collections (runtime.heap)
        # variants of tandem's kernels picked by environment (A/B runs)
        "kernel_env": {k: os.environ[k] for k in (*native.KERNEL_ENV, *gpu_share.SHARE_ENV,
                                                  decode_graphs.COMPILE_ENV, *quant_linear.QUANT_ENV,
                                                  ROUTE_ENV, heap.FREEZE_ENV, compiling.THREADS_ENV,
                                                  *OPENMP_ENV)
                       if k in os.environ},
        "ram_read_gb_per_s": bandwidth,
        "expert_bytes_per_token": per_token,
        "expert_gb_per_s_batch1": per_token * single / 1e9,
        "roofline_tok_per_s": bandwidth * 1e9 / per_token if per_token else None,
        "roofline_fraction": (per_token * single / 1e9) / bandwidth if per_token else None,
        # Several streams: the distinct experts' bytes the steps in which all of them decode
        # read, per second of those steps, against the RAM bandwidth; and over the whole run
        # (the prompts' steps included: a 16-token prompt reads most experts of every layer)
        "streams_roofline_fraction": {d["streams"]: d["decode_steps_expert_gb_per_s"] / bandwidth
                                      for d in results["decode"] if "decode_steps_expert_gb_per_s" in d},
        "streams_roofline_fraction_with_prompts": {d["streams"]: d["expert_gb_per_s"] / bandwidth
                                                   for d in results["decode"] if "expert_gb_per_s" in d},
        "peak_rss_anon_beyond_start_bytes": max(_memory_kb("RssAnon") - anon_before, 0) * 1024,
        "peak_vram_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0,
    }
    llm.close()
    return results
