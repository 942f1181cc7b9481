"""LoRA (Hu et al.): h = W0 x + (alpha/r) B A dropout(x) on chosen linear layers.

A is Kaiming-uniform, B zero (so the model starts unchanged). Works on nn.Linear and
GPT-2's Conv1D (weights stored (in, out)). Shared LoRAs merge into the base weights
(no inference cost: no hooks are left). Per-task LoRAs merge one chosen task at a time;
their hooks stay, cost nothing for rows of the merged task (or an unrouted forward), and
answer rows routed to another task with that task's update (its LoRA output minus the
merged task's). Merging another task unmerges the first. Mixed-task batches use
gathered batched matmuls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from adapterkit.core.base import AdapterSet, linear_targets
from adapterkit.core.config import AdapterConfig, bounded, choice, register_method
from adapterkit.core.fused import lora_add, one_task_weight
from adapterkit.core.routing import _task_index, expand_to_batch
from adapterkit.core.task_linear import TaskLinear, init_weight, task_pair
from adapterkit.errors import ConfigError


@dataclass
class LoraConfig(AdapterConfig):
    """LoRA options. ``targets`` are profile places (q, k, v, o, ...); ``target_modules``
    overrides them with module names/regexes (PEFT-style)."""

    method: str = "lora"
    r: int = bounded(8, lo=1)
    alpha: float = bounded(16.0, lo=0.0, lo_open=True)
    dropout: float = bounded(0.0, lo=0.0, hi=0.99)
    targets: list[str] = field(default_factory=lambda: ["q", "v"])
    target_modules: list[str] | None = None
    use_rslora: bool = False
    init: str = choice("kaiming", "gaussian", "swapped", default="kaiming")

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


def _linear_shape(module: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, fan_in_fan_out) of a Linear or Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return module.weight.shape[0], module.nf, True
    raise ConfigError(
        f"LoRA targets linear layers, but {type(module).__name__} is not one "
        "(conv layers: use method \"conv_lora\")"
    )


class LoraLayer(nn.Module):
    def __init__(self, target: nn.Module, cfg: LoraConfig):
        super().__init__()
        self.in_features, self.out_features, self.fan_in_fan_out = _linear_shape(target)
        self.A = TaskLinear(self.in_features, cfg.r, cfg.copies("down"), bias=False,
                            init="zeros" if cfg.init == "swapped" else "kaiming")
        self.B = TaskLinear(cfg.r, self.out_features, cfg.copies("up"), bias=False,
                            init="kaiming" if cfg.init == "swapped" else "zeros")
        if cfg.init == "gaussian":
            init_weight(self.A.weight, f"normal:{1.0 / cfg.r}")
        self.scaling = cfg.scaling
        self.p = cfg.dropout
        self.target = [target]  # not a submodule: the base layer belongs to the model

    def delta(self, task: int | None) -> torch.Tensor:
        """The weight update (out, in) for one task (or the shared copy)."""
        a = self.A.weight[0 if self.A.n == 1 or task is None else task]
        b = self.B.weight[0 if self.B.n == 1 or task is None else task]
        return (b @ a) * self.scaling

    def forward(self, x: torch.Tensor, task) -> torch.Tensor:
        if self.p and self.training:
            x = F.dropout(x, self.p, True)
        return task_pair(x, self.A, self.B, task, self._scale)  # scale the rank-r intermediate: r/out times less work

    def _scale(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.scaling

    def add_to(self, out: torch.Tensor, x: torch.Tensor, task, mode: str = "eager",
               backend: str = "inductor") -> torch.Tensor:
        """``out + self(x, task)``; one task's (or the shared) branch runs fused by ``mode``
        (:mod:`adapterkit.core.fused`), a mixed batch of per-task weights by ``task_pair``."""
        if mode == "off" or isinstance(task, torch.Tensor) and (self.A.n > 1 or self.B.n > 1) \
                or self._forward_pre_hooks or self._forward_hooks:  # a user's module hook must see the call
            return out + self(x, task)
        if self.p and self.training:
            x = F.dropout(x, self.p, True)
        return lora_add(out, x, one_task_weight(self.A.weight, task), one_task_weight(self.B.weight, task),
                        self.scaling, mode, backend)


class LoraSet(AdapterSet):
    can_merge = True
    routes_while_merged = True  # see _merged_out

    def __init__(self, cfg: LoraConfig):
        super().__init__(cfg)
        self.layers = nn.ModuleDict()
        self.per_task = cfg.copies("down") > 1 or cfg.copies("up") > 1
        self._merged_task = None
        self.fused, self.fused_backend = "eager", "inductor"  # adapterkit.fuse() sets them

    def attach(self, model, profile):
        cfg: LoraConfig = self.config
        found = linear_targets(model, profile, cfg)
        for place in found:
            layer = LoraLayer(place.module, cfg)
            self.layers[place.key] = layer
            self.add_forward_hook(place.module, self._hook(layer))
        self.paths = [p.path for p in found]

    def _hook(self, layer: LoraLayer):
        def hook(module, args, out):
            x = args[0]
            if self.merged:
                return self._merged_out(layer, x, out)
            task = self.router.resolve(x.device) if self.per_task else None
            return layer.add_to(out, x, task, self.fused, self.fused_backend)
        return hook

    def _merged_out(self, layer: LoraLayer, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """A per-task LoRA with task m merged: rows of m (or an unrouted forward) are the base
        output as is; a row routed to task t gets LoRA_t(x) - LoRA_m(x) added."""
        m = self._merged_task
        if m is None:
            return out
        task = self.router.resolve_or(m, x.device)
        if isinstance(task, int):
            return out if task == m else out + (layer(x, task) - layer(x, m))
        rows = expand_to_batch(task, x.shape[0])
        other = (rows != m).view((-1,) + (1,) * (out.dim() - 1))
        return out + (layer(x, rows) - layer(x, m)) * other.to(out.dtype)

    def _resolve_merge_task(self, task):
        if not self.per_task:
            return None
        if task is None:
            raise ConfigError(
                f"this LoRA has per-task weights for {list(self.config.tasks)}: merge_adapters(model, task=...) "
                "must name the task to merge"
            )
        return _task_index(task, self.router.tasks)

    @torch.no_grad()
    def merge(self, task=None) -> None:
        t = self._resolve_merge_task(task)
        if self.merged:
            if t == self._merged_task:
                return  # that task is merged already
            self.unmerge()  # another task is merged: take it out first
        for layer in self.layers.values():
            base = layer.target[0]
            d = layer.delta(t).to(base.weight.dtype)
            base.weight += d.T if layer.fan_in_fan_out else d
        self._merged_task = t
        self.merged = True
        if not self.per_task:
            self.suspend_hooks()  # merged shared LoRA: no hooks at all, inference costs exactly the base model

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        for layer in self.layers.values():
            base = layer.target[0]
            d = layer.delta(self._merged_task).to(base.weight.dtype)
            base.weight -= d.T if layer.fan_in_fan_out else d
        self.merged = False
        self._merged_task = None
        self.resume_hooks()


register_method("lora", LoraConfig, LoraSet)
