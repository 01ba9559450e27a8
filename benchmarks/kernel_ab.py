"""The CPU expert kernels of two revisions in ONE process: old against new, in rounds.

Builds csrc/experts.c + runner.c of a git revision (--base, default HEAD; or --base-dir, a
folder holding the two files where the tree has no .git, as on the GPU machine) and of the
working tree into two shared libraries and loads both. A case is one weight matrix of R1's
expert shapes times 1..8 tokens (`tandem_matmul`: the tile kernels only), or with --types
expert the MoE op on one UD-IQ1_S expert that all its tokens chose (`tandem_moe`: the GEMM
paths, on AMX where the CPU has it, from a few tokens on), or with --types layer a decode
step's op: each token chooses 8 such experts from a pool past the L3 cache (weights from RAM).
Random valid blocks. Each round calls every case once with each library, the order flipped
round by round, so the machine's drift falls on all alike: between processes the same build
moved by up to +-25% on the dev VM (other tenants), within one process the order held run after
run. The two builds' outputs must agree (same integer sums; float sums may differ in the last
bits where the summation order changed).

    python benchmarks/kernel_ab.py [--base REV | --base-dir DIR] [--types iq1_s iq2_xxs expert layer]
                                   [--tokens 1 2 4 8] [--threads 1] [--calls 30]
                                   [--out benchmarks/results]

Prints a table and writes kernel_ab-<host>-<time>.json (min and median ms per variant).
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants

from tandem.bench import machine
from tandem.bench.random_blocks import random_blocks
from tandem.kernels import native

ROOT = Path(__file__).resolve().parent.parent
CSRC = "src/tandem/kernels/csrc"
SOURCES = ("experts.c", "runner.c")
CFLAGS = ["-O3", "-fopenmp", "-std=gnu11", "-Wall", "-ffp-contract=off", "-shared", "-fPIC"]
# (type, rows, k) of the expert matrices of R1: gate / up, and down
SHAPES = {"iq1_s": (T.IQ1_S, 2048, 7168), "iq2_xxs": (T.IQ2_XXS, 7168, 2048),
          "q4_k": (T.Q4_K, 2048, 7168), "q6_k": (T.Q6_K, 7168, 2048)}
# --types expert: one routed expert of the UD-IQ1_S recipe (gate, up, down types; n_ff, d)
EXPERT = (T.IQ1_S, T.IQ1_S, T.IQ2_XXS, 2048, 7168)
# --types layer: a pool of that expert past the L3 cache; each token chooses K_ROUTED of them
POOL_EXPERTS, K_ROUTED = 38, 8


def build(sources: dict[str, str], out: Path, cflags: list[str] = CFLAGS) -> ctypes.CDLL:
    """The kernel library from these sources (name -> text), loaded on its own."""
    out.mkdir(parents=True, exist_ok=True)
    for name, text in sources.items():
        (out / name).write_text(text)
    lib = out / "kernels.so"
    subprocess.run(["gcc", *cflags, *(str(out / s) for s in SOURCES), "-o", str(lib), "-lm"], check=True)
    dll = ctypes.CDLL(str(lib), mode=ctypes.RTLD_LOCAL)
    dll.tandem_set_tables.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    ptr, i32 = ctypes.c_void_p, ctypes.c_int
    dll.tandem_matmul.argtypes = [ptr, i32, i32, i32, ptr, i32, ptr, i32]
    dll.tandem_moe.argtypes = [ptr, i32, i32, ptr, ptr, i32, ptr, i32, ptr, i32, ptr, i32, i32, i32, ptr, i32]
    iq1s, iq2xxs = native._grid_bytes(quants.IQ1_S, 1), native._grid_bytes(quants.IQ2_XXS, 0)
    dll.tandem_set_tables(iq1s.ctypes.data, iq2xxs.ctypes.data)
    return dll


def sources_at(rev: str) -> dict[str, str]:
    return {s: subprocess.run(["git", "show", f"{rev}:{CSRC}/{s}"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout for s in SOURCES}


def sources_in(folder: Path) -> dict[str, str]:
    return {s: (folder / s).read_text() for s in SOURCES}


class Case:
    """n_tok tokens through one kernel call of each library: their outputs ([n_tok, rows]) and
    call times. Subclasses set up the operands and make the call (`run`)."""

    op = ""  # the C function `run` calls, for errors

    def __init__(self, kind: str, n_tok: int, threads: int, libs: list[str], rows: int, k: int):
        self.kind, self.n_tok, self.threads, self.rows, self.k = kind, n_tok, threads, rows, k
        self.outs = {name: np.zeros((n_tok, rows), np.float32) for name in libs}
        self.times: dict[str, list[float]] = {name: [] for name in libs}

    def run(self, lib: ctypes.CDLL, out: np.ndarray) -> int:
        raise NotImplementedError

    def call(self, name: str, lib: ctypes.CDLL, keep: bool) -> None:
        start = time.perf_counter()
        rc = self.run(lib, self.outs[name])
        if rc != 0:
            raise RuntimeError(f"{name}: {self.op} returned {rc}")
        if keep:
            self.times[name].append((time.perf_counter() - start) * 1e3)

    def summary(self) -> dict:
        base, test = self.outs.values()
        scale = float(np.abs(base).max()) or 1.0
        return {
            "type": self.kind, "rows": self.rows, "k": self.k, "tokens": self.n_tok, "threads": self.threads,
            "max_abs_difference_over_max": float(np.abs(base - test).max()) / scale,
            **{f"{name}_ms_min": min(t) for name, t in self.times.items()},
            **{f"{name}_ms_median": statistics.median(t) for name, t in self.times.items()},
        }


class MatrixCase(Case):
    """One matrix of `kind` (SHAPES) times n_tok tokens (`tandem_matmul`: the tile kernels)."""

    op = "tandem_matmul"

    def __init__(self, kind: str, n_tok: int, threads: int, libs: list[str], rng: np.random.Generator):
        self.qtype, rows, k = SHAPES[kind]
        super().__init__(kind, n_tok, threads, libs, rows, k)
        self.weight = random_blocks(self.qtype, rows * k // 256, rng)
        self.x = rng.standard_normal((n_tok, k), dtype=np.float32)

    def run(self, lib: ctypes.CDLL, out: np.ndarray) -> int:
        return lib.tandem_matmul(self.weight.ctypes.data, int(self.qtype), self.rows, self.k,
                                 self.x.ctypes.data, self.n_tok, out.ctypes.data, self.threads)


class ExpertCase(Case):
    """EXPERT for n_tok tokens that all chose it, through the MoE op (`tandem_moe`): the tile
    kernels for a few tokens, the GEMM paths from a few more (on AMX tiles where the CPU has
    them), as the engine calls it."""

    op = "tandem_moe"

    def __init__(self, kind: str, n_tok: int, threads: int, libs: list[str], rng: np.random.Generator):
        *self.types, self.n_ff, self.d = EXPERT
        super().__init__(kind, n_tok, threads, libs, self.d, self.n_ff)
        shapes = ((self.n_ff, self.d), (self.n_ff, self.d), (self.d, self.n_ff))
        self.matrices = [random_blocks(t, rows * k // 256, rng)
                         for t, (rows, k) in zip(self.types, shapes, strict=True)]
        self.x = rng.standard_normal((n_tok, self.d), dtype=np.float32)
        self.ids = np.zeros((n_tok, 1), np.int32)
        self.weights = np.ones((n_tok, 1), np.float32)

    def run(self, lib: ctypes.CDLL, out: np.ndarray) -> int:
        (gate, up, down), (gt, ut, dt) = self.matrices, self.types
        return lib.tandem_moe(self.x.ctypes.data, self.n_tok, self.d, self.ids.ctypes.data,
                              self.weights.ctypes.data, 1, gate.ctypes.data, int(gt), up.ctypes.data, int(ut),
                              down.ctypes.data, int(dt), 1, self.n_ff, out.ctypes.data, self.threads)


class LayerCase(ExpertCase):
    """One decode step's CPU op as the engine makes it: n_tok tokens, each choosing K_ROUTED
    experts of EXPERT's types out of a pool of POOL_EXPERTS (362 MB), the next call choosing the
    next ones: an expert comes back after 361 MB of others, past the GPU machine's 300 MB L3, so
    the weights come from RAM, not from the cache that holds one expert's 9.5 MB between the
    calls of `expert`. The pool repeats one random expert's bytes (the kernels' time depends on
    where the bytes lie, not on their values; and every expert gives the same result)."""

    def __init__(self, kind: str, n_tok: int, threads: int, libs: list[str], rng: np.random.Generator):
        super().__init__(kind, n_tok, threads, libs, rng)
        self.matrices = [np.tile(m, (POOL_EXPERTS, 1)) for m in self.matrices]
        self.ids = np.zeros((n_tok, K_ROUTED), np.int32)
        self.weights = np.full((n_tok, K_ROUTED), 1.0 / K_ROUTED, np.float32)
        self.step = 0

    def run(self, lib: ctypes.CDLL, out: np.ndarray) -> int:
        # every library call reads experts the calls before did not touch for a while
        first = (self.step * K_ROUTED * self.n_tok) % POOL_EXPERTS
        self.ids[:] = (first + np.arange(self.ids.size).reshape(self.ids.shape)) % POOL_EXPERTS
        self.step += 1
        (gate, up, down), (gt, ut, dt) = self.matrices, self.types
        return lib.tandem_moe(self.x.ctypes.data, self.n_tok, self.d, self.ids.ctypes.data,
                              self.weights.ctypes.data, K_ROUTED, gate.ctypes.data, int(gt), up.ctypes.data,
                              int(ut), down.ctypes.data, int(dt), POOL_EXPERTS, self.n_ff, out.ctypes.data,
                              self.threads)


def run_rounds(libs: dict[str, ctypes.CDLL], cases: list[Case], rounds: int) -> None:
    """Every case once per round, the libraries' order flipped each round: slow spells of the
    machine fall on all cases and both libraries alike. Round 0 warms up."""
    for r in range(rounds + 1):
        names = list(libs) if r % 2 == 0 else list(libs)[::-1]
        for case in cases:
            for name in names:
                case.call(name, libs[name], keep=r > 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="HEAD", help="git revision of the old kernels (default HEAD)")
    parser.add_argument("--base-dir", type=Path, help="a folder with the old experts.c and runner.c instead")
    parser.add_argument("--types", nargs="+", default=["iq1_s", "iq2_xxs"],
                        choices=[*sorted(SHAPES), "expert", "layer"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calls", type=int, default=30, help="rounds: calls per case and library")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    now = datetime.now(UTC)
    if args.base_dir is not None:
        base_rev, base_sources = str(args.base_dir), sources_in(args.base_dir)
    else:
        base_rev = subprocess.run(["git", "rev-parse", args.base], cwd=ROOT, capture_output=True, text=True,
                                  check=True).stdout.strip()
        base_sources = sources_at(base_rev)
    with tempfile.TemporaryDirectory() as tmp:
        libs = {"base": build(base_sources, Path(tmp) / "base"),
                "test": build(sources_in(ROOT / CSRC), Path(tmp) / "test")}
        rng = np.random.default_rng(0)
        kinds = {"expert": ExpertCase, "layer": LayerCase}
        cases = [kinds.get(kind, MatrixCase)(kind, n, args.threads, list(libs), rng)
                 for kind in args.types for n in args.tokens]
        run_rounds(libs, cases, args.calls)
        rows = [case.summary() for case in cases]
    label = base_rev if args.base_dir else base_rev[:10]
    print(f"base {label} vs working tree, {args.threads} thread(s), min of {args.calls} calls each")
    print(f"{'type':8s} {'tokens':>6s} {'base ms':>8s} {'test ms':>8s} {'change':>7s} {'max diff':>9s}")
    for r in rows:
        change = r["test_ms_min"] / r["base_ms_min"] - 1
        print(f"{r['type']:8s} {r['tokens']:6d} {r['base_ms_min']:8.3f} {r['test_ms_min']:8.3f} "
              f"{change:+7.1%} {r['max_abs_difference_over_max']:9.1e}")
    record = machine.record_header("kernel_ab", now)
    record.update(base=base_rev, test="working tree of " + record["commit"], rows=rows)
    print(machine.write_record(record, args.out, now))
    bad = [r for r in rows if r["max_abs_difference_over_max"] > 1e-5]
    if bad:
        sys.exit(f"the builds disagree: {bad}")


if __name__ == "__main__":
    main()
