"""The project's own error types. Every user-facing failure raises one of these
with a single message that names the problem (a key, a path, a value)."""

from __future__ import annotations

import difflib
import warnings


class AdapterKitError(Exception):
    """Base class of every error adapterkit raises on purpose."""


class ConfigError(AdapterKitError, ValueError):
    """A configuration is malformed, out of range or does not fit the model."""


class CheckpointError(AdapterKitError):
    """A checkpoint or adapter file is missing, corrupt, unsafe or mismatched."""


class DataError(AdapterKitError):
    """A dataset file or feature store is missing or malformed."""


def did_you_mean(name: str, options) -> str:
    """Return ' (did you mean "x"?)' when a close option exists, else ''."""
    close = difflib.get_close_matches(str(name), [str(o) for o in options], n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""


class AdapterKitWarning(RuntimeWarning):
    """A warning the library gives on purpose (a checkpoint skipped, a fallback taken). It is
    printed once, as one line ``adapterkit: warning: ...``, without the source line Python's
    default format adds; filters and ``pytest.warns(RuntimeWarning)`` see it as usual."""


def warn(message: str, stacklevel: int = 2) -> None:
    """Give ``message`` as one :class:`AdapterKitWarning` (do not log it as well: it would print twice)."""
    warnings.warn(message, AdapterKitWarning, stacklevel=stacklevel + 1)


_default_formatwarning = warnings.formatwarning


def _formatwarning(message, category, filename, lineno, line=None):
    if isinstance(category, type) and issubclass(category, AdapterKitWarning):
        return f"adapterkit: warning: {message}\n"
    return _default_formatwarning(message, category, filename, lineno, line)


warnings.formatwarning = _formatwarning
