"""The Conformer adapter of PETL for Audio Spectrogram Transformers (Cappellazzo et al.).

Block (on tokens x of shape (B, L, d), m = d / reduction_factor):

    [LayerNorm(x)] -> pointwise conv d -> 2m -> GLU -> depthwise conv (kernel 31, 'same')
    -> BatchNorm -> SiLU -> pointwise conv m -> d -> dropout

A pointwise (kernel-1) convolution over the token axis is exactly a linear map of the
channels, so both pointwise convs are :class:`TaskLinear` (per-task copies for free).

``input_layernorm``: the reference's ``Conformer_adapter.forward`` computes a LayerNorm
of its input and then discards it (it continues from the un-normalised input). Here
the default (False) reproduces that behaviour (no LayerNorm); True really applies a
learned LayerNorm to the adapter input.

Placement (like the bottleneck methods), at ``positions`` "ffn" (PETL-AST "Pfeiffer")
and/or "attn" (with "ffn": PETL-AST "Houlsby"):
- ``parallel``: the adapter reads the sublayer's (normalised) input and its output is
  added to the sublayer output: out = Sub(LN h) + A(LN h) [+ LN h if ``residual``].
- ``sequential``: out = A(Sub(LN h)) [+ Sub(LN h) if ``residual``].
Both act before the block's dropout and residual add.

Per-task copies (``sharing: per_task``) keep separate weights *and* BatchNorm statistics
per task; mixed-task batches are served with gathered weights, one grouped conv and
scatter-add statistics (no loop over tasks or examples).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from adapterkit.core.base import AdapterSet, paired_places, places_for
from adapterkit.core.config import AdapterConfig, bounded, choice, register_method
from adapterkit.core.hooks import first as _first
from adapterkit.core.hooks import out_width as _width
from adapterkit.core.hooks import replace_first as _replace_first
from adapterkit.core.optim import mark_task_stacked
from adapterkit.core.routing import expand_to_batch
from adapterkit.core.task_linear import TaskLinear
from adapterkit.errors import ConfigError


@dataclass
class ConformerConfig(AdapterConfig):
    """Conformer adapter options (defaults: PETL-AST's, RR 96, kernel 31, parallel, no residual)."""

    method: str = "conformer"
    reduction_factor: float = bounded(96.0, lo=1.0)
    bottleneck_dim: int | None = bounded(None, lo=1)
    kernel_size: int = bounded(31, lo=1)
    placement: str = choice("parallel", "sequential", default="parallel")
    positions: list[str] = field(default_factory=lambda: ["ffn"])
    residual: bool = False
    input_layernorm: bool = False
    dropout: float = bounded(0.0, lo=0.0, hi=0.99)
    parallel_input: str = choice("normalized", "stream", default="normalized")
    bn_momentum: float = bounded(0.1, lo=0.0, hi=1.0)
    places: dict = field(default_factory=dict)  # explicit {place kind: [module path patterns]}

    def validate(self) -> None:
        super().validate()
        if self.sharing not in ("shared", "per_task"):
            raise ConfigError(f'the conformer adapter supports sharing "shared" or "per_task", got "{self.sharing}"')
        if self.kernel_size % 2 == 0:
            raise ConfigError(f"kernel_size must be odd (same-length depthwise conv), got {self.kernel_size}")
        if not self.positions:
            raise ConfigError("positions must list at least one of ['attn', 'ffn']")
        for p in self.positions:
            if p not in ("attn", "ffn"):
                raise ConfigError(f'unknown position "{p}" for the conformer adapter; allowed: ["attn", "ffn"]')

    def hidden(self, d: int) -> int:
        if self.bottleneck_dim is not None:
            return self.bottleneck_dim
        m = int(d // self.reduction_factor)
        if m < 1:
            raise ConfigError(f"reduction_factor {self.reduction_factor:g} leaves no channels for width {d}")
        return m


def _task_ids(task, batch: int, device) -> torch.Tensor:
    if task is None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    if isinstance(task, int):
        return torch.full((batch,), task, dtype=torch.long, device=device)
    return expand_to_batch(task, batch)


class TaskBatchNorm1d(nn.Module):
    """BatchNorm over (B, C, L) with one set of affine weights and running statistics per task.

    Running statistics are parameters with ``requires_grad=False`` (listed by the set's
    ``frozen_parameters``) so that adapter files carry them.
    """

    def __init__(self, channels: int, n: int = 1, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.eps, self.momentum, self.n = eps, momentum, n
        self.weight = mark_task_stacked(nn.Parameter(torch.ones(n, channels)))
        self.bias = mark_task_stacked(nn.Parameter(torch.zeros(n, channels)))
        self.running_mean = nn.Parameter(torch.zeros(n, channels), requires_grad=False)
        self.running_var = nn.Parameter(torch.ones(n, channels), requires_grad=False)

    def forward(self, x: torch.Tensor, task) -> torch.Tensor:
        if self.n == 1 or task is None or isinstance(task, int):
            t = 0 if (self.n == 1 or task is None) else task
            return F.batch_norm(x, self.running_mean[t], self.running_var[t], self.weight[t], self.bias[t],
                                self.training, self.momentum, self.eps)
        tid = _task_ids(task, x.shape[0], x.device)
        if self.training:
            length = x.shape[2]
            cnt = torch.zeros(self.n, device=x.device, dtype=x.dtype).index_add_(
                0, tid, torch.full((x.shape[0],), float(length), device=x.device, dtype=x.dtype))
            safe = cnt.clamp_min(1.0).unsqueeze(1)
            mean = torch.zeros(self.n, x.shape[1], device=x.device, dtype=x.dtype).index_add_(0, tid, x.sum(2)) / safe
            xc = x - mean.index_select(0, tid).unsqueeze(2)
            var = torch.zeros_like(mean).index_add_(0, tid, (xc * xc).sum(2)) / safe
            with torch.no_grad():
                present = (cnt > 0).unsqueeze(1)
                unbiased = var * (cnt / (cnt - 1).clamp_min(1.0)).unsqueeze(1)
                m = self.momentum
                self.running_mean.copy_(torch.where(present, (1 - m) * self.running_mean + m * mean, self.running_mean))
                self.running_var.copy_(torch.where(present, (1 - m) * self.running_var + m * unbiased, self.running_var))
            y = xc / torch.sqrt(var.index_select(0, tid).unsqueeze(2) + self.eps)
        else:
            y = (x - self.running_mean.index_select(0, tid).unsqueeze(2)) / torch.sqrt(
                self.running_var.index_select(0, tid).unsqueeze(2) + self.eps)
        return y * self.weight.index_select(0, tid).unsqueeze(2) + self.bias.index_select(0, tid).unsqueeze(2)


class ConformerBlock(nn.Module):
    """The PETL-AST Conformer adapter block; returns the branch output (B, L, d)."""

    def __init__(self, d: int, m: int, cfg: ConformerConfig):
        super().__init__()
        n = cfg.copies("all")
        self.k = cfg.kernel_size
        self.use_ln = cfg.input_layernorm
        if self.use_ln:
            self.ln_weight = mark_task_stacked(nn.Parameter(torch.ones(n, d)))
            self.ln_bias = mark_task_stacked(nn.Parameter(torch.zeros(n, d)))
        self.pointwise_in = TaskLinear(d, 2 * m, n)
        self.depthwise_weight = mark_task_stacked(nn.Parameter(torch.empty(n, m, self.k)))
        self.depthwise_bias = mark_task_stacked(nn.Parameter(torch.zeros(n, m)))
        bound = 1.0 / self.k ** 0.5  # nn.Conv1d's default for fan_in = kernel size (depthwise)
        nn.init.uniform_(self.depthwise_weight, -bound, bound)
        self.norm = TaskBatchNorm1d(m, n, momentum=cfg.bn_momentum)
        self.pointwise_out = TaskLinear(m, d, n)
        self.p = cfg.dropout

    def _layer_norm(self, x, task):
        y = F.layer_norm(x, x.shape[-1:])
        if self.ln_weight.shape[0] == 1 or task is None or isinstance(task, int):
            t = 0 if (self.ln_weight.shape[0] == 1 or task is None) else task
            return y * self.ln_weight[t] + self.ln_bias[t]
        tid = _task_ids(task, x.shape[0], x.device)
        return y * self.ln_weight.index_select(0, tid).unsqueeze(1) + self.ln_bias.index_select(0, tid).unsqueeze(1)

    def _depthwise(self, h: torch.Tensor, task) -> torch.Tensor:
        """h (B, m, L) -> (B, m, L), same-length depthwise conv with per-task kernels."""
        w, b = self.depthwise_weight, self.depthwise_bias
        pad = self.k // 2
        if w.shape[0] == 1 or task is None or isinstance(task, int):
            t = 0 if (w.shape[0] == 1 or task is None) else task
            return F.conv1d(h, w[t].unsqueeze(1), b[t], padding=pad, groups=h.shape[1])
        bsz, m, length = h.shape
        tid = _task_ids(task, bsz, h.device)
        wk = w.index_select(0, tid).reshape(bsz * m, 1, self.k)
        bk = b.index_select(0, tid).reshape(bsz * m)
        out = F.conv1d(h.reshape(1, bsz * m, length), wk, bk, padding=pad, groups=bsz * m)
        return out.reshape(bsz, m, length)

    def forward(self, x: torch.Tensor, task) -> torch.Tensor:
        h = self._layer_norm(x, task) if self.use_ln else x
        h = F.glu(self.pointwise_in(h, task), dim=-1)          # (B, L, m)
        h = self._depthwise(h.transpose(1, 2), task)            # (B, m, L)
        h = F.silu(self.norm(h, task)).transpose(1, 2)          # (B, L, m)
        out = self.pointwise_out(h, task)
        if self.p and self.training:
            out = F.dropout(out, self.p, True)
        return out


class ConformerSet(AdapterSet):
    """Conformer adapters next to (parallel) or after (sequential) the chosen sublayers."""

    def __init__(self, cfg: ConformerConfig):
        super().__init__(cfg)
        self.adapters = nn.ModuleDict()
        self.per_task = cfg.copies("all") > 1

    def _task(self, device):
        return self.router.resolve(device) if self.per_task else None

    def frozen_parameters(self):
        for m in self.modules():
            if isinstance(m, TaskBatchNorm1d):
                yield m.running_mean
                yield m.running_var

    def attach(self, model, profile):
        cfg: ConformerConfig = self.config
        for pos in cfg.positions:
            dst_kind = f"{pos}_out"
            if cfg.placement == "sequential":
                for dst in places_for(model, profile, dst_kind, cfg, cfg.places.get(dst_kind)):
                    d = _width(dst.module)
                    ad = ConformerBlock(d, cfg.hidden(d), cfg)
                    self.adapters[dst.key] = ad
                    self.add_forward_hook(dst.module, self._sequential_hook(ad))
                continue
            src_kind = f"{pos}_in" if cfg.parallel_input == "normalized" else f"{pos}_stream"
            for src, dst in paired_places(model, profile, cfg, src_kind, dst_kind, cfg.places):
                d = _width(dst.module)
                ad = ConformerBlock(d, cfg.hidden(d), cfg)
                self.adapters[dst.key] = ad
                slot: list = [None]

                def capture(module, args, kwargs, slot=slot):
                    slot[0] = args[0] if args else kwargs["hidden_states"]

                def add(module, args, out, ad=ad, slot=slot):
                    x, slot[0] = slot[0], None
                    h = _first(out)
                    y = h + ad(x, self._task(h.device))
                    if cfg.residual:
                        y = y + x
                    return _replace_first(out, y)

                self.add_pre_hook(src.module, capture, with_kwargs=True)
                self.add_forward_hook(dst.module, add)

    def _sequential_hook(self, ad: ConformerBlock):
        residual = self.config.residual

        def hook(module, args, out):
            h = _first(out)
            y = ad(h, self._task(h.device))
            return _replace_first(out, y + h if residual else y)
        return hook


register_method("conformer", ConformerConfig, ConformerSet)

__all__ = ["ConformerConfig", "ConformerSet", "ConformerBlock", "TaskBatchNorm1d"]
