"""AdaMix (microsoft/AdaMix): a mixture of adapter experts with stochastic routing.

Each projection of an adapter (bottleneck down/up, or LoRA A/B) holds ``num_experts``
copies. In training mode every projection draws one expert at random per forward (no
router). In eval mode the projection uses the mean of its experts' weights (the
reference's ``inference_level=3``: softmax of a frozen zero score = uniform mean),
cached until the weights change, so inference costs the same as one adapter.
``share_up`` / ``share_down`` keep a single expert for that projection (the reference
shares the up-projection).

Initialisation as the reference leaves it. Bottleneck experts (RoBERTa/BERT GLUE code):
``MixtureSoup`` deep-copies one ``nn.Linear``, but the model's ``init_weights`` then
re-draws every ``nn.Linear`` (``_init_weights``: N(0, 0.02), zero bias), so each expert
starts as its own independent draw of the bottleneck ``init`` scheme. LoRA experts
(``NLG/loralib``): deep copies of one A (kaiming) and one B (zeros), which no init
touches afterwards, so they start identical.

``expert_type="bottleneck"``: h + W_up f(W_down h + b_d) + b_u after the FFN output
(``positions``); ``expert_type="lora"``: out + (alpha/r) B A x on ``targets``; the
averaged LoRA can be merged into the base weights.

:func:`consistency_loss` gives the training loss with AdaMix's consistency term from two
routed passes p, q, as the reference's ``symmetric_KL_loss``:
``0.5 * (KL(sg q || p) + KL(sg p || q))`` (``F.kl_div(log_softmax(p), softmax(q.detach()))``
+ the mirror), averaged over the rows (examples, or unmasked tokens).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from adapterkit.core.activations import get_activation
from adapterkit.core.base import AdapterSet, linear_targets, sublayer_places
from adapterkit.core.config import ACTIVATIONS, AdapterConfig, bounded, choice, register_method
from adapterkit.core.task_linear import init_weight
from adapterkit.errors import ConfigError


@dataclass
class AdaMixConfig(AdapterConfig):
    """AdaMix options. Bottleneck fields apply to ``expert_type="bottleneck"``, LoRA
    fields (``r``, ``alpha``, ``targets``, ``target_modules``) to ``expert_type="lora"``."""

    method: str = "adamix"
    expert_type: str = choice("bottleneck", "lora", default="bottleneck")
    num_experts: int = bounded(4, lo=1)
    share_up: bool = True
    share_down: bool = False
    # bottleneck experts
    reduction_factor: float = bounded(16.0, lo=1.0)
    bottleneck_dim: int | None = bounded(None, lo=1)
    activation: str = choice(*ACTIVATIONS, default="gelu")
    init: str = choice("bert", "lora", "zeros_up_bert", default="bert")
    positions: list[str] = field(default_factory=lambda: ["ffn_out"])
    dropout: float = bounded(0.0, lo=0.0, hi=0.99)
    # LoRA experts
    r: int = bounded(8, lo=1)
    alpha: float = bounded(16.0, lo=0.0, lo_open=True)
    targets: list[str] = field(default_factory=lambda: ["q", "v"])
    target_modules: list[str] | None = None

    def validate(self) -> None:
        super().validate()
        if self.sharing != "shared" and len(self.tasks) > 1:
            raise ConfigError('adamix uses its stacked copies for experts: only sharing "shared" is supported '
                              f'with several tasks, got "{self.sharing}"')
        allowed = {"attn_out", "cross_attn_out", "ffn_out"}
        for p in self.positions:
            if p not in allowed:
                raise ConfigError(f'unknown position "{p}" for method "adamix"; allowed: {sorted(allowed)}')
        if self.expert_type == "bottleneck" and not self.positions:
            raise ConfigError("positions must list at least one position")

    def hidden(self, d: int) -> int:
        if self.bottleneck_dim is not None:
            return self.bottleneck_dim
        if d % self.reduction_factor:
            raise ConfigError(f"reduction_factor {self.reduction_factor:g} does not divide the hidden width {d}")
        return int(d // self.reduction_factor)

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class ExpertLinear(nn.Module):
    """A linear map with ``n`` expert copies: one random expert per training forward,
    the experts' mean in eval mode (cached while the weights are unchanged). ``identical``:
    every expert starts as the same draw, else each expert is drawn independently."""

    def __init__(self, in_features: int, out_features: int, n: int, bias: bool = True, init: str = "kaiming",
                 identical: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.n = in_features, out_features, n
        if identical:  # one draw copied to every expert
            first = torch.empty(1, out_features, in_features)
            init_weight(first, init)
            weight = first.repeat(n, 1, 1)
        else:  # an independent draw per expert
            weight = torch.empty(n, out_features, in_features)
            init_weight(weight, init)
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(torch.zeros(n, out_features)) if bias else None
        self.forced: int | None = None
        self._cache: tuple | None = None

    def _key(self):
        b = self.bias
        return (self.weight._version, self.weight.data_ptr(), self.weight.dtype, self.weight.device,
                None if b is None else (b._version, b.data_ptr()))

    def mean_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W_mean (out, in), b_mean (out,) or None); cached when no gradient is needed."""
        grad = torch.is_grad_enabled() and (self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad))
        if self.n == 1:
            return self.weight[0], None if self.bias is None else self.bias[0]
        if grad:
            return self.weight.mean(0), None if self.bias is None else self.bias.mean(0)
        key = self._key()
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                w = self.weight.mean(0)
                b = None if self.bias is None else self.bias.mean(0)
            self._cache = (key, w, b)
        return self._cache[1], self._cache[2]

    def pick(self) -> int:
        if self.forced is not None:
            return self.forced
        return int(torch.randint(self.n, ())) if self.n > 1 else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or self.forced is not None:
            e = self.pick()
            return F.linear(x, self.weight[e], None if self.bias is None else self.bias[e])
        w, b = self.mean_weights()
        return F.linear(x, w, b)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, experts={self.n}, bias={self.bias is not None}"


class ExpertBottleneck(nn.Module):
    def __init__(self, d: int, m: int, cfg: AdaMixConfig):
        super().__init__()
        down_init, up_init = {"bert": ("bert", "bert"), "lora": ("kaiming", "zeros"),
                              "zeros_up_bert": ("bert", "zeros")}[cfg.init]
        self.down = ExpertLinear(d, m, 1 if cfg.share_down else cfg.num_experts, init=down_init)
        self.up = ExpertLinear(m, d, 1 if cfg.share_up else cfg.num_experts, init=up_init)
        self.act = get_activation(cfg.activation)
        self.p = cfg.dropout

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = self.act(self.down(h))
        if self.p and self.training:
            z = F.dropout(z, self.p, True)
        return self.up(z)


class ExpertLora(nn.Module):
    def __init__(self, target: nn.Module, cfg: AdaMixConfig):
        super().__init__()
        from adapterkit.methods.lora import _linear_shape

        self.in_features, self.out_features, self.fan_in_fan_out = _linear_shape(target)
        self.A = ExpertLinear(self.in_features, cfg.r, 1 if cfg.share_down else cfg.num_experts, bias=False,
                              init="kaiming", identical=True)
        self.B = ExpertLinear(cfg.r, self.out_features, 1 if cfg.share_up else cfg.num_experts, bias=False,
                              init="zeros", identical=True)
        self.scaling = cfg.scaling
        self.p = cfg.dropout
        self.target = [target]

    def delta(self) -> torch.Tensor:
        """The averaged weight update (out, in) used at inference."""
        return (self.B.mean_weights()[0] @ self.A.mean_weights()[0]) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p and self.training:
            x = F.dropout(x, self.p, True)
        return self.B(self.A(x)) * self.scaling


class AdaMixSet(AdapterSet):
    """AdaMix experts at the configured places."""

    def __init__(self, cfg: AdaMixConfig):
        super().__init__(cfg)
        self.adapters = nn.ModuleDict()
        self.can_merge = cfg.expert_type == "lora"
        if not self.can_merge:
            self.merge_note = "bottleneck experts apply a non-linear function of the hidden states"

    def attach(self, model, profile):
        from adapterkit.core.hooks import first as _first
        from adapterkit.core.hooks import out_width as _out_width
        from adapterkit.core.hooks import replace_first as _replace_first

        cfg: AdaMixConfig = self.config
        if cfg.expert_type == "lora":
            for place in linear_targets(model, profile, cfg):
                layer = ExpertLora(place.module, cfg)
                self.adapters[place.key] = layer

                def hook(module, args, out, layer=layer):
                    return out if self.merged else out + layer(args[0])
                self.add_forward_hook(place.module, hook)
            return
        for place in sublayer_places(model, profile, cfg, cfg.positions):
            d = _out_width(place.module)
            ad = ExpertBottleneck(d, cfg.hidden(d), cfg)
            self.adapters[place.key] = ad

            def hook(module, args, out, ad=ad):
                h = _first(out)
                return _replace_first(out, h + ad(h))
            self.add_forward_hook(place.module, hook)

    def experts(self) -> list[ExpertLinear]:
        return [m for m in self.modules() if isinstance(m, ExpertLinear)]

    def force_expert(self, index: int | None) -> None:
        """Use expert ``index`` in every projection (None: back to random / averaged)."""
        for m in self.experts():
            if index is not None and not 0 <= index < m.n:
                if m.n == 1:
                    continue
                raise ConfigError(f"expert index {index} out of range: {m.n} experts")
            m.forced = None if index is None else min(index, m.n - 1)

    @torch.no_grad()
    def merge(self, task=None) -> None:
        if not self.can_merge:
            super().merge(task)
        if self.merged:
            raise ConfigError("AdaMix weights are already merged; unmerge first")
        for layer in self.adapters.values():
            base = layer.target[0]
            d = layer.delta().to(base.weight.dtype)
            base.weight += d.T if layer.fan_in_fan_out else d
        self.merged = True
        self.suspend_hooks()

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        for layer in self.adapters.values():
            base = layer.target[0]
            d = layer.delta().to(base.weight.dtype)
            base.weight -= d.T if layer.fan_in_fan_out else d
        self.merged = False
        self.resume_hooks()


def symmetric_kl(logits_p: torch.Tensor, logits_q: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The reference's ``symmetric_KL_loss``: 0.5 * (KL(sg q || p) + KL(sg p || q)).

    Each KL is ``F.kl_div(log_softmax(x), softmax(y.detach()), reduction="batchmean")``
    over rows of the last dim: the other pass's distribution is the (constant) target,
    so d/dlogits_p = 0.5 * (p - q) / rows. Leading dims are flattened into rows; ``mask``
    (same leading shape, true = keep) selects rows, as the NLG version's token mask.
    """
    c = logits_p.shape[-1]
    lp = F.log_softmax(logits_p.float().reshape(-1, c), dim=-1)
    lq = F.log_softmax(logits_q.float().reshape(-1, c), dim=-1)
    if mask is not None:
        keep = mask.reshape(-1).bool()
        lp, lq = lp[keep], lq[keep]
    rows = max(lp.shape[0], 1)
    tp, tq = lp.detach(), lq.detach()
    kl_q_p = (tq.exp() * (tq - lp)).sum() / rows  # KL(sg q || p)
    kl_p_q = (tp.exp() * (tp - lq)).sum() / rows  # KL(sg p || q)
    return 0.5 * (kl_q_p + kl_p_q)


def consistency_loss(
    forward: Callable[[], torch.Tensor],
    task_loss: Callable[[torch.Tensor], torch.Tensor],
    weight: float = 1.0,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AdaMix's training loss from two stochastically routed passes.

    ``forward()`` runs the model (in training mode) and returns logits; it is called
    twice, so each pass draws its own experts (and dropout). Returns
    ``(total, task, consistency)`` with ``total = task_loss(p) + weight * symmetric_kl(p, q, mask)``
    (the task loss of the first pass only, as the reference). The reference's weights:
    1 for GLUE (RoBERTa), 100 for NLG (GPT-2, with the token mask).
    """
    logits_p = forward()
    logits_q = forward()
    task = task_loss(logits_p)
    cons = symmetric_kl(logits_p, logits_q, mask)
    if not math.isfinite(weight):
        raise ConfigError(f"consistency weight must be finite, got {weight}")
    return task + weight * cons, task, cons


register_method("adamix", AdaMixConfig, AdaMixSet)

__all__ = ["AdaMixConfig", "AdaMixSet", "ExpertBottleneck", "ExpertLinear", "ExpertLora", "consistency_loss",
           "symmetric_kl"]
