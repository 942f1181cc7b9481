"""Compacter / Compacter++ (Karimi Mahabadi et al.): bottleneck adapters whose two
linears are PHM layers, H = sum_i A_i (x) W_i.

- ``phm_dim`` n; rules A (n, n, n), shared by every adapter layer (``shared_phm_rule``,
  the Compacter paper) or one per layer (VL-Adapter's setting).
- W_i full (in/n, out/n) or low-rank s_i t_i^T (``factorized_phm``, rank ``phm_rank``).
- ``compacter``: after attention and FFN; ``compacter++``: after the FFN only.
- ``adapter_input``: what the adapter reads, as for bottleneck adapters: ``sublayer`` (the
  sublayer output h; AdapterHub's ``CompacterConfig`` form) or ``normed_sum`` (LN(h + x),
  residual h, the block's LayerNorm again after; AdapterHub's ``CompacterPlusPlusConfig``).

The H of every adapter of a stack (encoder, decoder, ...) is built in one batched einsum
when that stack is entered (a pre-hook on the stack module), for all task copies, and
each place reads its slice: a handful of ops per stack call instead of a few per place.
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
from adapterkit.methods.bottleneck import sum_inputs


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
    adapter_input: str = choice("sublayer", "normed_sum", default="sublayer")

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

    def factors(self) -> torch.Tensor:
        """W (copies, n, p, q)."""
        return self.W if self.W is not None else self.W_left @ self.W_right

    @property
    def factor_shape(self) -> tuple:
        """The shape of :meth:`factors`, without computing them."""
        return tuple(self.W.shape) if self.W is not None else tuple(self.W_left.shape[:3]) + (self.W_right.shape[3],)

    def weight(self, rule: torch.Tensor) -> torch.Tensor:
        """Stacked (copies, d_out, d_in) weight, i.e. H^T, for y = x H + b."""
        return phm_weights(rule.unsqueeze(0), self.factors().unsqueeze(0))[0]

    def forward(self, x, rule, task, weight=None):
        return task_linear(x, self.weight(rule) if weight is None else weight, self.bias, task)


def phm_weights(rules: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """H^T of P PHM layers at once: rules (P, n, n, n), W (P, c, n, p, q) -> (P, c, n*q, n*p).

    H[c] = sum_i kron(A_i, W_i): H[c, a*p+u, b*q+v] = sum_i A[i,a,b] W[c,i,u,v]; we want H^T.
    """
    P, c, n, p, q = W.shape
    Ht = torch.einsum("Piab,Pciuv->Pcbvau", rules, W)
    return Ht.reshape(P, c, n * q, n * p)


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

    def versions(self) -> tuple:
        """In-place update counters of everything H is built from (staleness check)."""
        ps = [t for t in (self.down.W, self.down.W_left, self.down.W_right,
                          self.up.W, self.up.W_left, self.up.W_right) if t is not None]
        return tuple(t._version for t in ps) + (self.rule_pair()._version,)

    def rule_pair(self) -> torch.Tensor:
        """(2, n, n, n): the down and up rules (shared by every layer, or this layer's)."""
        return self._shared[0] if self._shared[0] is not None else self.rules

    def forward(self, h, task, weights=None):
        rules = self.rule_pair()
        wd, wu = weights if weights is not None else (None, None)
        return self.up(self.act(self.down(h, rules[0], task, wd)), rules[1], task, wu)


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
        places = sublayer_places(model, profile, cfg, cfg.positions)
        self._taps = sum_inputs(self, model, profile, cfg, cfg.positions) if cfg.adapter_input == "normed_sum" else {}
        by_stack: dict[str, list] = {}
        for place in places:
            ad = CompacterAdapter(_out_width(place.module), cfg, self.phm_rules)
            self.adapters[place.key] = ad
            by_stack.setdefault(place.stack, []).append(place)
        self._stacks: dict[str, list[str]] = {}   # stack -> adapter keys built together
        self._calls: dict[str, int] = {}          # stack -> how many times it was entered
        self._cache: dict[str, tuple] = {}        # stack -> (call, {key: (H_down, H_up)})
        for stack, ps in by_stack.items():
            self._stacks[stack] = [p.key for p in ps]
            self._calls[stack] = 0
            self.add_pre_hook(_stack_module(model, [p.path for p in ps]), self._enter(stack))
            for p in ps:
                self.add_forward_hook(p.module, self._hook(stack, p.key, self._taps.get(p.path)))

    def _enter(self, stack: str):
        def pre_hook(module, args):
            if not torch.compiler.is_compiling():  # compiled code builds H per place (no counter to guard on)
                self._calls[stack] += 1
        return pre_hook

    def _weights(self, stack: str, key: str):
        """This place's (H_down, H_up), built with the whole stack's once per stack call."""
        if torch.compiler.is_compiling():  # no Python-side cache in a traced graph: each place builds its H
            return None, None
        call = self._calls[stack]
        hit = self._cache.get(stack)
        # rebuilt on each entry to the stack, and if this place's factors changed in place
        # since (a layer called on its own after an optimizer step)
        if hit is None or hit[0] != call or hit[1][key][2] != self.adapters[key].versions():
            hit = (call, self._build(self._stacks[stack]))
            self._cache[stack] = hit
        return hit[1][key][:2]

    def _build(self, keys: list[str]) -> dict:
        ads = [self.adapters[k] for k in keys]
        groups: dict[tuple, list[int]] = {}  # adapters of one shape are built in one einsum
        for i, ad in enumerate(ads):
            groups.setdefault((ad.down.factor_shape, ad.up.factor_shape), []).append(i)
        out: dict = {}
        for idx in groups.values():
            rules = torch.stack([ads[i].rule_pair() for i in idx])  # (P, 2, n, n, n)
            hd = phm_weights(rules[:, 0], torch.stack([ads[i].down.factors() for i in idx])).unbind(0)
            hu = phm_weights(rules[:, 1], torch.stack([ads[i].up.factors() for i in idx])).unbind(0)
            for j, i in enumerate(idx):
                out[keys[i]] = (hd[j], hu[j], ads[i].versions())
        return out

    def _hook(self, stack: str, key: str, tap=None):
        ad = self.adapters[key]

        def hook(module, args, out):
            h = _first(out)
            task = self.router.resolve(h.device) if self.per_task else None
            x = tap.take()(h) if tap is not None else h
            return _replace_first(out, h + ad(x, task, self._weights(stack, key)))
        return hook


def _stack_module(model: nn.Module, paths: list[str]) -> nn.Module:
    """The module entered once per pass over these places: their deepest common ancestor
    that is called (a ModuleList is not, so its parent is taken)."""
    parts = [p.split(".") for p in paths]
    common = []
    for segs in zip(*parts):
        if len(set(segs)) != 1:
            break
        common.append(segs[0])
    if len(paths) == 1:
        common = common[:-1]  # a single place: its parent (the sublayer module's owner)
    while common:
        mod = model.get_submodule(".".join(common))
        if not isinstance(mod, (nn.ModuleList, nn.ModuleDict)):
            return mod
        common.pop()
    return model


register_method("compacter", CompacterConfig, CompacterSet)
register_method("compacter++", CompacterPPConfig, CompacterSet)
