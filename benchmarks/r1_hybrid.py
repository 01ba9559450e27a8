"""Load a DeepSeek-R1-shaped GGUF with the default hybrid rules, generate, report memory.

Writes the file with `tandem synth` first if it is missing (full R1 dimensions, 3 dense +
N MoE layers). Reports load time, per-layer VRAM and RAM from the memory plan, what CUDA and
the process actually hold, prefill and decode speed, and the projection of both memories to
the full 61-layer model at the asked context.

    python benchmarks/r1_hybrid.py --file /tmp/r1-ud-iq1_s.gguf --layers 5 --ctx 8192
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from tandem.bench import machine, synth
from tandem.runtime.architectures import ARCHITECTURES
from tandem.runtime.llm import LLM

FULL_LAYERS, FULL_DENSE = 61, 3


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def per_layer_kind(plan, n_dense: int) -> dict:
    """Bytes per device for a dense layer, a MoE layer and the rest (embedding, head)."""
    def sample(kind_layers):
        rows = [plan.per_layer[f"blk.{i}"] for i in kind_layers]
        devices = {d for r in rows for d in r}
        return {d: max(r.get(d, 0) for r in rows) for d in devices}
    layers = sorted(int(k.split(".")[1]) for k in plan.per_layer if k.startswith("blk."))
    return {"dense": sample([i for i in layers if i < n_dense]),
            "moe": sample([i for i in layers if i >= n_dense]),
            "other": dict(plan.per_layer.get("other", {}))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=5)
    parser.add_argument("--recipe", default="ud-iq1_s")
    parser.add_argument("--ctx", type=int, default=8192)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    if not args.file.exists():
        start = time.perf_counter()
        synth.write(synth.plan("r1", args.recipe, n_layers=args.layers), args.file, fill="random")
        print(f"synth: wrote {args.file} in {time.perf_counter() - start:.1f} s", flush=True)

    rss_before = rss_bytes()
    start = time.perf_counter()
    llm = LLM(args.file, ctx_size=args.ctx, n_threads=args.threads)
    load_s = time.perf_counter() - start
    c = llm.config
    cuda = torch.cuda.is_available()
    allocated = torch.cuda.memory_allocated() if cuda else 0

    tokens = torch.randint(0, c.n_vocab, (args.prompt_tokens,),
                           generator=torch.Generator().manual_seed(0)).tolist()
    llm.generate(tokens[:8], 4)  # warm-up: CUDA context, kernels, first page faults
    new = llm.generate(tokens, args.new_tokens)
    timings = llm.last_timings

    kinds = per_layer_kind(llm.memory, c.n_dense_layers)
    kv_per_layer = ARCHITECTURES["deepseek2"].cache_layer_bytes(c, args.ctx, torch.float32)
    gpu = "cuda" if cuda else "cpu"
    projected = {}
    for device in {"cpu", gpu}:
        proj = (kinds["other"].get(device, 0) + FULL_DENSE * kinds["dense"].get(device, 0)
                + (FULL_LAYERS - FULL_DENSE) * kinds["moe"].get(device, 0))
        if device == gpu:
            proj += FULL_LAYERS * kv_per_layer
        projected[device] = proj
    record = {
        **machine.record_header("r1_hybrid", datetime.now(UTC)),
        "file": {"path": str(args.file), "recipe": args.recipe, "layers": c.n_layers,
                 "dense_layers": c.n_dense_layers, "bytes": args.file.stat().st_size},
        "ctx": args.ctx,
        "load_s": load_s,
        "plan": {"resident": dict(llm.memory.resident), "mapped": dict(llm.memory.mapped)},
        "per_layer": kinds,
        "kv_bytes_per_layer": kv_per_layer,
        "measured": {"cuda_allocated": allocated,
                     "cuda_max_allocated": torch.cuda.max_memory_allocated() if cuda else 0,
                     "rss_after_load": rss_bytes(), "rss_before_load": rss_before,
                     "max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024},
        "prefill_tokens": timings.prompt_tokens, "prefill_s": timings.prompt_s,
        "prefill_tok_per_s": timings.prompt_tok_per_s,
        "decode_tokens": timings.decoded_tokens, "decode_s": timings.decode_s,
        "decode_tok_per_s": timings.decode_tok_per_s, "new_tokens": len(new),
        "projected_61_layers": {"ctx": args.ctx, "bytes": projected,
                                "note": "dense weights dequantized to bf16 on the GPU (default "
                                        "rules); experts and token_embd read in place (mapped)"},
    }
    print(json.dumps({k: record[k] for k in ("load_s", "per_layer", "measured", "prefill_tok_per_s",
                                              "decode_tok_per_s", "projected_61_layers")}, indent=1))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"r1_hybrid-{args.recipe}-{datetime.now(UTC):%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
    llm.close()


if __name__ == "__main__":
    main()
