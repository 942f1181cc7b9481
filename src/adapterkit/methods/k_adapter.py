"""K-Adapter (Wang et al.), as used by Adapter4Rec: an external small transformer fed
with hidden states tapped at chosen layers; its output is added to the final hidden state.

For taps k_1 < ... < k_T (layer outputs h_{k_i}) and one adapter module per tap:

    a_0 = 0
    a_i = Up_i(Enc_i(Down_i(h_{k_i} + a_{i-1})))      Down: d -> m, Enc: ``num_layers``
                                                        post-LN transformer layers of width m
    final hidden state h_L' = h_L + a_T

The backbone is untouched (the hooks read the tap outputs and add a_T to the last
layer's output). Weights are initialised N(0, ``init_std``) (Adapter4Rec: 2e-4), so the
model starts (almost) unchanged. Padding is respected when the model is called with an
``attention_mask`` keyword (captured by a pre-hook on the model's forward).
Per-task copies use stacked weights; mixed-task batches use gathered matmuls.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from adapterkit.core.base import AdapterSet
from adapterkit.core.config import AdapterConfig, bounded, register_method
from adapterkit.core.hooks import first as _first
from adapterkit.core.hooks import replace_first as _replace_first
from adapterkit.core.optim import mark_task_stacked
from adapterkit.core.routing import expand_to_batch
from adapterkit.core.task_linear import TaskLinear
from adapterkit.errors import ConfigError
from adapterkit.methods.vpt import transformer_layers


@dataclass
class KAdapterConfig(AdapterConfig):
    """K-Adapter options; ``taps`` are layer indices (negative counts from the end)."""

    method: str = "k_adapter"
    taps: list[int] = field(default_factory=lambda: [0, -1])
    adapter_dim: int = bounded(192, lo=1)
    num_layers: int = bounded(2, lo=1)
    num_heads: int = bounded(4, lo=1)
    ffn_mult: int = bounded(4, lo=1)
    init_std: float = bounded(2e-4, lo=0.0)
    dropout: float = bounded(0.0, lo=0.0, hi=0.99)
    stack: str | None = None
    layer_modules: list[str] | None = None

    def validate(self) -> None:
        super().validate()
        if not self.taps:
            raise ConfigError("taps must list at least one layer index")
        if self.adapter_dim % self.num_heads:
            raise ConfigError(f"num_heads {self.num_heads} does not divide adapter_dim {self.adapter_dim}")


def _gather_rows(p: torch.Tensor, task, batch: int) -> torch.Tensor:
    """(n, d) per-task vectors -> broadcastable (d,) or (B, 1, d)."""
    if p.shape[0] == 1 or task is None:
        return p[0]
    if isinstance(task, int):
        return p[task]
    return p.index_select(0, expand_to_batch(task, batch)).unsqueeze(1)


class TaskLayerNorm(nn.Module):
    def __init__(self, d: int, n: int):
        super().__init__()
        self.weight = mark_task_stacked(nn.Parameter(torch.ones(n, d)))
        self.bias = mark_task_stacked(nn.Parameter(torch.zeros(n, d)))

    def forward(self, x, task):
        y = F.layer_norm(x, x.shape[-1:])
        return y * _gather_rows(self.weight, task, x.shape[0]) + _gather_rows(self.bias, task, x.shape[0])


class TinyTransformerLayer(nn.Module):
    """Post-LN transformer layer (BERT style) built from per-task linear maps."""

    def __init__(self, m: int, heads: int, ffn: int, n: int, std: float, p: float):
        super().__init__()
        self.heads, self.p = heads, p
        init = f"normal:{std}" if std > 0 else "zeros"
        self.qkv = TaskLinear(m, 3 * m, n, init=init)
        self.out = TaskLinear(m, m, n, init=init)
        self.ln1 = TaskLayerNorm(m, n)
        self.fc1 = TaskLinear(m, ffn, n, init=init)
        self.fc2 = TaskLinear(ffn, m, n, init=init)
        self.ln2 = TaskLayerNorm(m, n)

    def forward(self, x, task, key_mask: torch.Tensor | None):
        b, length, m = x.shape
        q, k, v = self.qkv(x, task).view(b, length, 3, self.heads, m // self.heads).permute(2, 0, 3, 1, 4)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        a = a.transpose(1, 2).reshape(b, length, m)
        drop = self.p if self.training else 0.0
        x = self.ln1(x + F.dropout(self.out(a, task), drop), task)
        h = self.fc2(F.gelu(self.fc1(x, task)), task)
        return self.ln2(x + F.dropout(h, drop), task)


class KAdapterModule(nn.Module):
    def __init__(self, d: int, cfg: KAdapterConfig):
        super().__init__()
        n, m, std = cfg.copies("all"), cfg.adapter_dim, cfg.init_std
        init = f"normal:{std}" if std > 0 else "zeros"
        self.down = TaskLinear(d, m, n, init=init)
        self.layers = nn.ModuleList(
            TinyTransformerLayer(m, cfg.num_heads, m * cfg.ffn_mult, n, std, cfg.dropout) for _ in range(cfg.num_layers))
        self.up = TaskLinear(m, d, n, init=init)

    def forward(self, x, task, key_mask):
        h = self.down(x, task)
        for layer in self.layers:
            h = layer(h, task, key_mask)
        return self.up(h, task)


class KAdapterSet(AdapterSet):
    merge_note = "K-Adapter is a separate network whose output is added to the final hidden state"

    def __init__(self, cfg: KAdapterConfig):
        super().__init__(cfg)
        self.adapters = nn.ModuleList()
        self.per_task = cfg.copies("all") > 1
        self._taps: dict[int, torch.Tensor] = {}
        self._mask: list = [None]

    def attach(self, model, profile):
        cfg: KAdapterConfig = self.config
        layers = transformer_layers(model, profile, cfg, cfg.layer_modules, cfg.stack)
        n = len(layers)
        taps = []
        for t in cfg.taps:
            i = t + n if t < 0 else t
            if not 0 <= i < n:
                raise ConfigError(f"tap layer {t} is out of range for a model with {n} layers")
            taps.append(i)
        self.tap_layers = sorted(set(taps))
        d = self._width(model, layers[-1][1])
        for _ in self.tap_layers:
            self.adapters.append(KAdapterModule(d, cfg))
        self.add_pre_hook(model, self._capture_mask, with_kwargs=True)
        for i in self.tap_layers:
            self.add_forward_hook(layers[i][1], self._capture(i))
        self.add_forward_hook(layers[-1][1], self._add)

    @staticmethod
    def _width(model, last_layer) -> int:
        cfg = getattr(model, "config", None)
        for attr in ("hidden_size", "d_model", "n_embd"):
            if cfg is not None and isinstance(getattr(cfg, attr, None), int):
                return int(getattr(cfg, attr))
        for m in reversed(list(last_layer.modules())):
            if isinstance(m, nn.LayerNorm):
                return int(m.normalized_shape[0])
        raise ConfigError(f"cannot tell the hidden width of {type(model).__name__}")

    def _capture_mask(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        self._mask[0] = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def _capture(self, i: int):
        def hook(module, args, out):
            self._taps[i] = _first(out)
        return hook

    def _add(self, module, args, out):
        h = _first(out)
        task = self.router.resolve(h.device) if self.per_task else None
        mask = self._mask[0]
        key_mask = mask.bool() if mask is not None and mask.shape == h.shape[:2] else None
        a = torch.zeros((), dtype=h.dtype, device=h.device)
        for ad, i in zip(self.adapters, self.tap_layers, strict=True):
            tap = self._taps.pop(i, None)
            if tap is None:
                raise ConfigError(f"K-Adapter tap layer {i} produced no output in this forward")
            a = ad(tap + a, task, key_mask)
        return _replace_first(out, h + a)


register_method("k_adapter", KAdapterConfig, KAdapterSet)

__all__ = ["KAdapterConfig", "KAdapterSet", "KAdapterModule"]
