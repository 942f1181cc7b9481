"""Prefix tuning (Li & Liang 2021): trainable key/value prefixes in front of every layer's
attention, reparameterised by an MLP during training.

The prefix table of a group of L attention layers is P rows of width 2·L·H·hd (H key/value
heads, hd head size): ``Emb(P, d) -> Linear(d, h) -> tanh -> Linear(h, 2·L·H·hd)`` with
``reparam``, or the table itself (``flat``). Row layout (both peers): (2L, H, hd) per token,
layer i's keys at 2i and values at 2i+1.

Two styles, as the peers have them:

- ``adapterhub`` (AdapterHub ``PrefixTuningConfig``; defaults P 30, MLP 512, tanh): one group
  per *location* (``encoder``: encoder self-attention of an encoder-decoder; ``self``:
  decoder / single-stack self-attention; ``cross``: cross-attention), each with its own MLP.
  The prefixes are concatenated to the projected keys/values inside each attention (after
  RoPE), the mask widened with ones; positions are unchanged. Implemented with
  :mod:`adapterkit.core.attention`'s interceptor, so prefixes never enter the KV cache.
- ``peft`` (HF PEFT ``PrefixTuningConfig``; flat table by default, ``reparam`` = PEFT's
  ``prefix_projection``): one table for the decoder's (or causal LM's) self-attention, passed
  as the model's KV cache (transformers' ``DynamicCache`` / ``EncoderDecoderCache``) with V
  ones prepended to the self-attention mask, exactly as PEFT does on transformers 5: real
  tokens then sit at positions V.. (cache semantics). The embedding of the MLP (``reparam``)
  is as wide as the keys/values (PEFT's ``token_dim``: n_kv_heads * head_dim). On encoder-decoder models only the decoder's
  self-attention is prefixed and, as in PEFT, decoder layer j reads table rows 4j, 4j+1 (mod 2L).

``dropout`` acts on the prefixes (AdapterHub). Per-task prefixes stack like every other method.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from torch import nn

from adapterkit.core.activations import get_activation
from adapterkit.core.attention import attention_modules, intercept_attention, kv_shape
from adapterkit.core.base import AdapterSet
from adapterkit.core.config import ACTIVATIONS, AdapterConfig, bounded, choice, register_method
from adapterkit.core.optim import mark_task_stacked
from adapterkit.core.routing import expand_to_batch
from adapterkit.core.task_linear import TaskLinear
from adapterkit.errors import ConfigError

LOCATIONS = ("encoder", "self", "cross")


@dataclass
class PrefixConfig(AdapterConfig):
    method: str = "prefix"
    style: str = choice("adapterhub", "peft", default="adapterhub")
    num_tokens: int = bounded(30, lo=1)
    reparam: bool | None = None            # None: adapterhub True, peft False (PEFT's prefix_projection)
    bottleneck_size: int | None = bounded(None, lo=1)  # None: adapterhub 512, peft the model width
    activation: str = choice(*ACTIVATIONS, default="tanh")
    dropout: float = bounded(0.0, lo=0.0, hi=0.99)
    locations: list[str] = field(default_factory=lambda: list(LOCATIONS))  # adapterhub style

    def validate(self) -> None:
        super().validate()
        bad = [x for x in self.locations if x not in LOCATIONS]
        if bad or not self.locations:
            raise ConfigError(f"locations must be a non-empty subset of {list(LOCATIONS)}, got {self.locations}")

    @property
    def uses_mlp(self) -> bool:
        return self.reparam if self.reparam is not None else self.style == "adapterhub"


class PrefixTable(nn.Module):
    """The prefixes of one group of layers: (n_copies, P, width), flat or through the MLP."""

    def __init__(self, d: int, width: int, n: int, cfg: PrefixConfig):
        super().__init__()
        self.P = cfg.num_tokens
        if cfg.uses_mlp:
            h = cfg.bottleneck_size or (512 if cfg.style == "adapterhub" else d)
            self.embedding = nn.Parameter(torch.randn(n, self.P, d))         # nn.Embedding's N(0, 1)
            self.mlp_in = TaskLinear(d, h, n)                                  # nn.Linear's init
            self.mlp_out = TaskLinear(h, width, n)
            self.table = None
            self.act = get_activation(cfg.activation)
            if n > 1:
                mark_task_stacked(self.embedding)
        else:
            self.table = nn.Parameter(torch.randn(n, self.P, width))
            self.embedding = self.mlp_in = self.mlp_out = None
            if n > 1:
                mark_task_stacked(self.table)
        self._ids = None

    def forward(self) -> torch.Tensor:
        if self.table is not None:
            return self.table
        x = self.embedding
        ids = None
        if x.shape[0] > 1:
            if self._ids is None or self._ids.device != x.device:
                self._ids = torch.arange(x.shape[0], device=x.device)
            ids = self._ids
        return self.mlp_out(self.act(self.mlp_in(x, ids)), ids)

    def versions(self) -> tuple:
        return tuple(p._version for p in self.parameters())


class PrefixSet(AdapterSet):
    merge_note = "prefixes are extra attention keys/values, not a weight update"

    def __init__(self, cfg: PrefixConfig):
        super().__init__(cfg)
        self.tables = nn.ModuleDict()
        self.per_task = cfg.copies("all") > 1
        self._removers: list = []
        self._cache: dict = {}
        self._calls = 0
        self.groups: dict[str, list[str]] = {}   # group -> attention module paths, in layer order

    # -- attachment ------------------------------------------------------------------
    def attach(self, model, profile):
        cfg: PrefixConfig = self.config
        d = _width(model)
        n = cfg.copies("all")
        enc_dec = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
        if cfg.style == "peft":
            self._attach_peft(model, profile, d, n, enc_dec)
            return
        found = attention_modules(model, profile, cfg, ["self_attn", "cross_attn"])
        groups: dict[str, list] = {}
        for a in found:
            loc = "cross" if a.kind == "cross_attn" else ("encoder" if enc_dec and a.stack == "encoder" else "self")
            if loc in cfg.locations:
                groups.setdefault(loc, []).append(a)
        if not groups:
            raise ConfigError(f"prefix tuning found no attention at locations {cfg.locations} in {type(model).__name__}")
        for loc, attns in groups.items():
            attns.sort(key=lambda a: a.layer)
            shapes = {kv_shape(a.module) for a in attns}
            if len(shapes) != 1:
                raise ConfigError(f"prefix location {loc} mixes key/value shapes {sorted(shapes)}")
            heads, hd = shapes.pop()
            self.tables[loc] = PrefixTable(d, len(attns) * 2 * heads * hd, n, cfg)
            self.groups[loc] = [a.path for a in attns]
            for i, a in enumerate(attns):
                self._removers.append(intercept_attention(a.module, self, extender=self._extender(loc, i, heads, hd)))
        self.add_pre_hook(model, self._new_forward)

    def _attach_peft(self, model, profile, d, n, enc_dec):
        attns = [a for a in attention_modules(model, profile, self.config, ["self_attn"])
                 if not enc_dec or a.stack == "decoder"]
        if not attns:
            raise ConfigError(f"prefix tuning found no (decoder) self-attention in {type(model).__name__}")
        attns.sort(key=lambda a: a.layer)
        heads, hd = kv_shape(attns[0].module)
        mcfg = getattr(model, "config", None)
        n_layers = (getattr(mcfg, "num_hidden_layers", None) or len(attns)) if enc_dec else len(attns)
        if enc_dec and len(attns) > n_layers:
            raise ConfigError(f"PEFT-style prefixes cover {n_layers} decoder layers (num_hidden_layers), "
                              f"the model has {len(attns)}")
        self.n_layers, self.heads, self.hd, self.enc_dec = n_layers, heads, hd, enc_dec
        self.n_decoder = len(attns)
        # PEFT's token_dim is the key/value width (n_kv_heads * head_dim under GQA)
        self.tables["peft"] = PrefixTable(heads * hd, n_layers * 2 * heads * hd, n, self.config)
        self.groups["peft"] = [a.path for a in attns]
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        if self._cache_arg not in params:
            raise ConfigError(f"{type(model).__name__}.forward takes no KV cache argument, so PEFT-style prefixes "
                              '(passed as the cache) cannot reach it; use style "adapterhub"')
        self.add_pre_hook(model, self._inject_cache, with_kwargs=True)

    @torch.no_grad()
    def eject(self) -> None:
        """Replace every MLP-reparameterised table by the flat prefixes it computes (AdapterHub's
        ``eject``; PEFT saves this form): the same outputs, no MLP, ``reparam`` false in the config."""
        for name, tab in list(self.tables.items()):
            if tab.table is None:
                flat = PrefixTable(1, tab.mlp_out.out_features, tab.embedding.shape[0],
                                   PrefixConfig(num_tokens=tab.P, reparam=False))
                flat.table.copy_(tab())
                self.tables[name] = flat.to(device=tab.embedding.device, dtype=tab.embedding.dtype)
        self.config.reparam = False
        self._cache.clear()

    def detach(self) -> None:
        super().detach()
        for r in self._removers:
            r()
        self._removers.clear()

    # -- prefixes ----------------------------------------------------------------------
    def _new_forward(self, module, args):
        if not torch.compiler.is_compiling():
            self._calls += 1

    def group_prefixes(self, group: str, device, batch: int, cols: slice | None = None) -> torch.Tensor:
        """(b, P, width) prefixes of a group for the routed task(s) (width = 2L x H x hd, or the
        ``cols`` slice of it: one layer's keys and values); b is 1 or the batch."""
        tab = self.tables[group]
        hit = None if torch.compiler.is_compiling() else self._cache.get(group)
        key = (self._calls, tab.versions(), self.training)
        if hit is None or hit[0] != key:
            t = tab()
            if self.config.dropout and self.training:
                t = nn.functional.dropout(t, self.config.dropout, True)
            hit = (key, t)
            if not torch.compiler.is_compiling():
                self._cache[group] = hit
        t = hit[1] if cols is None else hit[1][..., cols]  # slice first: a per-row gather copies one layer only
        if not self.per_task:
            t = t[:1]
        else:
            task = self.router.resolve(device)
            t = t[task:task + 1] if isinstance(task, int) else t.index_select(0, expand_to_batch(task, batch))
        return t

    def _extender(self, group: str, i: int, heads: int, hd: int):
        def extend(module, query, key, value):
            w = heads * hd  # layer i's keys and values are columns [2i w, (2i + 2) w) of the table
            t = self.group_prefixes(group, key.device, key.shape[0], slice(2 * i * w, (2 * i + 2) * w))
            t = t.view(t.shape[0], t.shape[1], 2, heads, hd)                # (b, P, 2, H, hd)
            return t[:, :, 0].transpose(1, 2), t[:, :, 1].transpose(1, 2)
        return extend

    def _inject_cache(self, module, args, kwargs):
        from transformers import DynamicCache, EncoderDecoderCache

        cache = kwargs.get(self._cache_arg, kwargs.get("past_key_values"))
        V = self.config.num_tokens
        mask = kwargs.get("attention_mask")
        if cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0:
            # a later generation step: the cache holds the prefixes already; widen the mask if needed
            if mask is not None and not self.enc_dec:
                q = _seq_len(args, kwargs)
                if q is not None and mask.shape[-1] < cache.get_seq_length() + q:
                    kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], V), mask], dim=1)
            return args, kwargs
        b = _batch(args, kwargs)
        if b is None:
            return args, kwargs
        self._new_forward(module, args)
        ref = next(self.parameters())
        t = self.group_prefixes("peft", ref.device, b)
        t = t.expand(b, *t.shape[1:]) if t.shape[0] == 1 else t
        t = t.view(b, V, 2 * self.n_layers, self.heads, self.hd).permute(2, 0, 3, 1, 4)   # (2L, b, H, V, hd)
        if self.enc_dec:
            rows = [((4 * j) % (2 * self.n_layers), (4 * j + 1) % (2 * self.n_layers)) for j in range(self.n_decoder)]
            new = EncoderDecoderCache(DynamicCache([(t[k], t[v]) for k, v in rows]), DynamicCache())
        else:
            new = DynamicCache([(t[2 * j], t[2 * j + 1]) for j in range(self.n_decoder)])
        kwargs.pop("past_key_values", None)
        kwargs[self._cache_arg] = new
        # as PEFT: the self-attention mask gets V ones (the decoder's on encoder-decoder models;
        # the encoder has no prefix), and given position ids move by V
        mkey = "decoder_attention_mask" if self.enc_dec else "attention_mask"
        m = kwargs.get(mkey)
        if m is not None:
            kwargs[mkey] = torch.cat([m.new_ones(m.shape[0], V), m], dim=1)
        if kwargs.get("position_ids") is not None and not self.enc_dec:
            kwargs["position_ids"] = kwargs["position_ids"] + V
        return args, kwargs


def _width(model) -> int:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if isinstance(emb, nn.Embedding):
        return emb.weight.shape[1]
    cfg = getattr(model, "config", None)
    for n in ("hidden_size", "d_model", "n_embd"):
        if isinstance(getattr(cfg, n, None), int):
            return getattr(cfg, n)
    raise ConfigError(f"cannot tell the hidden width of {type(model).__name__} for prefix tuning")


def _batch(args, kwargs):
    for k in ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds"):
        t = kwargs.get(k)
        if isinstance(t, torch.Tensor):
            return t.shape[0]
    return args[0].shape[0] if args and isinstance(args[0], torch.Tensor) else None


def _seq_len(args, kwargs):
    for k in ("input_ids", "inputs_embeds"):
        t = kwargs.get(k)
        if isinstance(t, torch.Tensor):
            return t.shape[1]
    return args[0].shape[1] if args and isinstance(args[0], torch.Tensor) else None


register_method("prefix", PrefixConfig, PrefixSet)

__all__ = ["PrefixConfig", "PrefixSet", "PrefixTable"]
