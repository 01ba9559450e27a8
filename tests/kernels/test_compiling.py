"""kernels.compiling: once tandem has compiled something, inductor's compile workers do not
start (the OS's process table tells: no process of ours below this one), unless
TORCHINDUCTOR_COMPILE_THREADS asks for them; compiled functions compute what the eager ones do."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tandem.kernels import compiling

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

# Compiles through tandem, then asks inductor for its worker pool as a compile with CUDA inputs
# does (compile_fx wakes it), and counts this process's descendants half a second later.
_PROBE = textwrap.dedent("""
    import os, time
    from pathlib import Path
    from tandem.kernels import compiling
    compiling.compiled(lambda x: x + 1, dynamic=False)  # compiles lazily: nothing yet
    from torch._inductor.async_compile import AsyncCompile
    AsyncCompile.warm_pool()
    AsyncCompile.wakeup()
    time.sleep(0.5)
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        parents.setdefault(int(text[text.rindex(")") + 2:].split()[1]), []).append(int(stat.parent.name))
    found, todo = 0, [os.getpid()]
    while todo:
        for child in parents.get(todo.pop(), []):
            found += 1
            todo.append(child)
    print(found)
""")


def _descendants_after_waking_the_pool(threads_env: str | None) -> int:
    env = {k: v for k, v in os.environ.items() if k != compiling.THREADS_ENV}
    if threads_env is not None:
        env[compiling.THREADS_ENV] = threads_env
    done = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


def test_compiles_start_no_worker_processes():
    assert _descendants_after_waking_the_pool(None) == 0


def test_inductors_own_setting_brings_the_workers_back():
    """The control: the same probe with TORCHINDUCTOR_COMPILE_THREADS=2 starts inductor's helper."""
    assert _descendants_after_waking_the_pool("2") >= 1


def test_compiled_keeps_the_variants_asked_for_and_computes_as_eager():
    def scale(x):
        return x * 3 - 1

    fn = compiling.compiled(scale, dynamic=False, variants=40)
    assert torch._dynamo.config.recompile_limit >= 40
    x = torch.randn(5)
    torch.testing.assert_close(fn(x), scale(x))
