"""Small helpers every hook-based method shares."""

from __future__ import annotations

from torch import nn

from adapterkit.errors import ConfigError


def out_width(module: nn.Module) -> int:
    """Output width of a hooked module (Linear, GPT-2 Conv1D, or anything with a weight)."""
    for attr in ("out_features", "nf"):
        if hasattr(module, attr):
            return int(getattr(module, attr))
    w = getattr(module, "weight", None)
    if w is not None:
        return int(w.shape[0])
    raise ConfigError(f"cannot tell the output width of module {type(module).__name__}")


def first(out):
    """The hidden states of a module output that may be a tuple."""
    return out[0] if isinstance(out, tuple) else out


def replace_first(out, new):
    """``out`` with its hidden states replaced by ``new`` (tuple-aware)."""
    return (new,) + tuple(out[1:]) if isinstance(out, tuple) else new


def first_input(args: tuple, kwargs: dict | None = None):
    """The hidden states a module was called with: its first positional argument, else the
    ``hidden_states`` keyword (Llama-family layers pass it by keyword), else the first tensor keyword."""
    if args:
        return args[0]
    kwargs = kwargs or {}
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    for v in kwargs.values():
        if hasattr(v, "shape"):
            return v
    raise ConfigError("a hooked module was called with no hidden-states argument")
