"""GGUF access: files, split sets and folders; metadata; tensor views; dequantization."""

from tandem.gguf.model import GGUFModel, open_gguf
from tandem.gguf.reader import TensorInfo
from tandem.gguf.types import GGMLType

__all__ = ["GGMLType", "GGUFModel", "TensorInfo", "open_gguf"]
