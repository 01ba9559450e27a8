"""The `tandem` command as a user runs it: a real subprocess, real files."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def tandem(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tandem.cli", *args],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def split_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "r1ish.gguf"
    run = tandem("synth", str(out), "--preset", "tiny", "--recipe", "ud-iq1_s",
                 "--fill", "random", "--split-max-tensors", "16")
    assert run.returncode == 0, run.stderr
    return sorted(out.parent.glob("r1ish-*.gguf"))


def test_synth_writes_a_split_set(split_set):
    assert [p.name for p in split_set] == [f"r1ish-0000{i}-of-00004.gguf" for i in range(1, 5)]


def test_inspect_split_set(split_set):
    run = tandem("inspect", str(split_set[2]))
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "deepseek2" in out and "4 (" in out
    for t in ("IQ1_S", "IQ2_XXS", "Q4_K", "Q6_K", "F32"):
        assert t in out


def test_inspect_json_and_tensors(split_set):
    run = tandem("inspect", "--json", "--tensors", str(split_set[0]))
    assert run.returncode == 0, run.stderr
    data = json.loads(run.stdout)
    assert data["architecture"] == "deepseek2"
    assert len(data["files"]) == 4
    assert data["context_length"] == 2048
    by_name = {t["name"]: t for t in data["tensors"]}
    assert by_name["blk.1.ffn_gate_exps.weight"]["type"] == "IQ1_S"
    assert by_name["blk.1.ffn_gate_exps.weight"]["shape"] == [8, 256, 256]
    assert {t["file"] for t in data["tensors"]} == {1, 2, 3, 4}
    assert sum(r["tensors"] for r in data["quant_mix"].values()) == len(data["tensors"])
    assert data["parameters"] == sum(
        int(__import__("math").prod(t["shape"])) for t in data["tensors"])


def test_inspect_gemma(gemma_gguf):
    run = tandem("inspect", "--json", str(gemma_gguf))
    assert run.returncode == 0, run.stderr
    data = json.loads(run.stdout)
    assert data["architecture"] == "gemma3"
    assert data["context_length"] == 32768
    assert 260e6 < data["parameters"] < 280e6  # "270M"
    assert set(data["quant_mix"]) >= {"Q4_K", "Q6_K", "Q8_0", "F32"}
    assert data["tokenizer"]["tokens"] == 262144
    human = tandem("inspect", "--tensors", str(gemma_gguf))
    assert "blk.17.ffn_down.weight" in human.stdout and "Gemma 3 270m" in human.stdout


def test_errors_are_one_line_without_traceback(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + bytes(100))
    run = tandem("inspect", str(bad))
    assert run.returncode == 1
    assert "error:" in run.stderr and "not a GGUF file" in run.stderr
    assert "Traceback" not in run.stderr
    debug = tandem("--debug", "inspect", str(bad))
    assert "Traceback" in debug.stderr


def test_synth_rejects_bad_arguments(tmp_path):
    run = tandem("synth", str(tmp_path / "x.gguf"), "--recipe", "q3_nonsense")
    assert run.returncode == 1 and "unknown recipe 'q3_nonsense'" in run.stderr
    run = tandem("synth", str(tmp_path / "x.bin"))
    assert run.returncode == 1 and "must end in .gguf" in run.stderr


def test_convert_then_inspect(hf_models, tmp_path):
    out = tmp_path / "conv.gguf"
    run = tandem("convert", str(hf_models["qlora-groups2-dense1"]), str(out), "--recipe", "q8_0",
                 "--type", "ffn_down_exps=f16")
    assert run.returncode == 0, run.stderr
    data = json.loads(tandem("inspect", "--json", "--tensors", str(out)).stdout)
    types = {t["name"]: t["type"] for t in data["tensors"]}
    assert types["blk.1.ffn_down_exps.weight"] == "F16"
    assert types["blk.1.ffn_gate_exps.weight"] == "Q8_0"
    assert types["blk.1.ffn_gate_inp.weight"] == "F32"
    missing = tandem("convert", str(tmp_path / "nowhere"), str(out))
    assert missing.returncode == 1 and "no such file" in missing.stderr


def test_bench_writes_json(tiny_q8, tmp_path):
    run = tandem("bench", str(tiny_q8), "--prompt-lengths", "16,32", "--streams", "1,2",
                 "--new-tokens", "4", "--repetitions", "1", "--out", str(tmp_path))
    assert run.returncode == 0, run.stderr
    [path] = tmp_path.glob("bench-*.json")
    data = json.loads(path.read_text())
    assert data["commit"] and data["device"]["cpu"] and data["command"].startswith("tandem bench")
    r = data["results"]
    assert [p["prompt_tokens"] for p in r["prefill"]] == [16, 32]
    assert all(p["tok_per_s"] > 0 and p["ttft_s"] > 0 for p in r["prefill"])
    assert {d["streams"] for d in r["decode"]} == {1, 2}
    assert all(len(d["runs_tok_per_s"]) == 1 for d in r["decode"])  # one per repetition
    assert all(d["runs_gpu_share"] == [None] and d["runs_share_graph_captures"] == [0]  # no GPU here
               for d in r["decode"] if d["streams"] == 1)
    for d in (d for d in r["decode"] if d["streams"] == 1):  # each repetition: up to 3 steps after the first
        steps = d["runs_step_ms"]
        assert len(steps["max"]) == 1 and steps["max"][0] >= steps["median"][0] >= 0
        assert 0 <= steps["slowest_step"][0] < 3
        [gc_run], [cpu_run], [vm_run] = d["runs_gc"], d["runs_cpu"], d["runs_vm_events"]  # what else ran
        assert gc_run["collections"] >= gc_run["full"] == len(gc_run["full_ms"]) >= 0
        assert cpu_run["wall_s"] > 0 and all(moved != 0 for moved in vm_run.values())
        assert d["runs_compiles"] == [0]  # everything compiled before the clock starts
        assert any(t["thread"] == "main" and t["cpu_s"] > 0 for t in cpu_run["threads"])
        assert cpu_run["run_queue_ms"] >= 0 and all(t["run_queue_ms"] >= 0 for t in cpu_run["threads"])
        assert all(p["process"] and p["cores"] > 0 for p in cpu_run["other_processes"])
    # tiny preset: 2 MoE layers x 2 experts x (gate + up + down), Q8_0 (34 bytes per 32 weights)
    assert r["expert_bytes_per_token"] == 2 * 2 * 3 * 256 * 256 * 34 // 32
    # the warm-up prompt's routing: 32 tokens over the tiny preset's 8 experts in 2 MoE layers
    assert r["routing"]["tokens"] == 32 and r["routing"]["experts"] == 8
    assert len(r["routing"]["distinct_per_layer"]) == 2
    assert all(2 <= n <= 8 for n in r["routing"]["distinct_per_layer"])
    assert all(0 < share <= 1 for share in r["routing"]["top8_share_per_layer"])
    assert 0 < r["roofline_fraction"] < 1
    assert r["streamed_chunks"] == {"direct": 0, "staged": 0}  # no GPU: nothing streamed
    assert r["gc_frozen"] is True  # the warm-up's objects frozen (runtime.heap)
    assert r["warmup_s"] > 0  # timed: a cold process's compiles and captures show there
    # paged in up front: decoding faults on no page of the experts (a few from allocations)
    assert r["page_in_method"] in ("populate", "touch") and r["page_in_skipped"] is None
    assert all(0 <= d["page_faults_per_token"] < 50 for d in r["decode"] if d["streams"] == 1)
    # 2 streams of 4 tokens: at least one step where both decode (3 after the first token each)
    [two] = [d for d in r["decode"] if d["streams"] == 2]
    [steps] = two["runs_decode_steps"]
    assert 1 <= steps["steps"] <= 3 and steps["tok_per_s"] == two["decode_steps_tok_per_s"] > 0
    assert r["streams_roofline_fraction"]["2"] == pytest.approx(two["decode_steps_expert_gb_per_s"]
                                                                / r["ram_read_gb_per_s"])
    assert r["streams_roofline_fraction_with_prompts"]["2"] > 0
    assert data["device"]["kernel"]
