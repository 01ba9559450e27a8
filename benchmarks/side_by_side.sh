#!/usr/bin/env bash
# On the GPU machine, after llamacpp_build.sh: llama.cpp and tandem on the same file, same run.
#   bash benchmarks/side_by_side.sh FILE.gguf OUT_DIR [THREADS]
# llama.cpp: all layers on the GPU except the routed experts (-ngl 99 -ot exps=CPU).
set -euo pipefail
model=$1 out=$2 threads=${3:-$(nproc)}
mkdir -p "$out"
/tmp/llamacpp/build/bin/llama-bench -m "$model" -ngl 99 -ot exps=CPU -t "$threads" \
    -p 128,1024 -n 32 -r 3 -o json > "$out/llamacpp.json"
python3 -m tandem.cli bench "$model" --prompt-lengths 128,1024 --streams 1,8 --new-tokens 32 \
    --repetitions 3 --ctx-size 4096 --threads "$threads" --out "$out"
python3 - "$out" <<'PY'
import glob, json, sys
out = sys.argv[1]
cpp = json.load(open(f"{out}/llamacpp.json"))
ours = json.load(open(sorted(glob.glob(f"{out}/bench-*.json"))[-1]))["results"]
decode_cpp = next(r["avg_ts"] for r in cpp if r["n_gen"] > 0)
prefill_cpp = {r["n_prompt"]: r["avg_ts"] for r in cpp if r["n_prompt"] > 0}
decode = next(d["tok_per_s"] for d in ours["decode"] if d["streams"] == 1)
summary = {
    "llamacpp_decode_tok_per_s": decode_cpp, "tandem_decode_tok_per_s": decode,
    "decode_speedup_vs_llamacpp": decode / decode_cpp,
    "prefill_speedup_vs_llamacpp": {p["prompt_tokens"]: p["tok_per_s"] / prefill_cpp[p["prompt_tokens"]]
                                    for p in ours["prefill"] if p["prompt_tokens"] in prefill_cpp},
    "roofline_fraction": ours["roofline_fraction"],
}
json.dump(summary, open(f"{out}/side_by_side.json", "w"), indent=2)
print(json.dumps(summary, indent=2))
PY
