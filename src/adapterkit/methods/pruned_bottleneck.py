"""Bottleneck adapters with a hidden width per place ("pruned_bottleneck").

MiMi-style structured pruning (``adapterkit.pruning.mimi``) removes hidden units, so
each place ends up with its own width. This method is a Houlsby / Pfeiffer / parallel
bottleneck set (``base_method``) whose ``widths`` maps a place key (the module path
with ``.`` replaced by ``__``) to that place's hidden width; places not listed use the
config's ``bottleneck_dim`` / ``reduction_factor``. A saved pruned adapter therefore
rebuilds with the right shapes in :func:`adapterkit.load_adapters`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from adapterkit.core.config import AdapterConfig, choice, register_method
from adapterkit.core.task_linear import TaskLinear
from adapterkit.errors import ConfigError, did_you_mean
from adapterkit.methods.bottleneck import Bottleneck, BottleneckConfig, BottleneckSet

BASE_METHODS = ("houlsby", "pfeiffer", "parallel")


@dataclass
class PrunedBottleneckConfig(BottleneckConfig):
    """A bottleneck config plus per-place hidden widths."""

    method: str = "pruned_bottleneck"
    base_method: str = choice(*BASE_METHODS, default="houlsby")
    widths: dict = field(default_factory=dict)

    def validate(self) -> None:
        AdapterConfig.validate(self)
        allowed = {"attn", "ffn"} if self.base_method == "parallel" else {"attn_out", "cross_attn_out", "ffn_out"}
        if not self.positions:
            raise ConfigError("positions must list at least one position")
        for p in self.positions:
            if p not in allowed:
                raise ConfigError(
                    f'unknown position "{p}" for base_method "{self.base_method}"; allowed: {sorted(allowed)}'
                )
        for k, w in self.widths.items():
            if isinstance(w, bool) or not isinstance(w, int) or w < 0:
                raise ConfigError(f'widths["{k}"] must be an integer >= 0 (0: the place has no adapter), got {w!r}')


_INIT_PAIRS = {
    "bert": ("bert", "bert"),
    "houlsby": ("houlsby", "houlsby"),
    "lora": ("kaiming", "zeros"),
    "zeros_up_bert": ("bert", "zeros"),
}


def resize_hidden(ad: Bottleneck, keep, init: str = "bert") -> None:
    """Keep only hidden units ``keep`` (a LongTensor of indices or an int width) of ``ad``.

    With indices, the kept units' weights are copied exactly (rows of the down
    projection and its bias, columns of the up projection); with an int, fresh
    projections of that width, initialised by the bottleneck ``init`` scheme, replace the old ones.
    Width 0 removes the adapter: no hidden units, no up bias and no adapter LayerNorm, so its
    branch output is exactly zero.
    """
    down, up = ad.down, ad.up
    if isinstance(keep, int):
        width, idx = keep, None
    else:
        idx = keep.to(device=down.weight.device, dtype=torch.long)
        width = int(idx.numel())
    down_init, up_init = ("zeros", "zeros") if idx is not None else _INIT_PAIRS[init]
    new_down = TaskLinear(down.in_features, width, down.n, bias=down.bias is not None, init=down_init)
    new_up = TaskLinear(width, up.out_features, up.n, bias=up.bias is not None and width > 0, init=up_init)
    new_down.to(device=down.weight.device, dtype=down.weight.dtype)
    new_up.to(device=up.weight.device, dtype=up.weight.dtype)
    if idx is not None:
        new_down.weight.data.copy_(down.weight.data.index_select(1, idx))
        if down.bias is not None:
            new_down.bias.data.copy_(down.bias.data.index_select(1, idx))
        new_up.weight.data.copy_(up.weight.data.index_select(2, idx))
        if new_up.bias is not None:
            new_up.bias.data.copy_(up.bias.data)
    new_down.weight.requires_grad_(down.weight.requires_grad)
    new_up.weight.requires_grad_(up.weight.requires_grad)
    ad.down, ad.up = new_down, new_up
    if width == 0:
        if getattr(ad, "ln_mode", "none") != "none":
            ad.ln_mode = "none"
            del ad.ln_weight, ad.ln_bias


class PrunedBottleneckSet(BottleneckSet):
    """A :class:`BottleneckSet` whose places may each have their own hidden width."""

    def attach(self, model, profile):
        cfg: PrunedBottleneckConfig = self.config
        if cfg.base_method == "parallel":
            self._attach_parallel(model, profile)
        else:
            super().attach(model, profile)
        unknown = [k for k in cfg.widths if k not in self.adapters]
        if unknown:
            self.detach()  # leave no hooks behind on the model
            raise ConfigError(
                f'widths names place "{unknown[0]}", which this model does not have'
                f"{did_you_mean(unknown[0], self.adapters.keys())}"
            )
        for key, w in cfg.widths.items():
            ad = self.adapters[key]
            if ad.down.out_features != w:
                resize_hidden(ad, int(w), cfg.init)


register_method("pruned_bottleneck", PrunedBottleneckConfig, PrunedBottleneckSet)

__all__ = ["PrunedBottleneckConfig", "PrunedBottleneckSet", "resize_hidden"]
