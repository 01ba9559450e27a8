"""The GPU share's Triton kernels reading R1-shaped experts in place (TANDEM_SHARE_DIRECT=1)
from a pinned, mapped file over PCIe, against the same kernels reading them in VRAM and
against DMA copies of the same bytes (what the share does by default before its kernels).

    python benchmarks/share_in_place.py [--recipe ud-iq1_s] [--experts 1 2 4 6] [--rows 16 8 4]
                                        [--out DIR]

--rows: weight rows per program of the kernels, in place and in VRAM, each in turn (fewer rows,
more programs: more loads in flight). Also timed: `gather` (share_triton's coalesced copy
kernel) from the mapping into VRAM alone, and followed by the kernels there (`staged`): one
graph-capturable launch sequence that needs no host copies either.

The file (64 experts of random valid blocks) goes to /dev/shm and is registered with CUDA as
gpu_share registers a model's mapping. Needs a GPU and Triton. Prints a line per expert count
and writes share_in_place-<host>-<date>.json (device, commit, command).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from tandem.bench import machine
from tandem.bench.random_blocks import random_blocks
from tandem.gguf.types import GGMLType, block_bytes, block_size
from tandem.kernels import cudart, share_triton
from tandem.kernels.gpu_share import PinnedMappings

D_MODEL, N_FF, N_FILE = 7168, 2048, 64
RECIPES = {"ud-iq1_s": (GGMLType.IQ1_S, GGMLType.IQ1_S, GGMLType.IQ2_XXS),
           "q4_k_m": (GGMLType.Q4_K, GGMLType.Q4_K, GGMLType.Q6_K)}


def expert_file(types, folder: Path, rng) -> tuple[np.memmap, tuple[int, int, int]]:
    """N_FILE experts back to back (gate, up, down each) in a file under `folder`, mapped
    read-only; the bytes of each matrix of one expert."""
    weights = [N_FF * D_MODEL] * 3
    sizes = tuple(n // block_size(t) * block_bytes(t) for n, t in zip(weights, types, strict=True))
    path = folder / "experts.bin"
    with path.open("wb") as f:
        for _ in range(N_FILE):
            for t, n in zip(types, weights, strict=True):
                f.write(random_blocks(t, n // block_size(t), rng).tobytes())
    return np.memmap(path, dtype=np.uint8, mode="r"), sizes


def median_ms(fn, *args, reps: int = 20) -> float:
    """fn(*args)'s median time on the GPU after 3 warm-ups, in ms."""
    for _ in range(3):
        fn(*args)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="ud-iq1_s", choices=list(RECIPES))
    parser.add_argument("--experts", nargs="+", type=int, default=[1, 2, 4, 6])
    parser.add_argument("--rows", nargs="+", type=int, default=[16, 8, 4])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    types, rng = RECIPES[args.recipe], np.random.default_rng(0)
    runtime, stream = cudart.runtime(), torch.cuda.current_stream()
    with tempfile.TemporaryDirectory(dir="/dev/shm") as folder:
        mapped, sizes = expert_file(types, Path(folder), rng)
        per = sum(sizes)
        pins = PinnedMappings([mapped], mapped=True)
        host = mapped.ctypes.data
        in_vram = torch.from_numpy(np.array(mapped)).cuda()
        slots = torch.empty(max(args.experts) * per, dtype=torch.uint8, device="cuda")
        x = torch.randn(D_MODEL, device="cuda")
        rows = []
        for n in args.experts:
            experts = sorted(rng.choice(N_FILE, n, replace=False).tolist())
            weight = torch.rand(n, device="cuda")

            def table(start: int, experts=experts) -> torch.Tensor:
                return torch.tensor([[start + e * per + sum(sizes[:m]) for e in experts] for m in range(3)],
                                    dtype=torch.int64, device="cuda")

            at_file, at_vram = table(pins.device_address(host)), table(in_vram.data_ptr())
            same = torch.equal(share_triton.experts_at(types, at_file, sizes, x, weight),
                               share_triton.experts_at(types, at_vram, sizes, x, weight))

            def copies(experts=experts) -> None:
                for i, e in enumerate(experts):
                    runtime.copy_to_device(slots.data_ptr() + i * per, host + e * per, per,
                                           stream.cuda_stream)

            def kernels(at: torch.Tensor, rows: int | None = None, weight=weight) -> None:
                share_triton.experts_at(types, at, sizes, x, weight, rows=rows)

            def staged(at: torch.Tensor, weight=weight) -> None:
                kernels(share_triton.gather(at, sizes, slots), weight=weight)

            row = {
                "experts": n,
                "in_place_ms_by_rows": {r: median_ms(kernels, at_file, r) for r in args.rows},
                "vram_ms": median_ms(kernels, at_vram),
                "vram_ms_by_rows": {r: median_ms(kernels, at_vram, r) for r in args.rows},
                "dma_copies_ms": median_ms(copies),
                "gather_ms": median_ms(share_triton.gather, at_file, sizes, slots),
                "staged_ms": median_ms(staged, at_file),
                "same_result": same,
            }
            best = min(row["in_place_ms_by_rows"].values())
            row["in_place_gb_per_s"] = n * per / best / 1e6
            row["dma_gb_per_s"] = n * per / row["dma_copies_ms"] / 1e6
            row["gather_gb_per_s"] = n * per / row["gather_ms"] / 1e6
            rows.append(row)
            by_rows = ", ".join(f"{r} rows {ms:.3f}" for r, ms in row["in_place_ms_by_rows"].items())
            by_rows_vram = ", ".join(f"{r} rows {ms:.3f}" for r, ms in row["vram_ms_by_rows"].items())
            print(f"{n} experts: in place {by_rows} ms ({row['in_place_gb_per_s']:.1f} GB/s at best); "
                  f"in VRAM {row['vram_ms']:.3f} ms ({by_rows_vram}); "
                  f"DMA copies {row['dma_copies_ms']:.3f} ms "
                  f"({row['dma_gb_per_s']:.1f} GB/s); gather {row['gather_ms']:.3f} ms "
                  f"({row['gather_gb_per_s']:.1f} GB/s), then the kernels: {row['staged_ms']:.3f} ms; "
                  f"same result: {same}", flush=True)
        pins.close()
    now = datetime.now(UTC)
    record = {**machine.record_header("share_in_place", now), "recipe": args.recipe,
              "expert_bytes": per, "results": rows}
    print(f"wrote {machine.write_record(record, args.out, now)}")


if __name__ == "__main__":
    main()
