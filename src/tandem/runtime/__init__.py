"""Runtime: KV cache, sampling, and the LLM API over a loaded model."""
