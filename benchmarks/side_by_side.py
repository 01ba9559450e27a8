"""Issue 7's ratios from one side-by-side run (benchmarks/side_by_side.sh): llama-bench JSON and
`tandem bench` JSON for the same files on the same machine, into one summary JSON.

    python benchmarks/side_by_side.py OUT_DIR MOE_LAYERS_IQ1S [--command "..."]

Targets (issue 7): decode >= 3x llama.cpp and >= 60% of the expert roofline (UD-IQ1_S-like),
>= 1.4x (Q4_K_M-like); 2K prefill >= 1.5x llama.cpp (both stream experts to the GPU) and >= 3x
llama.cpp computing experts on the CPU only (-nopo 1; tandem --gpu-experts-from 0); 8 streams
>= 85% of the bandwidth bound of the distinct experts read. Missed targets get the factor still
missing (`shortfalls`) and, where side_by_side.sh ran them, the profiles that say what limits
them (`limits`: benchmarks/decode_profile.py per file and for 8 streams,
benchmarks/engine_streams.py).
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from pathlib import Path

from tandem.bench import machine

FULL_MOE_LAYERS = 58
TARGETS = {"decode_speedup_vs_llamacpp": 3.0, "decode_speedup_vs_llamacpp_q4km": 1.4,
           "prefill_speedup_vs_llamacpp": 1.5, "cpu_prefill_speedup_vs_llamacpp": 3.0,
           "roofline_fraction": 0.60, "batch8_roofline_fraction": 0.85}


def llamacpp(path: Path) -> dict:
    """{"decode": tok/s, "prefill": {n_prompt: tok/s}} from llama-bench -o json."""
    if not path.exists():
        return {}
    rows = json.loads(path.read_text())
    return {"decode": next((r["avg_ts"] for r in rows if r["n_gen"] > 0), None),
            "prefill": {r["n_prompt"]: r["avg_ts"] for r in rows if r["n_prompt"] > 0}}


def tandem(directory: Path) -> dict:
    runs = sorted(directory.glob("bench-*.json"))
    return json.loads(runs[-1].read_text()) if runs else {}


def header(command: str, benches: list[dict]) -> dict:
    """The record's header: the machine and commit that ran the benches (the first tandem
    record that has them), not the machine that summarizes them, which may be another."""
    ran = next((b for b in benches if "device" in b), {})
    found = machine.record_header("side_by_side", datetime.now(UTC), command, ran.get("device"))
    if "commit" in ran:
        found["commit"] = ran["commit"]
    return found


def ratio(a, b):
    return a / b if a and b else None


def shortfalls(ratios: dict) -> dict:
    """For each missed target: what was reached, the target, and the factor still missing."""
    return {k: {"achieved": v, "target": TARGETS[k], "missing_factor": TARGETS[k] / v}
            for k, v in ratios.items() if v is not None and v < TARGETS[k]}


def decode_limits(profile: dict) -> dict:
    """What a decode step's time went to (benchmarks/decode_profile.py), per token."""
    segments = profile.get("segments", [])
    moe_segments = segments[1:-1]  # between two MoE layers: attention, norms, router
    return {
        "source": f"decode_profile at {profile.get('commit', '?')[:7]}, {profile.get('date')}",
        "ms_per_token": profile.get("ms_per_token"),
        "parts_ms_per_token": profile.get("parts_ms_per_token"),
        "experts_split": profile.get("experts_split"),
        "sides": profile.get("sides"),  # the shared calls by their split (whole experts' cost)
        "moe_layer_segment_ms": (sum(s["median_ms"] for s in moe_segments) / len(moe_segments)
                                 if moe_segments else None),
        "moe_layer_segment_gb_per_s": (sum(s["gb_per_s"] for s in moe_segments) / len(moe_segments)
                                       if moe_segments else None),
        "share_layers_at_end": profile.get("share_layers_at_end"),
        "top_gpu_kernels": profile.get("top_gpu_kernels", [])[:6],
    }


def decode_bounds(bench: dict, profile: dict, llamacpp_tok_s: float | None, target: float) -> dict:
    """The fastest one-token decode this run's measured parts allow, each bound as tok/s and as
    a ratio to llama.cpp. A step is its GPU segments (attention, dense layers, router, head:
    measured) and, between them, the routed experts, which wait for their segment and which
    the next segment waits for. `ram`: the experts' bytes at the measured RAM read rate (the
    copies to the GPU read RAM too). `split`: the experts shared between the CPU op (measured
    ms per expert, with the DMA running) and the copies to the GPU (measured ms per expert;
    the GPU's kernels assumed hidden), both sides busy all the time, and never above `ram`.
    `roofline_fraction_at_most`: the share of the expert roofline (all expert bytes at the RAM
    rate, nothing else) that `ram` is: what the segments in series leave of it.
    Speculative copies during segments (TANDEM_SHARE_PREFETCH) could beat both if they hit."""
    parts = profile.get("parts_ms_per_token") or {}
    gpu_ms = parts.get("gpu: segment", 0.0) + parts.get("gpu: last segment + head", 0.0)
    ram, per_token = bench.get("ram_read_gb_per_s"), bench.get("expert_bytes_per_token")
    bounds = {"gpu_segments_ms_per_token": gpu_ms}
    if not (ram and per_token and gpu_ms):
        return bounds
    ram_ms = per_token / ram / 1e6
    bounds["ram"] = _bound(ram_ms + gpu_ms, llamacpp_tok_s, target)
    bounds["roofline_fraction_at_most"] = ram_ms / (ram_ms + gpu_ms)
    layers, k = profile.get("moe_layers"), profile.get("experts_per_token")
    cpu_ms_per_expert, copy_ms, gpu_experts = _expert_paths(profile)
    if layers and k and copy_ms and gpu_experts and cpu_ms_per_expert:
        experts_per_ms = 1 / cpu_ms_per_expert + gpu_experts / copy_ms
        bounds["split"] = _bound(max(layers * k / experts_per_ms, ram_ms) + gpu_ms, llamacpp_tok_s, target)
    return bounds


def stream_bound(bench: dict, profile: dict) -> dict:
    """What the experts' two paths can read at most, from one-token decode's profile: the CPU op
    (bytes per expert over its measured ms per expert: it decodes each weight once, however
    many tokens share the expert) and the copies to the GPU (their bytes over their GPU time),
    both busy all the time, against the RAM read rate. `roofline_fraction_at_most`: the share
    of the distinct-expert roofline several streams could reach so, before any segment or
    overhead."""
    size, ram = profile.get("expert_bytes"), bench.get("ram_read_gb_per_s")
    cpu_ms, copy_ms, gpu_experts = _expert_paths(profile)
    if not (size and cpu_ms and copy_ms and gpu_experts and ram):
        return {}
    cpu_rate, copy_rate = size / cpu_ms / 1e6, gpu_experts * size / copy_ms / 1e6
    return {"cpu_op_gb_per_s": cpu_rate, "copies_gb_per_s": copy_rate, "ram_read_gb_per_s": ram,
            "roofline_fraction_at_most": min(1.0, (cpu_rate + copy_rate) / ram)}


def streams_limits(profile: dict) -> dict:
    """Where a step of several streams went (decode_profile.py --streams N: its figures are per
    step of all streams): the CPU op against the GPU share's span (the longer one holds the step
    up), the GPU segments, and the shared calls' split."""
    parts = profile.get("parts_ms_per_token") or {}
    step_ms, streams = profile.get("ms_per_token"), profile.get("streams")
    segments_ms = parts.get("gpu: segment", 0.0) + parts.get("gpu: last segment + head", 0.0)
    return {
        "source": f"decode_profile --streams at {profile.get('commit', '?')[:7]}, {profile.get('date')}",
        "streams": streams, "ms_per_step": step_ms,
        "tok_per_s_together": streams * 1e3 / step_ms if streams and step_ms else None,
        "cpu_op_ms_per_step": parts.get("host: CPU op"),
        "gpu_share_span_ms_per_step": parts.get("gpu: share span"),
        "gpu_segments_ms_per_step": segments_ms,
        "experts_split": profile.get("experts_split"),
        "sides": profile.get("sides"),
    }


def _expert_paths(profile: dict) -> tuple[float | None, float | None, float]:
    """From a decode profile: the CPU op's ms per expert, the copies' GPU ms per token, and the
    experts copied to the GPU per token (over all MoE layers)."""
    split = profile.get("experts_split") or {}
    copy_ms = next((r["gpu_ms_per_token"] for r in profile.get("top_gpu_kernels", [])
                    if r["kernel"].startswith("Memcpy HtoD")), None)
    gpu_experts = (split.get("gpu_experts_per_call") or 0) * (profile.get("moe_layers") or 0)
    return split.get("cpu_op_ms_per_expert"), copy_ms, gpu_experts


def _bound(ms_per_token: float, llamacpp_tok_s: float | None, target: float) -> dict:
    """A bound as tok/s, its ratio to llama.cpp, and the share of it the target asks for."""
    tok_s = 1e3 / ms_per_token
    wanted = target * llamacpp_tok_s if llamacpp_tok_s else None
    return {"tok_per_s": tok_s, "ratio_vs_llamacpp": ratio(tok_s, llamacpp_tok_s),
            "target_needs_fraction": wanted / tok_s if wanted else None}


def limits(out: Path, benches: dict, llamacpp_decode: dict) -> dict:
    """The profiles side_by_side.sh ran after the pairs, where present, with the decode bounds
    they give (for each file: its bench results and llama.cpp's decode tok/s). The bounds take
    the machine's RAM read rate as the highest of the benches' readings: a lower one met other
    work (run r: 90.8 and 123.2 GB/s minutes apart)."""
    ram = max((b.get("ram_read_gb_per_s") or 0.0 for b in benches.values()), default=0.0)
    benches = {name: {**bench, "ram_read_gb_per_s": ram or None} for name, bench in benches.items()}
    found = {"ram_read_gb_per_s": ram or None}
    for name, target in (("iq1s", TARGETS["decode_speedup_vs_llamacpp"]),
                         ("q4km", TARGETS["decode_speedup_vs_llamacpp_q4km"])):
        runs = sorted((out / f"decode-profile-{name}").glob("decode_profile-*.json"))
        if runs:
            profile = json.loads(runs[-1].read_text())
            found[f"decode_{name}"] = {**decode_limits(profile), "bounds": decode_bounds(
                benches[name], profile, llamacpp_decode.get(name), target)}
            if name == "iq1s":  # the 8 streams' target is on this file
                found["streams_bound_iq1s"] = stream_bound(benches[name], profile)
    runs = sorted((out / "decode-profile-iq1s-8streams").glob("decode_profile-*.json"))
    if runs:  # what holds the 8 streams back
        found["decode_iq1s_8streams"] = streams_limits(json.loads(runs[-1].read_text()))
    runs = sorted((out / "engine-streams").glob("engine_streams-*.json"))
    if runs:
        streams = json.loads(runs[-1].read_text())
        found["engine_streams_iq1s"] = {k: v["median_tok_per_s"] for k, v in streams["results"].items()}
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("moe_layers", type=int, help="MoE layers in the UD-IQ1_S-like test file")
    parser.add_argument("--command", default="")
    args = parser.parse_args()
    out = args.out

    cpp_iq1 = llamacpp(out / "llamacpp-iq1s.json")
    cpp_iq1_cpu = llamacpp(out / "llamacpp-iq1s-cpu-prefill.json")
    cpp_q4 = llamacpp(out / "llamacpp-q4km.json")
    benches = [tandem(out / name) for name in ("tandem-iq1s", "tandem-q4km", "tandem-iq1s-cpu")]
    ours_iq1, ours_q4, ours_iq1_cpu = (b.get("results", {}) for b in benches)

    def decode(results, streams=1, figure="tok_per_s"):
        return next((d.get(figure) for d in results.get("decode", []) if d["streams"] == streams), None)

    def prefill_2k_of(results):
        return next((p["tok_per_s"] for p in results.get("prefill", []) if p["prompt_tokens"] == 2048), None)

    prefill_2k, cpu_prefill_2k = prefill_2k_of(ours_iq1), prefill_2k_of(ours_iq1_cpu)
    ratios = {
        "decode_speedup_vs_llamacpp": ratio(decode(ours_iq1), cpp_iq1.get("decode")),
        "decode_speedup_vs_llamacpp_q4km": ratio(decode(ours_q4), cpp_q4.get("decode")),
        "prefill_speedup_vs_llamacpp": ratio(prefill_2k, cpp_iq1.get("prefill", {}).get(2048)),
        "cpu_prefill_speedup_vs_llamacpp": ratio(cpu_prefill_2k, cpp_iq1_cpu.get("prefill", {}).get(2048)),
        "roofline_fraction": ours_iq1.get("roofline_fraction"),
        # the steps in which all 8 decode (since 2026-11-29; before, the whole run's, prompts
        # included: `streams_roofline_fraction_with_prompts` now)
        "batch8_roofline_fraction": (ours_iq1.get("streams_roofline_fraction") or {}).get("8"),
    }
    met = {k: (v is not None and v >= TARGETS[k]) for k, v in ratios.items()}
    scale = args.moe_layers / FULL_MOE_LAYERS  # time per token grows with the MoE layers
    summary = {
        **header(args.command, benches),
        "ratios": ratios,
        "targets": TARGETS,
        "met": met,
        "shortfalls": shortfalls(ratios),
        "limits": limits(out, {"iq1s": ours_iq1, "q4km": ours_q4},
                         {"iq1s": cpp_iq1.get("decode"), "q4km": cpp_q4.get("decode")}),
        "raw": {
            "llamacpp_iq1s": cpp_iq1, "llamacpp_iq1s_cpu_only_prefill": cpp_iq1_cpu,
            "llamacpp_q4km": cpp_q4,
            "tandem_iq1s_decode_tok_per_s": decode(ours_iq1),
            "tandem_iq1s_8_streams_tok_per_s": decode(ours_iq1, 8),  # prompts and ramp included
            "tandem_iq1s_8_streams_decode_steps_tok_per_s": decode(ours_iq1, 8, "decode_steps_tok_per_s"),
            "tandem_iq1s_8_streams_roofline_fraction_with_prompts":
                (ours_iq1.get("streams_roofline_fraction_with_prompts") or {}).get("8"),
            "tandem_iq1s_prefill_2048_tok_per_s": prefill_2k,
            "tandem_iq1s_cpu_only_prefill_2048_tok_per_s": cpu_prefill_2k,
            "tandem_q4km_decode_tok_per_s": decode(ours_q4),
            "tandem_iq1s_roofline_tok_per_s": ours_iq1.get("roofline_tok_per_s"),
            "ram_read_gb_per_s": ours_iq1.get("ram_read_gb_per_s"),
            "tandem_iq1s_peak_vram_bytes": ours_iq1.get("peak_vram_bytes"),
            # how the file's routing spreads a prompt over the experts (what caches, prefetching
            # and batching meet); absent before the bench recorded it
            "tandem_iq1s_routing": ours_iq1.get("routing"),
        },
        # Conservative: all of a step's time counted as MoE time, scaled to 58 MoE layers.
        "projected_full_r1_ud_iq1_s": {
            "decode_tok_per_s": decode(ours_iq1) * scale if decode(ours_iq1) else None,
            "prefill_2048_tok_per_s": prefill_2k * scale if prefill_2k else None,
            "note": f"measured with {args.moe_layers} MoE layers + 3 dense, times scaled by "
                    f"{args.moe_layers}/{FULL_MOE_LAYERS}; files from tandem synth with random norm "
                    "weights (runs up to p) sent a prompt's tokens to few experts, the router's "
                    "bias deciding, which made the prefill figure an upper bound; with norms near "
                    "1 (8b3d0b8) they spread (~2/3 of the 256 per 128 tokens), nearer a trained "
                    "model's routing",
        },
    }
    (out / "side_by_side.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({"ratios": ratios, "met": met}, indent=2))


if __name__ == "__main__":
    main()
