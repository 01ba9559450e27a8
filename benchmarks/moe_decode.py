"""MoE op for one decode token with DeepSeek-R1 expert shapes: GB/s of expert bytes read.

256 experts of 7168 x 2048 (gate, up) and 2048 -> 7168 (down), 8 chosen per token, a fresh
random choice every step so the bytes come from RAM, not cache. Expert blocks are random but
valid (tandem.bench.random_blocks); the kernels read them at the same speed as real weights.

    python benchmarks/moe_decode.py [--recipes ud-iq1_s q4_k_m] [--kernels ggml tandem]
                                    [--threads 1 2 16] [--tokens 1 8] [--steps 30] [--pool 16]
                                    [--cpu-experts 1 2 4 8] [--gap-ms 0 2] [--runner]
                                    [--gemm-min-pairs 0 16]

--pool N: every token picks its experts among the first N only (a prompt whose tokens share
experts, as the synthetic files' routing did before their norms were kept near 1), so each
expert serves many tokens.
--cpu-experts N: the op computes N of a token's 8 experts, the other slots skipped as the GPU
share leaves them (tandem's kernels only); the time against N separates the op's fixed cost
from its cost per expert. --gap-ms G: the thread idles G ms between calls, as it does while a
decode step's GPU segments run (a team of threads that went to sleep must be woken).
--runner: each call starts on the kernels' runner thread with one thread fewer and is waited
for (what a shared decode call does since the CPU's part starts first).
--gemm-min-pairs 0 16: the GEMM path's threshold (0: the default), settings alternating call by
call in one process (between processes the op's time moved up to 60% in run t).

Prints a table and writes benchmarks/results/moe_decode-<host>-<date>.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from tandem.bench import machine
from tandem.bench.random_blocks import random_blocks
from tandem.bench.runner import OPENMP_ENV
from tandem.gguf.types import GGMLType, block_size
from tandem.kernels import native
from tandem.kernels.cpu import SKIPPED_SLOT, CpuKernels, default_threads, resize_openmp_team
from tandem.kernels.tensors import QuantTensor

N_EXPERT, N_USED, D_MODEL, N_FF = 256, 8, 7168, 2048
RECIPES = {
    "ud-iq1_s": (GGMLType.IQ1_S, GGMLType.IQ1_S, GGMLType.IQ2_XXS),
    "q4_k_m": (GGMLType.Q4_K, GGMLType.Q4_K, GGMLType.Q6_K),
}


def experts(t: GGMLType, shape: tuple[int, int, int], rng) -> QuantTensor:
    n = shape[0] * shape[1] * shape[2]
    return QuantTensor(t, shape, random_blocks(t, n // block_size(t), rng).reshape(-1))


@functools.lru_cache(maxsize=1)  # one recipe's experts (GBs) at a time, kept across its runs
def recipe_experts(recipe: str) -> tuple[QuantTensor, QuantTensor, QuantTensor]:
    rng = np.random.default_rng(0)
    tg, tu, td = RECIPES[recipe]
    return (experts(tg, (N_EXPERT, N_FF, D_MODEL), rng), experts(tu, (N_EXPERT, N_FF, D_MODEL), rng),
            experts(td, (N_EXPERT, D_MODEL, N_FF), rng))


def run(recipe: str, kernel: str, thread_counts: list[int], tokens: int, steps: int,
        warmup: int, pool: int = N_EXPERT, cpu_experts: int = N_USED, gap_ms: float = 0.0,
        runner: bool = False, gemm_min_pairs: list[int] | None = None) -> list[dict]:
    """One row per thread count (and per `gemm_min_pairs` setting: those alternate call by call
    in one process, so that each meets the same machine; 0: the kernels' default)."""
    tg, tu, td = RECIPES[recipe]
    gate, up, down = recipe_experts(recipe)
    expert_bytes = gate.expert_bytes() + up.expert_bytes() + down.expert_bytes()
    x = torch.randn(tokens, D_MODEL)
    g = torch.Generator().manual_seed(0)
    settings = gemm_min_pairs or [None]
    given = native.set_gemm_min_pairs(0)  # the threshold as loaded (TANDEM_GEMM_MIN_PAIRS), put back
    native.set_gemm_min_pairs(given)
    rows = []
    for n_threads in thread_counts:
        times = {s: [] for s in settings}
        on_runner = {s: [] for s in settings}  # the op's own time on the runner's thread
        with CpuKernels(n_threads) as cpu:
            for step in range(warmup + steps):
                for setting in settings:
                    if setting is not None:
                        native.set_gemm_min_pairs(setting)
                    elapsed, running, distinct = _call(cpu, kernel, x, pool, cpu_experts, gap_ms, runner,
                                                       n_threads, g, (gate, up, down))
                    if step >= warmup:
                        times[setting].append((elapsed, distinct))
                        if running:
                            on_runner[setting].append(running.seconds)
        if gemm_min_pairs:
            native.set_gemm_min_pairs(given)
        for setting in settings:
            rows.append(_row(recipe, kernel, (tg, tu, td), n_threads, tokens, pool, cpu_experts, gap_ms,
                             runner, steps, times[setting], on_runner[setting], expert_bytes, setting))
    return rows


def _call(cpu: CpuKernels, kernel: str, x: torch.Tensor, pool: int, cpu_experts: int, gap_ms: float,
          runner: bool, n_threads: int, g: torch.Generator, experts_: tuple) -> tuple[float, object, int]:
    """One timed call on fresh random ids: seconds, the runner's call (or None), experts used."""
    gate, up, down = experts_
    tokens = x.shape[0]
    # each token its own random choice, as concurrent streams (prefill shares more)
    ids = torch.stack([torch.randperm(pool, generator=g)[:N_USED] for _ in range(tokens)])
    ids[:, cpu_experts:] = SKIPPED_SLOT  # computed elsewhere (the GPU share)
    weights = torch.rand(tokens, N_USED, generator=g)
    if gap_ms:
        time.sleep(gap_ms / 1e3)
    start = time.perf_counter()
    # as a shared decode call: one thread fewer, leaving a core to the waiting caller
    running = runner and cpu.start_moe(x, ids, weights, gate, up, down, n_threads=max(1, n_threads - 1))
    if running:
        running.result()
    else:
        cpu.moe(x, ids, weights, gate, up, down, own=kernel == "tandem")
    return time.perf_counter() - start, running or None, ids[ids != SKIPPED_SLOT].unique().numel()


def _row(recipe, kernel, types, n_threads, tokens, pool, cpu_experts, gap_ms, runner, steps, times,
         on_runner, expert_bytes, gemm_min_pairs) -> dict:
    median = statistics.median(t for t, _ in times)
    distinct = statistics.mean(n for _, n in times)
    row = {
        "recipe": recipe, "kernel": kernel, "types": [t.name for t in types],
        "threads": n_threads, "tokens": tokens, "pool": pool, "cpu_experts": cpu_experts,
        "gap_ms": gap_ms, "runner": runner, "steps": steps, "gemm_min_pairs": gemm_min_pairs,
        "median_ms": median * 1e3,
        # the op alone, without the hand-over to the runner and back (runner calls only)
        "median_op_ms_on_runner": statistics.median(on_runner) * 1e3 if on_runner else None,
        "min_ms": min(t for t, _ in times) * 1e3, "distinct_experts_per_step": distinct,
        "expert_bytes_per_step": distinct * expert_bytes,
        "gb_per_s": distinct * expert_bytes / median / 1e9,
    }
    print(f"{recipe:9s} {kernel:6s} tokens={tokens:2d} pool={pool:3d} experts={cpu_experts} "
          f"gap={gap_ms:g}ms runner={int(runner)} threads={n_threads:3d}"
          + (f" min_pairs={gemm_min_pairs or 'default'}" if gemm_min_pairs is not None else "")
          + f"  {median * 1e3:8.2f} ms  {row['gb_per_s']:7.2f} GB/s"
          + (f"  (op {row['median_op_ms_on_runner']:.2f} ms on the runner)" if on_runner else ""),
          flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--threads", nargs="+", type=int,
                        default=sorted({1, 2, default_threads()}))
    parser.add_argument("--kernels", nargs="+", default=["ggml", "tandem"], choices=["ggml", "tandem"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[1],
                        help="tokens per step, each with its own expert choice (concurrent streams)")
    parser.add_argument("--pool", type=int, default=N_EXPERT,
                        help="experts the tokens choose from (the first N; default all)")
    parser.add_argument("--cpu-experts", nargs="+", type=int, default=[N_USED],
                        help="of each token's 8 experts, how many the op computes (the rest skipped)")
    parser.add_argument("--gap-ms", nargs="+", type=float, default=[0.0],
                        help="idle milliseconds before each call")
    parser.add_argument("--runner", action="store_true",
                        help="start each call on the kernels' runner thread (tandem's kernels)")
    parser.add_argument("--main-omp-threads", type=int, default=None,
                        help="after the RAM reading (torch's sum on all threads), resize the main "
                             "thread's OpenMP team to this many threads: libgomp counts the threads "
                             "of every team, the runner's too, and past the CPUs' count its waiting "
                             "threads sleep at once (a futex wake at every barrier)")
    parser.add_argument("--gemm-min-pairs", nargs="+", type=int, default=None,
                        help="fewest pairs of an expert that take the GEMM path (0: the default, 4 on "
                             "AMX, 16 on AVX-512), each setting in turn call by call in this process")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if not N_USED <= args.pool <= N_EXPERT:
        parser.error(f"--pool takes {N_USED}..{N_EXPERT} (each token picks {N_USED} distinct experts)")
    if not all(1 <= n <= N_USED for n in args.cpu_experts):
        parser.error(f"--cpu-experts takes 1..{N_USED}")
    if any(n < N_USED for n in args.cpu_experts) and "ggml" in args.kernels:
        parser.error("--cpu-experts below 8 skips slots, which only tandem's kernels do: --kernels tandem")
    if args.runner and "ggml" in args.kernels:
        parser.error("--runner starts tandem's kernels only: --kernels tandem")

    info = machine.describe()
    bandwidth = machine.ram_read_gbps()
    if args.main_omp_threads:
        resize_openmp_team(args.main_omp_threads)
    print(f"{info['cpu']} ({info['cpu_cores']} cores, {', '.join(info['cpu_features'])}), "
          f"RAM read {bandwidth:.1f} GB/s", flush=True)
    results = [row for recipe in args.recipes for kernel in args.kernels for tokens in args.tokens
               for n in args.cpu_experts for gap in args.gap_ms
               for row in run(recipe, kernel, args.threads, tokens, args.steps, args.warmup, args.pool,
                              n, gap, args.runner, args.gemm_min_pairs)]
    for row in results:
        row["share_of_ram_bandwidth"] = row["gb_per_s"] / bandwidth
        # Decode speed of a 58-MoE-layer R1 if the experts ran at this rate (all streams together).
        row["r1_58_layer_tok_per_s_at_this_rate"] = row["tokens"] * 1e3 / (58 * row["median_ms"])
    now = datetime.now(UTC)
    record = {
        **machine.record_header("moe_decode", now, device=info),
        "ram_read_gb_per_s": bandwidth,
        # the environment the op's threads ran under (A/B runs vary these): what `tandem bench`
        # records of OpenMP and of the kernels' variants
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", *OPENMP_ENV, *native.KERNEL_ENV)},
        "main_omp_threads": args.main_omp_threads,
        "shapes": {"experts": N_EXPERT, "used": N_USED, "d_model": D_MODEL, "n_ff": N_FF},
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    host = (info["host"] or "host").split(".")[0]
    path = args.out / f"moe_decode-{host}-{now:%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
