"""The side-by-side summary's decode bounds (benchmarks/side_by_side.py), from a run's figures."""

from __future__ import annotations

import pytest


def profile(**split) -> dict:
    """10 MoE layers, k 8: segments 5 ms and head 1 ms a token; copies 10 ms a token for 4 GPU
    experts per call (0.25 ms each); the CPU op 0.5 ms per expert."""
    return {"parts_ms_per_token": {"gpu: segment": 5.0, "gpu: last segment + head": 1.0},
            "moe_layers": 10, "experts_per_token": 8,
            "experts_split": {"gpu_experts_per_call": 4.0, "cpu_op_ms_per_expert": 0.5, **split},
            "top_gpu_kernels": [{"kernel": "Memcpy HtoD (Pinned -> Device)", "gpu_ms_per_token": 10.0}]}


def test_ram_and_split_bounds(side_by_side):
    bench = {"ram_read_gb_per_s": 100.0, "expert_bytes_per_token": 1e9}  # 10 ms of experts a token
    bounds = side_by_side.decode_bounds(bench, profile(), llamacpp_tok_s=20.0, target=3.0)
    assert bounds["gpu_segments_ms_per_token"] == 6.0
    assert bounds["ram"]["tok_per_s"] == pytest.approx(1000 / 16)
    assert bounds["ram"]["ratio_vs_llamacpp"] == pytest.approx(1000 / 16 / 20)
    assert bounds["ram"]["target_needs_fraction"] == pytest.approx(60 / (1000 / 16))
    assert bounds["roofline_fraction_at_most"] == pytest.approx(10 / 16)  # 6 ms of segments too
    # 80 experts a token at 1/0.5 + 1/0.25 = 6 a millisecond: 13.3 ms, more than RAM's 10
    assert bounds["split"]["tok_per_s"] == pytest.approx(1000 / (80 / 6 + 6))


def test_the_split_bound_never_beats_the_ram_bound(side_by_side):
    bench = {"ram_read_gb_per_s": 10.0, "expert_bytes_per_token": 1e9}  # RAM: 100 ms a token
    bounds = side_by_side.decode_bounds(bench, profile(cpu_op_ms_per_expert=0.01), 20.0, 3.0)
    assert bounds["split"]["tok_per_s"] == pytest.approx(bounds["ram"]["tok_per_s"])


def test_no_bounds_without_the_figures(side_by_side):
    assert set(side_by_side.decode_bounds({}, profile(), 20.0, 3.0)) == {"gpu_segments_ms_per_token"}
    no_split = side_by_side.decode_bounds({"ram_read_gb_per_s": 100.0, "expert_bytes_per_token": 1e9},
                                          {**profile(), "moe_layers": None}, None, 3.0)
    assert "split" not in no_split and no_split["ram"]["ratio_vs_llamacpp"] is None


def test_streams_bound_adds_the_cpu_and_copy_rates(side_by_side):
    bench = {"ram_read_gb_per_s": 100.0}
    # 10 MB experts: the CPU op 0.5 ms each (20 GB/s); 40 copied a token in 10 ms (40 GB/s)
    found = side_by_side.stream_bound(bench, {**profile(), "expert_bytes": 10e6})
    assert found["cpu_op_gb_per_s"] == pytest.approx(20.0)
    assert found["copies_gb_per_s"] == pytest.approx(40.0)
    assert found["roofline_fraction_at_most"] == pytest.approx(0.6)
    fast = side_by_side.stream_bound({"ram_read_gb_per_s": 30.0}, {**profile(), "expert_bytes": 10e6})
    assert fast["roofline_fraction_at_most"] == 1.0  # never above the RAM's own rate
    assert side_by_side.stream_bound(bench, profile()) == {}  # no expert size: no bound


def test_limits_bound_both_files_by_the_highest_ram_reading(side_by_side, tmp_path):
    import json
    for name in ("iq1s", "q4km"):
        (tmp_path / f"decode-profile-{name}").mkdir()
        (tmp_path / f"decode-profile-{name}" / "decode_profile-x.json").write_text(json.dumps(profile()))
    benches = {"iq1s": {"ram_read_gb_per_s": 100.0, "expert_bytes_per_token": 1e9},
               "q4km": {"ram_read_gb_per_s": 50.0, "expert_bytes_per_token": 1e9}}  # met other work
    found = side_by_side.limits(tmp_path, benches, {"iq1s": 20.0, "q4km": 60.0})
    assert found["ram_read_gb_per_s"] == 100.0
    for name in ("iq1s", "q4km"):  # 10 ms of experts at 100 GB/s and 6 ms of segments, both
        assert found[f"decode_{name}"]["bounds"]["ram"]["tok_per_s"] == pytest.approx(1000 / 16)
    assert benches["q4km"]["ram_read_gb_per_s"] == 50.0  # the bench's own record is left as read


def test_the_record_names_the_machine_and_commit_that_ran_the_benches(side_by_side):
    ran = {"device": {"gpu": "some GPU", "cpu": "some CPU"}, "commit": "abc123"}
    found = side_by_side.header("cmd", [{}, ran, {"device": {"gpu": None}, "commit": "other"}])
    assert found["device"] == ran["device"] and found["commit"] == "abc123"
    assert found["command"] == "cmd"
    here = side_by_side.header("cmd", [{}, {}, {}])  # no tandem record: where it summarizes
    assert here["device"]["cpu"] and here["commit"] != "abc123"


def test_limits_name_what_holds_8_streams_back(side_by_side, tmp_path):
    """decode_profile --streams 8's figures are per step of all streams: the CPU op against the
    share's span, the segments, tok/s together."""
    import json
    folder = tmp_path / "decode-profile-iq1s-8streams"
    folder.mkdir()
    step = {**profile(), "streams": 8, "ms_per_token": 100.0, "commit": "abc1234567", "date": "d",
            "parts_ms_per_token": {"host: CPU op": 90.0, "gpu: share span": 45.0, "gpu: segment": 8.0,
                                   "gpu: last segment + head": 0.5}}
    (folder / "decode_profile-x.json").write_text(json.dumps(step))
    found = side_by_side.limits(tmp_path, {"iq1s": {}, "q4km": {}}, {})["decode_iq1s_8streams"]
    assert found["tok_per_s_together"] == pytest.approx(80.0)
    assert (found["cpu_op_ms_per_step"], found["gpu_share_span_ms_per_step"]) == (90.0, 45.0)
    assert found["gpu_segments_ms_per_step"] == pytest.approx(8.5)
    assert found["experts_split"] == step["experts_split"]
    assert found["source"].startswith("decode_profile --streams at abc1234")
    assert "decode_iq1s_8streams" not in side_by_side.limits(tmp_path / "none", {"iq1s": {}, "q4km": {}}, {})
