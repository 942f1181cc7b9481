"""HyperPELT (Zhang et al., Findings ACL 2023): one shared hypernetwork generates both
bottleneck adapters (for the FFN blocks) and attention prefixes (for self- and
cross-attention), conditioned on a hyper-embedding of [task; layer; block (; visual)].

Hyper-embedding: I = LN(MLP([z_task; e_layer; e_block (; W_v v)])) of width
``projected_dim``; z_task is a learned per-task vector, e_layer one row per (stack,
layer) pair, e_block one row per block type (``ffn_out``/``attn_out``/``cross_attn_out``
adapters, ``self_attn``/``cross_attn`` prefixes), and v an optional pooled visual
feature vector per example (``visual_dim``), projected to the task-embedding width.
Generators map I to (W_down, b_down, W_up, b_up) for adapters (y = h + W_up f(W_down h
+ b_down) + b_up, placed after the block output projection, before the residual) and to
(P_k, P_v) of ``prefix_length`` rows per attention module.

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

import contextlib
import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from adapterkit.core.activations import get_activation
from adapterkit.core.base import AdapterSet, get_container, places_for
from adapterkit.core.config import ACTIVATIONS, AdapterConfig, bounded, choice, register_method
from adapterkit.core.task_linear import task_linear
from adapterkit.errors import ConfigError
from adapterkit.methods.bottleneck import _first, _out_width, _replace_first

# ----------------------------------------------------------------------------- attention interception

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


# ----------------------------------------------------------------------------- HyperPELT

ADAPTER_POSITIONS = ("ffn_out", "attn_out", "cross_attn_out")
PREFIX_POSITIONS = ("self_attn", "cross_attn")


@dataclass
class HyperPELTConfig(AdapterConfig):
    """HyperPELT options. ``prefix_length: 0`` disables prefixes; ``visual_dim`` enables the
    visual embedding (pooled features set with :func:`visual_context`)."""

    method: str = "hyperpelt"
    sharing: str = choice("per_task", default="per_task")
    reduction_factor: float = bounded(32.0, lo=1.0)
    task_embedding_dim: int = bounded(64, lo=1)
    hidden_dim: int = bounded(128, lo=1)
    projected_dim: int = bounded(64, lo=1)
    prefix_length: int = bounded(8, lo=0)
    adapter_positions: list[str] = field(default_factory=lambda: ["ffn_out"])
    prefix_positions: list[str] = field(default_factory=lambda: ["self_attn", "cross_attn"])
    visual_dim: int | None = bounded(None, lo=1)
    activation: str = choice(*ACTIVATIONS, default="gelu")
    generator_init_std: float = bounded(0.01, lo=0.0)
    zero_init_up: bool = False

    def validate(self) -> None:
        super().validate()
        for p in self.adapter_positions:
            if p not in ADAPTER_POSITIONS:
                raise ConfigError(f'unknown adapter position "{p}" for hyperpelt; allowed: {list(ADAPTER_POSITIONS)}')
        for p in self.prefix_positions:
            if p not in PREFIX_POSITIONS:
                raise ConfigError(f'unknown prefix position "{p}" for hyperpelt; allowed: {list(PREFIX_POSITIONS)}')
        if not self.adapter_positions and not (self.prefix_positions and self.prefix_length):
            raise ConfigError("hyperpelt needs adapter_positions or prefixes (prefix_positions with prefix_length > 0)")


class AdapterGenerator(nn.Module):
    """I (R, p) -> W_down (R, m, d), b_down (R, m), W_up (R, d, m), b_up (R, d)."""

    def __init__(self, p: int, d: int, m: int, std: float, zero_up: bool):
        super().__init__()
        self.d, self.m = d, m
        self.down_w, self.down_b = nn.Linear(p, m * d), nn.Linear(p, m)
        self.up_w, self.up_b = nn.Linear(p, d * m), nn.Linear(p, d)
        for lin in (self.down_w, self.down_b, self.up_w, self.up_b):
            nn.init.normal_(lin.weight, std=std)
            nn.init.zeros_(lin.bias)
        if zero_up:
            nn.init.zeros_(self.up_w.weight)
            nn.init.zeros_(self.up_b.weight)

    def forward(self, emb: torch.Tensor):
        r = emb.shape[0]
        return (self.down_w(emb).view(r, self.m, self.d), self.down_b(emb),
                self.up_w(emb).view(r, self.d, self.m), self.up_b(emb))


class PrefixGenerator(nn.Module):
    """I (R, p) -> P_k, P_v, each (R, heads, L_p, head_dim)."""

    def __init__(self, p: int, heads: int, head_dim: int, length: int, std: float):
        super().__init__()
        self.shape = (heads, length, head_dim)
        self.kv = nn.Linear(p, 2 * heads * length * head_dim)
        nn.init.normal_(self.kv.weight, std=std)
        nn.init.zeros_(self.kv.bias)

    def forward(self, emb: torch.Tensor):
        h, n, hd = self.shape
        kv = self.kv(emb).view(emb.shape[0], 2, n, h, hd).transpose(2, 3)
        return kv[:, 0], kv[:, 1]


class HyperPELTSet(AdapterSet):
    merge_note = "its adapters are non-linear and its prefixes are extra attention keys"

    def __init__(self, cfg: HyperPELTConfig):
        super().__init__(cfg)
        e = cfg.task_embedding_dim
        self.task_embedding = nn.Parameter(torch.randn(len(cfg.tasks), e))
        self.visual_proj = nn.Linear(cfg.visual_dim, e) if cfg.visual_dim else None
        self.act = get_activation(cfg.activation)
        self.layer_ids: dict[tuple[str, int], int] = {}
        self.block_ids: dict[str, int] = {}
        self.adapter_gen = None
        self.prefix_gens = nn.ModuleDict()
        self.paths: dict[str, list[str]] = {"adapters": [], "prefixes": []}
        self._visual: torch.Tensor | None = None
        self._removers: list = []
        self._places: dict[str, tuple[int, int, str | None]] = {}  # path -> (layer id, block id, prefix gen)

    # -- construction ------------------------------------------------------------
    def attach(self, model, profile):
        cfg: HyperPELTConfig = self.config
        adapters = []
        for pos in cfg.adapter_positions:
            optional = pos == "cross_attn_out"
            if optional and profile is not None and pos not in profile["places"]:
                continue
            adapters += places_for(model, profile, pos, cfg, required=not optional)
        attns = attention_modules(model, profile, cfg, cfg.prefix_positions) if cfg.prefix_length else []
        keys = sorted({(p.stack, p.layer) for p in adapters} | {(a.stack, a.layer) for a in attns})
        self.layer_ids = {k: i for i, k in enumerate(keys)}
        blocks = sorted({p.kind for p in adapters} | {a.kind for a in attns})
        self.block_ids = {b: i for i, b in enumerate(blocks)}
        e = cfg.task_embedding_dim
        self.layer_emb = nn.Embedding(len(keys), e)
        self.block_emb = nn.Embedding(len(blocks), e)
        in_dim = (4 if cfg.visual_dim else 3) * e
        self.proj = nn.Sequential(nn.Linear(in_dim, cfg.hidden_dim), nn.ReLU(),
                                  nn.Linear(cfg.hidden_dim, cfg.projected_dim), nn.LayerNorm(cfg.projected_dim))
        if adapters:
            widths = {_out_width(p.module) for p in adapters}
            if len(widths) != 1:
                raise ConfigError(f"hyperpelt needs one hidden width across adapter places, found {sorted(widths)}")
            d = widths.pop()
            if d % cfg.reduction_factor:
                raise ConfigError(f"reduction_factor {cfg.reduction_factor:g} does not divide the hidden width {d}")
            self.adapter_gen = AdapterGenerator(cfg.projected_dim, d, int(d // cfg.reduction_factor),
                                                cfg.generator_init_std, cfg.zero_init_up)
            for p in adapters:
                lid, bid = self.layer_ids[(p.stack, p.layer)], self.block_ids[p.kind]
                self.add_forward_hook(p.module, self._adapter_hook(lid, bid))
                self.paths["adapters"].append(p.path)
                self._places[p.path] = (lid, bid, None)
        for a in attns:
            heads, hd = kv_shape(a.module)
            gk = f"{heads}x{hd}"
            if gk not in self.prefix_gens:
                self.prefix_gens[gk] = PrefixGenerator(cfg.projected_dim, heads, hd, cfg.prefix_length,
                                                       cfg.generator_init_std)
            lid, bid = self.layer_ids[(a.stack, a.layer)], self.block_ids[a.kind]
            self._removers.append(intercept_attention(a.module, self, extender=self._prefix_extender(lid, bid, gk)))
            self.paths["prefixes"].append(a.path)
            self._places[a.path] = (lid, bid, gk)

    def detach(self) -> None:
        super().detach()
        for r in self._removers:
            r()
        self._removers.clear()

    # -- hyper-embeddings --------------------------------------------------------
    def set_visual(self, feats: torch.Tensor | None) -> None:
        """Set (or clear with None) the pooled visual features (batch, visual_dim) for the next forwards."""
        if feats is not None:
            if self.visual_proj is None:
                raise ConfigError("this hyperpelt adapter has no visual embedding: set visual_dim in its config")
            if feats.dim() != 2 or feats.shape[1] != self.config.visual_dim:
                raise ConfigError(
                    f"visual features must be (batch, {self.config.visual_dim}), got {tuple(feats.shape)}")
        self._visual = feats

    def embeddings(self, layer: int, block: int, device) -> tuple[torch.Tensor, int | torch.Tensor | None]:
        """(I, index): hyper-embeddings (R, projected_dim) and which row serves each example
        (an int for all examples, or a LongTensor with one row id per example)."""
        task = self.router.resolve(device)
        z = self.task_embedding
        if self._visual is not None:
            v = self.visual_proj(self._visual.to(device=device, dtype=z.dtype))
            b = v.shape[0]
            if isinstance(task, int):
                z = z[task].expand(b, -1)
            elif task.shape[0] != b:
                raise ConfigError(f"the visual context has {b} rows but {task.shape[0]} per-example tasks were routed")
            else:
                z = z.index_select(0, task)
            index = torch.arange(b, device=device) if b > 1 else 0
        else:
            if isinstance(task, int):
                z, index = z[task:task + 1], 0
            else:
                index = task
            v = None
        r = z.shape[0]
        parts = [z, self.layer_emb.weight[layer].expand(r, -1), self.block_emb.weight[block].expand(r, -1)]
        if self.visual_proj is not None:
            parts.append(v if v is not None else z.new_zeros(r, self.config.task_embedding_dim))
        return self.proj(torch.cat(parts, dim=-1)), index

    # -- hooks ------------------------------------------------------------------
    def _adapter_hook(self, layer: int, block: int):
        def hook(module, args, out):
            h = _first(out)
            emb, index = self.embeddings(layer, block, h.device)
            wd, bd, wu, bu = self.adapter_gen(emb)
            z = self.act(task_linear(h, wd, bd, index))
            return _replace_first(out, h + task_linear(z, wu, bu, index))
        return hook

    def _prefix_extender(self, layer: int, block: int, gen_key: str):
        gen = self.prefix_gens[gen_key]

        def ext(module, query, key, value):
            emb, index = self.embeddings(layer, block, key.device)
            pk, pv = gen(emb)
            if not isinstance(index, int):
                from adapterkit.core.routing import expand_to_batch

                index = expand_to_batch(index, key.shape[0])
                pk, pv = pk.index_select(0, index), pv.index_select(0, index)
            return pk, pv
        return ext

    def generated(self, task: str | int = 0) -> dict[str, dict[str, tuple[int, ...]]]:
        """Shapes of what the hypernetwork generates for ``task`` at every attached place
        (keyed by module path; adapters: W_down, b_down, W_up, b_up; prefixes: P_k, P_v)."""
        from adapterkit.core.routing import route

        out: dict[str, dict[str, tuple[int, ...]]] = {}
        dev = self.task_embedding.device
        with route(task), torch.no_grad():
            for path, (lid, bid, gen_key) in self._places.items():
                emb, _ = self.embeddings(lid, bid, dev)
                if gen_key is None:
                    wd, bd, wu, bu = self.adapter_gen(emb)
                    out[path] = {"W_down": tuple(wd.shape[1:]), "b_down": tuple(bd.shape[1:]),
                                 "W_up": tuple(wu.shape[1:]), "b_up": tuple(bu.shape[1:])}
                else:
                    pk, pv = self.prefix_gens[gen_key](emb)
                    out[path] = {"P_k": tuple(pk.shape[1:]), "P_v": tuple(pv.shape[1:])}
        return out

    def prefixes(self, path: str, task: str | int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(P_k, P_v), each (kv_heads, prefix_length, head_dim), of the attention module at ``path``."""
        from adapterkit.core.routing import route

        if path not in self._places or self._places[path][2] is None:
            raise ConfigError(f"no hyperpelt prefix at {path!r}; prefixed modules: {self.paths['prefixes']}")
        lid, bid, gk = self._places[path]
        with route(task):
            emb, _ = self.embeddings(lid, bid, self.task_embedding.device)
            pk, pv = self.prefix_gens[gk](emb)
        return pk[0], pv[0]


def _hyperpelt_sets(model: nn.Module, name: str | None) -> list[HyperPELTSet]:
    c = get_container(model)
    sets = [s for n, s in (c.sets.items() if c is not None else []) if isinstance(s, HyperPELTSet) and name in (None, n)]
    if not sets:
        raise ConfigError("the model has no hyperpelt adapter" + (f' named "{name}"' if name else ""))
    return sets


def set_visual_context(model: nn.Module, feats: torch.Tensor | None, name: str | None = None) -> None:
    """Set (None clears) the pooled visual features (batch, visual_dim) every hyperpelt set conditions on."""
    for s in _hyperpelt_sets(model, name):
        s.set_visual(feats)


@contextlib.contextmanager
def visual_context(model: nn.Module, feats: torch.Tensor, name: str | None = None):
    """``with visual_context(model, feats): model(...)`` — condition the hyper-embeddings on ``feats``."""
    sets = _hyperpelt_sets(model, name)
    old = [s._visual for s in sets]
    for s in sets:
        s.set_visual(feats)
    try:
        yield
    finally:
        for s, o in zip(sets, old):
            s._visual = o


register_method("hyperpelt", HyperPELTConfig, HyperPELTSet)
