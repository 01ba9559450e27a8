"""Fixtures: tiny random DeepSeek-V3 folders made with `transformers`."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("transformers")

from hf_tiny import CONFIGS, QUANT_BASE, build_hf  # noqa: E402


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {name: build_hf(root / name, seed=i, **cfg) for i, (name, cfg) in enumerate(CONFIGS.items())}


@pytest.fixture(scope="session")
def hf_quant_model(tmp_path_factory) -> Path:
    return build_hf(tmp_path_factory.mktemp("hfq") / "model", seed=11, **QUANT_BASE)
