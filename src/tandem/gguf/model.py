"""`open_gguf`: one model's GGUF file(s) as metadata, a tensor table and tensor data.

All tensor data stays in the memory-mapped files: `raw()` is a zero-copy view, and only
`dequantize()` makes float copies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from tandem.errors import GGUFError
from tandem.gguf.files import model_files
from tandem.gguf.reader import TensorInfo, read_gguf_file

SPLIT_NO = "split.no"
SPLIT_COUNT = "split.count"
SPLIT_TENSORS = "split.tensors.count"


class GGUFModel:
    """The files of one model, opened and checked. Use `open_gguf(path)` to make one."""

    def __init__(self, path: str | Path):
        self.files: list[Path] = model_files(path)
        self._maps: dict[Path, np.memmap] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, Any] = {}
        for no, file in enumerate(self.files):
            metadata, tensors, reader = read_gguf_file(file)
            self._maps[file] = reader.data
            if no == 0:
                self.metadata = metadata
            self._check_split_member(file, no, metadata)
            for info in tensors:
                if info.name in self.tensors:
                    raise GGUFError(f"{file}: tensor {info.name!r} also stands in "
                                    f"{self.tensors[info.name].file.name}")
                self.tensors[info.name] = info
        self._check_split_total()

    def _check_split_member(self, file: Path, no: int, metadata: dict[str, Any]) -> None:
        count = len(self.files)
        if count == 1 and SPLIT_COUNT not in metadata:
            return
        if metadata.get(SPLIT_COUNT) != count or metadata.get(SPLIT_NO) != no:
            raise GGUFError(
                f"{file}: expected member {no + 1} of a {count}-file split set, but its metadata "
                f"says split.no={metadata.get(SPLIT_NO)} of split.count={metadata.get(SPLIT_COUNT)}"
            )

    def _check_split_total(self) -> None:
        expected = self.metadata.get(SPLIT_TENSORS)
        if expected is not None and expected != len(self.tensors):
            raise GGUFError(
                f"{self.files[0]}: split set should hold {expected} tensors, its "
                f"{len(self.files)} files hold {len(self.tensors)}"
            )

    @property
    def path(self) -> Path:
        """The first (or only) file."""
        return self.files[0]

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise GGUFError(f"{self.path}: metadata lacks general.architecture")
        return arch

    @property
    def config(self):
        """Typed hyperparameters for this architecture (see tandem.gguf.config)."""
        from tandem.gguf.config import config_from_metadata

        return config_from_metadata(self.metadata, source=str(self.path))

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise GGUFError(f"{self.path}: no tensor named {name!r}") from None

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of tensor `name`: a read-only uint8 view into the mapped file."""
        t = self.info(name)
        return self._maps[t.file][t.offset : t.offset + t.n_bytes]

    def dequantize(self, name: str) -> torch.Tensor:
        """Tensor `name` as float32 in its logical shape (rows, ..., row length)."""
        from tandem.kernels.dequant import dequantize

        t = self.info(name)
        return dequantize(self.raw(name), t.ggml_type, t.shape)

    def close(self) -> None:
        """Drop the file mappings (views handed out earlier keep their own reference)."""
        self._maps.clear()

    def __enter__(self) -> GGUFModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        files = f"{len(self.files)} files" if len(self.files) > 1 else self.path.name
        return f"GGUFModel({files}, {self.metadata.get('general.architecture')}, {len(self.tensors)} tensors)"


def open_gguf(path: str | Path) -> GGUFModel:
    """Open a GGUF file, a split set (any member) or a folder holding one model."""
    return GGUFModel(path)
