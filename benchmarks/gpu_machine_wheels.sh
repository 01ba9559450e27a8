#!/usr/bin/env bash
# Here (with PyPI): what the GPU machine lacks, for its Python 3.12 and no network, into .whl
# (git-ignored; carried with each device call): tandem's runtime dependencies that its image
# does not hold, and the ggml-python sdist, which gpu_machine_setup.sh builds there (-march=native).
#   bash benchmarks/gpu_machine_wheels.sh [OUT_DIR]      (default .whl)
set -euo pipefail
out=${1:-.whl}
mkdir -p "$out"
platforms="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms \
    -d "$out" "gguf>=0.17,<0.20" fastapi starlette pydantic pydantic-core annotated-types typing-inspection \
    uvicorn opentelemetry-api
python3 -m pip download -q --no-deps --no-binary :all: -d "$out" ggml-python==0.0.45
du -sh "$out"
