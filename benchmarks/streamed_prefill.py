"""Prefill with the routed experts streamed to the GPU, and where streaming starts to pay.

Two measurements on one DeepSeek GGUF (a `tandem synth --preset r1` file, say):

1. Whole-model prefill tok/s at each prompt length, with prompt passes of 2048 and of 512
   tokens, and the time the streamed MoE layers take of it (synchronized around each call).
2. One MoE layer of the file under uniform random routing (trained models spread a prompt's
   tokens over all experts): tandem's CPU kernels against the streamer, per token count. The
   crossover is where `--gpu-experts-from` belongs.

    python benchmarks/streamed_prefill.py FILE [--lengths 512 2048] [--tokens 16 64 128 512]
                                          [--threads 16] [--repetitions 3] [--out DIR]

Needs a CUDA GPU. Writes streamed_prefill-<host>-<date>.json (device, commit, command).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from tandem.bench import machine
from tandem.kernels import streamed
from tandem.kernels.experts import CpuExperts
from tandem.runtime.llm import LLM
from tandem.runtime.sampler import SamplingParams


def prefill_runs(llm: LLM, lengths: list[int], chunks: list[int], reps: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0, max_new_tokens=1)
    moe_s = [0.0]
    plain = streamed.ExpertStreamer.moe

    def timed(self, *args):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = plain(self, *args)
        torch.cuda.synchronize()
        moe_s[0] += time.perf_counter() - t0
        return out

    def prefill(n: int, timed_moe: bool) -> tuple[float, float]:
        streamed.ExpertStreamer.moe = timed if timed_moe else plain
        moe_s[0] = 0.0
        try:
            list(llm.stream(torch.randint(10, llm.config.n_vocab, (n,), generator=gen).tolist(), params))
        finally:
            streamed.ExpertStreamer.moe = plain
        return llm.last_timings.prompt_s, moe_s[0]

    rows = []
    for chunk in chunks:
        llm.prefill_chunk = chunk
        for n in lengths:
            prefill(n, False)  # warm-up: compiles, page faults, allocations
            walls = [prefill(n, False)[0] for _ in range(reps)]
            moe = prefill(n, True)[1]
            rows.append({"prompt_tokens": n, "pass_tokens": chunk, "tok_per_s": n / statistics.median(walls),
                         "runs_s": walls, "streamed_moe_s": moe})
            print(f"prompt {n:5d}, passes of {chunk:4d}: {rows[-1]['tok_per_s']:8.0f} tok/s, "
                  f"streamed MoE {moe * 1e3:.0f} ms (synchronized run)", flush=True)
    return rows


def crossover(llm: LLM, token_counts: list[int]) -> list[dict]:
    experts = next(b.ffn.experts for b in llm.model.blocks
                   if isinstance(getattr(b.ffn, "experts", None), CpuExperts))
    n_expert, _, d = experts.gate.shape
    k = llm.config.n_expert_used
    streamer = experts.streamer
    tensors = (experts.gate, experts.up, experts.down)
    rows = []
    for t in token_counts:
        gen = torch.Generator().manual_seed(t)
        x = torch.randn(t, d, generator=gen)
        ids = torch.stack([torch.randperm(n_expert, generator=gen)[:k] for _ in range(t)])
        w = torch.rand(t, k, generator=gen)
        gpu_args = (x.cuda(), ids.cuda(), w.cuda())
        times = {"cpu_ms": _ms(llm.kernels.moe, x, ids, w, *tensors),
                 "gpu_streamed_ms": _ms(streamer.moe, *gpu_args, *tensors)}
        rows.append({"tokens": t, "distinct_experts": int(ids.unique().numel()), **times})
        print(f"one layer, {t:5d} tokens ({rows[-1]['distinct_experts']} experts): CPU "
              f"{times['cpu_ms']:8.1f} ms, GPU streamed {times['gpu_streamed_ms']:7.1f} ms", flush=True)
    return rows


def _ms(fn, *args) -> float:
    """Milliseconds of the second call of fn(*args) (the first warms up), GPU synchronized."""
    fn(*args)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn(*args)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path)
    parser.add_argument("--lengths", nargs="+", type=int, default=[512, 2048])
    parser.add_argument("--passes", nargs="+", type=int, default=[2048, 512], help="prompt tokens per pass")
    parser.add_argument("--tokens", nargs="+", type=int, default=[16, 32, 64, 128, 256, 512, 2048])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("streamed_prefill.py needs a CUDA GPU")
    llm = LLM(args.file, ctx_size=max(args.lengths) + 16, n_threads=args.threads, gpu_experts_from=1)
    try:
        record = {
            **machine.record_header("streamed_prefill", datetime.now(UTC)),
            "prefill": prefill_runs(llm, args.lengths, args.passes, args.repetitions),
            "one_layer_uniform_routing": crossover(llm, args.tokens),
        }
    finally:
        llm.close()
    print(f"wrote {machine.write_record(record, args.out, datetime.now(UTC))}")


if __name__ == "__main__":
    main()
