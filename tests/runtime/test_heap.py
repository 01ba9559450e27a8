"""runtime.heap.settle: what is alive is frozen (skipped by later collections), and again once a
share's background compile ends; TANDEM_GC_FREEZE=0 leaves the collector alone."""

from __future__ import annotations

import gc
import threading
import weakref

from tandem.runtime import heap


class _Node:
    """A cycle's member: only the collector frees it once dropped."""

    def __init__(self):
        self.me = self


class _Compiling:
    """Stands in for the GPU share's background compile (wait() returns once it is done)."""

    def __init__(self):
        self.done = threading.Event()

    def wait(self, timeout=None):
        return self.done.wait(timeout)


def test_settle_freezes_what_is_alive_and_what_the_share_compiled(monkeypatch):
    monkeypatch.delenv(heap.FREEZE_ENV, raising=False)
    node = _Node()
    compiling = _Compiling()
    assert heap.settle(compiling)
    later = _Node()  # made while the share "compiles": frozen by the second freeze
    compiling.done.set()
    for thread in [t for t in threading.enumerate() if t.name == "tandem-heap"]:
        thread.join(5)
    refs = [weakref.ref(node), weakref.ref(later)]
    del node, later
    gc.collect()
    assert all(ref() is not None for ref in refs)  # frozen: the collector skips them
    gc.unfreeze()
    gc.collect()
    assert all(ref() is None for ref in refs)
    fresh = _Node()  # made after settle: collected as usual
    ref = weakref.ref(fresh)
    del fresh
    gc.collect()
    assert ref() is None


def test_settle_off_leaves_the_collector_alone(monkeypatch):
    monkeypatch.setenv(heap.FREEZE_ENV, "0")
    gc.unfreeze()
    node = _Node()
    assert heap.settle() is False and gc.get_freeze_count() == 0
    ref = weakref.ref(node)
    del node
    gc.collect()
    assert ref() is None
