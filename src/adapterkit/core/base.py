"""Adapter sets, the per-model container, and attachment (``add_adapters``).

An :class:`AdapterSet` is everything one method config attaches to a model: its
modules (registered under ``model.adapterkit.sets[name]``, so they appear in
``model.parameters()`` and ``state_dict()`` without touching the base model's own
keys) and the hooks that wire them in at the profile's places.
"""

from __future__ import annotations

import dataclasses
import re

import torch
from torch import nn

from adapterkit.core.config import AdapterConfig, config_from_dict, method_entry
from adapterkit.core.profiles import Place, find_places, norm_style, profile_for_model
from adapterkit.core.routing import TaskRouter, _task_index, check_rows, current_route
from adapterkit.errors import ConfigError

CONTAINER = "adapterkit"


class AdapterSet(nn.Module):
    """Base class: the modules of one method config plus their hooks."""

    can_merge = False
    merge_note = "it applies a non-linear function of the hidden states, which no weight update reproduces"
    #: a per-task set with one task merged still answers rows routed to other tasks (LoRA);
    #: for the others a forward routed to another task is refused (see ``_root_pre_hook``)
    routes_while_merged = False

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
        self.root_hook = None  # the model-level forward pre-hook (route rows, merged-task guard)

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
    """Find places of ``kind`` (skipping the adapter container), filtered by ``config.layers``
    (negative indices count from the last layer: -1 is the top one, as in Python)."""
    found = [p for p in find_places(model, profile, kind, patterns) if not p.path.startswith(CONTAINER)]
    layers = None
    if config.layers is not None:
        depth = 1 + max((p.layer for p in found if p.layer is not None), default=-1)
        layers = {i + depth if i < 0 else i for i in config.layers}
        found = [p for p in found if p.layer in layers]
    if required and not found:
        where = f"patterns {patterns}" if patterns else f'place "{kind}" of profile "{profile["name"] if profile else None}"'
        only = f" in layers {sorted(config.layers)}" if layers is not None else ""
        raise ConfigError(f"no module of {type(model).__name__} matches {where}{only}")
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


#: HF model classes whose task head is new (randomly initialised) when the class is loaded from a
#: backbone checkpoint: add_adapters trains that head by default
NEW_HEAD_CLASSES = ("ForSequenceClassification", "ForTokenClassification")


def head_modules(model: nn.Module) -> list[str]:
    """The task head of an HF ``*For<Task>`` model: its top-level children, other than the
    backbone (``base_model_prefix``) and the adapters, that hold parameters (``classifier``,
    ``score``, ``pre_classifier`` + ``classifier``, ``classification_head``...)."""
    prefix = getattr(model, "base_model_prefix", None)
    if not prefix or not isinstance(getattr(model, prefix, None), nn.Module):
        return []
    return [n for n, child in model.named_children()
            if n not in (prefix, CONTAINER) and next(child.parameters(), None) is not None]


def _with_head(cfg: AdapterConfig, model: nn.Module, train_head: bool | None) -> AdapterConfig:
    """``cfg`` with the model's head added to ``trainable_modules`` (so the saved config says so)."""
    if train_head is False or not cfg.freeze_base:
        return cfg
    if train_head is None and not type(model).__name__.endswith(NEW_HEAD_CLASSES):
        return cfg
    heads = head_modules(model)
    if not heads:
        if train_head:
            raise ConfigError(f"train_head=True, but {type(model).__name__} has no task head outside its backbone "
                              f'"{getattr(model, "base_model_prefix", None)}" (name the modules in trainable_modules)')
        return cfg
    patterns = [f"^{re.escape(h)}\\." for h in heads]
    extra = [p for p in patterns if p not in cfg.trainable_modules]
    return dataclasses.replace(cfg, trainable_modules=list(cfg.trainable_modules) + extra) if extra else cfg


def add_adapters(model: nn.Module, config, name: str | None = None, *, train_head: bool | None = None) -> nn.Module:
    """Attach the adapters described by ``config`` to ``model``, freeze by policy, return it.

    ``config`` is a method config dataclass or a plain dict such as
    ``{"method": "houlsby", "reduction_factor": 8, "tasks": ["vqa", "gqa"], "sharing": "shared"}``.
    Several configs can be attached to one model under different names.

    ``train_head``: on an HF ``*ForSequenceClassification`` / ``*ForTokenClassification``
    model the task head (``classifier``, ``score``...: see :func:`head_modules`) is new, so by
    default (None) it is trained: its module path is added to the config's
    ``trainable_modules`` and it is saved with the adapters. ``False`` keeps it frozen;
    ``True`` trains the head of any ``*For<Task>`` model (an error if it has none).

    On an HF model, ``model.save_pretrained`` (and so ``transformers.Trainer``) then writes
    the adapters only, and ``model.print_trainable_parameters()`` / ``model.merge_and_unload()``
    exist (see :mod:`adapterkit.core.hf`); :func:`remove_adapters` takes them away again.
    """
    cfg = _with_head(config_from_dict(config), model, train_head)
    _, builder = method_entry(cfg.method)
    existing = get_container(model)
    if existing is not None and (name or cfg.method) in existing.sets:
        raise ConfigError(f'an adapter named "{name or cfg.method}" is already attached; pass another name=')
    container = get_container(model, create=True)
    name = name or cfg.method
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
    if container.root_hook is None:
        container.root_hook = model.register_forward_pre_hook(_root_pre_hook, with_kwargs=True)
    from adapterkit.core import copying, hf

    hf.install(model)
    copying.install(model)
    return model


# inputs whose first dimension is the batch, in the order a model-level check looks for them
_BATCH_INPUTS = ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds", "pixel_values",
                 "input_features", "input_values")


def _root_pre_hook(model: nn.Module, args, kwargs):
    """Once per forward of the model adapters were added to: the active route must fit the
    batch (:func:`~adapterkit.core.routing.check_rows`, HF models), and a per-task set with
    one task merged that cannot answer other tasks (``routes_while_merged``) refuses them."""
    if torch.compiler.is_compiling():
        return None
    r = current_route()
    if r is None:
        return None
    container = get_container(model)
    if container is None:
        return None
    if r.rows is not None and hasattr(model, "main_input_name"):
        names = (model.main_input_name,) + _BATCH_INPUTS
        x = args[0] if args and isinstance(args[0], torch.Tensor) else next(
            (kwargs[n] for n in names if isinstance(kwargs.get(n), torch.Tensor)), None)
        if x is not None and x.dim() >= 1:
            check_rows(x.shape[0])
    for name, s in container.sets.items():
        m = getattr(s, "_merged_task", None)
        if not s.merged or s.routes_while_merged or m is None or not getattr(s, "per_task", False):
            continue
        t = s.router.resolve_or(m, _device_of(s))
        if isinstance(t, int) and t == m or not isinstance(t, int) and bool((t == m).all()):
            continue
        raise ConfigError(
            f'adapter "{name}" ({s.config.method}) has task "{s.router.tasks[m]}" merged into the base weights and '
            "cannot answer rows routed to another task: call adapterkit.merge_adapters(model, task=...) for that "
            "task, or adapterkit.unmerge_adapters(model) to serve mixed tasks")
    return None


def _device_of(module: nn.Module):
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


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
        s.requires_grad_(True)
        frozen = getattr(s, "frozen_parameters", None)
        if frozen:
            for p in frozen():
                p.requires_grad_(False)
    container.base_trainable = trainable


def remove_adapters(model: nn.Module, name: str | None = None) -> nn.Module:
    """Detach adapters (all, or the named set) and unfreeze the base model.

    A merged set is unmerged first (the base weights are restored): to keep a merged LoRA in
    the weights and drop everything else, use :func:`merge_and_unload`."""
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
        _unload(model)
    return model


def _unload(model: nn.Module) -> None:
    """Take the (empty) container, its model hook and the HF integration off ``model``."""
    container = get_container(model)
    if container.root_hook is not None:
        container.root_hook.remove()
        container.root_hook = None
    delattr(model, CONTAINER)
    from adapterkit.core import copying, hf

    hf.uninstall(model)
    hf.remove_contiguous_lm_heads(model)
    copying.uninstall(model)
    model.requires_grad_(True)


def merge_and_unload(model: nn.Module, task: str | int | None = None) -> nn.Module:
    """Fold every adapter into the base weights and take adapterkit off the model: what is
    returned is the plain model (e.g. a plain HF model, ready for ``save_pretrained`` of the
    full weights), with no adapter modules, hooks or patched methods left, and every
    parameter trainable again (as after :func:`remove_adapters`). Trained base modules
    (a head, LayerNorms) keep their trained values.

    ``task``: for per-task adapters, the task whose weights are folded in. An adapter that
    cannot be merged (a bottleneck adapter, a prompt...) is one :class:`ConfigError`
    naming it, and the model is left as it was."""
    container = get_container(model)
    if container is None:
        raise ConfigError("the model has no adapters to merge and unload")
    bad = [f'"{n}" ({s.config.method}: {s.merge_note})' for n, s in container.sets.items() if not s.can_merge]
    if bad:
        raise ConfigError(f"merge_and_unload: adapter {', '.join(bad)} cannot be folded into the base weights; "
                          "keep the adapters attached (save_adapters) or remove_adapters(model) to drop them")
    merge_adapters(model, task)
    for s in container.sets.values():
        s.detach()  # the merged weights stay; every hook goes
    _unload(model)
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


_UPCAST = "_adapterkit_embedding_dtype"  # the dtype a cast frozen embedding returns


def cast_frozen(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Store every frozen floating-point parameter in ``dtype``; trainable ones keep theirs.

    For training under ``torch.autocast(dtype=dtype)``: autocast casts every weight to
    ``dtype`` for its matmul anyway, so the matmuls are unchanged, but each frozen weight is
    no longer cast again on every forward, and its fp32 copy no longer takes memory. (A
    tied embedding / LM head is one parameter and is cast once.) Call it after
    ``add_adapters``; run the model under autocast afterwards.

    torch's own normalisation layers (LayerNorm, GroupNorm, BatchNorm) keep fp32 parameters:
    autocast does not cast for them, and on the CPU they refuse an fp32 input with bf16
    weights (a frozen BART ``layernorm_embedding`` reads the fp32 embeddings) while accepting
    a bf16 input with fp32 weights. (Norms written in the modelling code, such as Llama's
    RMSNorm, cast their input themselves and are stored in ``dtype``.)

    A cast frozen embedding returns its rows in the dtype the weight had (fp32), as it would
    under plain autocast (which does not cast embeddings): otherwise the whole residual
    stream of a transformer becomes bf16, and the small updates an adapter adds to it are
    rounded at 8 bits of mantissa (measured on SmolLM2 + a bottleneck adapter: the loss of
    the first batch moved 0.062 from fp32's with a bf16 stream, 0.008 with an fp32 one).
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"cast_frozen needs a floating-point dtype (torch.bfloat16, torch.float16), got {dtype!r}")
    norms = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)
    seen = {id(p) for m in model.modules() if isinstance(m, norms) for p in m.parameters(recurse=False)}
    embeds: dict[int, list[nn.Module]] = {}
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            embeds.setdefault(id(m.weight), []).append(m)
    for p in model.parameters():
        if id(p) in seen or p.requires_grad or not p.is_floating_point() or p.dtype == dtype:
            continue
        seen.add(id(p))
        for m in embeds.get(id(p), ()):
            if getattr(m, _UPCAST, None) is None:
                setattr(m, _UPCAST, p.dtype)
                m.register_forward_hook(_upcast_embedding)
        p.data = p.data.to(dtype)
    return model


def _upcast_embedding(module, args, out):
    want = getattr(module, _UPCAST, None)
    return out.to(want) if want is not None and out.dtype != want else None


def merge_adapters(model: nn.Module, task: str | int | None = None) -> nn.Module:
    """Fold mergeable adapters (LoRA) into the base weights; others raise a clear error.

    A per-task adapter merges the named ``task``; merging another task later unmerges the
    first one, then merges the new one. While a per-task LoRA has a task merged, a forward
    routed to another task is still answered right (the LoRA adds that task's update and
    takes the merged one out for those rows); other per-task methods refuse such a route
    with a :class:`ConfigError` naming the merged task."""
    container = get_container(model)
    if container is None:
        raise ConfigError("the model has no adapters to merge")
    for s in container.sets.values():
        if not s.can_merge:
            s.merge(task)  # raises with the method's reason
    for s in container.sets.values():
        if s.merged:
            merged = getattr(s, "_merged_task", None)
            if merged is None or task is None or _task_index(task, s.router.tasks) == merged:
                continue  # a shared set is merged already, or this very task is
            s.unmerge()
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
