"""Bottleneck adapters: Houlsby (after attention and FFN), Pfeiffer (after FFN) and
parallel adapters (next to the FFN, scaled; AdaptFormer is ``parallel`` with scale 0.1
and LoRA-style init on the un-normalised residual stream).

A(h) = h + s * W_up f(W_down h + b_d) + b_u, on tensors (B, L, d). Sequential
adapters hook the sublayer's output projection, so they sit on the sublayer output
before dropout and the residual add (right for both pre-LN and post-LN blocks).
Parallel adapters read the stream entering the FFN block and add their output to
the FFN output.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from adapterkit.core.activations import get_activation
from adapterkit.core.base import AdapterSet, paired_places, sublayer_places
from adapterkit.core.config import ACTIVATIONS, AdapterConfig, bounded, choice, register_method
from adapterkit.core.hooks import first as _first
from adapterkit.core.hooks import out_width as _out_width
from adapterkit.core.hooks import replace_first as _replace_first
from adapterkit.core.optim import mark_task_stacked
from adapterkit.core.task_linear import TaskLinear, task_pair
from adapterkit.errors import ConfigError

INITS = ("bert", "houlsby", "lora", "zeros_up_bert")


@dataclass
class BottleneckConfig(AdapterConfig):
    """Bottleneck adapter options (defaults follow each paper; see the method docs)."""

    method: str = "houlsby"
    reduction_factor: float = bounded(16.0, lo=1.0)
    bottleneck_dim: int | None = bounded(None, lo=1)
    activation: str = choice(*ACTIVATIONS, default="gelu")
    init: str = choice(*INITS, default="bert")
    positions: list[str] = field(default_factory=lambda: ["attn_out", "cross_attn_out", "ffn_out"])
    scale: float = 1.0
    learned_scale: bool = False
    dropout: float = bounded(0.0, lo=0.0, hi=0.99)
    adapter_layernorm: str = choice("none", "before", "after", default="none")
    parallel_input: str = choice("stream", "normalized", default="stream")
    places: dict = field(default_factory=dict)  # explicit {position: [module path patterns]}

    def validate(self) -> None:
        super().validate()
        allowed = {"attn_out", "cross_attn_out", "ffn_out"} if self.method != "parallel" else {"attn", "ffn"}
        for p in self.positions:
            if p not in allowed:
                raise ConfigError(f'unknown position "{p}" for method "{self.method}"; allowed: {sorted(allowed)}')
        if not self.positions:
            raise ConfigError("positions must list at least one position")

    def hidden(self, d: int) -> int:
        if self.bottleneck_dim is not None:
            return self.bottleneck_dim
        r = self.reduction_factor
        if d % r:
            raise ConfigError(f"reduction_factor {r:g} does not divide the hidden width {d}")
        return int(d // r)


class Bottleneck(nn.Module):
    """down -> act -> (dropout) -> up, with stacked per-task copies as the sharing mode says."""

    def __init__(self, d: int, m: int, cfg: BottleneckConfig):
        super().__init__()
        down_init, up_init = {
            "bert": ("bert", "bert"),
            "houlsby": ("houlsby", "houlsby"),
            "lora": ("kaiming", "zeros"),
            "zeros_up_bert": ("bert", "zeros"),
        }[cfg.init]
        self.down = TaskLinear(d, m, cfg.copies("down"), init=down_init)
        self.up = TaskLinear(m, d, cfg.copies("up"), init=up_init)
        self.act = get_activation(cfg.activation)
        self.p = cfg.dropout
        self.fixed_scale = cfg.scale
        self.scale = mark_task_stacked(nn.Parameter(torch.full((cfg.copies("up"),), float(cfg.scale)))) \
            if cfg.learned_scale else None
        self.ln_mode = cfg.adapter_layernorm
        if self.ln_mode != "none":
            n = cfg.copies("down" if self.ln_mode == "before" else "up")
            self.ln_weight = mark_task_stacked(nn.Parameter(torch.ones(n, d)))
            self.ln_bias = mark_task_stacked(nn.Parameter(torch.zeros(n, d)))

    def _ln(self, x, task):
        y = F.layer_norm(x, x.shape[-1:])
        w, b = self.ln_weight, self.ln_bias
        if w.shape[0] == 1 or task is None:
            return y * w[0] + b[0]
        if isinstance(task, int):
            return y * w[task] + b[task]
        shape = (task.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
        return y * w.index_select(0, task).view(shape) + b.index_select(0, task).view(shape)

    def _mid(self, z: torch.Tensor) -> torch.Tensor:
        z = self.act(z)
        return F.dropout(z, self.p, True) if (self.p and self.training) else z

    def forward(self, h: torch.Tensor, task) -> torch.Tensor:
        """The adapter's branch output (without the residual)."""
        x = self._ln(h, task) if self.ln_mode == "before" else h
        out = task_pair(x, self.down, self.up, task, self._mid)
        if self.ln_mode == "after":
            out = self._ln(out, task)
        if self.scale is not None:
            s = self.scale[0] if (self.scale.shape[0] == 1 or task is None) else self.scale[task]
            if isinstance(task, torch.Tensor) and self.scale.shape[0] > 1:
                s = s.view((-1,) + (1,) * (out.dim() - 1))
            out = out * s
        elif self.fixed_scale != 1.0:
            out = out * self.fixed_scale
        return out


class BottleneckSet(AdapterSet):
    """Sequential (Houlsby / Pfeiffer) or parallel bottleneck adapters at the profile's places."""

    def __init__(self, cfg: BottleneckConfig):
        super().__init__(cfg)
        self.adapters = nn.ModuleDict()
        self.per_task = cfg.copies("down") > 1 or cfg.copies("up") > 1

    def _task(self, device):
        return self.router.resolve(device) if self.per_task else None

    def attach(self, model, profile):
        cfg: BottleneckConfig = self.config
        if cfg.method == "parallel":
            self._attach_parallel(model, profile)
            return
        for place in sublayer_places(model, profile, cfg, cfg.positions, cfg.places):
            d = _out_width(place.module)
            ad = Bottleneck(d, cfg.hidden(d), cfg)
            self.adapters[place.key] = ad
            self.add_forward_hook(place.module, self._sequential_hook(ad))

    def _sequential_hook(self, ad: Bottleneck):
        def hook(module, args, out):
            h = _first(out)
            return _replace_first(out, h + ad(h, self._task(h.device)))
        return hook

    def _attach_parallel(self, model, profile):
        cfg: BottleneckConfig = self.config
        for pos in cfg.positions:  # "ffn" or "attn"
            src_kind = f"{pos}_stream" if cfg.parallel_input == "stream" else f"{pos}_in"
            for src, dst in paired_places(model, profile, cfg, src_kind, f"{pos}_out", cfg.places):
                d = _out_width(dst.module)
                ad = Bottleneck(d, cfg.hidden(d), cfg)
                self.adapters[dst.key] = ad
                slot: list = [None]

                def capture(module, args, slot=slot):
                    slot[0] = args[0]

                def add(module, args, out, ad=ad, slot=slot):
                    x = slot[0]
                    slot[0] = None
                    h = _first(out)
                    return _replace_first(out, h + ad(x, self._task(h.device)))

                self.add_pre_hook(src.module, capture)
                self.add_forward_hook(dst.module, add)


@dataclass
class HoulsbyConfig(BottleneckConfig):
    method: str = "houlsby"


@dataclass
class PfeifferConfig(BottleneckConfig):
    method: str = "pfeiffer"
    activation: str = choice(*ACTIVATIONS, default="relu")
    positions: list[str] = field(default_factory=lambda: ["ffn_out"])


@dataclass
class ParallelConfig(BottleneckConfig):
    method: str = "parallel"
    activation: str = choice(*ACTIVATIONS, default="relu")
    init: str = choice(*INITS, default="lora")
    scale: float = 0.1
    positions: list[str] = field(default_factory=lambda: ["ffn"])


register_method("houlsby", HoulsbyConfig, BottleneckSet)
register_method("pfeiffer", PfeifferConfig, BottleneckSet)
register_method("parallel", ParallelConfig, BottleneckSet)

__all__ = ["BottleneckConfig", "HoulsbyConfig", "PfeifferConfig", "ParallelConfig", "BottleneckSet", "Bottleneck"]
