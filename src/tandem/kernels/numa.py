"""NUMA placement of the mapped expert pages, for machines with more than one memory node.

On a two-socket machine the page cache puts each page of the GGUF on the node of the thread
that first read it, so the experts can end up on one socket and the other socket's cores read
them across the interconnect at a fraction of their own memory bandwidth. `--numa interleave`
has the thread that pages the experts in (kernels.page_in) allocate under MPOL_INTERLEAVE:
consecutive pages go to the nodes in turn, and every core reads from all memory controllers at
once. (KTransformers' USE_NUMA copies the experts once per node instead: twice the RAM, which a
131 GB model on a 2 x 192 GB machine can afford and one on 2 x 96 GB cannot.) Pages already in
the page cache keep their node; drop the cache first (or copy the file anew) to re-place them.
On one node there is nothing to do.

The policy is set with the set_mempolicy system call directly (libnuma is not needed).
"""

from __future__ import annotations

import ctypes
import logging
import platform
import sys
from pathlib import Path

log = logging.getLogger(__name__)

MPOL_DEFAULT, MPOL_INTERLEAVE = 0, 3
NODES_ONLINE = Path("/sys/devices/system/node/online")
# (set_mempolicy, get_mempolicy) system call numbers
SYSCALLS = {"x86_64": (238, 239), "aarch64": (237, 236)}
MODES = ("interleave",)


class NumaError(OSError):
    """A memory policy the kernel refused."""


def parse_node_list(text: str) -> list[int]:
    """Nodes from the kernel's list format ("0-1,3" -> [0, 1, 3])."""
    nodes: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        nodes.extend(range(int(first), int(last or first) + 1))
    return nodes


def online_nodes() -> list[int]:
    """The memory nodes online here ([0] where the kernel says nothing)."""
    try:
        return parse_node_list(NODES_ONLINE.read_text()) or [0]
    except OSError:
        return [0]


def _syscalls() -> tuple[ctypes.CDLL, int, int] | None:
    numbers = SYSCALLS.get(platform.machine())
    if not sys.platform.startswith("linux") or numbers is None:
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc, *numbers


def _mask(nodes: list[int]) -> tuple[ctypes.Array, int]:
    words = max(nodes) // 64 + 1
    mask = (ctypes.c_ulong * words)()
    for node in nodes:
        mask[node // 64] |= 1 << (node % 64)
    return mask, words * 64


def interleave_this_thread(nodes: list[int]) -> None:
    """Allocate this thread's new pages round-robin over `nodes` (set_mempolicy)."""
    calls = _syscalls()
    if calls is None:
        raise NumaError(f"memory policies are not supported on {sys.platform}/{platform.machine()}")
    libc, set_policy, _ = calls
    mask, max_node = _mask(nodes)
    if libc.syscall(set_policy, MPOL_INTERLEAVE, mask, ctypes.c_ulong(max_node + 1)) != 0:
        errno = ctypes.get_errno()
        raise NumaError(errno, f"set_mempolicy(MPOL_INTERLEAVE, nodes {nodes}) failed")


def this_thread_policy() -> tuple[int, list[int]]:
    """This thread's memory policy: (mode, nodes) from get_mempolicy."""
    calls = _syscalls()
    if calls is None:
        raise NumaError(f"memory policies are not supported on {sys.platform}/{platform.machine()}")
    libc, _, get_policy = calls
    mode = ctypes.c_int()
    mask, max_node = _mask([1023])  # room for 1024 nodes
    if libc.syscall(get_policy, ctypes.byref(mode), mask, ctypes.c_ulong(max_node), None,
                    ctypes.c_ulong(0)) != 0:
        raise NumaError(ctypes.get_errno(), "get_mempolicy failed")
    nodes = [i for i in range(max_node) if mask[i // 64] >> (i % 64) & 1]
    return mode.value, nodes
