"""How many compiled variants torch.compile keeps of one function.

Dynamo keeps 8 by default; past them it silently runs the function eagerly. Functions compiled
for many shapes (an expert count, a bucket, a weight shape each) need more.
"""

from __future__ import annotations

import torch._dynamo


def allow_compiled_variants(n: int) -> None:
    """Let dynamo keep at least `n` compiled variants of each function (never fewer than now)."""
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, n)
