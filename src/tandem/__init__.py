"""tandem: DeepSeek-R1/V3-class MoE models from GGUF on one GPU plus a big-RAM CPU."""

from tandem.errors import GGUFError, KernelError, TandemError
from tandem.gguf import GGUFModel, open_gguf

__version__ = "0.1.0"

__all__ = ["LLM", "GGUFError", "GGUFModel", "KernelError", "TandemError", "__version__", "open_gguf"]


def __getattr__(name: str):
    if name == "LLM":  # torch-heavy: import on first use
        from tandem.runtime.llm import LLM

        return LLM
    raise AttributeError(f"module 'tandem' has no attribute {name!r}")
