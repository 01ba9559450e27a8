"""The kernels' A/B settings from the environment: whole numbers, and the optional modules
(Triton kernels) that some of them turn on."""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType

from tandem.errors import KernelError, first_line

log = logging.getLogger(__name__)


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


def triton_module(name: str, setting: str, instead: str, asked: bool = True) -> ModuleType | None:
    """tandem.kernels.<name>, whose kernels need Triton, for the setting `setting`; None where
    it cannot be imported, with a warning that `instead` runs when the user `asked` for it (a
    default that needs Triton falls back quietly)."""
    try:
        return importlib.import_module(f"tandem.kernels.{name}")
    except ImportError as exc:
        report = log.warning if asked else log.debug
        report("%s=1 but Triton is missing (%s): %s instead", setting, first_line(exc), instead)
        return None
