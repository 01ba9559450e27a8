"""Builds tandem's own CPU kernels (plain C, called through ctypes); the rest is pyproject.toml."""

from setuptools import Extension, setup

experts = Extension(
    "tandem.kernels._experts",
    sources=["src/tandem/kernels/csrc/experts.c", "src/tandem/kernels/csrc/runner.c"],
    # AVX-512 paths carry their own target attributes and are chosen at run time, so the
    # library runs on any x86-64 (portable kernels) and on other CPUs. No fused multiply-adds
    # where the code has none: the vector and portable SiLU must round alike.
    extra_compile_args=["-O3", "-fopenmp", "-std=c11", "-Wall", "-ffp-contract=off"],
    extra_link_args=["-fopenmp"],
)

setup(ext_modules=[experts])
