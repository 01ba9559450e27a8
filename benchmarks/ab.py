"""A/B runs of `tandem bench`: variants (settings in the environment) alternated round by round
on one machine, each a fresh process, into one JSON with every run and each variant's median.

    python benchmarks/ab.py MODEL --variant base= --variant gpufirst=TANDEM_SHARE_CPU_FIRST=0 \\
        [--rounds 2] [--out DIR] -- --prompt-lengths 128 --streams 1 --new-tokens 64

A variant is NAME=SETTINGS, SETTINGS a comma-separated list of VAR=VALUE (empty: as is) and of
`tandem bench` options of its own, written --OPTION=VALUE (after the common ones, so they win):
`--variant quant=--rules=benchmarks/rules/gpu-quantized-weights.yaml`. Everything after `--`
goes to every `tandem bench`. Alternating the variants spreads the
machine's drift over all of them; on the GPU machine single runs of one setting spread by
+-15% between processes, so a difference smaller than that needs rounds to show.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from tandem.bench import machine


def parse_variant(text: str) -> tuple[str, dict[str, str], list[str]]:
    """NAME=VAR=VALUE,--OPTION=VALUE,... -> (NAME, {VAR: VALUE}, [--OPTION=VALUE, ...])."""
    name, sep, settings = text.partition("=")
    if not sep or not name:
        raise SystemExit(f"--variant takes NAME=SETTINGS (e.g. old=TANDEM_SHARE_CPU_FIRST=0), got {text!r}")
    env, options = {}, []
    for item in filter(None, settings.split(",")):
        if item.startswith("--"):
            options.append(item)
            continue
        var, sep, value = item.partition("=")
        if not sep or not var:
            raise SystemExit(f"--variant {name}: {item!r} is neither VAR=VALUE nor --OPTION=VALUE")
        env[var] = value
    return name, env, options


def run_bench(model: Path, bench_args: list[str], env: dict[str, str], out: Path, timeout: float) -> dict:
    """One `tandem bench` in a fresh process with `env` added: its results, or {"error": why}
    (the other runs go on)."""
    cmd = [sys.executable, "-m", "tandem.cli", "bench", str(model), *bench_args, "--out", str(out)]
    try:
        done = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"no result within {timeout:.0f} s"}
    found = sorted(out.glob("bench-*.json"))
    if done.returncode != 0 or not found:
        return {"error": f"exit code {done.returncode}: {done.stderr.strip()[-1000:]}"}
    return {"results": json.loads(found[-1].read_text())["results"]}


def summarize(runs: list[dict]) -> dict:
    """Per variant: the decode tok/s of each run (per stream count and context; for several
    streams also over the steps in which all decode, the issue's batch figure) and the prefill
    tok/s (per prompt length), their medians, and each median's ratio to the first variant's."""
    figures: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        per = figures.setdefault(run["variant"], {})
        if "results" not in run:  # failed: counted in the JSON's runs, not here
            continue
        for d in run["results"].get("decode", []):
            per.setdefault(f"decode_{d['streams']}_streams_ctx{d['context']}", []).append(d["tok_per_s"])
            if d.get("decode_steps_tok_per_s"):  # several streams: the steps in which all decode
                per.setdefault(f"decode_steps_{d['streams']}_streams_ctx{d['context']}", []).append(
                    d["decode_steps_tok_per_s"])
        for p in run["results"].get("prefill", []):
            per.setdefault(f"prefill_{p['prompt_tokens']}", []).append(p["tok_per_s"])
    first = next(iter(figures), None)
    summary = {}
    for name, per in figures.items():
        summary[name] = {}
        for key, values in per.items():
            median = statistics.median(values)
            base = statistics.median(figures[first][key]) if key in figures.get(first, {}) else None
            summary[name][key] = {"runs": values, "median": median,
                                  "vs_first": median / base if base else None}
    return summary


def main() -> None:
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    own, bench_args = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--variant", action="append", required=True, help="NAME=VAR=VALUE,...")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300, help="seconds a bench run may take")
    parser.add_argument("--name", default="ab", help="what the JSON's file name starts with")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(own)
    if args.rounds < 1:
        raise SystemExit(f"--rounds must be at least 1, got {args.rounds}")
    variants = [parse_variant(v) for v in args.variant]
    if len({name for name, _, _ in variants}) != len(variants):
        raise SystemExit("variant names must differ")
    runs, now = [], datetime.now(UTC)
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(1, args.rounds + 1):
            for name, env, options in variants:
                out = Path(tmp) / f"{name}-{round_}"
                run = {"variant": name, "round": round_, "env": env, "options": options,
                       **run_bench(args.model, [*bench_args, *options], env, out, args.timeout)}
                runs.append(run)
                if "error" in run:
                    print(f"round {round_} {name:12s} failed: {run['error']}", flush=True)
                    continue
                decode = [f"{d['streams']}x{d['tok_per_s']:.2f}" for d in run["results"].get("decode", [])]
                print(f"round {round_} {name:12s} decode {' '.join(decode)} tok/s", flush=True)
            # after every round, over the same file: a run cut short keeps its whole rounds
            summary = summarize(runs)
            path = write(args, bench_args, variants, runs, summary, now)
    for name, per in summary.items():
        print(name, {k: round(v["median"], 2) for k, v in per.items()})
    print(f"wrote {path}")


def write(args, bench_args: list[str], variants: list, runs: list[dict], summary: dict,
          now: datetime) -> Path:
    """The A/B record so far, into args.out under the name `now` gives (the same each round)."""
    record = {**machine.record_header(args.name, now), "model": str(args.model), "bench_args": bench_args,
              "variants": {name: {"env": env, "options": options} for name, env, options in variants},
              "rounds_done": max((run["round"] for run in runs), default=0),
              "summary": summary, "runs": runs}
    return machine.write_record(record, args.out, now)


if __name__ == "__main__":
    main()
