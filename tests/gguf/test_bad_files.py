"""Damaged or inconsistent files get a GGUFError naming the file and the problem."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFWriter

import tandem
from tandem.errors import GGUFError
from tandem.kernels.quantize import quantize


def _write_small(path: Path) -> Path:
    rng = np.random.default_rng(0)
    writer = GGUFWriter(path, "llama")
    writer.add_uint32("llama.block_count", 1)
    writer.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    a = quantize(rng.standard_normal((4, 64)).astype(np.float32), GGMLQuantizationType.Q8_0)
    writer.add_tensor("first.weight", a, raw_dtype=GGMLQuantizationType.Q8_0)
    writer.add_tensor("second.weight", rng.standard_normal((3, 16)).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _tensor_info_offset(data: bytes, name: str) -> int:
    """Byte offset of the n_dims field of tensor `name`'s info entry."""
    encoded = name.encode()
    at = data.index(struct.pack("<Q", len(encoded)) + encoded)
    return at + 8 + len(encoded)


@pytest.fixture
def good(tmp_path) -> Path:
    path = _write_small(tmp_path / "good.gguf")
    model = tandem.open_gguf(path)  # the unmodified file opens
    assert set(model.tensors) == {"first.weight", "second.weight"}
    return path


def _patched(good: Path, patch) -> Path:
    data = bytearray(good.read_bytes())
    patch(data)
    bad = good.with_name("bad.gguf")
    bad.write_bytes(bytes(data))
    return bad


def test_wrong_magic(good):
    bad = _patched(good, lambda d: d.__setitem__(slice(0, 4), b"GGML"))
    with pytest.raises(GGUFError, match=r"bad.gguf: not a GGUF file \(starts with b'GGML'"):
        tandem.open_gguf(bad)


def test_not_gguf_at_all(tmp_path):
    path = tmp_path / "notes.gguf"
    path.write_text("hello world, not a model")
    with pytest.raises(GGUFError, match="notes.gguf: not a GGUF file"):
        tandem.open_gguf(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    with pytest.raises(GGUFError, match="empty.gguf: not a GGUF file"):
        tandem.open_gguf(path)


@pytest.mark.parametrize("keep", [6, 30, 90])
def test_truncated_header(good, keep):
    bad = good.with_name("bad.gguf")
    bad.write_bytes(good.read_bytes()[:keep])
    with pytest.raises(GGUFError, match="bad.gguf: (truncated|damaged) GGUF header"):
        tandem.open_gguf(bad)


def test_truncated_tensor_data(good):
    bad = good.with_name("bad.gguf")
    bad.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(GGUFError, match=r"bad.gguf: tensor 'second.weight' needs bytes .* "
                                        r"the file is truncated \(\d+ bytes short\)"):
        tandem.open_gguf(bad)


def test_unknown_ggml_type(good):
    def patch(d):
        at = _tensor_info_offset(d, "first.weight") + 4 + 2 * 8  # past n_dims and 2 dims
        d[at:at + 4] = struct.pack("<I", 99)

    with pytest.raises(GGUFError, match="bad.gguf: tensor 'first.weight' has unknown ggml type id 99"):
        tandem.open_gguf(_patched(good, patch))


def test_rows_not_a_whole_number_of_blocks(good):
    def patch(d):
        at = _tensor_info_offset(d, "first.weight") + 4  # first dim: row length 64 -> 48
        d[at:at + 8] = struct.pack("<Q", 48)

    with pytest.raises(GGUFError, match="'first.weight' of type Q8_0 has rows of 48 values.*"
                                        "byte size does not match its shape"):
        tandem.open_gguf(_patched(good, patch))


def test_tensor_larger_than_the_gap_to_the_next(good):
    def patch(d):
        at = _tensor_info_offset(d, "first.weight") + 4 + 8  # second dim: 4 rows -> 5 rows
        d[at:at + 8] = struct.pack("<Q", 5)

    with pytest.raises(GGUFError, match="'first.weight' .* needs 340 bytes but tensor "
                                        "'second.weight' starts 288 bytes after it"):
        tandem.open_gguf(_patched(good, patch))


def test_split_set_with_a_member_missing(tiny_split, tmp_path):
    for p in tiny_split:
        shutil.copy(p, tmp_path / p.name)
    (tmp_path / tiny_split[1].name).unlink()
    with pytest.raises(GGUFError, match="has 3 members but 1 is missing: tiny-00002-of-00003.gguf"):
        tandem.open_gguf(tmp_path / tiny_split[0].name)


def test_split_member_from_another_set(tiny_split, tmp_path):
    for p in tiny_split:
        shutil.copy(p, tmp_path / p.name)
    # Member 2 replaced by member 3's content: its split.no says 2 (0-based), not 1.
    shutil.copy(tiny_split[2], tmp_path / tiny_split[1].name)
    with pytest.raises(GGUFError, match="expected member 2 of a 3-file split set"):
        tandem.open_gguf(tmp_path / tiny_split[0].name)


def test_missing_tensor_is_named(good):
    with pytest.raises(GGUFError, match="good.gguf: no tensor named 'third.weight'"):
        tandem.open_gguf(good).dequantize("third.weight")


def test_missing_path():
    with pytest.raises(GGUFError, match="no such file or folder"):
        tandem.open_gguf("/nonexistent/model.gguf")
