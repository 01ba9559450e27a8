"""PageIn against the kernel's own accounting: the mapping's resident set in /proc/self/smaps
and the process's minor page faults."""

import ctypes
import mmap
import resource
import sys
from pathlib import Path

import numpy as np
import pytest

import tandem
from expert_checks import cpu_experts
from tandem.kernels.page_in import PageIn, page_ranges

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux page tables")

SIZE = 32 << 20


def mapping_rss_kb(address: int) -> int:
    """Rss of the mapping that holds `address`, from /proc/self/smaps."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(v, 16) for v in head.split("-"))
            inside = start <= address < end
        elif inside and head == "Rss:":
            return int(line.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}")


def minor_faults() -> int:
    """This thread's minor faults: threads left running by earlier tests fault too."""
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt


@pytest.fixture
def mapped(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(np.random.default_rng(0).integers(0, 255, SIZE, dtype=np.uint8).tobytes())
    data = np.memmap(path, dtype=np.uint8, mode="r")
    yield data
    del data


@pytest.mark.parametrize("method", ["populate", "touch"])  # touch: kernels before 5.14
def test_pages_are_mapped_and_reads_take_no_faults(mapped, method):
    part = mapped[4096 * 3 + 100 : SIZE - 5000]  # not page aligned at either end
    assert mapping_rss_kb(mapped.ctypes.data) < 1024  # nothing touched yet
    pager = PageIn([part], ram=1 << 40, method=method)
    assert pager.wait(timeout=30) and pager.skipped is None
    assert pager.done_bytes == pager.total >= part.nbytes
    assert mapping_rss_kb(mapped.ctypes.data) >= part.nbytes // 1024
    before = minor_faults()
    part[::4096].astype(np.int64).sum()  # one read per page
    assert minor_faults() - before < 16


def test_too_large_for_ram_is_left_alone(mapped):
    pager = PageIn([mapped], ram=SIZE)  # would fill all of a (pretend) RAM
    assert pager.done and "would not fit" in pager.skipped
    assert mapping_rss_kb(mapped.ctypes.data) < 1024
    pager.close()


def test_a_failing_madvise_is_reported_and_stops(mapped):
    import mmap

    region = mmap.mmap(-1, 1 << 20)
    gone = np.frombuffer((ctypes.c_uint8 * (1 << 20)).from_address(_address(region)), dtype=np.uint8)
    region.close()  # unmapped now: madvise answers ENOMEM (the pages are never read)
    pager = PageIn([gone], ram=1 << 40)
    assert pager.wait(timeout=30)
    assert pager.skipped.startswith("madvise failed (Cannot allocate memory)")


def _address(region) -> int:
    view = (ctypes.c_uint8 * len(region)).from_buffer(region)
    address = ctypes.addressof(view)
    del view  # the mapping can close only once no export holds it
    return address


def test_unknown_method_is_refused(mapped):
    with pytest.raises(ValueError, match="page-in method must be"):
        PageIn([mapped], method="willneed")


def test_close_stops_early(mapped):
    pager = PageIn([mapped], ram=1 << 40)
    pager.close()
    assert pager.done and pager.done_bytes <= pager.total


def test_page_ranges_merge_overlaps():
    region = mmap.mmap(-1, 5 * 4096)  # page-aligned, so the expected pages do not depend on malloc
    buf = np.frombuffer(region, dtype=np.uint8)
    base = buf.ctypes.data
    assert base % 4096 == 0
    ranges = page_ranges([buf[100:200], buf[150:5000], buf[4 * 4096 :]])
    assert ranges[0] == (base, 5000)
    assert ranges[-1][0] + ranges[-1][1] == base + buf.nbytes
    assert len(ranges) == 2  # [100, 5000) and [16384, end) do not touch


def test_llm_pages_in_its_cpu_experts(tiny_q8):
    with tandem.LLM(tiny_q8, ctx_size=64, page_in=False) as llm:
        assert llm.page_in.total == 0 and llm.page_in.done
        rss_without = mapping_rss_kb(cpu_experts(llm)[0].gate.address)
    with tandem.LLM(tiny_q8, ctx_size=64) as llm:
        assert llm.page_in.wait(timeout=30) and llm.page_in.skipped is None
        experts = cpu_experts(llm)
        expert_bytes = sum(p.nbytes for e in experts for p in (e.gate, e.up, e.down))
        assert llm.page_in.done_bytes == llm.page_in.total >= expert_bytes
        # the file's mapping now holds the expert pages too (dense weights were read either way)
        assert mapping_rss_kb(experts[0].gate.address) >= rss_without + 0.9 * expert_bytes // 1024
