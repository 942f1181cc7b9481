"""The project's own error types. Every user-facing failure raises one of these
with a single message that names the problem (a key, a path, a value)."""

from __future__ import annotations

import difflib


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
