"""The Triton matvec of GPU weights kept in Q4_K / Q6_K (kernel quant) at DeepSeek R1's shapes,
with and without splitting rows' blocks over programs (split-K), against cuBLAS on bfloat16
copies of the same weights: time per call as decode runs them, inside a CUDA graph (no launch
gaps of the host), and GB/s of the bytes each reads.

    python benchmarks/quant_matvec.py [--rows 1] [--calls 20] [--sweep] [--out DIR]

Variants: `bf16` (cuBLAS), `whole_rows` and `split` (kernel `values`), `q8` (that kernel,
split as `split`; its error includes its 8-bit activations') and `default` (the kernel and tile
triton_matvec.kernel_for and Q8_TILES choose); --sweep adds `<kernel>-r<R>-w<W>` for tile
heights R and warps W and `q8-s<S>` for pipeline stages S (SWEEP), and names each kernel's
fastest per shape.

Types as in the ud-iq1_s recipe (tandem.bench.recipes). `moe_layer_ms` sums the shapes one MoE layer
reads per token (attention and shared expert). Needs a GPU and Triton; writes
quant_matvec-<host>-<date>.json (device, commit, command).
"""

from __future__ import annotations

import argparse
import functools
import statistics
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tandem.bench import machine
from tandem.bench.random_blocks import random_blocks
from tandem.gguf.types import GGMLType, block_size
from tandem.kernels import torch_dequant, triton_matvec

Q4, Q6 = GGMLType.Q4_K, GGMLType.Q6_K
# name: (rows out, row length, type, read by every MoE layer)
SHAPES = {
    "q_a": (1536, 7168, Q4, True),
    "q_b": (24576, 1536, Q4, True),
    "kv_a": (576, 7168, Q4, True),
    "kv_b": (32768, 512, Q6, True),
    "o": (7168, 16384, Q4, True),
    "shexp_gate": (2048, 7168, Q4, True),
    "shexp_up": (2048, 7168, Q4, True),
    "shexp_down": (7168, 2048, Q4, True),
    "dense_up": (18432, 7168, Q4, False),
    "dense_down": (7168, 18432, Q6, False),
    "head": (129280, 7168, Q6, False),
}
# (kernel, settings): each kernel at tile heights x warps, q8 at pipeline stages too (its
# default tile)
SWEEP = ([("values", {"rows_per_program": r, "warps": w}) for r in (8, 16, 32) for w in (2, 4, 8)]
         + [("q8", {"rows_per_program": r, "warps": w}) for r in (16, 32, 64, 128) for w in (2, 4, 8)]
         + [("q8", {"stages": st}) for st in (1, 2, 3, 4)])
SHORT = {"rows_per_program": "r", "warps": "w", "stages": "s"}


def sweep_name(kernel: str, settings: dict) -> str:
    return kernel + "-" + "-".join(f"{SHORT[k]}{v}" for k, v in settings.items())


def per_call_ms(fn, calls: int, reps: int = 20) -> float:
    """fn()'s time on the GPU, in ms a call: median over reps of a CUDA graph of `calls` calls."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    return float((y - reference).norm() / reference.norm())


def variants(raw, t: GGMLType, x: torch.Tensor, n_out: int, bf16: torch.Tensor, sweep: bool) -> dict:
    """name: a call of that variant."""
    runs = {"bf16": lambda: F.linear(x.to(torch.bfloat16), bf16),
            "whole_rows": lambda: triton_matvec.matvec(raw, t, x, n_out, splits=1, kernel="values"),
            "split": lambda: triton_matvec.matvec(raw, t, x, n_out, kernel="values"),
            "q8": lambda: triton_matvec.matvec(raw, t, x, n_out, kernel="q8"),
            "default": lambda: triton_matvec.matvec(raw, t, x, n_out)}
    for kernel, settings in SWEEP if sweep else ():
        runs[sweep_name(kernel, settings)] = functools.partial(triton_matvec.matvec, raw, t, x, n_out,
                                                               kernel=kernel, **settings)
    return runs


def measure(n_out: int, n_in: int, t: GGMLType, rows: int, calls: int, rng, sweep: bool = False) -> dict:
    """One weight shape: ms a call and relative errors (against float64 products of the
    dequantized weight) of each variant."""
    blocks = random_blocks(t, n_out * n_in // block_size(t), rng)
    raw = torch.from_numpy(blocks.reshape(-1)).cuda()
    weight = torch_dequant.dequantize(raw, t, (n_out, n_in), dtype=torch.float32)
    bf16 = weight.to(torch.bfloat16)
    x = torch.randn(rows, n_in, device="cuda")
    reference = (x.double() @ weight.double().T).float()
    del weight
    runs = variants(raw, t, x, n_out, bf16, sweep)
    ms = {k: per_call_ms(fn, calls) for k, fn in runs.items()}
    read = {k: bf16.numel() * 2 if k == "bf16" else raw.numel() for k in runs}
    row = {"type": t.name, "shape": [n_out, n_in], "splits": triton_matvec.splits_for(n_out, n_in),
           "bytes": read, "ms": ms, "gb_per_s": {k: read[k] / ms[k] / 1e6 for k in runs},
           "relative_error": {k: relative_error(fn().float(), reference) for k, fn in runs.items()}}
    if sweep:
        for kernel in triton_matvec.KERNELS:
            row[f"fastest_{kernel}"] = min((k for k in ms if k.startswith(kernel)), key=ms.get)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1, help="input rows (a decode step's sequences)")
    parser.add_argument("--calls", type=int, default=20, help="calls per CUDA graph")
    parser.add_argument("--sweep", action="store_true", help="the kernels at SWEEP's settings")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    rng = np.random.default_rng(0)
    results, layer = {}, {}
    for name, (n_out, n_in, t, per_layer) in SHAPES.items():
        row = results[name] = measure(n_out, n_in, t, args.rows, args.calls, rng, args.sweep)
        if per_layer:
            for k, ms in row["ms"].items():
                layer[k] = layer.get(k, 0.0) + ms
        fastest = [row[f"fastest_{k}"] for k in triton_matvec.KERNELS] if args.sweep else []
        shown = ["bf16", "whole_rows", "split", "q8", "default", *fastest]
        ms, rate, err = row["ms"], row["gb_per_s"], row["relative_error"]
        print(f"{name:11s} {t.name} {n_out:6d}x{n_in:<5d} split {row['splits']:2d}: " + " | ".join(
            f"{k} {ms[k] * 1e3:7.1f} us ({rate[k]:5.0f} GB/s, err {err[k]:.0e})"
            for k in dict.fromkeys(shown)), flush=True)
    print("one MoE layer's attention + shared expert: "
          + ", ".join(f"{k} {ms:.3f} ms" for k, ms in layer.items()))
    now = datetime.now(UTC)
    record = {**machine.record_header("quant_matvec", now), "input_rows": args.rows,
              "calls_per_graph": args.calls, "results": results, "moe_layer_ms": layer}
    print(f"wrote {machine.write_record(record, args.out, now)}")


if __name__ == "__main__":
    main()
