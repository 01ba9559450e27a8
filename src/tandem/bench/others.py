"""What else ran while a benchmark measured: Python's garbage collections, torch.compile's
compiles, the CPU time of this process's threads and how long they waited for a CPU, the CPU
time of other processes (the busiest by name), and the kernel's memory events. A slow
repetition then shows whether a collection stalled it, a compile did (inductor's worker
processes: see kernels.compiling), a thread of ours competed with the kernels' threads (a
page-in), another process did (and which: the kernel's own threads count as processes), our
threads sat on a run queue (pushed off their cores) or slept (not on a CPU, not waiting for
one), or the kernel reworked memory under it (huge pages collapsed or split, compaction, pages
migrated, major faults)."""

from __future__ import annotations

import gc
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

TICK = os.sysconf("SC_CLK_TCK")  # /proc's CPU times count these per second
TOP_THREADS = 6
TOP_PROCESSES = 4
# /proc/vmstat counters of memory work that can stall a process (khugepaged's collapses take the
# mapping's lock; compaction and migration move pages under it); not allocation counts
VM_EVENTS = ("thp_", "compact_", "numa_hint_faults", "numa_pages_migrated", "numa_pte_updates",
             "pgmigrate_", "pgmajfault", "pswpin", "pswpout")


class GcPauses:
    """Each collection of Python's cyclic garbage collector while open (gc.callbacks): its
    generation and how long it held the GIL. A full one (generation 2) walks every tracked
    object: the long stalls."""

    def __init__(self):
        self.pauses: list[tuple[int, float]] = []  # (generation, ms)
        self._started = 0.0  # collections never overlap: they run under the GIL

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._note)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._note)

    def _note(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses.append((info["generation"], (time.perf_counter() - self._started) * 1e3))

    def summary(self) -> dict:
        full = [ms for generation, ms in self.pauses if generation == 2]
        return {"collections": len(self.pauses), "full": len(full),
                "total_ms": round(sum(ms for _, ms in self.pauses), 2),
                "max_ms": round(max((ms for _, ms in self.pauses), default=0.0), 2),
                "full_ms": [round(ms, 1) for ms in full]}


def compiles() -> int:
    """Frames torch.compile has compiled in this process so far (each compile and recompile;
    0 where it never ran)."""
    utils = sys.modules.get("torch._dynamo.utils")
    return int(utils.counters["frames"]["ok"]) if utils is not None else 0


class ProcessTimes(NamedTuple):
    """A /proc stat file's name, CPU seconds (utime + stime) and start time (ticks since boot:
    a pid reused by a new process has a later one)."""

    name: str
    cpu: float
    started: int


@dataclass
class CpuTimes:
    """CPU seconds so far: per thread of this process (by thread id), with the seconds each
    waited on a run queue (runnable, no CPU free for it); the process's whole; other processes'
    (by pid, with their names); and the machine's busy time (all CPUs, every process)."""

    threads: dict[int, float]
    names: dict[int, str]
    process: float
    machine_busy: float
    wall: float
    waits: dict[int, float] = field(default_factory=dict)
    processes: dict[int, ProcessTimes] = field(default_factory=dict)


def _stat(path: str) -> ProcessTimes | None:
    """A thread's or process's stat file read; None once it is gone."""
    try:
        with open(path) as f:
            stat = f.read()
    except OSError:  # the thread or process ended meanwhile
        return None
    name, fields = stat[stat.index("(") + 1: stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
    # fields[0] is proc(5)'s field 3 (state): 11, 12 utime, stime; 19 starttime
    return ProcessTimes(name, (int(fields[11]) + int(fields[12])) / TICK, int(fields[19]))


def _run_queue_wait(task: str) -> float | None:
    """Seconds the thread waited on a run queue so far (schedstat's second field, ns)."""
    try:
        with open(f"{task}/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):  # a kernel without schedstats, or the thread ended
        return None


def cpu_times() -> CpuTimes:
    """Read from /proc (Linux); empty where it cannot be read."""
    threads, names, waits = {}, {}, {}
    python_names = {t.native_id: t.name for t in threading.enumerate()}
    tasks = "/proc/self/task"
    for tid in (int(entry) for entry in os.listdir(tasks)) if os.path.isdir(tasks) else ():
        stat = _stat(f"{tasks}/{tid}/stat")
        if stat is None:
            continue
        threads[tid] = stat.cpu
        names[tid] = "main" if tid == os.getpid() else python_names.get(tid, stat.name)
        wait = _run_queue_wait(f"{tasks}/{tid}")
        if wait is not None:
            waits[tid] = wait
    return CpuTimes(threads, names, time.process_time(), _machine_busy(), time.perf_counter(), waits,
                    _other_processes())


def _other_processes() -> dict[int, ProcessTimes]:
    """Every other process's name and CPU seconds so far, by pid (kernel threads included)."""
    found, me = {}, os.getpid()
    try:
        pids = [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]
    except OSError:
        return found
    for pid in pids:
        stat = _stat(f"/proc/{pid}/stat") if pid != me else None
        if stat is not None:
            found[pid] = stat
    return found


def _machine_busy() -> float:
    """Seconds all CPUs spent not idle, since boot (/proc/stat's first line)."""
    try:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:9]]  # user .. steal
    except (OSError, ValueError):
        return 0.0
    idle, iowait = values[3], values[4]
    return (sum(values) - idle - iowait) / TICK


def cpu_use(before: CpuTimes, after: CpuTimes, top: int = TOP_THREADS) -> dict:
    """Between two readings: the busiest threads of this process (CPU seconds each, in cores:
    seconds per second of wall time, and ms waited on a run queue), the process's whole and
    its threads' waits together, other processes' cores, and the busiest other processes (those
    alive at the second reading: one that ended between the two counts only in the whole)."""
    wall = max(after.wall - before.wall, 1e-9)
    used = {tid: after.threads[tid] - before.threads.get(tid, 0.0) for tid in after.threads}
    waited = {tid: after.waits[tid] - before.waits.get(tid, 0.0) for tid in after.waits}
    busiest = sorted(used, key=used.get, reverse=True)[:top]
    process = after.process - before.process
    others = max(0.0, (after.machine_busy - before.machine_busy) - process)
    other_used = {pid: now.cpu - _earlier_cpu(before, pid, now) for pid, now in after.processes.items()}
    other_busiest = sorted(other_used, key=other_used.get, reverse=True)[:TOP_PROCESSES]
    return {"wall_s": round(wall, 3),
            "threads": [{"thread": after.names[tid], "cpu_s": round(used[tid], 3),
                         "cores": round(used[tid] / wall, 2),
                         "run_queue_ms": round(waited.get(tid, 0.0) * 1e3, 1)}
                        for tid in busiest if used[tid] > 0],
            "threads_busy": sum(1 for s in used.values() if s > 0.5 * wall),
            "process_cores": round(process / wall, 2),
            "run_queue_ms": round(sum(waited.values()) * 1e3, 1),
            "other_processes_cores": round(others / wall, 2),
            "other_processes": [{"process": after.processes[pid].name, "pid": pid,
                                 "cores": round(other_used[pid] / wall, 2)}
                                for pid in other_busiest if other_used[pid] > 0]}


def _earlier_cpu(before: CpuTimes, pid: int, now: ProcessTimes) -> float:
    """The CPU seconds `pid` had at `before`: 0 for a process started since (also one that
    reuses the pid of a process that ended)."""
    earlier = before.processes.get(pid)
    return earlier.cpu if earlier is not None and earlier.started == now.started else 0.0


def vm_events(prefixes: tuple[str, ...] = VM_EVENTS) -> dict[str, int]:
    """The /proc/vmstat counters so far whose names start with one of `prefixes` (empty where
    it cannot be read)."""
    try:
        lines = Path("/proc/vmstat").read_text().splitlines()
    except OSError:
        return {}
    counters = {}
    for line in lines:
        name, _, value = line.partition(" ")
        if name.startswith(prefixes) and value.strip().isdigit():
            counters[name] = int(value)
    return counters


def vm_events_between(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """The counters that moved between two readings, by how much (machine-wide: every process)."""
    return {name: after[name] - before.get(name, 0) for name in after if after[name] != before.get(name, 0)}


class WhatElseRan:
    """All of the above over one stretch (a `with` block); then `found` holds its collections
    (`gc`), compiles, CPU use (`cpu`) and memory events (`vm_events`)."""

    def __enter__(self) -> WhatElseRan:
        self._times, self._events, self._compiles = cpu_times(), vm_events(), compiles()
        self._collections = GcPauses().__enter__()
        self.found: dict = {}
        return self

    def __exit__(self, *exc) -> None:
        self._collections.__exit__()
        self.found = {"gc": self._collections.summary(), "compiles": compiles() - self._compiles,
                      "cpu": cpu_use(self._times, cpu_times()),
                      "vm_events": vm_events_between(self._events, vm_events())}
