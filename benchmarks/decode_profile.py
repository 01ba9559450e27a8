"""Where a one-token decode step's time goes (CUDA graphs, GPU share as configured).

Per token, summed over the layers: the GPU time of the graph segments (attention, router,
dense layers, head) and of the shared experts, by CUDA events around each replay; the host's
wait for each segment before the routed experts can start; the share's launch (and its parts:
pairing experts with tokens, staging inputs, queuing copies, queuing kernels), the CPU op, the
split and the combining, and the whole routed-experts call on the host, and the share's span on
the compute stream (from its launch to its last kernel); the rest of the token (sampling,
Python). The model's MoE layers, k and bytes per expert, for bounds. The shared calls by their
split (`sides`): each side's time against its experts, and what whole experts cost against a
split at a fraction of one. Also the bytes of
GPU weights each segment reads and the GB/s that gives, and the top GPU kernels of a few
steps by torch.profiler.

    python benchmarks/decode_profile.py MODEL.gguf [--tokens 64] [--share auto] [--prompt 128]
        [--streams 8]   # several sequences through the server's engine: per step, no kernel tables
        [--first]       # the steps right after a 4-token warm-up (a fresh bench's first repetition)

Prints a table and writes benchmarks/results/decode_profile-<host>-<time>.json.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

import torch

from tandem.bench import machine, others
from tandem.kernels import experts as experts_module
from tandem.kernels import gpu_share as share_module
from tandem.kernels import native
from tandem.kernels.cpu import CpuKernels
from tandem.kernels.experts import CpuExperts
from tandem.kernels.gpu_share import GpuShare
from tandem.kernels.quant_linear import QuantLinear
from tandem.runtime import heap
from tandem.runtime.decode_graphs import DecodeGraphs
from tandem.runtime.engine import Engine
from tandem.runtime.llm import LLM
from tandem.runtime.sampler import Sampler, SamplingParams

host_s: dict[str, list[float]] = defaultdict(list)  # host seconds per call, by part
# per shared call: experts on the GPU ("gpu") of the distinct ones ("distinct"), the CPU op's
# milliseconds on the runner ("cpu_ms"), the GPU part's span events ("span"), the call's host
# milliseconds ("call_ms")
calls: list[dict] = []
layer_of: dict[int, int] = {}  # MoE layers (their CpuExperts) numbered by their first call
gpu_events: dict[str, list[tuple]] = defaultdict(list)  # (start, end) CUDA events, by part
gc_pauses = others.GcPauses()  # Python's collections during the instrumented steps


def _timed_host(part: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            host_s[part].append(time.perf_counter() - start)
    return wrapper


def _events() -> tuple[torch.cuda.Event, torch.cuda.Event]:
    return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)


class TimedGraph:
    """A captured graph whose replays are timed on the GPU."""

    def __init__(self, graph: torch.cuda.CUDAGraph, part: str):
        self.graph, self.part = graph, part

    def replay(self) -> None:
        start, end = _events()
        start.record()
        self.graph.replay()
        end.record()
        gpu_events[self.part].append((start, end))


class TimedWait:
    """DecodeGraphs' segment-done event: the host's wait on it is timed."""

    def __init__(self, event: torch.cuda.Event):
        self.event = event

    @property
    def cuda_event(self) -> int:  # what an early CPU part's runner polls (TANDEM_SHARE_EARLY)
        return self.event.cuda_event

    def record(self) -> None:
        self.event.record()

    def synchronize(self) -> None:
        start = time.perf_counter()
        self.event.synchronize()
        host_s["wait for segment"].append(time.perf_counter() - start)


def _timed_launch(fn):
    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        start, end = _events()
        start.record()
        begun = time.perf_counter()
        launched = fn(self, *args, **kwargs)
        host_s["share launch"].append(time.perf_counter() - begun)
        end.record()
        gpu_events["share span"].append((start, end))
        if calls:
            calls[-1]["span"] = (start, end)
        return launched
    return wrapper


def _rounded(ms: float | None) -> float | None:
    return None if ms is None else round(ms, 3)


def sides(calls: list[dict]) -> dict:
    """The shared calls by their split: per count of GPU experts, the mean CPU op, GPU span and
    call (ms); a line fitted to each side's time against its experts; where the lines cross
    (the split a fraction of an expert would allow) against the best whole split and the mean
    of the slower side as run: what whole experts cost."""
    timed = [c for c in calls if c.get("cpu_ms") is not None and c.get("gpu_ms") is not None]
    groups = defaultdict(list)
    for c in timed:
        groups[c["gpu"]].append(c)
    rows = [{"gpu_experts": n, "cpu_experts": statistics.mean(c["distinct"] - n for c in group),
             "calls": len(group), "cpu_op_ms": statistics.mean(c["cpu_ms"] for c in group),
             "gpu_span_ms": statistics.mean(c["gpu_ms"] for c in group),
             "call_ms": statistics.mean(c["call_ms"] for c in group if "call_ms" in c)
             if any("call_ms" in c for c in group) else None}
            for n, group in sorted(groups.items())]
    found = {"by_gpu_experts": rows}
    if len(rows) < 2 or len({c["distinct"] for c in timed}) != 1:
        return found  # a line needs two splits; the bounds one expert count
    k = timed[0]["distinct"]
    cpu = statistics.linear_regression([k - c["gpu"] for c in timed], [c["cpu_ms"] for c in timed])
    gpu = statistics.linear_regression([c["gpu"] for c in timed], [c["gpu_ms"] for c in timed])

    def slower(n_gpu: float) -> float:
        return max(cpu.intercept + cpu.slope * (k - n_gpu), gpu.intercept + gpu.slope * n_gpu)
    crossing = (cpu.intercept + cpu.slope * k - gpu.intercept) / (cpu.slope + gpu.slope)
    found.update({
        "cpu_line_ms": {"per_expert": cpu.slope, "fixed": cpu.intercept},
        "gpu_line_ms": {"per_expert": gpu.slope, "fixed": gpu.intercept},
        "crossing_gpu_experts": crossing, "crossing_ms": slower(crossing),
        "best_whole_split_ms": min(slower(n) for n in range(k + 1)),
        "slower_side_as_run_ms": statistics.mean(max(c["cpu_ms"], c["gpu_ms"]) for c in timed)})
    return found


def instrument(graphs: DecodeGraphs) -> None:
    """Wrap decode graphs (captured by a first step) and the experts' calls; what was counted
    before (warm-up) is dropped."""
    host_s.clear()
    calls.clear()
    layer_of.clear()
    for length, pairs in graphs._graphs.items():
        graphs._graphs[length] = [
            (TimedGraph(main, "segment" if i < len(pairs) - 1 else "last segment + head"),
             TimedGraph(shared, "shared expert") if shared is not None else None)
            for i, (main, shared) in enumerate(pairs)]
    graphs._ready = TimedWait(graphs._ready)
    compute_shared = _timed_host("routed experts call (shared)", CpuExperts.compute_shared)

    @functools.wraps(compute_shared)
    def counted_call(self, *args, **kwargs):
        out = compute_shared(self, *args, **kwargs)
        if calls:
            calls[-1]["call_ms"] = host_s["routed experts call (shared)"][-1] * 1e3
        return out
    CpuExperts.compute_shared = counted_call
    CpuExperts.compute = _timed_host("routed experts call (CPU only)", CpuExperts.compute)
    CpuKernels.moe = _timed_host("CPU op", CpuKernels.moe)
    # the CPU part first (the default; TANDEM_SHARE_CPU_FIRST=0: last): the op runs on the kernels'
    # runner thread; its own time counts as the CPU op, the caller's wait for it apart
    CpuKernels.start_moe = _timed_host("CPU op: start on the runner", CpuKernels.start_moe)
    result = native.RunningMoe.result

    @functools.wraps(result)
    def timed_result(self):
        waited = self.waited
        out = _timed_host("CPU op: wait for the runner", result)(self)
        if not waited:
            host_s["CPU op"].append(self.seconds)
            if calls and "cpu_ms" not in calls[-1]:  # not an unshared call's (compute, on the runner too)
                calls[-1]["cpu_ms"] = self.seconds * 1e3
        return out
    native.RunningMoe.result = timed_result
    GpuShare.launch = _timed_launch(GpuShare.launch)
    # the whole step and the choice of its token (which waits for the head), around the rest
    DecodeGraphs.step = _timed_host("step (all of it)", DecodeGraphs.step)
    Sampler.__call__ = _timed_host("sampling (waits for the head)", Sampler.__call__)
    # the call's other host parts, and the launch's own (what is left of it is bookkeeping)
    CpuExperts._combine = _timed_host("split/combine: combine", CpuExperts._combine)
    experts_module._pinned_copy = _timed_host("split/combine: x to host", experts_module._pinned_copy)
    share_module._pairs = _timed_host("launch: pairs", share_module._pairs)
    GpuShare._inputs = _timed_host("launch: inputs", GpuShare._inputs)
    GpuShare._upload = _timed_host("launch: copies queued", GpuShare._upload)
    GpuShare._compute = _timed_host("launch: kernels queued", GpuShare._compute)
    split = CpuExperts._split

    @functools.wraps(split)
    def counted_split(self, ids):
        chosen = split(self, ids)
        calls.append({"layer": layer_of.setdefault(id(self), len(layer_of)), "gpu": len(chosen[0]),
                      "distinct": chosen[2], "share": round(chosen[3].share, 3)})
        return chosen
    CpuExperts._split = _timed_host("split/combine: split", counted_split)
    start_early = CpuExperts.start_early

    @functools.wraps(start_early)
    def counted_start(self, x_host, ids_host, *args):  # TANDEM_SHARE_EARLY: split by count, in advance
        early = start_early(self, x_host, ids_host, *args)
        if early is not None:
            calls.append({"layer": layer_of.setdefault(id(self), len(layer_of)), "gpu": early.n_gpu,
                          "distinct": ids_host.shape[1], "share": round(early.balance.share, 3)})
        return early
    CpuExperts.start_early = _timed_host("CPU op: posted early", counted_start)


def segment_bytes(llm: LLM, graphs: DecodeGraphs) -> list[int]:
    """Bytes of GPU weights each graph segment reads (the shared experts apart)."""
    per_cut = []
    for cut in graphs.cuts:
        total = 0
        for j in range(cut.first, cut.last + 1):
            block = llm.model.blocks[j]
            skip = set()
            if j == cut.last and cut.moe is not None and cut.moe.shared is not None:
                skip = {id(p) for p in (*cut.moe.shared.parameters(), *cut.moe.shared.buffers())}
            total += sum(p.numel() * p.element_size() for p in block.parameters()
                         if p.is_cuda and id(p) not in skip)
            total += sum(m.raw.numel() for m in block.modules()  # weights kept quantized
                         if isinstance(m, QuantLinear) and m.raw.is_cuda and id(m.raw) not in skip)
        if cut.moe is None:
            head = llm.model.lm_head
            total += sum(p.numel() * p.element_size() for p in (*head.parameters(), *head.buffers()))
        per_cut.append(total)
    return per_cut


def expert_bytes(llm: LLM) -> int:
    """Bytes of one routed expert (gate, up and down) of the first MoE layer."""
    first = llm.routed_experts()[0]
    return sum(w.expert_bytes() for w in (first.gate, first.up, first.down))


def top_kernels(llm: LLM, prompt: list[int], steps: int, top: int = 15) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile
    params = SamplingParams(temperature=0, max_new_tokens=steps)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        list(llm.stream(prompt, params))
    rows = [{"kernel": name, "calls": count, "gpu_ms_per_token": gpu_us / 1e3 / steps}
            for name, count, gpu_us in _kernels(prof)]
    return sorted(rows, key=lambda r: -r["gpu_ms_per_token"])[:top]


def _kernels(prof) -> list[tuple[str, int, float]]:
    """(name, launches, GPU microseconds) of each kernel a profile saw: the kernels themselves
    (GPU events), not the ops launching them."""
    found = []
    for avg in prof.key_averages():
        if getattr(avg, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        gpu_us = getattr(avg, "self_device_time_total", 0) or getattr(avg, "self_cuda_time_total", 0)
        found.append((avg.key[:120], avg.count, gpu_us))
    return found


def segment_kernels(llm: LLM, replays: int = 20) -> list[dict]:
    """Every kernel of one MoE layer's segment graph (the second segment: attention, norms,
    router) per replay: where a segment's time goes when its weights alone would take a
    fraction of it. Replayed on its own after decoding (it rewrites a cache row already written)."""
    from torch.profiler import ProfilerActivity, profile
    captured = next(iter(llm._graphs._graphs.values()), None)
    if not captured or len(captured) < 3:
        return []
    graph = captured[1][0]
    graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    rows = [{"kernel": name, "per_replay": count / replays, "us_per_replay": gpu_us / replays}
            for name, count, gpu_us in _kernels(prof)]
    return sorted(rows, key=lambda r: -r["us_per_replay"])


def profile_one(llm: LLM, prompt: list[int], tokens: int, first: bool = False):
    """One sequence: the kernel tables, then `tokens` decode steps instrumented. Returns the
    graphs, the steps, ms a step, the top kernels and one MoE segment's kernels. `first`: the
    steps right after a warm-up of 4 tokens, as `tandem bench` has before its first repetition
    (which ran slow in every run so far), and no kernel tables."""
    list(llm.stream(prompt, SamplingParams(temperature=0, max_new_tokens=4 if first else 32)))
    if llm._graphs is None:  # captured at the first step; the share's balance settles
        raise SystemExit("this model does not decode in CUDA graphs here: nothing to profile")
    kernels, one_segment = [], []
    if not first:
        kernels = top_kernels(llm, prompt, steps=8)
        try:
            one_segment = segment_kernels(llm)
        except Exception as exc:  # a profiler that cannot see graph kernels: the rest still runs
            print(f"segment kernels not profiled: {exc}")
    instrument(llm._graphs)
    with gc_pauses:
        produced = list(llm.stream(prompt, SamplingParams(temperature=0, max_new_tokens=tokens + 1)))
    n = len(produced) - 1
    return llm._graphs, n, llm.last_timings.decode_s * 1e3 / n, kernels, one_segment


def profile_streams(llm: LLM, streams: int, tokens: int):
    """`streams` sequences through the server's engine (its batch decode graphs, the batch
    balance of the GPU share): a warm-up round, then one instrumented. Prompts of 16 random
    tokens, one per stream, as `tandem bench` has for streams (one prompt for all made every
    stream decode the same tokens, their steps reading a third of the distinct experts, run `y`):
    their one eager step adds little to the host parts. Returns the graphs, the decode steps and
    ms a step (the graph steps' own time)."""
    engine = Engine(llm, max_batch=streams)
    draw = torch.Generator().manual_seed(1)
    try:
        def round_of(new_tokens: int) -> None:
            params = SamplingParams(temperature=0, max_new_tokens=new_tokens)
            prompts = [torch.randint(10, llm.config.n_vocab, (16,), generator=draw).tolist()
                       for _ in range(streams)]
            for req in [engine.submit(p, params) for p in prompts]:
                list(req.tokens(timeout=600))
        round_of(32)  # captures the batch graphs; the batch balance settles
        if engine.batch_graphs is None:
            raise SystemExit("the engine did not decode in batch graphs here: nothing to profile")
        instrument(engine.batch_graphs)
        with gc_pauses:
            round_of(tokens)
    finally:
        engine.close()
    steps = host_s["step (all of it)"]
    return engine.batch_graphs, len(steps), sum(steps) * 1e3 / len(steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens (the context)")
    parser.add_argument("--share", default="auto", help="--gpu-expert-share: auto, a fraction, 0")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rules", type=Path, default=None, help="placement rules YAML")
    parser.add_argument("--streams", type=int, default=1,
                        help="sequences decoded together (more than 1: through the server's engine, "
                             "its batch graphs; figures per step, no kernel tables)")
    parser.add_argument("--first", action="store_true",
                        help="one stream: profile the steps right after a 4-token warm-up, as a "
                             "fresh `tandem bench` process's first repetition (no kernel tables)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("decode_profile needs a CUDA GPU (decode graphs, events)")

    share = args.share if args.share == "auto" else float(args.share)
    llm = LLM(args.model, rules=args.rules, ctx_size=args.prompt + args.tokens + 64, gpu_expert_share=share,
              n_threads=args.threads)
    llm.page_in.wait()
    if llm.gpu_share is not None:
        llm.gpu_share.wait()
    heap.settle()  # as tandem chat, serve and bench do once loaded
    prompt = torch.randint(10, llm.config.n_vocab, (args.prompt,),
                           generator=torch.Generator().manual_seed(0)).tolist()
    if args.streams > 1:
        graphs, n, token_ms = profile_streams(llm, args.streams, args.tokens)
        kernels, one_segment = [], []
    else:
        graphs, n, token_ms, kernels, one_segment = profile_one(llm, prompt, args.tokens, args.first)
    torch.cuda.synchronize()

    per_token = {f"gpu: {part}": sum(s.elapsed_time(e) for s, e in pairs) / n
                 for part, pairs in gpu_events.items()}
    per_token.update({f"host: {part}": sum(values) * 1e3 / n for part, values in host_s.items()})
    # the CPU op's cost per expert it computed (the experts a shared call left it)
    cpu_experts = sum(c["distinct"] - c["gpu"] for c in calls)
    n_calls = max(1, len(calls))
    experts_split = {"calls": len(calls), "gpu_experts_per_call": sum(c["gpu"] for c in calls) / n_calls,
                     "cpu_experts_per_call": cpu_experts / n_calls,
                     "cpu_op_ms_per_expert": (sum(host_s["CPU op"]) * 1e3 / cpu_experts
                                              if cpu_experts and calls else None)}
    for c in calls:
        span = c.pop("span", None)
        if span is not None:
            c["gpu_ms"] = span[0].elapsed_time(span[1])
    by_split = sides(calls)
    bytes_per_cut = segment_bytes(llm, graphs)
    n_moe = len(bytes_per_cut) - 1  # a segment ends at each MoE layer; the last at the head
    moe_segments = gpu_events["segment"]
    segments = [statistics.median(s.elapsed_time(e) for s, e in moe_segments[i::n_moe]) for i in range(n_moe)]
    segments.append(statistics.median(s.elapsed_time(e) for s, e in gpu_events["last segment + head"]))
    seg_rows = [{"bytes": b, "median_ms": ms, "gb_per_s": b / ms / 1e6}
                for b, ms in zip(bytes_per_cut, segments, strict=True)]

    # per token of each stream: one step (of all streams together where --streams > 1)
    print(f"{n} steps of {args.streams} stream(s), {token_ms:.2f} ms per token "
          f"({args.streams * 1e3 / token_ms:.1f} tok/s together), share {args.share}")
    for part, ms in sorted(per_token.items()):
        print(f"  {part:<40} {ms:7.3f} ms per token")
    print(f"  experts per shared call: {experts_split['gpu_experts_per_call']:.2f} on the GPU, "
          f"{experts_split['cpu_experts_per_call']:.2f} on the CPU; CPU op per expert: "
          f"{experts_split['cpu_op_ms_per_expert'] or 0:.3f} ms")
    for row in by_split["by_gpu_experts"]:
        print(f"  {row['calls']:4d} calls with {row['gpu_experts']} GPU experts: CPU op "
              f"{row['cpu_op_ms']:.3f} ms, GPU span {row['gpu_span_ms']:.3f} ms, "
              f"call {row['call_ms'] or 0:.3f} ms")
    if "crossing_ms" in by_split:
        print(f"  slower side {by_split['slower_side_as_run_ms']:.3f} ms as run, "
              f"{by_split['best_whole_split_ms']:.3f} at the best whole split, "
              f"{by_split['crossing_ms']:.3f} where the sides' lines cross "
              f"({by_split['crossing_gpu_experts']:.2f} GPU experts)")
    for i, row in enumerate(seg_rows):
        print(f"  segment {i:2d}: {row['bytes'] / 1e6:8.1f} MB of weights, {row['median_ms']:.3f} ms, "
              f"{row['gb_per_s']:.0f} GB/s")
    for row in kernels:
        print(f"  {row['gpu_ms_per_token']:7.3f} ms/token  {row['calls']:5d}x  {row['kernel']}")
    print(f"one MoE layer's segment: {len(one_segment)} kernel kinds, "
          f"{sum(r['per_replay'] for r in one_segment):.0f} launches, "
          f"{sum(r['us_per_replay'] for r in one_segment):.0f} us of kernels per replay")
    collections = gc_pauses.summary()
    print(f"garbage collections: {collections['collections']}, {collections['full']} full, "
          f"{collections['total_ms']:.1f} ms in all, longest {collections['max_ms']:.1f} ms")
    now = datetime.now(UTC)
    record = {**machine.record_header("decode_profile", now), "model": str(args.model),
              "share": args.share, "prompt_tokens": args.prompt, "tokens": n, "streams": args.streams,
              "first_steps_after_load": args.first,
              "ms_per_token": token_ms, "parts_ms_per_token": per_token, "experts_split": experts_split,
              "sides": by_split,
              # every shared call in order (the balance's course: hiccups, drift), as rows
              "calls": {"columns": ["layer", "gpu_experts", "distinct", "share", "cpu_op_ms",
                                    "gpu_span_ms"],
                        "rows": [[c["layer"], c["gpu"], c["distinct"], c["share"],
                                  _rounded(c.get("cpu_ms")), _rounded(c.get("gpu_ms"))] for c in calls]},
              "segments": seg_rows, "moe_layers": n_moe, "experts_per_token": llm.config.n_expert_used,
              "expert_bytes": expert_bytes(llm),
              "share_layers_at_end": [round(e.balance.share, 3) for e in llm.routed_experts()
                                      if getattr(e, "share", None) is not None],
              "top_gpu_kernels": kernels, "moe_segment_kernels": one_segment, "gc": collections}
    print(f"wrote {machine.write_record(record, args.out, now)}")


if __name__ == "__main__":
    main()
