"""Whole-number settings read from the environment (the kernels' A/B knobs)."""

from __future__ import annotations

import os

from tandem.errors import KernelError


def env_int(name: str, default: int = 0, minimum: int = 0) -> int:
    """The whole number in environment variable `name` (`default` when unset or empty);
    KernelError naming the variable when it is not one, or below `minimum`."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or number < minimum:
        raise KernelError(f"{name} must be a whole number >= {minimum}, got {value!r}")
    return number
