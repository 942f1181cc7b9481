"""SimAdapter (Hou et al. 2021, "Exploiting Adapters for Cross-lingual Low-resource Speech
Recognition"): attention fusion over frozen per-language adapters, as the reference code
(``jindongwang/transferlearning``, ``code/ASR/Adapter/``) computes it.

In every block (pre-LN; the fusion sits on the block output, i.e. on the FFN output place
``ffn_out`` with the residual added), with ``x`` the block output, ``x_norm`` the block's
pre-FFN LayerNorm output (the FFN's input) and ``a_n = x + W_up,n ReLU(W_down,n LN_n(x))`` the
N language adapters named in ``fusion`` (one stacked copy each, in that order; the set's
``tasks`` only route, e.g. the one target language being trained)::

    q = W_q x + b_q,   k_n = W_k a_n + b_k,   v_n = W_v a_n          (W_v: no bias, identity + 1e-6)
    alpha = softmax_n(q . k_n / sqrt(tau))                            (tau = 1: no sqrt(d) scaling)
    out = sum_n alpha_n v_n + x_norm                                  (fusion_residual "x_norm", the code)

Only the fusion layers train (the adapters, loaded from per-language runs, stay frozen). The
training loss adds :meth:`SimAdapterSet.training_loss`::

    value_reg * sum_layers ||I - W_v||_F^2 + guide_weight * sum_layers CE(exp(mean_{B,T} alpha), target)

where the guide term needs ``target`` (a task in ``fusion``; without one it is left out, as the
reference does when the target language is not in the fusion list). The language adapters are
the Pfeiffer-style adapters of :mod:`adapterkit.methods.bottleneck` with ``adapter_input:
normed_sum`` and ``adapter_layernorm: before`` (in a pre-LN block: ``z + A(LN(z))`` on the
block output ``z``), so the weights of a ``pfeiffer`` set of that form (per_task over the same
languages, in ``fusion``'s order) load into this set unchanged (rename the set). Differences to the reference: its adapters have no
biases (these do), and its guide weight can decay linearly (here it is constant).

The module is a method (``method: sim_adapter``) rather than a ``Fuse`` composition because
it differs from AdapterFusion in where it reads (block output and pre-FFN LayerNorm output,
not the sublayer output), in its residual and in its extra loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from adapterkit.core.base import paired_places, sublayer_places
from adapterkit.core.config import (
    ACTIVATIONS,
    SHARING,
    AdapterConfig,
    bounded,
    check_name,
    choice,
    register_method,
)
from adapterkit.core.hooks import first as _first
from adapterkit.core.hooks import first_input
from adapterkit.core.hooks import out_width as _out_width
from adapterkit.core.hooks import replace_first as _replace_first
from adapterkit.errors import ConfigError
from adapterkit.methods.bottleneck import INITS, Bottleneck, BottleneckConfig, BottleneckSet, sum_inputs


@dataclass
class SimAdapterConfig(BottleneckConfig):
    """SimAdapter: the language adapters (frozen) and one fusion layer per block."""

    method: str = "sim_adapter"
    activation: str = choice(*ACTIVATIONS, default="relu")
    init: str = choice(*INITS, default="bert")
    positions: list[str] = field(default_factory=lambda: ["ffn_out"])
    adapter_input: str = choice("sublayer", "normed_sum", default="normed_sum")
    adapter_layernorm: str = choice("none", "before", "after", default="before")
    sharing: str = choice(*SHARING, default="per_task")
    train_adapters: bool = False
    target: str | None = None                                 # the guide loss's language (one of fusion)
    guide_weight: float = bounded(0.1, lo=0.0)                # lambda_g
    value_reg: float = bounded(0.01, lo=0.0)                  # weight of ||I - W_v||_F^2
    temperature: float = bounded(1.0, lo=1e-6)                # tau
    fusion_residual: str = choice("x_norm", "none", default="x_norm")

    def copies(self, part: str) -> int:
        """One adapter copy per language of ``fusion`` (whatever the routing tasks are)."""
        return len(self.fusion)

    def validate(self) -> None:
        AdapterConfig.validate(self)
        if len(self.fusion) < 2 or len(set(self.fusion)) != len(self.fusion):
            raise ConfigError("sim_adapter needs fusion: [...] naming at least two distinct language adapters, "
                              f"got {self.fusion}")
        for t in self.fusion:
            check_name(t, "fusion: a language adapter")
        if self.positions != ["ffn_out"]:
            raise ConfigError(f'sim_adapter fuses on the block output (positions ["ffn_out"]), got {self.positions}')
        if self.adapter_input != "normed_sum" or self.adapter_layernorm != "before":
            raise ConfigError('sim_adapter\'s language adapters read the block output through their own LayerNorm '
                              '(adapter_input "normed_sum", adapter_layernorm "before")')
        if self.target is not None and self.target not in self.fusion:
            raise ConfigError(f'sim_adapter target "{self.target}" is not one of fusion {self.fusion}')


class SimFusion(nn.Module):
    """SimAdapter's attention at one block over N adapter outputs (see the module docstring)."""

    def __init__(self, d: int, temperature: float = 1.0, dropout: float = 0.0):
        super().__init__()
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d, bias=False)
        with torch.no_grad():
            self.value.weight.fill_(1e-6).fill_diagonal_(1.0)
        self.temperature = float(temperature)
        self.p = dropout
        self.last_alpha: torch.Tensor | None = None   # (N,): mean over batch and time of the last forward

    def forward(self, x: torch.Tensor, adapted: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """x (..., d), adapted (..., N, d), residual (..., d) or None -> (..., d)."""
        q = self.query(x)
        k = self.key(adapted)
        scores = (k @ q.unsqueeze(-1)).squeeze(-1) / math.sqrt(self.temperature)   # (..., N)
        alpha = torch.softmax(scores, dim=-1)
        self.last_alpha = alpha.reshape(-1, alpha.shape[-1]).mean(0)
        if self.p and self.training:
            alpha = F.dropout(alpha, self.p, True)
        out = (alpha.unsqueeze(-2) @ self.value(adapted)).squeeze(-2)
        return out + residual if residual is not None else out

    def value_penalty(self) -> torch.Tensor:
        w = self.value.weight
        return (torch.eye(w.shape[0], device=w.device, dtype=w.dtype) - w).pow(2).sum()


def adapted_outputs(ad: Bottleneck, z: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """a_n = z + W_up,n act(W_down,n LN_n(z) + b_d) + b_u for the copies ``idx``: (..., d) -> (..., N, d)."""
    y = F.layer_norm(z, z.shape[-1:])
    y = y.unsqueeze(-2) * ad.ln_weight.index_select(0, idx) + ad.ln_bias.index_select(0, idx)   # (..., N, d)
    h = torch.einsum("...kd,kmd->...km", y, ad.down.weight.index_select(0, idx)) + ad.down.bias.index_select(0, idx)
    h = ad._mid(h)
    out = torch.einsum("...km,kdm->...kd", h, ad.up.weight.index_select(0, idx)) + ad.up.bias.index_select(0, idx)
    if ad.scale is not None:
        out = out * ad.scale.index_select(0, idx).unsqueeze(-1)
    elif ad.fixed_scale != 1.0:
        out = out * ad.fixed_scale
    return z.unsqueeze(-2) + out


class SimAdapterSet(BottleneckSet):
    """Frozen per-language bottleneck adapters fused by SimAdapter's attention at every block."""

    def __init__(self, cfg: SimAdapterConfig):
        super().__init__(cfg)
        self._idx = torch.arange(len(cfg.fusion))
        self._target = cfg.fusion.index(cfg.target) if cfg.target is not None else None

    def attach(self, model, profile):
        cfg: SimAdapterConfig = self.config
        if getattr(self, "norm", "pre") != "pre":
            raise ConfigError("sim_adapter needs pre-LN blocks (the block output is the residual stream)")
        sums = sum_inputs(self, model, profile, cfg, cfg.positions, cfg.places)
        normed = {dst.path: src for src, dst in paired_places(model, profile, cfg, "ffn_in", "ffn_out", cfg.places)}
        p = cfg.fusion_dropout if cfg.fusion_dropout is not None else 0.0
        for place in sublayer_places(model, profile, cfg, cfg.positions, cfg.places):
            d = _out_width(place.module)
            ad = Bottleneck(d, cfg.hidden(d), cfg)
            self.adapters[place.key] = ad
            self.fusions[place.key] = SimFusion(d, cfg.temperature, p)
            slot: list = [None]

            def capture(module, args, kwargs, slot=slot):
                slot[0] = first_input(args, kwargs)

            self.add_pre_hook(normed[place.path].module, capture, with_kwargs=True)
            self.add_forward_hook(place.module, self._fuse_hook(place.key, ad, sums[place.path], slot))

    def _fuse_hook(self, key, ad, tap, slot):
        def hook(module, args, out):
            h = _first(out)
            x_stream = tap.x                          # the residual entering the FFN block
            pre = tap.take()
            z = pre(h)                                # the block output: x_stream + h
            x_norm, slot[0] = slot[0], None
            if x_norm is None:
                raise ConfigError("sim_adapter: the pre-FFN LayerNorm output of this block was not seen")
            idx = self._idx.to(h.device)
            fused = self.fusions[key](z, adapted_outputs(ad, z, idx),
                                      x_norm if self.config.fusion_residual == "x_norm" else None)
            return _replace_first(out, fused - x_stream)   # the block adds x_stream back
        return hook

    def set_composition(self, block) -> None:
        if block is not None:
            raise ConfigError("sim_adapter always fuses its adapters; it takes no Stack/Average/Fuse composition")

    def training_loss(self) -> torch.Tensor:
        """value_reg * sum ||I - W_v||^2 + guide_weight * sum_layers CE(exp(mean alpha), target) of the last forward."""
        cfg: SimAdapterConfig = self.config
        fus = list(self.fusions.values())
        loss = cfg.value_reg * torch.stack([f.value_penalty() for f in fus]).sum()
        if self._target is not None and cfg.guide_weight:
            alphas = [f.last_alpha for f in fus if f.last_alpha is not None]
            if alphas:
                logits = torch.exp(torch.stack(alphas))                    # (layers, N)
                tgt = torch.full((logits.shape[0],), self._target, dtype=torch.long, device=logits.device)
                loss = loss + cfg.guide_weight * F.cross_entropy(logits, tgt, reduction="sum")
        for f in fus:
            f.last_alpha = None
        return loss


register_method("sim_adapter", SimAdapterConfig, SimAdapterSet)

__all__ = ["SimAdapterConfig", "SimAdapterSet", "SimFusion", "adapted_outputs"]
