# On the GPU machine, sourced at the start of each device call (the machine keeps what an earlier
# call of the session built): the wheels from gpu_machine_wheels.sh on PYTHONPATH, ggml-python
# built from its sdist (~20 s on 16 cores) and tandem installed in place (its C kernels built).
#   . benchmarks/gpu_machine_setup.sh [WHEELS_DIR]      (default .whl)
wheels=${1:-.whl}
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$wheels"/*.whl || return 1
export PYTHONPATH=/tmp/site
if ! python3 -c "import ggml" 2>/dev/null; then
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) python3 -m pip install -q --no-index --no-deps --no-build-isolation \
      --no-cache-dir --target /tmp/site "$wheels"/ggml_python-*.tar.gz > /tmp/ggml_build.log 2>&1 \
      || { tail -30 /tmp/ggml_build.log; return 1; }
fi
if ! python3 -c "import tandem.kernels._experts" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . > /tmp/tandem_install.log 2>&1 \
      || { tail -30 /tmp/tandem_install.log; return 1; }
fi
python3 -c "import ggml, gguf, tandem, torch; print('tandem ready: torch', torch.__version__, torch.cuda.get_device_name())"
