"""Errors a user can act on.

Every exception tandem raises on purpose derives from TandemError; the CLI prints those as one
clear line (no traceback unless --debug). Anything else escaping is a bug in tandem.
"""


class TandemError(Exception):
    """Base class for errors with a message meant for the user."""


class GGUFError(TandemError):
    """A GGUF file, split set or folder that cannot be used as asked."""


class KernelError(TandemError):
    """A kernel asked to do something it cannot (type, shape, thread count)."""


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (its type's name where it has none): for
    warnings about a failure that tandem works around, e.g. a compiler that is missing."""
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
