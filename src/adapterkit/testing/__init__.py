"""Tiny random-init models built from configs (no weights needed), for tests and smoke runs."""

from adapterkit.testing.tiny import TINY_FAMILIES, tiny_inputs, tiny_model

__all__ = ["TINY_FAMILIES", "tiny_inputs", "tiny_model"]
