"""Freeze policies as methods: ``layernorm`` (train only LayerNorms) and ``bitfit``
(train only biases, Ben Zaken et al.). They attach no modules."""

from __future__ import annotations

from dataclasses import dataclass

from adapterkit.core.base import AdapterSet
from adapterkit.core.config import AdapterConfig, register_method


@dataclass
class LayerNormConfig(AdapterConfig):
    method: str = "layernorm"
    train_layernorms: bool = True


@dataclass
class BitFitConfig(AdapterConfig):
    method: str = "bitfit"
    train_biases: bool = True


class PolicyOnly(AdapterSet):
    merge_note = "it trains base parameters in place; there is nothing separate to merge"

    def attach(self, model, profile):
        pass


register_method("layernorm", LayerNormConfig, PolicyOnly)
register_method("bitfit", BitFitConfig, PolicyOnly)
