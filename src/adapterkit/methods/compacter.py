"""Compacter / Compacter++ (Karimi Mahabadi et al.): bottleneck adapters whose two
linears are PHM layers, H = sum_i A_i (x) W_i.

- ``phm_dim`` n; rules A (n, n, n), shared by every adapter layer (``shared_phm_rule``,
  the Compacter paper) or one per layer (VL-Adapter's setting).
- W_i full (in/n, out/n) or low-rank s_i t_i^T (``factorized_phm``, rank ``phm_rank``).
- ``compacter``: after attention and FFN; ``compacter++``: after the FFN only.

H is built once per forward per layer with one einsum (for all task copies), then
applied like any task-stacked linear.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from adapterkit.core.activations import get_activation
from adapterkit.core.base import AdapterSet, sublayer_places
from adapterkit.core.config import ACTIVATIONS, AdapterConfig, bounded, choice, register_method
from adapterkit.core.hooks import first as _first
from adapterkit.core.hooks import out_width as _out_width
from adapterkit.core.hooks import replace_first as _replace_first
from adapterkit.core.optim import mark_task_stacked
from adapterkit.core.task_linear import task_linear
from adapterkit.errors import ConfigError


@dataclass
class CompacterConfig(AdapterConfig):
    method: str = "compacter"
    reduction_factor: float = bounded(32.0, lo=1.0)
    bottleneck_dim: int | None = bounded(None, lo=1)
    phm_dim: int = bounded(4, lo=1)
    shared_phm_rule: bool = True
    factorized_phm: bool = True
    phm_rank: int = bounded(1, lo=1)
    phm_init_std: float = bounded(0.01, lo=0.0)
    activation: str = choice(*ACTIVATIONS, default="gelu_new")
    positions: list[str] = field(default_factory=lambda: ["attn_out", "cross_attn_out", "ffn_out"])

    def hidden(self, d: int) -> int:
        m = self.bottleneck_dim if self.bottleneck_dim is not None else None
        if m is None:
            if d % self.reduction_factor:
                raise ConfigError(f"reduction_factor {self.reduction_factor:g} does not divide the hidden width {d}")
            m = int(d // self.reduction_factor)
        for w, what in ((d, "hidden width"), (m, "bottleneck width")):
            if w % self.phm_dim:
                raise ConfigError(f"phm_dim {self.phm_dim} does not divide the {what} {w}")
        return m


@dataclass
class CompacterPPConfig(CompacterConfig):
    method: str = "compacter++"
    positions: list[str] = field(default_factory=lambda: ["ffn_out"])


class PHMLinear(nn.Module):
    """PHM linear with ``copies`` task copies of its W factors; rule given at call time."""

    def __init__(self, d_in: int, d_out: int, n: int, copies: int, cfg: CompacterConfig):
        super().__init__()
        self.n, self.d_in, self.d_out = n, d_in, d_out
        p, q = d_in // n, d_out // n
        gain = math.sqrt(2.0)
        if cfg.factorized_phm:
            k = cfg.phm_rank
            self.W_left = nn.Parameter(torch.empty(copies, n, p, k))
            self.W_right = nn.Parameter(torch.empty(copies, n, k, q))
            for t in (self.W_left, self.W_right):
                with torch.no_grad():
                    for idx in range(t.shape[0] * t.shape[1]):
                        nn.init.xavier_uniform_(t.view(-1, *t.shape[2:])[idx], gain=gain)
            self.W = None
        else:
            self.W = nn.Parameter(torch.empty(copies, n, p, q))
            with torch.no_grad():
                for idx in range(copies * n):
                    nn.init.xavier_uniform_(self.W.view(-1, p, q)[idx], gain=gain)
            self.W_left = self.W_right = None
        self.bias = nn.Parameter(torch.zeros(copies, d_out))
        if copies > 1:
            for p in (self.W, self.W_left, self.W_right, self.bias):
                if p is not None:
                    mark_task_stacked(p)

    def weight(self, rule: torch.Tensor) -> torch.Tensor:
        """Stacked (copies, d_out, d_in) weight, i.e. H^T, for y = x H + b."""
        W = self.W if self.W is not None else self.W_left @ self.W_right  # (c, n, p, q)
        c, n, p, q = W.shape
        # H[c] = sum_i kron(A_i, W_i): H[c, a*p+u, b*q+v] = sum_i A[i,a,b] W[c,i,u,v]; we want H^T
        Ht = torch.einsum("iab,ciuv->cbvau", rule, W)
        return Ht.reshape(c, n * q, n * p)

    def forward(self, x, rule, task):
        return task_linear(x, self.weight(rule), self.bias, task)


class CompacterAdapter(nn.Module):
    def __init__(self, d: int, cfg: CompacterConfig, shared_rules: nn.Parameter | None):
        super().__init__()
        m, n = cfg.hidden(d), cfg.phm_dim
        self.down = PHMLinear(d, m, n, cfg.copies("down"), cfg)
        self.up = PHMLinear(m, d, n, cfg.copies("up"), cfg)
        if shared_rules is None:
            self.rules = nn.Parameter(torch.randn(2, n, n, n) * cfg.phm_init_std)
        self._shared = [shared_rules]
        self.act = get_activation(cfg.activation)

    def forward(self, h, task):
        rules = self._shared[0] if self._shared[0] is not None else self.rules
        return self.up(self.act(self.down(h, rules[0], task)), rules[1], task)


class CompacterSet(AdapterSet):
    def __init__(self, cfg: CompacterConfig):
        super().__init__(cfg)
        self.adapters = nn.ModuleDict()
        self.per_task = cfg.copies("down") > 1 or cfg.copies("up") > 1
        n = cfg.phm_dim
        # one rule for down and one for up projections, shared by every layer
        self.phm_rules = nn.Parameter(torch.randn(2, n, n, n) * cfg.phm_init_std) if cfg.shared_phm_rule else None

    def attach(self, model, profile):
        cfg: CompacterConfig = self.config
        for place in sublayer_places(model, profile, cfg, cfg.positions):
            ad = CompacterAdapter(_out_width(place.module), cfg, self.phm_rules)
            self.adapters[place.key] = ad
            self.add_forward_hook(place.module, self._hook(ad))

    def _hook(self, ad):
        def hook(module, args, out):
            h = _first(out)
            task = self.router.resolve(h.device) if self.per_task else None
            return _replace_first(out, h + ad(h, task))
        return hook


register_method("compacter", CompacterConfig, CompacterSet)
register_method("compacter++", CompacterPPConfig, CompacterSet)
