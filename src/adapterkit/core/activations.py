"""Activation functions by name (functional, no module allocation on the hot path)."""

from __future__ import annotations

import torch.nn.functional as F

from adapterkit.errors import ConfigError


def _gelu_new(x):
    return F.gelu(x, approximate="tanh")


def _identity(x):
    return x


ACT = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": _gelu_new,
    "swish": F.silu,
    "silu": F.silu,
    "tanh": F.tanh,
    "identity": _identity,
}


def get_activation(name: str):
    try:
        return ACT[name]
    except KeyError:
        raise ConfigError(f'unknown activation "{name}"; known: {sorted(ACT)}') from None
