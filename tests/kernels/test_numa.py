"""--numa interleave: the memory policy as the kernel reports it back (get_mempolicy), and the
page-in thread that sets it."""

from __future__ import annotations

import platform
import sys
import threading

import numpy as np
import pytest

import tandem
from tandem.errors import TandemError
from tandem.kernels import numa
from tandem.kernels.page_in import PageIn

needs_policies = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.machine() not in numa.SYSCALLS,
    reason="Linux memory policies on x86_64/aarch64")


def test_node_lists_parse_like_the_kernel_writes_them():
    assert numa.parse_node_list("0\n") == [0]
    assert numa.parse_node_list("0-1,3,6-7") == [0, 1, 3, 6, 7]


@needs_policies
def test_interleave_sets_this_threads_policy_only():
    seen = {}

    def run():
        seen["before"] = numa.this_thread_policy()
        numa.interleave_this_thread(numa.online_nodes())
        seen["after"] = numa.this_thread_policy()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert seen["before"][0] == numa.MPOL_DEFAULT
    assert seen["after"] == (numa.MPOL_INTERLEAVE, numa.online_nodes())
    assert numa.this_thread_policy()[0] == numa.MPOL_DEFAULT  # the caller's thread untouched


@needs_policies
def test_a_node_that_does_not_exist_is_refused():
    seen = {}

    def run():
        try:
            numa.interleave_this_thread([max(numa.online_nodes()) + 64])
        except numa.NumaError as exc:
            seen["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert "set_mempolicy(MPOL_INTERLEAVE" in str(seen["error"])


@needs_policies
def test_page_in_says_what_interleaving_came_to(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(np.zeros(4 << 20, dtype=np.uint8).tobytes())
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    pager = PageIn([mapped], ram=1 << 40, numa="interleave")
    assert pager.wait(timeout=30) and pager.skipped is None
    if len(numa.online_nodes()) < 2:
        assert pager.numa_note == "one memory node: nothing to interleave"
    else:
        assert pager.numa_note.startswith("pages read in now interleave over nodes")
    with pytest.raises(ValueError, match="numa must be one of interleave or None"):
        PageIn([mapped], numa="local")


def test_llm_refuses_an_unknown_numa_mode_before_loading(tiny_q8):
    with pytest.raises(TandemError, match="numa 'spread' is not one of interleave"):
        tandem.LLM(tiny_q8, numa="spread")
