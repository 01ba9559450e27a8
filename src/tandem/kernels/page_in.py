"""Map the pages of the weights that CPU kernels read in place into the process, ahead of use.

The routed experts are read straight from the memory-mapped GGUF. The first read of each page
takes a page fault, even when the file sits in the page cache; a decode step that meets
experts nobody has used yet then pays for tens of thousands of faults. On the GPU machine
that made a Q4_K_M-like MoE layer 5x slower (20.5 against 4.1 ms) until every expert had been
touched once. llama.cpp maps its file with MAP_POPULATE for the same reason.

`PageIn` asks the kernel to populate the page tables (MADV_POPULATE_READ, Linux 5.14+; on older
kernels it reads one byte of every page instead, which maps them as well) on a background
thread, in chunks, so loading does not wait and `close()` can stop it. It does nothing when the
mapped bytes would not fit in RAM: populating them would only push earlier pages out again.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading
import time
from collections.abc import Iterable

import numpy as np

from tandem.kernels import numa as numa_policy

log = logging.getLogger(__name__)

MADV_POPULATE_READ = 22
EINVAL = 22
CHUNK = 64 << 20  # bytes per madvise call: close() waits for one chunk at most
RAM_SHARE = 0.8  # populate only if the bytes fit in this share of physical RAM
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def physical_ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def page_ranges(arrays: Iterable[np.ndarray]) -> list[tuple[int, int]]:
    """(start, length) of the whole pages under each array, overlaps merged, in address order."""
    spans = []
    for a in arrays:
        start = a.ctypes.data & ~(PAGE - 1)
        end = a.ctypes.data + a.nbytes
        spans.append((start, end))
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e - s) for s, e in merged]


def _touch(address: int, length: int) -> None:
    """Read one byte of every page in [address, address + length): each read maps its page
    (numpy's reduction drops the GIL)."""
    pages = np.frombuffer((ctypes.c_uint8 * length).from_address(address), dtype=np.uint8)
    np.add.reduce(pages[::PAGE], dtype=np.uint64)


class PageIn:
    """Populates the page tables of `arrays` (views of a file mapping) on a thread. The arrays
    must stay alive (their mapping mapped) until `close()` returns or `done` is set."""

    def __init__(self, arrays: Iterable[np.ndarray], ram: int | None = None, method: str = "populate",
                 numa: str | None = None):
        """`method`: "populate" (madvise; "touch" where the kernel lacks it) or "touch".
        `numa`: "interleave" spreads the pages it brings into the page cache over the memory
        nodes (kernels.numa); None leaves them where the kernel puts them."""
        if method not in ("populate", "touch"):
            raise ValueError(f"page-in method must be 'populate' or 'touch', got {method!r}")
        if numa not in (None, *numa_policy.MODES):
            raise ValueError(f"numa must be one of {', '.join(numa_policy.MODES)} or None, got {numa!r}")
        self.method = method
        self.numa = numa
        self.numa_note: str | None = None  # what the numa request came to
        self.arrays = list(arrays)  # keeps the mappings alive while the thread runs
        self.ranges = page_ranges(self.arrays)
        self.total = sum(n for _, n in self.ranges)
        self.done_bytes = 0
        self.seconds = 0.0
        self._stop = threading.Event()
        self._done = threading.Event()
        self._libc = _libc()
        ram = physical_ram() if ram is None else ram
        self.skipped = self._skip_reason(ram)
        self._thread = None
        if self.skipped:
            log.info("not paging in the in-place weights: %s", self.skipped)
        if self.skipped or not self.ranges:
            self._done.set()
            return
        self._thread = threading.Thread(target=self._run, name="tandem-page-in", daemon=True)
        self._thread.start()

    def _skip_reason(self, ram: int) -> str | None:
        if self._libc is None:
            return "not on Linux"
        if self.total > RAM_SHARE * ram:
            return (f"{self.total / 1e9:.1f} GB would not fit in {RAM_SHARE:.0%} of the "
                    f"{ram / 1e9:.1f} GB of RAM; pages load on first use")
        return None

    def _run(self) -> None:
        began = time.perf_counter()
        try:
            if self.numa == "interleave":
                self._interleave()
            for start, length in self.ranges:
                for offset in range(0, length, CHUNK):
                    if self._stop.is_set():
                        return
                    n = min(CHUNK, length - offset)
                    self._advise(start + offset, n)
                    self.done_bytes += n
        finally:
            self.seconds = time.perf_counter() - began
            self._done.set()
            log.info("paged in %.1f GB of in-place weights in %.1f s", self.done_bytes / 1e9,
                     self.seconds)

    def _interleave(self) -> None:
        """This thread's new pages round-robin over the memory nodes (a no-op on one node)."""
        nodes = numa_policy.online_nodes()
        if len(nodes) < 2:
            self.numa_note = "one memory node: nothing to interleave"
        else:
            try:
                numa_policy.interleave_this_thread(nodes)
                self.numa_note = f"pages read in now interleave over nodes {nodes}"
            except numa_policy.NumaError as exc:
                self.numa_note = f"not interleaved ({exc})"
                log.warning("--numa interleave: %s", self.numa_note)
        log.info("numa: %s", self.numa_note)

    def _advise(self, address: int, length: int) -> None:
        if self.method == "touch":
            _touch(address, length)
            return
        if self._libc.madvise(address, length, MADV_POPULATE_READ) == 0:  # ctypes drops the GIL
            return
        errno = ctypes.get_errno()
        if errno == EINVAL:  # a kernel before 5.14
            log.info("MADV_POPULATE_READ unsupported by this kernel; reading a byte per page instead")
            self.method = "touch"
            _touch(address, length)
            return
        self.skipped = f"madvise failed ({os.strerror(errno)}); pages load on first use"
        log.warning("on in-place weights: %s", self.skipped)
        self._stop.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every page is in (or it was skipped or stopped); False on timeout."""
        return self._done.wait(timeout)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
