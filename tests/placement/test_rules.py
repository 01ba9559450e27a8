"""Placement rules and the memory plan, on a real file's tensor table."""

from __future__ import annotations

import pytest
import torch

import tandem
from tandem.gguf.types import GGMLType
from tandem.placement.planner import check_fits, gpu_shortfall, plan_memory
from tandem.placement.rules import PlacementError, Rule, assign, default_rules, kept_quantized


def test_default_rules_without_gpu(tiny_q8):
    model = tandem.open_gguf(tiny_q8)
    placed = assign({n: t.ggml_type for n, t in model.tensors.items()}, default_rules(False),
                    devices={"cpu"})
    experts = [n for n in placed if "_exps" in n]
    assert experts and all(placed[n].kernel == "cpu" for n in experts)
    assert placed["token_embd.weight"].kernel == "ggml"
    rest = [p for n, p in placed.items() if "_exps" not in n and n != "token_embd.weight"]
    assert all(p.device.type == "cpu" and p.kernel == "torch" and p.dtype == torch.float32
               for p in rest)


def test_default_rules_with_gpu(tiny_q8):
    model = tandem.open_gguf(tiny_q8)
    placed = assign({n: t.ggml_type for n, t in model.tensors.items()}, default_rules(True),
                    devices={"cpu", "cuda", "cuda:0"})
    assert placed["token_embd.weight"].device.type == "cpu"
    assert placed["token_embd.weight"].kernel == "ggml"  # rows dequantized from the file
    q = placed["blk.0.attn_q_a.weight"]  # Q8_0 in the file: bfloat16 on the GPU
    assert q.device.type == "cuda" and q.dtype == torch.bfloat16
    norm = placed["blk.0.attn_norm.weight"]  # F32 in the file: stays float32
    assert norm.device.type == "cuda" and norm.dtype == torch.float32
    assert placed["blk.1.ffn_down_exps.weight"].kernel == "cpu"


def test_first_matching_rule_wins():
    rules = [Rule("attn", "cpu", "torch", "float16"), Rule(".", "cpu", "torch")]
    placed = assign({"blk.0.attn_q.weight": GGMLType.Q8_0, "blk.0.ffn_up.weight": GGMLType.F16},
                    rules, devices={"cpu"})
    assert placed["blk.0.attn_q.weight"].dtype == torch.float16
    assert placed["blk.0.ffn_up.weight"].rule == 1


@pytest.mark.parametrize("kwargs,message", [
    (dict(match="(", device="cpu"), "bad regex"),
    (dict(match=".", device="gpu"), "is not cpu, cuda or cuda:N"),
    (dict(match=".", device="cpu", kernel="fast"), "kernel 'fast' is not one of"),
    (dict(match=".", device="cpu", dtype="int3"), "dtype 'int3' is not one of"),
    (dict(match=".", device="cuda", kernel="ggml"), "kernel ggml runs on the cpu"),
])
def test_bad_rules(kwargs, message):
    with pytest.raises(PlacementError, match=message):
        Rule(**kwargs)


def test_memory_plan_counts_bytes_per_device_and_layer(tiny_q8):
    model = tandem.open_gguf(tiny_q8)
    placed = assign({n: t.ggml_type for n, t in model.tensors.items()}, default_rules(False),
                    devices={"cpu"})
    plan = plan_memory(model.tensors, placed, {"cpu": 1000})
    in_place = {n for n in model.tensors if "_exps" in n or n == "token_embd.weight"}
    experts = sum(model.tensors[n].n_bytes for n in in_place)
    dense = sum(t.n_elements * 4 for n, t in model.tensors.items() if n not in in_place)
    assert plan.mapped["cpu"] == experts
    assert plan.resident["cpu"] == dense + 1000
    assert sum(sum(d.values()) for d in plan.per_layer.values()) == experts + dense
    check_fits(plan, default_rules(False), {"cpu": 1 << 40, "cpu-total": 1 << 40})
    with pytest.raises(PlacementError, match="routed experts .* exceed the"):
        check_fits(plan, default_rules(False), {"cpu": 1 << 40, "cpu-total": experts})


def test_short_ram_names_the_rule_with_most_copied_bytes(tiny_q8):
    """The experts, read in place, are the most bytes; the copies that do not fit come from the
    dense rule, which the hint must name."""
    model = tandem.open_gguf(tiny_q8)
    rules = default_rules(False)
    placed = assign({n: t.ggml_type for n, t in model.tensors.items()}, rules, devices={"cpu"})
    plan = plan_memory(model.tensors, placed, {})
    assert plan.mapped["cpu"] > 0
    experts_rule = next(p.rule for n, p in placed.items() if "_exps" in n)
    assert experts_rule not in plan.resident_by_rule
    with pytest.raises(PlacementError) as err:
        check_fits(plan, rules, {"cpu": plan.resident["cpu"] // 2, "cpu-total": 1 << 40})
    heaviest = max(plan.resident_by_rule, key=plan.resident_by_rule.get)
    assert f"comes from rule {rules[heaviest].match!r}" in str(err.value)
    assert rules[experts_rule].match not in str(err.value)


def test_streaming_workspace_counts_and_is_named_when_short(tiny_q8):
    model = tandem.open_gguf(tiny_q8)
    placed = assign({n: t.ggml_type for n, t in model.tensors.items()}, default_rules(False),
                    devices={"cpu"})
    plan = plan_memory(model.tensors, placed, {"cpu": 1000}, workspace={"cuda": 3 << 30, "cpu": 5000})
    assert plan.resident["cuda"] == 3 << 30 and plan.workspace == {"cuda": 3 << 30, "cpu": 5000}
    caps = {"cpu": 1 << 40, "cpu-total": 1 << 40}
    check_fits(plan, default_rules(False), {**caps, "cuda:0": 4 << 30})
    with pytest.raises(PlacementError, match=r"cuda: needs 3.22 GB but 2.15 GB is free.*"
                                             r"workspace for streaming experts.*--gpu-experts-from 0"):
        check_fits(plan, default_rules(False), {**caps, "cuda:0": 2 << 30})


def test_cpu_experts_buffers_are_planned_and_named_when_short(tiny_q8):
    with tandem.LLM(tiny_q8, ctx_size=64) as llm:  # no GPU here: whole passes on the CPU op
        workspace = llm.memory.workspace["cpu"]
        assert workspace > 0 and llm.memory.resident["cpu"] >= workspace
        resident = llm.memory.resident["cpu"]
    ggml_experts = [Rule(r"_exps\.", "cpu", "ggml"), *default_rules(False)[1:]]
    with tandem.LLM(tiny_q8, ctx_size=64, rules=ggml_experts) as llm:  # ggml's op: not ours
        assert "cpu" not in llm.memory.workspace
    with pytest.raises(PlacementError, match=r"cpu: needs .*routed experts' workspace"):
        tandem.LLM(tiny_q8, ctx_size=64, memory_caps={"cpu": resident - workspace // 2})


def test_kernel_quant_keeps_the_linear_weights_in_their_stored_bytes(tiny_q8):
    """Kernel quant: projections, FFN and head stay quantized (their file bytes counted); what
    it matches beyond them (norms, router, kv_b) is placed as torch would place it."""
    model = tandem.open_gguf(tiny_q8)
    types = {n: t.ggml_type for n, t in model.tensors.items()}
    rules = [Rule(r"_exps\.", "cpu", "cpu"), Rule(r"^token_embd\.", "cpu", "ggml"), Rule(".", "cpu", "quant")]
    placed = assign(types, rules, devices={"cpu"})
    kept = {n for n, t in model.tensors.items() if kept_quantized(n, t.ggml_type, placed[n])}
    assert "blk.0.attn_q_a.weight" in kept and "output.weight" in kept
    assert not kept & {"blk.0.attn_norm.weight", "blk.0.attn_kv_b.weight", "token_embd.weight"}
    assert all(types[n] == GGMLType.Q8_0 for n in kept)
    assert placed["blk.0.attn_norm.weight"].dtype == torch.float32  # dense, as torch places it
    plan = plan_memory(model.tensors, placed, {})
    in_place = {n for n in model.tensors if "_exps" in n or n == "token_embd.weight"}
    dense = sum(t.n_elements * 4 for n, t in model.tensors.items() if n not in in_place | kept)
    assert plan.resident["cpu"] == dense + sum(model.tensors[n].n_bytes for n in kept)


def test_gpu_shortfall_names_only_a_gpu_without_room(tiny_q8):
    """What the default rules fall back on (kernel quant) when their bfloat16 copies would not
    fit the GPU; RAM shortages are not the GPU's."""
    model = tandem.open_gguf(tiny_q8)
    types = {n: t.ggml_type for n, t in model.tensors.items()}
    plans = {}
    for quantized in (False, True):
        placed = assign(types, default_rules(True, types, quantized), devices={"cpu", "cuda"})
        assert placed["blk.0.attn_q_a.weight"].kernel == ("quant" if quantized else "torch")
        plans[quantized] = plan_memory(model.tensors, placed, {"cuda": 1 << 20})
    need = plans[False].resident["cuda"]
    assert plans[True].resident["cuda"] < need  # what the fallback saves
    roomy = {"cpu": 1 << 40, "cpu-total": 1 << 40}
    assert gpu_shortfall(plans[False], {**roomy, "cuda:0": need}) is None
    short = gpu_shortfall(plans[False], {**roomy, "cuda:0": need - 1})
    assert short is not None and short.startswith("cuda: needs")
    assert gpu_shortfall(plans[False], {"cpu": 1, "cpu-total": 1, "cuda:0": need}) is None
