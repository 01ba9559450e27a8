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


@pytest.fixture(scope="module")
def side_by_side():
    return _load("side_by_side")


@pytest.fixture(scope="module")
def ab():
    return _load("ab")


@pytest.fixture(scope="module")
def moe_decode():
    return _load("moe_decode")


@pytest.fixture(scope="module")
def decode_profile():
    return _load("decode_profile")
