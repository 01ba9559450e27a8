#!/usr/bin/env bash
# On the GPU machine, after llamacpp_build.sh: llama.cpp and tandem on the same files, same run.
#   bash benchmarks/side_by_side.sh IQ1S.gguf MOE_LAYERS Q4KM.gguf OUT_DIR [THREADS]
# llama.cpp: all layers on the GPU except the routed experts (-ngl 99 -ot exps=CPU); for its
# CPU-only prefill figure also -nopo 1 (no expert offload to the GPU for large batches).
set -euo pipefail
iq1s=$1 moe_layers=$2 q4km=$3 out=$4 threads=${5:-$(nproc)}
bench=/tmp/llamacpp/build/bin/llama-bench
mkdir -p "$out"
$bench -m "$iq1s" -ngl 99 -ot exps=CPU -t "$threads" -p 2048 -n 32 -r 2 -o json > "$out/llamacpp-iq1s.json"
$bench -m "$iq1s" -ngl 99 -ot exps=CPU -t "$threads" -p 2048 -n 0 -r 1 -nopo 1 -o json \
    > "$out/llamacpp-iq1s-cpu-prefill.json"
$bench -m "$q4km" -ngl 99 -ot exps=CPU -t "$threads" -p 0 -n 32 -r 2 -o json > "$out/llamacpp-q4km.json"
python3 -m tandem.cli bench "$iq1s" --prompt-lengths 2048 --streams 1,8 --new-tokens 32 \
    --repetitions 3 --ctx-size 4096 --threads "$threads" --out "$out/tandem-iq1s"
# CPU-only prefill (no expert streaming), against llama.cpp's -nopo 1 figure
python3 -m tandem.cli bench "$iq1s" --prompt-lengths 2048 --streams 1 --new-tokens 2 \
    --repetitions 1 --ctx-size 4096 --threads "$threads" --gpu-experts-from 0 --out "$out/tandem-iq1s-cpu"
python3 -m tandem.cli bench "$q4km" --prompt-lengths 128 --streams 1 --new-tokens 32 \
    --repetitions 2 --ctx-size 4096 --threads "$threads" --out "$out/tandem-q4km"
python3 benchmarks/side_by_side.py "$out" "$moe_layers" --command "bash benchmarks/side_by_side.sh $*"
