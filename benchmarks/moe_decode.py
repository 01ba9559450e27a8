"""MoE op for one decode token with DeepSeek-R1 expert shapes: GB/s of expert bytes read.

256 experts of 7168 x 2048 (gate, up) and 2048 -> 7168 (down), 8 chosen per token, a fresh
random choice every step so the bytes come from RAM, not cache. Expert blocks are random but
valid (tandem.bench.random_blocks); the kernels read them at the same speed as real weights.

    python benchmarks/moe_decode.py [--recipes ud-iq1_s q4_k_m] [--kernels ggml tandem]
                                    [--threads 1 2 16] [--tokens 1 8] [--steps 30] [--pool 16]

--pool N: every token picks its experts among the first N only (a prompt whose tokens share
experts, as the synthetic files' routing did before their norms were kept near 1), so each
expert serves many tokens.

Prints a table and writes benchmarks/results/moe_decode-<host>-<date>.json.
"""

from __future__ import annotations

import argparse
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
from tandem.gguf.types import GGMLType, block_size
from tandem.kernels.cpu import CpuKernels, default_threads
from tandem.kernels.tensors import QuantTensor

N_EXPERT, N_USED, D_MODEL, N_FF = 256, 8, 7168, 2048
RECIPES = {
    "ud-iq1_s": (GGMLType.IQ1_S, GGMLType.IQ1_S, GGMLType.IQ2_XXS),
    "q4_k_m": (GGMLType.Q4_K, GGMLType.Q4_K, GGMLType.Q6_K),
}


def experts(t: GGMLType, shape: tuple[int, int, int], rng) -> QuantTensor:
    n = shape[0] * shape[1] * shape[2]
    return QuantTensor(t, shape, random_blocks(t, n // block_size(t), rng).reshape(-1))


def run(recipe: str, kernel: str, thread_counts: list[int], tokens: int, steps: int,
        warmup: int, pool: int = N_EXPERT) -> list[dict]:
    rng = np.random.default_rng(0)
    tg, tu, td = RECIPES[recipe]
    gate = experts(tg, (N_EXPERT, N_FF, D_MODEL), rng)
    up = experts(tu, (N_EXPERT, N_FF, D_MODEL), rng)
    down = experts(td, (N_EXPERT, D_MODEL, N_FF), rng)
    expert_bytes = gate.expert_bytes() + up.expert_bytes() + down.expert_bytes()
    x = torch.randn(tokens, D_MODEL)
    g = torch.Generator().manual_seed(0)
    rows = []
    for n_threads in thread_counts:
        with CpuKernels(n_threads) as cpu:
            times = []
            for step in range(warmup + steps):
                # each token its own random choice, as concurrent streams (prefill shares more)
                ids = torch.stack([torch.randperm(pool, generator=g)[:N_USED] for _ in range(tokens)])
                weights = torch.rand(tokens, N_USED, generator=g)
                start = time.perf_counter()
                cpu.moe(x, ids, weights, gate, up, down, own=kernel == "tandem")
                if step >= warmup:
                    times.append((time.perf_counter() - start, ids.unique().numel()))
        median = statistics.median(t for t, _ in times)
        distinct = statistics.mean(n for _, n in times)
        rows.append({
            "recipe": recipe, "kernel": kernel, "types": [tg.name, tu.name, td.name],
            "threads": n_threads, "tokens": tokens, "pool": pool, "steps": steps, "median_ms": median * 1e3,
            "min_ms": min(t for t, _ in times) * 1e3, "distinct_experts_per_step": distinct,
            "expert_bytes_per_step": distinct * expert_bytes,
            "gb_per_s": distinct * expert_bytes / median / 1e9,
        })
        print(f"{recipe:9s} {kernel:6s} tokens={tokens:2d} pool={pool:3d} threads={n_threads:3d}  "
              f"{median * 1e3:8.2f} ms  {rows[-1]['gb_per_s']:7.2f} GB/s", flush=True)
    return rows


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
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    info = machine.describe()
    bandwidth = machine.ram_read_gbps()
    print(f"{info['cpu']} ({info['cpu_cores']} cores, {', '.join(info['cpu_features'])}), "
          f"RAM read {bandwidth:.1f} GB/s", flush=True)
    results = [row for recipe in args.recipes for kernel in args.kernels for tokens in args.tokens
               for row in run(recipe, kernel, args.threads, tokens, args.steps, args.warmup, args.pool)]
    for row in results:
        row["share_of_ram_bandwidth"] = row["gb_per_s"] / bandwidth
        # Decode speed of a 58-MoE-layer R1 if the experts ran at this rate (all streams together).
        row["r1_58_layer_tok_per_s_at_this_rate"] = row["tokens"] * 1e3 / (58 * row["median_ms"])
    now = datetime.now(UTC)
    record = {
        **machine.record_header("moe_decode", now, device=info),
        "ram_read_gb_per_s": bandwidth,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
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
