"""argparse types for the command lines' numbers: a bad value is argparse's one-line error naming
the option ("argument --lr: must be a positive number, got '-1'"), before any work starts.

`positive_int`, `nonnegative_int`, `positive_float`, `nonnegative_float`, `fraction` (0 to 1,
both included) and `open_fraction` (strictly between 0 and 1). Floats must be finite.
"""

from __future__ import annotations

import argparse
import math

__all__ = ["positive_int", "nonnegative_int", "positive_float", "nonnegative_float", "fraction", "open_fraction"]


def _int(text: str, lo: int, what: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a {what} integer, got {text!r}") from None
    if n < lo:
        raise argparse.ArgumentTypeError(f"must be a {what} integer, got {n}")
    return n


def _float(text: str, ok, what: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if not math.isfinite(x) or not ok(x):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return x


def positive_int(text: str) -> int:
    return _int(text, 1, "positive")


def nonnegative_int(text: str) -> int:
    return _int(text, 0, "non-negative")


def positive_float(text: str) -> float:
    return _float(text, lambda x: x > 0, "a positive number")


def nonnegative_float(text: str) -> float:
    return _float(text, lambda x: x >= 0, "a non-negative number")


def open_fraction(text: str) -> float:
    return _float(text, lambda x: 0 < x < 1, "a number strictly between 0 and 1")


def fraction(text: str) -> float:
    return _float(text, lambda x: 0 <= x <= 1, "a number from 0 to 1")
