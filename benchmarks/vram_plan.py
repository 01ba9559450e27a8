"""VRAM the planner gives the full model's GPU weights under a rule set, without a file:
`tandem synth`'s tensor table for a preset and recipe, placed by the rules, summed per device.

    python benchmarks/vram_plan.py [--preset r1] [--recipe ud-iq1_s] [--rules A.yaml B.yaml]

Prints, per rule set (default: the default rules and benchmarks/rules/gpu-quantized-weights.yaml),
the GPU bytes of weight copies and the largest bf16 copy kernel quant makes per prompt matmul.
The KV cache, expert streaming slots and the GPU share's slots come on top (r1_hybrid.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tandem.bench import synth
from tandem.gguf.reader import TensorInfo
from tandem.gguf.types import tensor_bytes
from tandem.placement.planner import plan_memory, quant_copy_bytes
from tandem.placement.rules import assign, default_rules, load_rules

QUANT_RULES = Path(__file__).parent / "rules" / "gpu-quantized-weights.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="r1")
    parser.add_argument("--recipe", default="ud-iq1_s")
    parser.add_argument("--rules", nargs="*", type=Path, default=[None, QUANT_RULES],
                        help="rule files (none given: the default rules and the quant ones)")
    args = parser.parse_args()
    planned = synth.plan(args.preset, args.recipe)
    tensors = {n: TensorInfo(n, s, t, tensor_bytes(t, s), Path("planned"), 0) for n, s, t in planned.tensors}
    types = {n: info.ggml_type for n, info in tensors.items()}
    print(f"{args.preset} {args.recipe}: {planned.shape.n_layers} layers")
    for path in args.rules:
        rules = default_rules(True) if path is None else load_rules(path)
        placed = assign(types, rules, devices={"cpu", "cuda", "cuda:0"})
        gpu = plan_memory(tensors, placed, {}).resident.get("cuda", 0)
        copy = quant_copy_bytes(tensors, placed).get("cuda", 0)
        print(f"  {path or 'default rules'}: GPU weights {gpu / 1e9:.2f} GB, "
              f"bf16 copy per prompt matmul {copy / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
