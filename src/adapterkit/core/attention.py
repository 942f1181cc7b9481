"""Attention interception for methods that change what attention sees (prefixes,
attention-graph adapters), without forking modelling code.

Prefix mechanism (transformers 5, no forked modelling code): BART, T5, Llama, ... compute
q/k/v inside the attention module and then call the function registered in
``transformers.AttentionInterface`` under ``config._attn_implementation``. Each hooked
attention module gets a read-through view of its config whose ``_attn_implementation``
names adapterkit's interceptor (:func:`intercept_attention`); the interceptor receives
the projected (post-RoPE, post-cache) query/key/value, the mask and extra arguments
(T5's ``position_bias``), prepends the prefix keys/values, widens the mask (ones for
boolean masks, zeros for additive masks and position biases; an implicit causal mask
is made explicit and aligned bottom-right so prefixes stay visible to every query) and
calls the model's real implementation (``eager``: the modelling file's own
``eager_attention_forward``; otherwise the registered sdpa/flex/... function, read from
the shared config at call time). Prefixes are never written to the KV cache, so
generation with a cache works. Other modules of the model are untouched.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from adapterkit.core.base import places_for
from adapterkit.core.config import AdapterConfig
from adapterkit.errors import ConfigError

INTERCEPT_NAME = "adapterkit_intercept"

# (module, query, key, value) -> (prefix_k, prefix_v), each (b, H_kv, L_p, head_dim), b in {1, batch}
Extender = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor] | None"]
# (module, query, key, value, explicit_mask_or_None, kwargs) -> None
Observer = Callable[..., None]


class _Slot:
    """Interception state of one attention module."""

    def __init__(self, module: nn.Module, config):
        self.config = config                   # the model's (shared) config
        self.extenders: dict[int, Extender] = {}
        self.observers: dict[int, Observer] = {}


_SLOTS: weakref.WeakKeyDictionary[nn.Module, _Slot] = weakref.WeakKeyDictionary()


class _ConfigView:
    """Read-through view of a model config that names the interceptor as attention implementation."""

    def __init__(self, base):
        object.__setattr__(self, "_view_base", base)

    def __getattr__(self, name):
        if name == "_attn_implementation":
            return INTERCEPT_NAME
        return getattr(object.__getattribute__(self, "_view_base"), name)

    def __setattr__(self, name, value):
        setattr(object.__getattribute__(self, "_view_base"), name, value)


def _base_impl(module: nn.Module, slot: _Slot):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    impl = getattr(slot.config, "_attn_implementation", None)
    if impl in (None, "eager", INTERCEPT_NAME):
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if fn is not None:
            return fn
        impl = "sdpa"
    return ALL_ATTENTION_FUNCTIONS[impl.removeprefix("paged|")]


def explicit_mask(module: nn.Module, query: torch.Tensor, key: torch.Tensor, mask, kwargs: dict):
    """The attention mask as a tensor over the current keys, or None when nothing is masked.

    An implicit causal mask (sdpa with ``mask=None`` and ``is_causal``) becomes an explicit
    boolean (1, 1, Q, K) mask aligned bottom-right (query i sees keys j <= i + K - Q).
    """
    q_len, k_len = query.shape[-2], key.shape[-2]
    if mask is None:
        causal = kwargs.get("is_causal")
        causal = getattr(module, "is_causal", False) if causal is None else causal
        if causal and q_len > 1:
            i = torch.arange(q_len, device=query.device).unsqueeze(1)
            j = torch.arange(k_len, device=query.device).unsqueeze(0)
            return (j <= i + (k_len - q_len)).view(1, 1, q_len, k_len)
        return None
    if not isinstance(mask, torch.Tensor):
        raise ConfigError(f"adapterkit's attention interceptor needs a tensor mask, got {type(mask).__name__} "
                          "(flex-attention block masks are not supported: use attn_implementation eager or sdpa)")
    if mask.dim() == 4 and mask.shape[-1] > k_len:
        mask = mask[..., :k_len]
    return mask


def _prepend(t: torch.Tensor, n: int, fill) -> torch.Tensor:
    pad = torch.full((*t.shape[:-1], n), fill, dtype=t.dtype, device=t.device)
    return torch.cat([pad, t], dim=-1)


def _match_batch(p: torch.Tensor, batch: int) -> torch.Tensor:
    if p.shape[0] == batch:
        return p
    if p.shape[0] == 1:
        return p.expand(batch, *p.shape[1:])
    if batch % p.shape[0]:
        raise ConfigError(f"prefixes were made for {p.shape[0]} examples but the attention batch has {batch} rows")
    return p.repeat_interleave(batch // p.shape[0], dim=0)


def _intercepted_attention(module, query, key, value, attention_mask, **kwargs):
    slot = _SLOTS.get(module)
    base = _base_impl(module, slot) if slot is not None else None
    if slot is None or (not slot.extenders and not slot.observers):
        if base is None:
            from transformers.integrations.sdpa_attention import sdpa_attention_forward as base
        return base(module, query, key, value, attention_mask, **kwargs)
    mask = explicit_mask(module, query, key, attention_mask, kwargs)
    for obs in slot.observers.values():
        obs(module, query, key, value, mask, kwargs)
    pks, pvs = [], []
    for ext in slot.extenders.values():
        pkv = ext(module, query, key, value)
        if pkv is not None:
            pks.append(_match_batch(pkv[0], key.shape[0]).to(key.dtype))
            pvs.append(_match_batch(pkv[1], value.shape[0]).to(value.dtype))
    if not pks:
        return base(module, query, key, value, attention_mask, **kwargs)
    n = sum(p.shape[-2] for p in pks)
    key = torch.cat([*pks, key], dim=-2)
    value = torch.cat([*pvs, value], dim=-2)
    if mask is not None:
        if mask.dim() == 2:  # flash-attention style (batch, keys) padding mask
            mask = _prepend(mask, n, 1)
        else:
            mask = _prepend(mask, n, True if mask.dtype == torch.bool else 0.0)
    kwargs = dict(kwargs)
    kwargs["is_causal"] = False
    pb = kwargs.get("position_bias")
    if isinstance(pb, torch.Tensor):
        kwargs["position_bias"] = _prepend(pb, n, 0.0)
    return base(module, query, key, value, mask, **kwargs)


def _ensure_registered() -> None:
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if INTERCEPT_NAME not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(INTERCEPT_NAME, _intercepted_attention)


def intercept_attention(module: nn.Module, owner: object, *, extender: Extender | None = None,
                        observer: Observer | None = None) -> Callable[[], None]:
    """Route ``module``'s attention call through adapterkit's interceptor.

    ``extender`` returns prefix keys/values to prepend; ``observer`` sees the projected
    query/key/value and the explicit mask (e.g. to recompute attention probabilities).
    Returns a function that removes this owner's callbacks (and the view when none remain).
    """
    cfg = getattr(module, "config", None)
    if cfg is None or not hasattr(cfg, "_attn_implementation"):
        raise ConfigError(
            f"{type(module).__name__} does not dispatch through transformers' AttentionInterface "
            "(no .config._attn_implementation), so adapterkit cannot intercept its keys/values"
        )
    _ensure_registered()
    slot = _SLOTS.get(module)
    if slot is None:
        base_cfg = object.__getattribute__(cfg, "_view_base") if isinstance(cfg, _ConfigView) else cfg
        slot = _SLOTS[module] = _Slot(module, base_cfg)
        module.config = _ConfigView(base_cfg)
    key = id(owner)
    if extender is not None:
        slot.extenders[key] = extender
    if observer is not None:
        slot.observers[key] = observer

    def remove() -> None:
        s = _SLOTS.get(module)
        if s is None:
            return
        s.extenders.pop(key, None)
        s.observers.pop(key, None)
        if not s.extenders and not s.observers:
            module.config = s.config
            del _SLOTS[module]
    return remove


@dataclass(frozen=True)
class AttnPlace:
    """An attention module (the one that calls the AttentionInterface) and its output projection."""

    path: str
    kind: str        # self_attn / cross_attn
    layer: int
    stack: str
    module: nn.Module
    out_path: str
    out_proj: nn.Module


def _dispatches(mod: nn.Module) -> bool:
    return hasattr(getattr(mod, "config", None), "_attn_implementation")


def find_attention_module(model: nn.Module, out_path: str) -> tuple[str, nn.Module]:
    """The attention module owning the output projection at ``out_path``: its parent (BART, T5,
    Llama, GPT-2, CLIP...) or a sibling of the parent (BERT/ViT: ``attention.self`` next to
    ``attention.output``)."""
    parent = out_path.rpartition(".")[0]
    mod = model.get_submodule(parent)
    if _dispatches(mod):
        return parent, mod
    grand = parent.rpartition(".")[0]
    for name, child in model.get_submodule(grand).named_children():
        if _dispatches(child):
            return f"{grand}.{name}" if grand else name, child
    raise ConfigError(f"cannot find the attention module that owns {out_path} (a module with "
                      ".config._attn_implementation next to it)")


def attention_modules(model: nn.Module, profile: dict | None, cfg: AdapterConfig, kinds: list[str],
                      stacks: list[str] | None = None) -> list[AttnPlace]:
    """The attention modules of ``kinds`` (self_attn / cross_attn), found from the profile's
    ``attn_out`` / ``cross_attn_out`` output projections."""
    out = []
    for kind in kinds:
        place = {"self_attn": "attn_out", "cross_attn": "cross_attn_out"}[kind]
        if kind == "cross_attn" and profile is not None and place not in profile["places"]:
            continue
        for p in places_for(model, profile, place, cfg, required=kind == "self_attn"):
            if stacks is not None and p.stack not in stacks:
                continue
            path, mod = find_attention_module(model, p.path)
            out.append(AttnPlace(path, kind, p.layer, p.stack, mod, p.path, p.module))
    return out


def _int_attr(obj, names) -> int | None:
    for n in names:
        v = getattr(obj, n, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def num_heads(attn: nn.Module) -> int:
    """Query heads of an attention module."""
    h = _int_attr(attn, ("num_heads", "num_attention_heads", "n_heads")) or \
        _int_attr(getattr(attn, "config", None), ("num_attention_heads", "num_heads", "n_head"))
    if h is None:
        raise ConfigError(f"cannot tell the number of heads of {type(attn).__name__}")
    return h


def kv_shape(attn: nn.Module) -> tuple[int, int]:
    """(key/value heads, head dim) of an attention module."""
    hd = _int_attr(attn, ("head_dim", "attention_head_size", "key_value_proj_dim"))
    heads = num_heads(attn)
    if hd is None:
        width = _int_attr(getattr(attn, "config", None), ("hidden_size", "d_model", "n_embd"))
        if width is None:
            raise ConfigError(f"cannot tell the head size of {type(attn).__name__}")
        hd = width // heads
    kproj = next((getattr(attn, n) for n in ("k_proj", "k", "key") if isinstance(getattr(attn, n, None), nn.Linear)),
                 None)
    if kproj is not None:
        return kproj.out_features // hd, hd
    kv = _int_attr(getattr(attn, "config", None), ("num_key_value_heads",))
    return kv or heads, hd


