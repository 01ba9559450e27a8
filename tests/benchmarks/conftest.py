"""The benchmark scripts (benchmarks/*.py, not a package) loaded as modules for their tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).parents[2] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _script_fixture(name: str):
    @pytest.fixture(scope="module", name=name)
    def script():
        return _load(name)
    return script


side_by_side, ab, moe_decode, decode_profile, kernel_ab, quant_matvec = (
    _script_fixture(name) for name in ("side_by_side", "ab", "moe_decode", "decode_profile", "kernel_ab",
                                       "quant_matvec"))
