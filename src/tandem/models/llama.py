"""Llama-family decoders (GGUF architecture `llama`: Llama 2/3, SmolLM2, Mistral-style) are the
shared decoder (tandem.models.decoder) with grouped-query attention and SwiGLU blocks: nothing
here beyond that composition, kept as the family's entry point."""

from tandem.models.decoder import Block, Decoder

__all__ = ["Block", "Decoder"]
