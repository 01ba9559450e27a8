"""benchmarks/ab.py: variants alternated through real `tandem bench` runs into one summary."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "ab.py"


def test_variants_parse_and_bad_ones_are_refused(ab):
    assert ab.parse_variant("base=") == ("base", {}, [])
    assert ab.parse_variant("x=A=1,B=2") == ("x", {"A": "1", "B": "2"}, [])
    assert ab.parse_variant("q=--rules=r.yaml,A=1") == ("q", {"A": "1"}, ["--rules=r.yaml"])
    for bad in ("noequals", "=A=1", "x=A"):
        with pytest.raises(SystemExit):
            ab.parse_variant(bad)


def test_summary_medians_and_ratios_to_the_first_variant(ab):
    def run(variant, rate):
        return {"variant": variant, "results": {"decode": [{"streams": 1, "context": 16, "tok_per_s": rate}]}}
    summary = ab.summarize([run("a", 10.0), run("b", 15.0), run("a", 12.0), run("b", 18.0), run("a", 11.0)])
    key = "decode_1_streams_ctx16"
    assert summary["a"][key]["median"] == 11.0 and summary["a"][key]["vs_first"] == 1.0
    assert summary["b"][key]["runs"] == [15.0, 18.0]
    assert summary["b"][key]["vs_first"] == pytest.approx(16.5 / 11)
    assert not any(k.startswith("decode_steps") for k in summary["a"])  # one stream: no such figure


def test_summary_of_several_streams_keeps_their_decode_only_steps(ab):
    def run(variant, whole, steps):
        return {"variant": variant, "results": {"decode": [
            {"streams": 8, "context": 16, "tok_per_s": whole, "decode_steps_tok_per_s": steps}]}}
    summary = ab.summarize([run("a", 60.0, 80.0), run("b", 66.0, 96.0)])
    assert summary["b"]["decode_8_streams_ctx16"]["vs_first"] == pytest.approx(1.1)
    assert summary["b"]["decode_steps_8_streams_ctx16"]["runs"] == [96.0]
    assert summary["b"]["decode_steps_8_streams_ctx16"]["vs_first"] == pytest.approx(1.2)


def test_runs_alternate_and_land_in_one_json(tiny_q8, tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), str(tiny_q8), "--variant", "base=",
                           "--variant", "block64=TANDEM_TOKEN_BLOCK=64,--prompt-lengths=8", "--rounds", "1",
                           "--out", str(tmp_path), "--", "--prompt-lengths", "16", "--streams", "1",
                           "--new-tokens", "4", "--repetitions", "1"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    [path] = tmp_path.glob("ab-*.json")
    data = json.loads(path.read_text())
    assert data["commit"] and data["bench_args"][:2] == ["--prompt-lengths", "16"]
    assert data["rounds_done"] == 1
    assert [(r["variant"], r["round"]) for r in data["runs"]] == [("base", 1), ("block64", 1)]
    assert data["runs"][1]["env"] == {"TANDEM_TOKEN_BLOCK": "64"}
    # the setting reached the bench process: it records the kernel settings it ran with
    assert data["runs"][1]["results"]["kernel_env"].get("TANDEM_TOKEN_BLOCK") == "64"
    assert data["runs"][0]["results"]["kernel_env"].get("TANDEM_TOKEN_BLOCK") is None
    # the variant's own option came after the common one and won
    assert [p["prompt_tokens"] for r in data["runs"] for p in r["results"]["prefill"]] == [16, 8]
    assert data["variants"]["block64"]["options"] == ["--prompt-lengths=8"]
    assert set(data["summary"]) == {"base", "block64"}
    assert data["summary"]["block64"]["decode_1_streams_ctx8"]["median"] > 0


def test_a_failing_run_is_recorded_and_the_others_go_on(ab, tiny_q8, tmp_path):
    bench_args = ["--prompt-lengths", "16", "--streams", "1", "--new-tokens", "2", "--repetitions", "1"]
    bad = ab.run_bench(tiny_q8, bench_args, {"TANDEM_TOKEN_BLOCK": "many"}, tmp_path / "bad", 120)
    good = ab.run_bench(tiny_q8, bench_args, {}, tmp_path / "good", 120)
    assert "error" in bad and "results" not in bad
    assert good["results"]["decode"][0]["tok_per_s"] > 0
    summary = ab.summarize([{"variant": "bad", **bad}, {"variant": "good", **good}])
    assert summary["bad"] == {} and summary["good"]
