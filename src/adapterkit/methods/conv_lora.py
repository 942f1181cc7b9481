"""LoRA on 2-D convolutions (ResCLoRA-style): y = conv(x) + (alpha/r)·up(down(x)).

``down`` is a Conv2d(C_in -> r) with the base conv's kernel, stride, padding and
dilation (no bias, Kaiming-uniform); ``up`` a 1x1 Conv2d(r -> C_out) (no bias, zero
init, so the model starts unchanged). Targets are chosen by module name pattern
(``target_modules``: plain trailing names or regexes). Merging adds the composed kernel
ΔW[o, i] = (alpha/r)·Σ_k up[o, k]·down[k, i] (a kxk conv followed by a 1x1 conv is one
kxk conv), exactly; unmerge subtracts it. Per-task weights are stacked (n, ...);
mixed-task batches run one grouped convolution (groups = batch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from adapterkit.core.base import AdapterSet, places_for
from adapterkit.core.config import AdapterConfig, bounded, choice, register_method
from adapterkit.core.routing import expand_to_batch
from adapterkit.errors import ConfigError


@dataclass
class ConvLoraConfig(AdapterConfig):
    """Conv-LoRA options; ``target_modules`` names the nn.Conv2d layers (required)."""

    method: str = "conv_lora"
    sharing: str = choice("shared", "per_task", default="shared")
    r: int = bounded(8, lo=1)
    alpha: float = bounded(8.0, lo=0.0, lo_open=True)
    target_modules: list[str] = field(default_factory=list)

    def validate(self) -> None:
        super().validate()
        if not self.target_modules:
            raise ConfigError('conv_lora needs "target_modules": names or regexes of the nn.Conv2d layers to adapt')

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class ConvLoraLayer(nn.Module):
    """Stacked down (n, r, C_in, kh, kw) and up (n, C_out, r, 1, 1) kernels for one conv."""

    def __init__(self, conv: nn.Conv2d, cfg: ConvLoraConfig):
        super().__init__()
        if conv.groups != 1:
            raise ConfigError(f"conv_lora supports ungrouped convolutions only (this one has groups={conv.groups})")
        if conv.padding_mode != "zeros":
            raise ConfigError(f"conv_lora supports zero padding only (this conv uses padding_mode={conv.padding_mode!r})")
        n = cfg.copies("all")
        kh, kw = conv.kernel_size
        self.lora_down = nn.Parameter(torch.empty(n, cfg.r, conv.in_channels, kh, kw))
        self.lora_up = nn.Parameter(torch.zeros(n, conv.out_channels, cfg.r, 1, 1))
        for i in range(n):
            nn.init.kaiming_uniform_(self.lora_down[i], a=math.sqrt(5))
        self.scaling = cfg.scaling
        self.r = cfg.r
        self.target = [conv]  # the base conv belongs to the model

    def delta(self, task: int | None) -> torch.Tensor:
        """The composed kernel update (C_out, C_in, kh, kw) for one task (or the shared copy)."""
        t = 0 if task is None or self.lora_down.shape[0] == 1 else task
        return torch.einsum("or,rihw->oihw", self.lora_up[t][:, :, 0, 0], self.lora_down[t]) * self.scaling

    def forward(self, x: torch.Tensor, task) -> torch.Tensor:
        conv = self.target[0]
        kw = {"stride": conv.stride, "padding": conv.padding, "dilation": conv.dilation}
        if task is None or isinstance(task, int) or self.lora_down.shape[0] == 1:
            t = 0 if task is None or self.lora_down.shape[0] == 1 else task
            z = F.conv2d(x, self.lora_down[t], **kw)
            return F.conv2d(z, self.lora_up[t]) * self.scaling
        b = x.shape[0]
        t = expand_to_batch(task, b)
        down = self.lora_down.index_select(0, t).flatten(0, 1)   # (B*r, C_in, kh, kw)
        up = self.lora_up.index_select(0, t).flatten(0, 1)       # (B*C_out, r, 1, 1)
        z = F.conv2d(x.reshape(1, -1, *x.shape[2:]), down, groups=b, **kw)
        y = F.conv2d(z, up, groups=b)
        return y.view(b, -1, *y.shape[2:]) * self.scaling


class ConvLoraSet(AdapterSet):
    can_merge = True

    def __init__(self, cfg: ConvLoraConfig):
        super().__init__(cfg)
        self.layers = nn.ModuleDict()
        self.per_task = cfg.copies("all") > 1
        self.paths: list[str] = []
        self._merged_task = None

    def attach(self, model, profile):
        cfg: ConvLoraConfig = self.config
        for place in places_for(model, profile, "conv_lora", cfg, cfg.target_modules):
            if not isinstance(place.module, nn.Conv2d):
                raise ConfigError(f"conv_lora targets nn.Conv2d layers, but {place.path} is a {type(place.module).__name__} "
                                  '(linear layers: use method "lora")')
            layer = ConvLoraLayer(place.module, cfg)
            self.layers[place.key] = layer
            self.add_forward_hook(place.module, self._hook(layer))
            self.paths.append(place.path)

    def _hook(self, layer: ConvLoraLayer):
        def hook(module, args, out):
            if self.merged:
                return out
            x = args[0]
            task = self.router.resolve(x.device) if self.per_task else None
            return out + layer(x, task).to(out.dtype)
        return hook

    def _merge_task(self, task):
        if not self.per_task:
            return None
        if task is None:
            raise ConfigError(f"this conv LoRA has per-task weights for {list(self.config.tasks)}: "
                              "merge_adapters(model, task=...) must name the task to merge")
        return self.router.tasks.index(task) if isinstance(task, str) else int(task)

    @torch.no_grad()
    def merge(self, task=None) -> None:
        if self.merged:
            raise ConfigError("conv LoRA weights are already merged; unmerge first")
        t = self._merge_task(task)
        for layer in self.layers.values():
            w = layer.target[0].weight
            w += layer.delta(t).to(w.dtype)
        self._merged_task, self.merged = t, True
        self.suspend_hooks()

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        for layer in self.layers.values():
            w = layer.target[0].weight
            w -= layer.delta(self._merged_task).to(w.dtype)
        self._merged_task, self.merged = None, False
        self.resume_hooks()


register_method("conv_lora", ConvLoraConfig, ConvLoraSet)
