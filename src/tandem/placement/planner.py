"""Before any weight is loaded: add up the bytes each device must hold and refuse plans that
do not fit, saying what does not fit, by how much, and which rule to change."""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from tandem.gguf.reader import TensorInfo
from tandem.placement.rules import IN_PLACE_KERNELS, Placement, PlacementError, Rule, kept_quantized

GPU_HEADROOM = 1 << 30  # activations, CUDA context and allocator slack
CPU_HEADROOM = 2 << 30
LAYER = re.compile(r"^blk\.(\d+)\.")
EXPERT_TENSOR = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_exps\.")


@dataclass
class MemoryPlan:
    """Bytes per device: `resident` copies (dequantized weights, KV cache) and `mapped` bytes
    read in place from the GGUF mmap (they live in the page cache)."""

    resident: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    mapped: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    workspace: dict[str, int] = field(default_factory=dict)  # part of resident: expert buffers
    resident_by_rule: dict[int, int] = field(default_factory=lambda: defaultdict(int))  # copies only
    per_layer: dict[str, dict[str, int]] = field(default_factory=dict)  # "blk.N"/"other" -> dev -> bytes

    def as_dict(self) -> dict:
        return {"resident": dict(self.resident), "mapped": dict(self.mapped),
                "per_layer": self.per_layer}


def placed_bytes(info: TensorInfo, p: Placement) -> int:
    if p.kernel in IN_PLACE_KERNELS or kept_quantized(info.name, info.ggml_type, p):
        return info.n_bytes
    return info.n_elements * torch.tensor([], dtype=p.dtype).element_size()


def quant_copy_bytes(tensors: dict[str, TensorInfo], placements: dict[str, Placement]) -> dict[str, int]:
    """Per device, the largest bfloat16 copy prompts make of a weight kept quantized there
    (kernel quant dequantizes PROMPT_ROWS rows at a time for a matmul)."""
    from tandem.kernels.quant_linear import PROMPT_ROWS

    largest: dict[str, int] = {}
    for name, info in tensors.items():
        if kept_quantized(name, info.ggml_type, placements[name]):
            device = str(placements[name].device)
            rows, width = info.shape
            largest[device] = max(largest.get(device, 0), min(rows, PROMPT_ROWS) * width * 2)
    return largest


def expert_bytes_per_layer(tensors: dict[str, TensorInfo]) -> dict[int, int]:
    """Bytes of one routed expert (gate + up + down, as stored) in each MoE layer."""
    per_layer: dict[int, int] = defaultdict(int)
    for name, info in tensors.items():
        match = EXPERT_TENSOR.match(name)
        if match:
            per_layer[int(match[1])] += info.n_bytes // info.shape[0]
    return dict(per_layer)


def plan_memory(tensors: dict[str, TensorInfo], placements: dict[str, Placement],
                kv_bytes: dict[str, int], workspace: dict[str, int] | None = None) -> MemoryPlan:
    """kv_bytes: KV cache bytes per device (from the context size asked for); workspace:
    buffers per device of the routed experts (streaming to the GPU: kernels.streamed; the CPU
    op's work buffers: kernels.native)."""
    plan = MemoryPlan()
    for name, info in tensors.items():
        p = placements[name]
        n = placed_bytes(info, p)
        device = str(p.device)
        if p.kernel in IN_PLACE_KERNELS:
            plan.mapped[device] += n
        else:
            plan.resident[device] += n
            plan.resident_by_rule[p.rule] += n
        match = LAYER.match(name)
        layer = f"blk.{match[1]}" if match else "other"
        plan.per_layer.setdefault(layer, defaultdict(int))[device] += n
    for device, n in kv_bytes.items():
        plan.resident[device] += n
    for device, n in (workspace or {}).items():
        plan.resident[device] += n
        plan.workspace[device] = n
    return plan


def capacities() -> dict[str, int]:
    """Bytes usable now: free VRAM per GPU; available RAM for copies, total RAM for mappings."""
    caps = {"cpu": _meminfo("MemAvailable") - CPU_HEADROOM, "cpu-total": _meminfo("MemTotal")}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, _ = torch.cuda.mem_get_info(i)
            caps[f"cuda:{i}"] = free - GPU_HEADROOM
    return caps


def gpu_shortfall(plan: MemoryPlan, caps: dict[str, int] | None = None) -> str | None:
    """Where a GPU lacks room for what the plan puts there ("cuda:0: needs X but Y is free"),
    or None where every GPU has room (caps as check_fits takes them)."""
    caps = capacities() if caps is None else caps
    for device, need in plan.resident.items():
        key = "cuda:0" if device == "cuda" else device
        have = caps.get(key)
        if key.startswith("cuda") and have is not None and need > have:
            return f"{device}: needs {_gb(need)} but {_gb(max(have, 0))} is free"
    return None


def check_fits(plan: MemoryPlan, rules: list[Rule], caps: dict[str, int] | None = None) -> None:
    caps = capacities() if caps is None else caps
    problems = []
    for device, need in plan.resident.items():
        key = "cuda:0" if device == "cuda" else device
        have = caps.get(key)
        if have is not None and need > have:
            problems.append(_too_big(device, need, have, plan, rules))
    mapped = sum(plan.mapped.values())
    total = caps.get("cpu-total")
    if total is not None and mapped + plan.resident.get("cpu", 0) > total:
        problems.append(
            f"cpu: the routed experts ({_gb(mapped)}, read in place from the file) and "
            f"{_gb(plan.resident.get('cpu', 0))} of copies exceed the {_gb(total)} of RAM by "
            f"{_gb(mapped + plan.resident.get('cpu', 0) - total)}; every token would wait on "
            "the disk. Use a smaller quant or a machine with more RAM")
    if problems:
        raise PlacementError("the model does not fit:\n  " + "\n  ".join(problems))


def _too_big(device: str, need: int, have: int, plan: MemoryPlan, rules: list[Rule]) -> str:
    heaviest = sorted(((n, i) for i, n in plan.resident_by_rule.items()
                       if rules[i].device.split(":")[0] == device.split(":")[0]), reverse=True)
    hint = ""
    if heaviest:
        n, i = heaviest[0]
        r = rules[i]
        hint = (f"; the largest share, {_gb(n)}, comes from rule {r.match!r} ({r.source}): "
                "send some of its tensors to another device or pick a smaller dtype")
    if plan.workspace.get(device) and device == "cpu":
        hint += (f"; {_gb(plan.workspace[device])} of it is the routed experts' workspace (their "
                 "CPU op's buffers for a prompt pass, pinned slots for streaming)")
    elif plan.workspace.get(device):
        hint += (f"; {_gb(plan.workspace[device])} of it is the workspace for streaming experts "
                 "to the GPU during long prompts (--gpu-experts-from 0 turns that off)")
    return f"{device}: needs {_gb(need)} but {_gb(max(have, 0))} is free, {_gb(need - have)} short{hint}"


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def _meminfo(key: str) -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: do not refuse on a guess
