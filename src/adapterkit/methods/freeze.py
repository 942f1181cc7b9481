"""Freeze policies as methods: ``layernorm`` (train only LayerNorms), ``bitfit`` (train only
biases, Ben Zaken et al.) and ``frozen`` (train nothing of the base model but what
``trainable_modules`` names: the frozen-backbone / linear-probe baseline). They attach no modules."""

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


@dataclass
class FrozenConfig(AdapterConfig):
    method: str = "frozen"


class PolicyOnly(AdapterSet):
    merge_note = "it trains base parameters in place; there is nothing separate to merge"

    def attach(self, model, profile):
        pass


register_method("layernorm", LayerNormConfig, PolicyOnly)
register_method("bitfit", BitFitConfig, PolicyOnly)
register_method("frozen", FrozenConfig, PolicyOnly)
