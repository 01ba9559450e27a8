"""`tandem synth`: write a GGUF with random weights for a shape preset and a quant recipe.

Ways to fill a tensor: `quantized` draws random floats and quantizes them with ggml (an
importance matrix of ones for the IQ types that need one); `random` writes random valid blocks
directly (see random_blocks), for benchmark files of tens of GB. `auto` picks `random` for
tensors over RANDOM_ABOVE bytes of float32. `pool` is `random` whose routed-expert tensors
(95% of an R1 file's bytes) repeat POOL_BYTES of random blocks: the kernels' speed does not
depend on the weights' values, and drawing ~50 GB of random blocks took 5-8 minutes of the GPU
machine's time per session (one core), writing them ~1. Every expert's bytes still lie at their
own addresses, so caches meet what they would meet. Tensors are generated and written one at a
time, so memory stays at one tensor however large the file.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tandem.bench import presets, recipes
from tandem.bench.random_blocks import can_fill, random_blocks
from tandem.errors import TandemError
from tandem.gguf import deepseek2
from tandem.gguf.config import DeepSeek2Config
from tandem.gguf.types import GGMLType, block_bytes, block_size, tensor_bytes
from tandem.gguf.writer import write_gguf
from tandem.kernels.quantize import quantize
from tandem.placement.rules import EXPERTS

log = logging.getLogger(__name__)

RANDOM_ABOVE = 64 << 20  # float32 bytes of a tensor above which `auto` writes random blocks
QUANTIZE_ROWS = 4096  # rows quantized per ggml call, to bound the float32 scratch
POOL_BYTES = 256 << 20  # random blocks a routed-expert tensor repeats with fill `pool`
FILLS = ("auto", "random", "pool", "quantized")


@dataclass
class SynthPlan:
    shape: DeepSeek2Config
    recipe: str
    split_kv_b: bool = False
    tensors: list[tuple[str, tuple[int, ...], GGMLType]] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(tensor_bytes(t, s) for _, s, t in self.tensors)


def plan(preset: str = "tiny", recipe: str = "q8_0", n_layers: int | None = None,
         n_dense_layers: int | None = None, split_kv_b: bool = False,
         overrides: list[str] = ()) -> SynthPlan:
    shape = presets.shape_for(preset, n_layers, n_dense_layers)
    rules = recipes.recipe_rules(recipe, recipes.parse_overrides(list(overrides)))
    result = SynthPlan(shape, recipe, split_kv_b)
    for name, tshape in deepseek2.tensor_shapes(shape, split_kv_b):
        result.tensors.append((name, tshape, recipes.tensor_type(name, tshape, rules)))
    return result


def write(synth: SynthPlan, out: str | Path, *, fill: str = "auto", seed: int = 0,
          split_max_size: int = 0, split_max_tensors: int = 0,
          on_tensor: Callable[[str, int], None] | None = None) -> list[Path]:
    """Write the planned file (or split set); returns the paths written."""
    if fill not in FILLS:
        raise TandemError(f"fill must be one of {', '.join(FILLS)}, got {fill!r}")
    metadata = {
        "general.name": f"tandem synth {synth.recipe} ({synth.shape.n_layers} layers)",
        "general.quantized_by": "tandem synth",
        **deepseek2.metadata(synth.shape, synth.split_kv_b),
        **placeholder_vocabulary(synth.shape.n_vocab),
    }
    rng = np.random.default_rng(seed)
    return write_gguf(out, deepseek2.ARCH, metadata, synth.tensors,
                      lambda name, shape, t: _tensor_bytes(name, shape, t, fill, rng),
                      split_max_size=split_max_size, split_max_tensors=split_max_tensors,
                      on_tensor=on_tensor)


def placeholder_vocabulary(n_vocab: int) -> dict[str, object]:
    """A byte-level BPE vocabulary of the model's size, so that tools which insist on one
    (llama.cpp) load the file: the 256 byte symbols, filler tokens, one merge."""
    from tokenizers.pre_tokenizers import ByteLevel

    normal = [*sorted(ByteLevel.alphabet()), "Ġt"]
    tokens = normal + [f"<|synth_{i}|>" for i in range(n_vocab - len(normal))]
    return {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "deepseek-v3",
        "tokenizer.ggml.tokens": tokens[:n_vocab],
        "tokenizer.ggml.token_type": ([1] * len(normal) + [4] * n_vocab)[:n_vocab],
        "tokenizer.ggml.merges": ["Ġ t"],
        "tokenizer.ggml.bos_token_id": n_vocab - 2, "tokenizer.ggml.eos_token_id": n_vocab - 1,
    }


def _tensor_bytes(name: str, shape: tuple[int, ...], t: GGMLType, fill: str,
                  rng: np.random.Generator) -> np.ndarray:
    n = int(np.prod(shape, dtype=np.int64))
    # norms stay near 1 whatever the fill: random ones (std 0.02) shrink every normalized input
    # 50-fold, and the router's scores then vary too little between tokens to outweigh its
    # bias, so every token would pick the same experts (nothing like a trained model's routing)
    random = not _is_norm(name) and (fill in ("random", "pool") or (fill == "auto" and 4 * n > RANDOM_ABOVE))
    if random and can_fill(t):
        if fill == "pool" and re.search(EXPERTS, name):
            return _pooled(t, n // block_size(t), rng)
        return random_blocks(t, n // block_size(t), rng).reshape(-1)
    if random:
        log.info("%s: no random-block writer for %s, quantizing random floats", name, t.name)
    return _quantized(shape, t, name, rng)


def _quantized(shape: tuple[int, ...], t: GGMLType, name: str, rng: np.random.Generator):
    row = shape[-1]
    rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    is_norm = _is_norm(name)
    parts = []
    for start in range(0, rows, QUANTIZE_ROWS):
        noise = rng.standard_normal((min(QUANTIZE_ROWS, rows - start), row), dtype=np.float32)
        values = 1.0 + 0.1 * noise if is_norm else 0.02 * noise  # norms near 1, weights small
        parts.append(quantize(values, t).reshape(-1))
    return np.concatenate(parts)


def _pooled(t: GGMLType, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """n_blocks valid blocks: up to POOL_BYTES of random ones, repeated."""
    pool = random_blocks(t, max(1, min(n_blocks, POOL_BYTES // block_bytes(t))), rng)
    return np.resize(pool, (n_blocks, pool.shape[1])).reshape(-1)  # whole blocks, cyclically


def _is_norm(name: str) -> bool:
    return name.endswith("norm.weight")
