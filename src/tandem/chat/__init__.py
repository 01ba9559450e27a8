"""Chat: templates (sandboxed), reasoning split, and sessions over tandem.LLM."""
