"""Typed errors. Every message is one line that names the problem and the fix.

The CLI turns any `SpecAttnError` into that line on stderr and exit code 2, so a
user never sees a traceback for bad input.
"""


class SpecAttnError(Exception):
    """Base class of every error we raise on purpose."""


class ModelLoadError(SpecAttnError):
    """The model path is missing, unreadable, truncated or not a checkpoint."""


class UnsupportedModelError(SpecAttnError):
    """The checkpoint is readable but its architecture or layout is not supported."""


class InvalidInputError(SpecAttnError):
    """A user-given value (prompt, sampling setting, budget, ...) is out of range."""


class ContextTooLongError(InvalidInputError):
    """The request needs more positions than the model or the KV cache has."""


class CacheFullError(ContextTooLongError):
    """The paged KV cache has no free pages left for the request."""


class DeviceError(SpecAttnError):
    """A GPU-only option was asked for on a machine without a GPU."""
