#!/usr/bin/env bash
# On the GPU machine (or any AMX CPU): tandem's CPU-only 2K prefill with the kernel variants side
# by side in one run, each as a `tandem bench` JSON under OUT_DIR/<variant>/:
#   amx-128 (default), amx-64 (TANDEM_TOKEN_BLOCK=64), avx512-128 (TANDEM_AMX=0).
#   bash benchmarks/cpu_prefill_variants.sh IQ1S.gguf OUT_DIR [THREADS]
set -euo pipefail
model=$1 out=$2 threads=${3:-$(nproc)}
mkdir -p "$out"
run() {  # variant name, then environment assignments
    local name=$1
    shift
    env "$@" python3 -m tandem.cli bench "$model" --prompt-lengths 2048 --streams 1 --new-tokens 2 \
        --repetitions 2 --ctx-size 4096 --threads "$threads" --gpu-experts-from 0 --out "$out/$name"
}
run amx-128 TANDEM_TOKEN_BLOCK=128
run amx-64 TANDEM_TOKEN_BLOCK=64
run avx512-128 TANDEM_AMX=0
