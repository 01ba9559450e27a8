#!/usr/bin/env bash
# Prepare llama.cpp's source, as the llama-cpp-python sdist on PyPI vendors it, trimmed to what
# llama-bench needs (models/, docs/ and the web UI dropped) so it fits a device call's 64 MiB.
#   bash benchmarks/llamacpp_source.sh [OUT_DIR]      (default .llamacpp, git-ignored)
set -euo pipefail
out=${1:-.llamacpp}
version=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
tmp=$(mktemp -d)
python3 -m pip download --no-deps --no-binary :all: -q -d "$tmp" "llama-cpp-python==$version"
tar xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
src=$(echo "$tmp"/llama_cpp_python-*/vendor/llama.cpp)
rm -rf "$src"/models "$src"/docs "$src"/tools/server/public* "$src"/tools/ui "$src"/benches "$src"/tests/*.gguf* \
       "$src"/examples/*/assets "$src"/media 2>/dev/null || true
mkdir -p "$out"
tar czf "$out/llama.cpp.tar.gz" -C "$(dirname "$src")" llama.cpp
du -h "$out/llama.cpp.tar.gz"
rm -rf "$tmp"
