"""Bottleneck adapters: Houlsby (after attention and FFN), Pfeiffer (after FFN) and
parallel adapters (next to the FFN, scaled; AdaptFormer is ``parallel`` with scale 0.1
and LoRA-style init on the un-normalised residual stream).

A(h) = h + s * W_up f(W_down h + b_d) + b_u, on tensors (B, L, d). Sequential
adapters hook the sublayer's output projection, so they sit on the sublayer output
before dropout and the residual add (right for both pre-LN and post-LN blocks).
Parallel adapters read the stream entering the FFN block and add their output to
the FFN output.

``adapter_input`` chooses what a sequential adapter reads, with h the sublayer output and
x the residual stream entering the sublayer:

- ``sublayer`` (default): A reads h; post-LN blocks compute LN(x + h + A(h)) (Houlsby,
  AdapterHub's ``double_seq_bn``);
- ``normed_sum``: AdapterHub's ``seq_bn`` form (``original_ln_before``, ``residual_before_ln``,
  ``original_ln_after``): A reads LN(h + x) through the block's own LayerNorm, its residual
  is h, and the block's LayerNorm is applied again: LN(h + A(LN(h + x)) + x). In pre-LN
  blocks (no LayerNorm after the sublayer) A reads h + x: x + h + A(h + x).

Both hook the sublayer output before its dropout, so they equal AdapterHub's in eval mode;
in training AdapterHub drops out h before the adapter, here h + A(.) is dropped out.

``residual`` (None: the forms above) changes the residual of the adapter: ``false`` on a
sequential adapter replaces h by A(h) (out = x + A(Sub(x)): PETL-AST's default sequential
setting), ``true`` on a parallel one also adds its input (out = Sub(z) + A(z) + z, z the FFN
input). ``init: zeros`` is PETL-AST's all-zero bottleneck (with GELU(0) = 0 only the
up-projection bias then receives gradient).

Several tasks' adapters of one set can be composed (Stack, Average, Fuse; see
:mod:`adapterkit.core.composition`); ``fusion`` adds AdapterFusion layers over the named tasks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from adapterkit.core.activations import get_activation
from adapterkit.core.base import AdapterSet, paired_places, sublayer_places
from adapterkit.core.composition import Average, Fuse, Fusion, Stack
from adapterkit.core.config import ACTIVATIONS, AdapterConfig, bounded, choice, register_method
from adapterkit.core.fused import bottleneck_add, one_task_weight
from adapterkit.core.hooks import first as _first
from adapterkit.core.hooks import first_input
from adapterkit.core.hooks import out_width as _out_width
from adapterkit.core.hooks import replace_first as _replace_first
from adapterkit.core.optim import mark_task_stacked
from adapterkit.core.task_linear import TaskLinear, task_pair
from adapterkit.errors import ConfigError

INITS = ("bert", "houlsby", "lora", "zeros_up_bert", "zeros")


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
    adapter_input: str = choice("sublayer", "normed_sum", default="sublayer")
    # None: the method's own form (sequential h + A(h), parallel Sub(x) + A(x)); False on a
    # sequential adapter: A(h) replaces h (PETL-AST's default); True on a parallel one: + x as well
    residual: bool | None = None
    places: dict = field(default_factory=dict)  # explicit {position: [module path patterns]}
    fusion: list[str] = field(default_factory=list)  # tasks an AdapterFusion layer attends over
    fusion_value: bool = True                        # dynamic fusion (value matrix); False: static
    fusion_dropout: float | None = bounded(None, lo=0.0, hi=0.99)  # None: attention_probs_dropout_prob (AdapterHub)
    train_adapters: bool = True                      # False: only the fusion layers train

    def validate(self) -> None:
        super().validate()
        if self.residual is not None and not isinstance(self.residual, bool):
            raise ConfigError(f"residual must be true, false or null, got {self.residual!r}")
        if self.residual is False and self.fusion:
            raise ConfigError("residual: false (the adapter replaces the sublayer output) cannot be fused")
        if self.adapter_input == "normed_sum" and self.method == "parallel":
            raise ConfigError('adapter_input "normed_sum" is for sequential adapters, not "parallel"')
        if self.fusion:
            unknown = [t for t in self.fusion if t not in self.tasks]
            if unknown or len(self.fusion) < 2 or len(set(self.fusion)) != len(self.fusion):
                raise ConfigError(f"fusion must name at least two distinct declared tasks {self.tasks}, "
                                  f"got {self.fusion}")
            if self.sharing != "per_task":
                raise ConfigError(f'fusion needs one adapter per task (sharing "per_task"), got "{self.sharing}"')
        if not self.train_adapters and not self.fusion:
            raise ConfigError("train_adapters: false leaves nothing to train without fusion layers")
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
            "zeros": ("zeros", "zeros"),  # PETL-AST's Bottleneck_adapter: every weight and bias zero
        }[cfg.init]
        self.down = TaskLinear(d, m, cfg.copies("down"), init=down_init)
        self.up = TaskLinear(m, d, cfg.copies("up"), init=up_init)
        self.act = get_activation(cfg.activation)
        self.act_name = cfg.activation
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

    def branches(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Every listed copy's branch output at once: x (..., d), idx (k,) -> (..., k, d)."""
        if self.ln_mode != "none":
            raise ConfigError("composing adapters with their own LayerNorm (adapter_layernorm) is not supported")
        di = idx if self.down.weight.shape[0] > 1 else torch.zeros_like(idx)
        ui = idx if self.up.weight.shape[0] > 1 else torch.zeros_like(idx)
        z = torch.einsum("...d,kmd->...km", x, self.down.weight.index_select(0, di))
        z = self._mid(z + self.down.bias.index_select(0, di))
        y = torch.einsum("...km,kdm->...kd", z, self.up.weight.index_select(0, ui)) + self.up.bias.index_select(0, ui)
        if self.scale is not None:
            y = y * self.scale.index_select(0, ui if self.scale.shape[0] > 1 else torch.zeros_like(ui)).unsqueeze(-1)
        elif self.fixed_scale != 1.0:
            y = y * self.fixed_scale
        return y

    def residual(self, x: torch.Tensor, res: torch.Tensor | None, task, mode: str = "eager",
                 backend: str = "inductor") -> torch.Tensor:
        """``res + self(x, task)`` (``res`` None: the branch alone), fused by ``mode`` where it
        can be (:mod:`adapterkit.core.fused`: one task or shared weights, no adapter LayerNorm,
        no learned scale, no active dropout, both biases)."""
        mixed = isinstance(task, torch.Tensor) and (self.down.n > 1 or self.up.n > 1)
        plain = self.ln_mode != "none" or self.scale is not None or (self.p and self.training) \
            or self.down.bias is None or self.up.bias is None  # (a pruned-away adapter has no up bias)
        hooked = bool(self._forward_pre_hooks or self._forward_hooks)  # a user's module hook must see the call
        if mode == "off" or mixed or plain or hooked:
            a = self(x, task)
            return a if res is None else res + a
        return bottleneck_add(x, res, one_task_weight(self.down.weight, task), one_task_weight(self.down.bias, task),
                              one_task_weight(self.up.weight, task), one_task_weight(self.up.bias, task),
                              self.act_name, self.fixed_scale, mode, backend)

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
        self.fusions = nn.ModuleDict()
        self.per_task = cfg.copies("down") > 1 or cfg.copies("up") > 1
        self.composition = None
        self._plan = None
        self._fusion_idx = {t: i for i, t in enumerate(cfg.fusion)}
        self.fused, self.fused_backend = "eager", "inductor"  # adapterkit.fuse() sets them

    def _task(self, device):
        return self.router.resolve(device) if self.per_task else None

    def frozen_parameters(self):
        return [] if self.config.train_adapters else list(self.adapters.parameters())

    def attach(self, model, profile):
        cfg: BottleneckConfig = self.config
        if cfg.method == "parallel":
            self._attach_parallel(model, profile)
            return
        sums = sum_inputs(self, model, profile, cfg, cfg.positions, cfg.places) \
            if cfg.adapter_input == "normed_sum" else {}
        for place in sublayer_places(model, profile, cfg, cfg.positions, cfg.places):
            d = _out_width(place.module)
            ad = Bottleneck(d, cfg.hidden(d), cfg)
            self.adapters[place.key] = ad
            if cfg.fusion:
                p = cfg.fusion_dropout if cfg.fusion_dropout is not None else \
                    float(getattr(getattr(model, "config", None), "attention_probs_dropout_prob", 0.0) or 0.0)
                self.fusions[place.key] = Fusion(d, cfg.fusion_value, p)
            self.add_forward_hook(place.module, self._sequential_hook(place.key, ad, sums.get(place.path)))

    def _sequential_hook(self, key: str, ad: Bottleneck, tap):
        keep = self.config.residual is not False

        def hook(module, args, out):
            h = _first(out)
            pre = tap.take() if tap is not None else _identity
            if self.composition is None:
                y = ad.residual(pre(h), h if keep else None, self._task(h.device), self.fused, self.fused_backend)
                return _replace_first(out, y)
            return _replace_first(out, self._composed(key, ad, h, pre, self._plan))
        return hook

    # -- composition -----------------------------------------------------------------
    def set_composition(self, block) -> None:
        """Compose this set's task adapters by ``block`` (Stack/Average/Fuse; None: plain routing)."""
        if block is None:
            self.composition, self._plan = None, None
            return
        if self.config.method == "parallel":
            raise ConfigError("Stack/Average/Fuse compose sequential bottleneck adapters, not parallel ones")
        if self.config.residual is False:
            raise ConfigError("Stack/Average/Fuse need adapters with their residual (residual: false replaces h)")
        p = next(self.parameters(), None)
        self._plan = self._resolve(block, p.device if p is not None else None)
        self.composition = block

    def _resolve(self, block, device=None):
        """The block as a plan whose index/weight tensors sit on the adapters' device (made once
        here, not at every forward)."""
        tasks = self.config.tasks
        if isinstance(block, str):
            return ("one", tasks.index(block))
        if isinstance(block, Stack):
            return ("stack", [self._resolve(c, device) for c in block.children])
        idx = torch.tensor([tasks.index(t) for t in block.children], dtype=torch.long, device=device)
        if isinstance(block, Average):
            w = torch.tensor(block.weights, device=device)
            return ("average", idx, w, float(w.sum()))
        if isinstance(block, Fuse):
            if set(block.children) != set(self.config.fusion):
                raise ConfigError(f"{block!r} does not match this set's fusion layers over {self.config.fusion}")
            return ("fuse", idx)
        raise ConfigError(f"{type(block).__name__} cannot compose bottleneck adapters here")

    def _composed(self, key, ad: Bottleneck, h, pre, plan):
        kind = plan[0]
        if kind == "one":
            return h + ad(pre(h), plan[1])
        if kind == "stack":
            for p in plan[1]:
                h = self._composed(key, ad, h, pre, p)
            return h
        x = pre(h)
        idx = plan[1].to(h.device)  # a no-op unless the model moved after compose()
        ups = ad.branches(x, idx)                                   # (..., k, d)
        if kind == "average":  # AdapterHub: mean_i(w_i * (A_i(x) + h))
            w = plan[2].to(device=h.device, dtype=ups.dtype)
            return (torch.matmul(w, ups) + plan[3] * h) / idx.numel()
        return self.fusions[key](x, ups, h)

    def _attach_parallel(self, model, profile):
        cfg: BottleneckConfig = self.config
        plus_input = cfg.residual is True
        for pos in cfg.positions:  # "ffn" or "attn"
            src_kind = f"{pos}_stream" if cfg.parallel_input == "stream" else f"{pos}_in"
            for src, dst in paired_places(model, profile, cfg, src_kind, f"{pos}_out", cfg.places):
                d = _out_width(dst.module)
                ad = Bottleneck(d, cfg.hidden(d), cfg)
                self.adapters[dst.key] = ad
                slot: list = [None]

                def capture(module, args, kwargs, slot=slot):
                    slot[0] = first_input(args, kwargs)

                def add(module, args, out, ad=ad, slot=slot):
                    x = slot[0]
                    slot[0] = None
                    h = _first(out)
                    y = ad.residual(x, h, self._task(h.device), self.fused, self.fused_backend)
                    return _replace_first(out, y + x if plus_input else y)

                self.add_pre_hook(src.module, capture, with_kwargs=True)
                self.add_forward_hook(dst.module, add)


def _identity(h):
    return h


class _SumTap:
    """The residual x entering a sublayer (captured by a pre-hook) and the block's LayerNorm
    after it (post-LN; None in pre-LN blocks): ``pre(h)`` is LN(h + x), or h + x."""

    def __init__(self, norm: nn.Module | None):
        self.x = None
        self.norm = [norm]  # a list: not registered as a submodule of anything

    def capture(self, module, args, kwargs):
        self.x = first_input(args, kwargs)

    def take(self):
        """``pre`` for this call of the sublayer (the captured x is consumed)."""
        x, self.x = self.x, None
        if x is None:
            raise ConfigError('adapter_input "normed_sum": the residual stream of this sublayer was not seen '
                              "(its stream module did not run before the sublayer output)")
        norm = self.norm[0]

        def pre(h):
            return norm(h + x) if norm is not None else h + x
        return pre


def sum_inputs(adapter_set: AdapterSet, model, profile, cfg, positions, places: dict | None = None) -> dict:
    """For AdapterHub's ``seq_bn`` form: per output place path, a tap that sees the residual
    stream x entering the sublayer (``<pos>_stream`` place) and, in post-LN blocks, the block's
    LayerNorm after it (``<pos>_norm``). Explicit ``places`` may name both kinds."""
    places = places or {}
    post = getattr(adapter_set, "norm", "pre") == "post"
    taps = {}
    for pos in positions:
        base = pos.removesuffix("_out")
        if pos == "cross_attn_out" and not places.get(pos) and profile is not None and pos not in profile["places"]:
            continue
        for kind in [f"{base}_stream"] + ([f"{base}_norm"] if post else []):
            if not places.get(kind) and (profile is None or kind not in profile["places"]):
                raise ConfigError(f'adapter_input "normed_sum" needs place "{kind}" (the '
                                  f'{"residual stream entering" if kind.endswith("stream") else "LayerNorm after"} '
                                  f'the sublayer at "{pos}"); give it in places')
        streams = paired_places(model, profile, cfg, f"{base}_stream", pos, places)
        norms = {dst.path: n.module for n, dst in paired_places(model, profile, cfg, f"{base}_norm", pos, places)} \
            if post else {}
        for src, dst in streams:
            tap = _SumTap(norms.get(dst.path))
            adapter_set.add_pre_hook(src.module, tap.capture, with_kwargs=True)
            taps[dst.path] = tap
    return taps


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

__all__ = ["BottleneckConfig", "HoulsbyConfig", "PfeifferConfig", "ParallelConfig", "BottleneckSet", "Bottleneck",
           "sum_inputs"]
