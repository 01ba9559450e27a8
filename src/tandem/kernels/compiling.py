"""How tandem calls torch.compile: in this process, with room for many compiled variants.

In this process: inductor builds Triton kernels in a pool of worker processes, one per CPU,
behind a helper process that imports torch first. Every compile with CUDA inputs wakes that
pool, even one whose kernels all come from inductor's disk cache, and after a minute idle the
pool quiesces, to start again at the next compile. While the helper loads, it takes a core from
the CPU experts' OpenMP team, one thread per core, which then stalls at its barriers: on the GPU
machine (run y) the first decode repetitions after loading ran at a third to a half of the later
ones' speed, other processes taking 0.6-1.3 cores meanwhile and our kernels' threads 0.8 of a
core each. In-process compiles start nothing; a cold cache compiles one kernel at a time.
TORCHINDUCTOR_COMPILE_THREADS (inductor's own setting) wins where set: =N brings the pool back.

Many variants: dynamo keeps 8 by default; past them it silently runs the function eagerly.
Functions compiled for many shapes (an expert count, a bucket, a weight shape each) need more.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
import torch._dynamo

THREADS_ENV = "TORCHINDUCTOR_COMPILE_THREADS"


def compiled(fn: Callable, *, dynamic: bool | None, variants: int = 0) -> Callable:
    """torch.compile(fn, dynamic=dynamic), its kernels built in this process; dynamo keeps at
    least `variants` compiled variants of each function."""
    compile_in_process()
    if variants:
        allow_compiled_variants(variants)
    return torch.compile(fn, dynamic=dynamic)


@functools.cache
def compile_in_process() -> bool:
    """Inductor builds kernels here from now on, without worker processes (unless
    TORCHINDUCTOR_COMPILE_THREADS says otherwise: then False)."""
    if os.environ.get(THREADS_ENV):
        return False
    from torch._inductor import config

    config.compile_threads = 1
    return True


def allow_compiled_variants(n: int) -> None:
    """Let dynamo keep at least `n` compiled variants of each function (never fewer than now)."""
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, n)
