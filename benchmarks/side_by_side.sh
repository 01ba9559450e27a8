#!/usr/bin/env bash
# On the GPU machine, after llamacpp_build.sh: llama.cpp and tandem on the same files, same run.
#   bash benchmarks/side_by_side.sh IQ1S.gguf MOE_LAYERS Q4KM.gguf OUT_DIR [THREADS]
# OUT_DIR: a new or empty directory.
# llama.cpp: all layers on the GPU except the routed experts (-ngl 99 -ot exps=CPU); for its
# CPU-only prefill figure also -nopo 1 (no expert offload to the GPU for large batches).
# The pairs run one after the other (llama.cpp, then tandem), so a run cut short still leaves
# whole pairs; the profiles come last; side_by_side.py reads whatever OUT_DIR holds.
set -euo pipefail
iq1s=$1 moe_layers=$2 q4km=$3 out=$4 threads=${5:-$(nproc)}
bench=/tmp/llamacpp/build/bin/llama-bench
# side_by_side.py takes the newest files it finds: an old run's would mix into this one's
if [ -n "$(ls -A "$out" 2>/dev/null)" ]; then echo "$out is not empty: give a new directory" >&2; exit 2; fi
mkdir -p "$out"
# 2K prefill with the experts computed on the CPU only
$bench -m "$iq1s" -ngl 99 -ot exps=CPU -t "$threads" -p 2048 -n 0 -r 1 -nopo 1 -o json \
    > "$out/llamacpp-iq1s-cpu-prefill.json"
python3 -m tandem.cli bench "$iq1s" --prompt-lengths 2048 --streams 1 --new-tokens 2 \
    --repetitions 1 --ctx-size 4096 --threads "$threads" --gpu-experts-from 0 --out "$out/tandem-iq1s-cpu"
# Q4_K_M-like decode
$bench -m "$q4km" -ngl 99 -ot exps=CPU -t "$threads" -p 0 -n 32 -r 3 -o json > "$out/llamacpp-q4km.json"
python3 -m tandem.cli bench "$q4km" --prompt-lengths 128 --streams 1 --new-tokens 32 \
    --repetitions 3 --ctx-size 4096 --threads "$threads" --out "$out/tandem-q4km"
# UD-IQ1_S-like decode (1 and 8 streams) and 2K prefill with the experts streamed to the GPU
$bench -m "$iq1s" -ngl 99 -ot exps=CPU -t "$threads" -p 2048 -n 32 -r 2 -o json > "$out/llamacpp-iq1s.json"
python3 -m tandem.cli bench "$iq1s" --prompt-lengths 2048 --streams 1,8 --new-tokens 32 \
    --repetitions 3 --ctx-size 4096 --threads "$threads" --out "$out/tandem-iq1s"
# the ratios now (a call's time limit may cut the profiles below short), again at the end
python3 benchmarks/side_by_side.py "$out" "$moe_layers" --command "bash benchmarks/side_by_side.sh $*"
# what limits decode (where the ratios fall short): a profile of each file's decode steps,
# then one of 8 streams' steps, and 8 streams through the server's engine (eager, graphs, graphs + GPU share)
python3 benchmarks/decode_profile.py "$iq1s" --threads "$threads" --out "$out/decode-profile-iq1s" || true
python3 benchmarks/decode_profile.py "$q4km" --threads "$threads" --out "$out/decode-profile-q4km" || true
python3 benchmarks/decode_profile.py "$iq1s" --streams 8 --threads "$threads" --out "$out/decode-profile-iq1s-8streams" || true
python3 benchmarks/engine_streams.py "$iq1s" --out "$out/engine-streams" || true
python3 benchmarks/side_by_side.py "$out" "$moe_layers" --command "bash benchmarks/side_by_side.sh $*"
