"""What machine a benchmark ran on, and how fast its RAM reads: for result files."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import torch


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_features() -> list[str]:
    """SIMD features ggml was built for and found on this CPU."""
    from tandem.kernels.ggml_lib import ggml

    names = ("avx2", "avx512", "avx512_vnni", "avx512_bf16", "amx_int8", "f16c", "fma")
    return [n for n in names if getattr(ggml, f"ggml_cpu_has_{n}", lambda: 0)()]


def threads_per_core() -> int | None:
    """Hardware threads that share a core with CPU 0 (2 with SMT: worker threads on siblings
    compete for one core's units); None where Linux does not say."""
    try:
        siblings = Path("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list").read_text()
    except OSError:
        return None
    count = 0
    for part in siblings.strip().split(","):
        first, _, last = part.partition("-")
        count += int(last or first) - int(first) + 1
    return count


def ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def git_commit(repo: Path | None = None) -> str:
    """HEAD of the checkout; TANDEM_COMMIT overrides it (copies of a tree without .git)."""
    if os.environ.get("TANDEM_COMMIT"):
        return os.environ["TANDEM_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=repo or Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def record_header(benchmark: str, now: datetime, command: str | None = None,
                  device: dict | None = None) -> dict:
    """The fields every results JSON starts with: what ran (the script's command line unless
    given), when, on which machine, at which commit."""
    return {
        "benchmark": benchmark,
        "date": now.isoformat(timespec="seconds"),
        "device": describe() if device is None else device,
        "commit": git_commit(),
        "command": command or " ".join([Path(sys.executable).name, *sys.argv]),
    }


def write_record(record: dict, out: Path, now: datetime) -> Path:
    """A results JSON into `out` as <benchmark>-<host>-<time>.json; its path."""
    out.mkdir(parents=True, exist_ok=True)
    host = (record["device"]["host"] or "host").split(".")[0]
    path = out / f"{record['benchmark']}-{host}-{now:%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def describe() -> dict:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "threads_per_core": threads_per_core(),
        "cpu_features": cpu_features(),
        "ram_gib": round(ram_bytes() / 2**30, 1),
        "gpu": gpu,
        "torch": torch.__version__,
        "host": platform.node(),
        "kernel": platform.release(),  # page-table and madvise behaviour depend on it
    }


def ram_read_gbps(gib: float = 2.0, repeats: int = 5) -> float:
    """Read bandwidth of a summation over a buffer far larger than any cache, on every CPU this
    process may use, whatever torch's thread count (TANDEM_SHARE_TORCH_THREADS lowers it); that
    count and its OpenMP team are put back after."""
    from tandem.kernels.cpu import default_threads, resize_openmp_team

    threads, every = torch.get_num_threads(), default_threads()
    torch.set_num_threads(every)
    try:
        buf = torch.ones(int(gib * 2**30) // 8, dtype=torch.int64)
        buf.sum()  # fault the pages in
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            buf.sum()
            best = min(best, time.perf_counter() - start)
        return buf.numel() * 8 / best / 1e9
    finally:
        if threads != every:
            resize_openmp_team(threads)
