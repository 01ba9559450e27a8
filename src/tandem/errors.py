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
