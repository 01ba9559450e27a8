"""Python's heap kept out of the decode loop's way.

Python's cyclic garbage collector walks every tracked object in a full collection, holding the
GIL meanwhile. After loading (torch, the model, torch.compile's kernels) that is 0.3-0.5M
objects: a full collection took 0.2-0.4 s on the dev box. It comes when enough objects have
survived since the last one, likely in the first decode steps after loading and compiling (a
lead for run x's single 264-368 ms steps in first repetitions; `tandem bench` records each
repetition's collections to tell). A stalled step holds up the GPU's launches and the balance
of the GPU share.
`settle` collects once and freezes what is alive (gc.freeze: later collections skip those
objects), then freezes again once the GPU share's kernels are compiled in the background.

TANDEM_GC_FREEZE=0 leaves the collector as Python sets it (A/B runs).
"""

from __future__ import annotations

import atexit
import functools
import gc
import os
import threading

FREEZE_ENV = "TANDEM_GC_FREEZE"


def settle(share=None) -> bool:
    """Collect, then freeze the objects alive now; with a `share` (kernels.gpu_share.GpuShare)
    still compiling, freeze again when it is done (no collection then: decode may be running,
    and the compiler's garbage frozen is a one-off). False where TANDEM_GC_FREEZE=0."""
    if os.environ.get(FREEZE_ENV) == "0":
        return False
    _unfreeze_at_exit()
    gc.collect()
    gc.freeze()
    if share is not None:
        threading.Thread(target=_freeze_after, args=(share,), name="tandem-heap", daemon=True).start()
    return True


def _freeze_after(share) -> None:
    share.wait()
    gc.freeze()


@functools.cache
def _unfreeze_at_exit() -> None:
    """Frozen objects are never freed, not even at exit, where extensions that count their
    objects then report leaks (nanobind's, under Triton): hand them back to the collector."""
    atexit.register(gc.unfreeze)
