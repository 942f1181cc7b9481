"""Adapter sets, the per-model container, and attachment (``add_adapters``).

An :class:`AdapterSet` is everything one method config attaches to a model: its
modules (registered under ``model.adapterkit.sets[name]``, so they appear in
``model.parameters()`` and ``state_dict()`` without touching the base model's own
keys) and the hooks that wire them in at the profile's places.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from adapterkit.core.config import AdapterConfig, config_from_dict, method_entry
from adapterkit.core.profiles import Place, find_places, norm_style, profile_for_model
from adapterkit.core.routing import TaskRouter
from adapterkit.errors import ConfigError

CONTAINER = "adapterkit"


class AdapterSet(nn.Module):
    """Base class: the modules of one method config plus their hooks."""

    can_merge = False
    merge_note = "it applies a non-linear function of the hidden states, which no weight update reproduces"

    def __init__(self, config: AdapterConfig):
        super().__init__()
        self.config = config
        self.router = TaskRouter(config.tasks)
        self._handles: list = []
        self._hook_specs: list = []  # (pre?, module, fn, with_kwargs): what suspend/resume re-registers
        self.merged = False

    # subclasses implement attach(); they call self.hook_* to install hooks
    def attach(self, model: nn.Module, profile: dict | None) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def task(self, device) -> int | torch.Tensor | None:
        """The routed task(s) for the current forward (None when every part is shared)."""
        return self.router.resolve(device)

    def add_forward_hook(self, module: nn.Module, fn, *, with_kwargs: bool = False) -> None:
        self._hook_specs.append((False, module, fn, with_kwargs))
        self._register(self._hook_specs[-1])

    def add_pre_hook(self, module: nn.Module, fn, *, with_kwargs: bool = False) -> None:
        self._hook_specs.append((True, module, fn, with_kwargs))
        self._register(self._hook_specs[-1])

    def _register(self, spec) -> None:
        pre, module, fn, with_kwargs = spec
        register = module.register_forward_pre_hook if pre else module.register_forward_hook
        self._handles.append(register(fn, with_kwargs=with_kwargs))

    def suspend_hooks(self) -> None:
        """Remove this set's hooks but remember them (a merged set costs nothing at inference)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def resume_hooks(self) -> None:
        """Re-register the hooks :meth:`suspend_hooks` removed."""
        if not self._handles:
            for spec in self._hook_specs:
                self._register(spec)

    def detach(self) -> None:
        self.suspend_hooks()
        self._hook_specs.clear()

    def merge(self, task=None) -> None:
        raise ConfigError(f'method "{self.config.method}" cannot be merged into the base weights: {self.merge_note}')

    def unmerge(self) -> None:
        raise ConfigError(f'method "{self.config.method}" cannot be merged or unmerged')


class AdapterContainer(nn.Module):
    """Holds every adapter set attached to a model, plus the freeze-policy record."""

    def __init__(self):
        super().__init__()
        self.sets = nn.ModuleDict()
        self.base_trainable: list[str] = []  # base parameter names unfrozen by policy

    def forward(self, x, *args, **kwargs):
        """Identity: lets containers such as nn.Sequential, which call every child, pass through."""
        return x

    def configs(self) -> dict[str, dict]:
        return {name: s.config.to_dict() for name, s in self.sets.items()}


def get_container(model: nn.Module, create: bool = False) -> AdapterContainer | None:
    c = getattr(model, CONTAINER, None)
    if c is None and create:
        c = AdapterContainer()
        model.add_module(CONTAINER, c)
    return c


def base_named_parameters(model: nn.Module):
    """Parameters of the base model (everything outside the adapter container)."""
    prefix = CONTAINER + "."
    for n, p in model.named_parameters():
        if not n.startswith(prefix):
            yield n, p


def places_for(model: nn.Module, profile: dict | None, kind: str, config: AdapterConfig,
               patterns: list[str] | None = None, required: bool = True) -> list[Place]:
    """Find places of ``kind`` (skipping the adapter container), filtered by ``config.layers``."""
    found = [p for p in find_places(model, profile, kind, patterns) if not p.path.startswith(CONTAINER)]
    if config.layers is not None:
        found = [p for p in found if p.layer in set(config.layers)]
    if required and not found:
        where = f"patterns {patterns}" if patterns else f'place "{kind}" of profile "{profile["name"] if profile else None}"'
        raise ConfigError(f"no module of {type(model).__name__} matches {where}")
    return found


def sublayer_places(model: nn.Module, profile: dict | None, config: AdapterConfig, positions,
                    explicit: dict | None = None) -> list[Place]:
    """Places of several sublayer positions in order. Cross-attention exists only in decoders,
    so ``cross_attn_out`` is skipped quietly where the model has none (unless given explicitly)."""
    found = []
    for pos in positions:
        patterns = (explicit or {}).get(pos)
        optional = pos == "cross_attn_out" and not patterns
        if optional and profile is not None and pos not in profile["places"]:
            continue
        found += places_for(model, profile, pos, config, patterns, required=not optional)
    return found


def linear_targets(model: nn.Module, profile: dict | None, config, kind: str = "lora") -> list[Place]:
    """LoRA-style targets: ``target_modules`` (names/regexes; found places are named ``kind``) or
    the profile places in ``targets``, each module once."""
    if config.target_modules:
        return places_for(model, profile, kind, config, config.target_modules)
    found, seen = [], set()
    for kind in config.targets:
        for p in places_for(model, profile, kind, config):
            if p.path not in seen:
                seen.add(p.path)
                found.append(p)
    return found


def paired_places(model: nn.Module, profile: dict | None, config, src_kind: str, dst_kind: str,
                  places: dict | None = None) -> list[tuple[Place, Place]]:
    """(src, dst) pairs in the same (stack, layer): a parallel branch reads ``src`` (e.g. the
    stream entering the FFN) and adds to ``dst`` (its output). ``places``: explicit patterns
    by kind. A ``dst`` with no partner is one ConfigError."""
    places = places or {}
    srcs = {(p.stack, p.layer): p for p in places_for(model, profile, src_kind, config, places.get(src_kind))}
    out = []
    for dst in places_for(model, profile, dst_kind, config, places.get(dst_kind)):
        src = srcs.get((dst.stack, dst.layer))
        if src is None:
            raise ConfigError(f"no {src_kind} module pairs with {dst.path}")
        out.append((src, dst))
    return out


def add_adapters(model: nn.Module, config, name: str | None = None) -> nn.Module:
    """Attach the adapters described by ``config`` to ``model``, freeze by policy, return it.

    ``config`` is a method config dataclass or a plain dict such as
    ``{"method": "houlsby", "reduction_factor": 8, "tasks": ["vqa", "gqa"], "sharing": "shared"}``.
    Several configs can be attached to one model under different names.
    """
    cfg = config_from_dict(config)
    _, builder = method_entry(cfg.method)
    container = get_container(model, create=True)
    name = name or cfg.method
    if name in container.sets:
        raise ConfigError(f'an adapter named "{name}" is already attached; pass another name=')
    profile = profile_for_model(model, cfg.profile)
    adapter_set: AdapterSet = builder(cfg)
    adapter_set.norm = norm_style(profile, model)
    adapter_set.attach(model, profile)
    # match the base model's device and floating dtype
    ref = next((p for _, p in base_named_parameters(model) if p.is_floating_point()), None)
    if ref is not None:
        adapter_set.to(device=ref.device, dtype=ref.dtype)
    adapter_set.train(model.training)  # follow the model's mode (branch dropout only when training)
    container.sets[name] = adapter_set
    apply_freeze_policy(model, profile)
    if not any(p.requires_grad for p in model.parameters()):
        remove_adapters(model, name)
        raise ConfigError(
            f'method "{cfg.method}" leaves nothing trainable on {type(model).__name__} '
            "(e.g. BitFit on a model without biases)"
        )
    return model


def apply_freeze_policy(model: nn.Module, profile: dict | None = None) -> None:
    """Freeze the base and unfreeze what the attached configs' policies name."""
    container = get_container(model)
    if container is None:
        return
    cfgs = [s.config for s in container.sets.values()]
    if profile is None:
        profile = profile_for_model(model, next((c.profile for c in cfgs if c.profile), None))
    freeze = any(c.freeze_base for c in cfgs)
    ln = any(c.train_layernorms for c in cfgs)
    bias = any(c.train_biases for c in cfgs)
    extra = [re.compile(p) for c in cfgs for p in c.trainable_modules]
    ln_rx = [re.compile(p) for p in (profile or {}).get("layernorm", [])]
    ln_modules = set()
    if ln:
        for path, mod in model.named_modules():
            if path.startswith(CONTAINER):
                continue
            cls = type(mod).__name__.lower()
            if isinstance(mod, (nn.LayerNorm, nn.GroupNorm)) or "layernorm" in cls or "rmsnorm" in cls \
                    or any(r.search(path) for r in ln_rx) and "norm" in cls:
                ln_modules.add(path)
    trainable = []
    for n, p in base_named_parameters(model):
        mod_path, _, leaf = n.rpartition(".")
        on = not freeze
        if ln and mod_path in ln_modules:
            on = True
        if bias and leaf == "bias":
            on = True
        if any(r.search(n) for r in extra):
            on = True
        p.requires_grad_(on)
        if on and freeze:
            trainable.append(n)
    for s in container.sets.values():
        for p in s.parameters():
            p.requires_grad_(True)
        frozen = getattr(s, "frozen_parameters", None)
        if frozen:
            for p in frozen():
                p.requires_grad_(False)
    container.base_trainable = trainable


def remove_adapters(model: nn.Module, name: str | None = None) -> nn.Module:
    """Detach adapters (all, or the named set) and unfreeze the base model."""
    container = get_container(model)
    if container is None:
        return model
    names = [name] if name else list(container.sets)
    for n in names:
        if n not in container.sets:
            raise ConfigError(f'no adapter named "{n}" is attached; attached: {list(container.sets)}')
        s = container.sets[n]
        if s.merged:
            s.unmerge()
        s.detach()
        del container.sets[n]
    if not container.sets:
        delattr(model, CONTAINER)
        for p in model.parameters():
            p.requires_grad_(True)
    return model


def trainable_report(model: nn.Module) -> dict:
    """``{"trainable", "total", "percent"}``; tensors shared by several tasks/places count once."""
    seen, total, trainable = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / max(total, 1)}


def cast_frozen(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Store every frozen floating-point parameter in ``dtype``; trainable ones keep theirs.

    For training under ``torch.autocast(dtype=dtype)``: autocast casts every weight to
    ``dtype`` for its matmul anyway, so the matmuls are unchanged, but each frozen weight is
    no longer cast again on every forward, and its fp32 copy no longer takes memory. (A
    tied embedding / LM head is one parameter and is cast once.) Call it after
    ``add_adapters``; run the model under autocast afterwards.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"cast_frozen needs a floating-point dtype (torch.bfloat16, torch.float16), got {dtype!r}")
    seen = set()
    for p in model.parameters():
        if id(p) in seen or p.requires_grad or not p.is_floating_point() or p.dtype == dtype:
            continue
        seen.add(id(p))
        p.data = p.data.to(dtype)
    return model


def merge_adapters(model: nn.Module, task: str | int | None = None) -> nn.Module:
    """Fold mergeable adapters (LoRA) into the base weights; others raise a clear error."""
    container = get_container(model)
    if container is None:
        raise ConfigError("the model has no adapters to merge")
    for s in container.sets.values():
        if not s.can_merge:
            s.merge(task)  # raises with the method's reason
    for s in container.sets.values():
        if not s.merged:
            s.merge(task)
    return model


def unmerge_adapters(model: nn.Module) -> nn.Module:
    container = get_container(model)
    if container is None:
        raise ConfigError("the model has no adapters to unmerge")
    for s in container.sets.values():
        if s.can_merge and s.merged:
            s.unmerge()
    return model
