"""Placement rules: which device and kernel each tensor gets.

A rule list is YAML, first match wins, like KTransformers' optimize rules but shorter:

    - match: 'ffn_(gate|up|down)_exps'   # regex, searched in the GGUF tensor name
      device: cpu                       # cpu, cuda or cuda:N
      kernel: cpu                       # cpu or ggml (read in place from the file), torch or quant
    - match: '.'
      device: cuda
      kernel: torch
      dtype: auto                       # auto, float32, bfloat16 or float16 (torch kernel)

Kernels cpu and ggml read their tensors in place from the mapped file: the routed experts (CPU
MoE op; cpu takes tandem's own kernels where they cover the types, IQ1_S, IQ2_XXS, Q4_K and
Q6_K, and ggml's for the rest; ggml takes ggml's only) and the token embedding (rows dequantized as they are
looked up); everything else takes torch. `auto` keeps F32/F16/BF16 tensors in
their own precision and turns quantized ones into bfloat16 on a GPU, float32 on the CPU.
Kernel quant keeps the plain linear weights (LINEAR_WEIGHTS: projections, dense and shared FFN,
head) in their stored ggml type on the device, dequantized on the fly (kernels.quant_linear);
the rest of what it matches is placed as torch would place it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from tandem.errors import TandemError
from tandem.gguf.types import GGMLType

KERNELS = ("cpu", "ggml", "torch", "quant")
IN_PLACE_KERNELS = ("cpu", "ggml")  # read from the mapped file on the CPU
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
EXPERTS = r"ffn_(gate|up|down)_exps\."
IN_PLACE = re.compile(EXPERTS + r"|^token_embd\.")  # what kernel ggml can serve
DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")
# weights tandem multiplies as plain linear layers: what kernel quant keeps quantized
LINEAR_WEIGHTS = re.compile(r"(^|\.)(attn_(q|q_a|q_b|k|v|kv_a_mqa|output)|ffn_(gate|up|down)(_shexp)?"
                            r"|output)\.weight$")


class PlacementError(TandemError):
    """Rules that cannot be applied, or a plan that does not fit."""


@dataclass(frozen=True)
class Rule:
    match: str
    device: str
    kernel: str = "torch"
    dtype: str = "auto"
    source: str = "default rules"
    pattern: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        where = f"{self.source}: rule {self.match!r}"
        try:
            object.__setattr__(self, "pattern", re.compile(self.match))
        except re.error as exc:
            raise PlacementError(f"{where}: bad regex ({exc})") from None
        if not DEVICE.match(self.device):
            raise PlacementError(f"{where}: device {self.device!r} is not cpu, cuda or cuda:N")
        if self.kernel not in KERNELS:
            raise PlacementError(f"{where}: kernel {self.kernel!r} is not one of {', '.join(KERNELS)}")
        if self.dtype not in DTYPES:
            raise PlacementError(f"{where}: dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.kernel in IN_PLACE_KERNELS and self.device != "cpu":
            raise PlacementError(f"{where}: kernel {self.kernel} runs on the cpu, not {self.device}")


@dataclass(frozen=True)
class Placement:
    device: torch.device
    kernel: str
    dtype: torch.dtype | None  # torch kernel only
    rule: int  # index of the rule that matched


def default_rules(has_gpu: bool, names: Iterable[str] | None = None, quantized: bool = False) -> list[Rule]:
    """Routed experts on the CPU (tandem's kernels, ggml's for other types); everything else on
    the GPU (or the CPU): bfloat16 copies on a GPU, or with `quantized` the linear weights in
    their stored types (kernel quant, for GPUs the copies would not fit). Given the model's
    tensor names, rules that would place nothing (experts of a dense model) are left out."""
    rest = "cuda" if has_gpu else "cpu"
    rules = [
        Rule(EXPERTS, "cpu", "cpu"),
        # One row per token is read: dequantize those rows from the file, not the whole table.
        Rule(r"^token_embd\.", "cpu", "ggml"),
        Rule(".", rest, "quant" if quantized and has_gpu else "torch"),
    ]
    if names is None:
        return rules
    names = list(names)
    return [r for r in rules if any(r.pattern.search(n) for n in names)]


def load_rules(path: str | Path) -> list[Rule]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise PlacementError(f"{path}: cannot read rules ({exc})") from None
    if not isinstance(data, list) or not data:
        raise PlacementError(f"{path}: rules must be a non-empty YAML list of mappings")
    rules = []
    for i, item in enumerate(data, 1):
        if not isinstance(item, dict) or "match" not in item or "device" not in item:
            raise PlacementError(f"{path}: rule {i} needs 'match' and 'device', got {item!r}")
        unknown = set(item) - {"match", "device", "kernel", "dtype"}
        if unknown:
            raise PlacementError(f"{path}: rule {i} has unknown keys {sorted(unknown)}")
        rules.append(Rule(**{k: str(v) for k, v in item.items()}, source=f"{path} rule {i}"))
    return rules


def available_devices() -> set[str]:
    devices = {"cpu"}
    if torch.cuda.is_available():
        devices |= {"cuda"} | {f"cuda:{i}" for i in range(torch.cuda.device_count())}
    return devices


def assign(tensors: dict[str, GGMLType], rules: list[Rule],
           devices: set[str] | None = None) -> dict[str, Placement]:
    """Placement of every tensor; PlacementError for unusable rules or unplaced tensors."""
    devices = available_devices() if devices is None else devices
    for rule in rules:
        if rule.device not in devices:
            raise PlacementError(f"{rule.source}: rule {rule.match!r} sends tensors to "
                                 f"{rule.device}, which this machine lacks (has: "
                                 f"{', '.join(sorted(devices))})")
    placed: dict[str, Placement] = {}
    used = [False] * len(rules)
    for name, stored in tensors.items():
        index = next((i for i, r in enumerate(rules) if r.pattern.search(name)), None)
        if index is None:
            raise PlacementError(f"no rule places tensor {name!r}; end the rules with a "
                                 "catch-all such as {match: '.', device: cuda}")
        rule = rules[index]
        if rule.kernel in IN_PLACE_KERNELS and not IN_PLACE.search(name):
            raise PlacementError(f"{rule.source}: rule {rule.match!r} gives kernel {rule.kernel} to "
                                 f"{name!r}; {rule.kernel} serves the routed experts (*_exps) and "
                                 "token_embd only")
        used[index] = True
        placed[name] = Placement(torch.device(rule.device), rule.kernel,
                                 _dtype(rule, stored, rule.device), index)
    unused = [r for r, u in zip(rules, used, strict=True) if not u]
    if unused:
        raise PlacementError("rules that match no tensor (a typo?): "
                             + ", ".join(f"{r.match!r} ({r.source})" for r in unused))
    return placed


def kept_quantized(name: str, stored: GGMLType, p: Placement) -> bool:
    """Whether tensor `name` stays in its stored type on its device (kernel quant)."""
    from tandem.kernels import torch_dequant  # placement stays importable without the kernels

    return p.kernel == "quant" and bool(LINEAR_WEIGHTS.search(name)) and torch_dequant.supports(stored)


def _dtype(rule: Rule, stored: GGMLType, device: str) -> torch.dtype | None:
    """The dtype of a dense copy: torch's, and quant's for what it does not keep quantized."""
    if rule.kernel not in ("torch", "quant"):
        return None
    if DTYPES[rule.dtype] is not None:
        return DTYPES[rule.dtype]
    own = {GGMLType.F32: torch.float32, GGMLType.F16: torch.float16, GGMLType.BF16: torch.bfloat16}
    if device == "cpu":
        return torch.float32
    return own.get(stored, torch.bfloat16)
