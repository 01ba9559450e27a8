#!/usr/bin/env bash
# On the GPU machine: build llama-bench (CUDA, sm_90) from the trimmed source, in the
# background so that it outlives one call; progress in /tmp/llamacpp/build.log.
#   setsid bash benchmarks/llamacpp_build.sh .llamacpp/llama.cpp.tar.gz &
set -euo pipefail
archive=${1:-.llamacpp/llama.cpp.tar.gz}
mkdir -p /tmp/llamacpp && cd /tmp/llamacpp
tar xzf "$OLDPWD/$archive"
cmake -S llama.cpp -B build -G Ninja -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
      -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
      -DLLAMA_BUILD_SERVER=OFF -DCMAKE_BUILD_TYPE=Release > build.log 2>&1
cmake --build build --target llama-bench -j "$(nproc)" >> build.log 2>&1
echo BUILD_DONE >> build.log
