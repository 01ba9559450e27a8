"""Concurrent streams through the server's engine (continuous batching), in three set-ups on one
machine in one run: eager steps, decode CUDA graphs over all slots, graphs plus the GPU share
of the experts (batches of single-token experts on the GPU).

    python benchmarks/engine_streams.py MODEL.gguf [--streams 8] [--new-tokens 32] [--repetitions 3]

Each repetition submits `streams` random 16-token prompts at once and counts every generated
token over the wall time until the last one ends (prefill included, as a user sees it).
Prints one line per set-up and writes benchmarks/results/engine_streams-<host>-<time>.json.
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from tandem.bench import machine, others
from tandem.runtime import heap
from tandem.runtime.engine import Engine
from tandem.runtime.llm import LLM
from tandem.runtime.sampler import SamplingParams

SETUPS = (("eager", False, 0), ("graphs", True, 0), ("graphs+share", True, "auto"))
PROMPT_TOKENS = 16


def measure(path: Path, graphs: bool, share, streams: int, new_tokens: int, repetitions: int) -> dict:
    params = SamplingParams(temperature=0, max_new_tokens=new_tokens)
    with LLM(path, ctx_size=512, cuda_graphs=graphs, gpu_expert_share=share, sequences=streams) as llm:
        llm.page_in.wait()
        if llm.gpu_share is not None:
            llm.gpu_share.wait()  # compiled before the clock starts, as `tandem bench` does
            llm.gpu_share.batches_ready.wait()
        engine = Engine(llm, max_batch=streams)
        heap.settle()  # as tandem serve does once loaded
        rates, pauses = [], []
        try:
            for rep in range(repetitions):
                prompts = [torch.randint(10, llm.config.n_vocab, (PROMPT_TOKENS,),
                                         generator=torch.Generator().manual_seed(rep * 100 + i)).tolist()
                           for i in range(streams)]
                start = time.perf_counter()
                with others.GcPauses() as collections:
                    requests = [engine.submit(p, params) for p in prompts]
                    produced = sum(len(list(r.tokens(timeout=600))) for r in requests)
                rates.append(produced / (time.perf_counter() - start))
                pauses.append(collections.summary())
        finally:
            engine.close()
        record = {"tok_per_s": rates, "median_tok_per_s": statistics.median(rates), "runs_gc": pauses,
                  "batch_graphs_used": engine.batch_graphs is not None}
        if llm.gpu_share is not None:
            shared = [e for e in llm.routed_experts() if getattr(e, "share", None) is not None]
            record["batch_layer_shares_at_end"] = [round(e.batch_balance.share, 3) for e in shared]
        return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    results = {}
    for name, graphs, share in SETUPS:
        if graphs and not torch.cuda.is_available():
            continue  # graphs and the share need CUDA
        results[name] = measure(args.model, graphs, share, args.streams, args.new_tokens, args.repetitions)
        print(f"{name}: {args.streams} streams {[round(r, 1) for r in results[name]['tok_per_s']]} tok/s, "
              f"median {results[name]['median_tok_per_s']:.1f}", flush=True)
    now = datetime.now(UTC)
    record = {**machine.record_header("engine_streams", now), "model": str(args.model),
              "streams": args.streams, "new_tokens": args.new_tokens,
              "prompt_tokens": PROMPT_TOKENS, "results": results}
    print(f"wrote {machine.write_record(record, args.out, now)}")


if __name__ == "__main__":
    main()
