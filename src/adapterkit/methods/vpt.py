"""Visual prompt tuning (VPT, Jia et al.) for ViT / AST / CLIP-vision / Whisper encoders.

Shallow VPT inserts ``num_tokens`` learned vectors right after the prefix tokens
(ViT/CLIP: the CLS token; AST/DeiT: CLS + distillation token; Whisper: none) of the
embeddings output, so every layer sees ``[prefix, prompts, patches]``. Deep VPT also
*replaces* the prompt slots with a fresh set of learned vectors at the input of every
later layer (the outputs at those slots from the previous layer are discarded).

Wiring (hooks only, no forked modelling code):
- insertion: a forward hook on the embeddings module (``embeddings`` / ``vision_model.embeddings``),
  or a forward pre-hook on the first transformer layer when the model has none (Whisper);
- deep replacement: forward pre-hooks on the inputs of layers 1..L-1.

Init ``uniform`` is VPT's (and PETL-AST's) U(-v, v) with v = sqrt(6 / (3 * patch_area + d)).
Prompts carry no position embedding. The encoder output is longer by ``num_tokens``
tokens; the CLS token stays at index 0. Models that pass an attention mask to their
layers (text models) are rejected at forward time: use ``prompt`` tuning there.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from adapterkit.core.base import CONTAINER, AdapterSet, places_for
from adapterkit.core.config import AdapterConfig, bounded, choice, register_method
from adapterkit.core.hooks import first as _first
from adapterkit.core.hooks import replace_first as _replace_first
from adapterkit.core.optim import mark_task_stacked
from adapterkit.core.routing import expand_to_batch
from adapterkit.errors import ConfigError

_PREFIX_BY_TYPE = {"audio-spectrogram-transformer": 2, "deit": 2, "whisper": 0}
_STACK_PREFERENCE = ("vision_model", "encoder", "", "text_model", "decoder")


@dataclass
class VptConfig(AdapterConfig):
    """VPT options. ``prefix_tokens`` = tokens kept in front of the prompts (auto by model
    type); ``layer_modules`` / ``embeddings_module`` = explicit module-path regexes."""

    method: str = "vpt"
    num_tokens: int = bounded(10, lo=1)
    deep: bool = False
    dropout: float = bounded(0.0, lo=0.0, hi=0.99)
    init: str = choice("uniform", "normal", default="uniform")
    prefix_tokens: int | None = bounded(None, lo=0)
    stack: str | None = None
    layer_modules: list[str] | None = None
    embeddings_module: str | None = None


def _layer_path(place_path: str, layer: int) -> str:
    parts = place_path.split(".")
    for i, c in enumerate(parts):
        if c == str(layer) and i > 0:
            return ".".join(parts[: i + 1])
    raise ConfigError(f"cannot find the layer index {layer} in module path {place_path!r}")


def transformer_layers(model: nn.Module, profile: dict | None, cfg: AdapterConfig,
                       patterns: list[str] | None = None, stack: str | None = None) -> list[tuple[str, nn.Module]]:
    """The transformer layer modules of one stack of ``model``, in layer order.

    Derived from the profile's ``attn_in`` places (the layer is the path prefix ending
    at the layer index), or from explicit ``patterns``. With several stacks (encoder /
    decoder, vision / text) the ``stack`` named, else the first of vision_model,
    encoder, unnamed, text_model, decoder.
    """
    if patterns:
        places = places_for(model, None, "layer", cfg, patterns)
        found = [(p.stack, p.layer, p.path) for p in places]
    else:
        places = [p for p in places_for(model, profile, "attn_in", cfg) if not p.path.startswith(CONTAINER)]
        found = [(p.stack, p.layer, _layer_path(p.path, p.layer)) for p in places]
    stacks = sorted({s for s, _, _ in found}, key=lambda s: _STACK_PREFERENCE.index(s) if s in _STACK_PREFERENCE else 9)
    if stack is not None:
        if stack not in stacks:
            raise ConfigError(f'stack "{stack}" not found in {type(model).__name__}; it has {stacks}')
        chosen = stack
    else:
        chosen = stacks[0]
    by_layer: dict[int, str] = {}
    for s, layer, path in found:
        if s == chosen:
            by_layer.setdefault(layer, path)
    if not by_layer:
        raise ConfigError(f"no transformer layers found in {type(model).__name__}")
    return [(by_layer[i], model.get_submodule(by_layer[i])) for i in sorted(by_layer)]


def hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden-states input of a layer call (positional or keyword)."""
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    raise ConfigError("a transformer layer was called without hidden states as its first argument")


def _with_hidden(args: tuple, kwargs: dict, h: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (h,) + tuple(args[1:]), kwargs
    kwargs = dict(kwargs)
    kwargs["hidden_states"] = h
    return args, kwargs


def _patch_area(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "vision_config", cfg)
    p = getattr(cfg, "patch_size", None)
    if isinstance(p, (list, tuple)):
        return int(p[0]) * int(p[1])
    return int(p) ** 2 if p else 256


class VptSet(AdapterSet):
    """Learned prompt tokens inserted after the prefix tokens (shallow) and replaced per layer (deep)."""

    merge_note = "prompts are extra input tokens, not a weight update"

    def __init__(self, cfg: VptConfig):
        super().__init__(cfg)
        self.per_task = cfg.copies("all") > 1
        self.prompts: nn.Parameter | None = None
        self.num_prefix = 0

    def attach(self, model, profile):
        cfg: VptConfig = self.config
        layers = transformer_layers(model, profile, cfg, cfg.layer_modules, cfg.stack)
        mt = getattr(getattr(model, "config", None), "model_type", None)
        self.num_prefix = cfg.prefix_tokens if cfg.prefix_tokens is not None else _PREFIX_BY_TYPE.get(mt, 1)
        d = self._width(model, layers)
        deep_layers = list(range(1, len(layers))) if cfg.deep else []
        if cfg.deep and cfg.layers is not None:
            deep_layers = [i for i in deep_layers if i in set(cfg.layers)]
        n_sets = 1 + len(deep_layers)
        self.prompts = mark_task_stacked(nn.Parameter(torch.empty(cfg.copies("all"), n_sets, cfg.num_tokens, d)))
        with torch.no_grad():
            if cfg.init == "uniform":
                v = math.sqrt(6.0 / (3 * _patch_area(model) + d))
                self.prompts.uniform_(-v, v)
            else:
                self.prompts.normal_(0.0, 0.02)
        emb = self._embeddings(model, layers[0][0])
        if emb is not None:
            self.add_forward_hook(emb, self._insert_out)
            self.add_pre_hook(layers[0][1], self._mask_guard, with_kwargs=True)
        else:
            self.add_pre_hook(layers[0][1], self._insert_pre, with_kwargs=True)
        for slot, i in enumerate(deep_layers, start=1):
            self.add_pre_hook(layers[i][1], self._replace_hook(slot), with_kwargs=True)
        self.layer_paths = [p for p, _ in layers]

    @staticmethod
    def _width(model, layers) -> int:
        cfg = getattr(model, "config", None)
        cfg = getattr(cfg, "vision_config", cfg)
        for attr in ("hidden_size", "d_model", "n_embd"):
            if cfg is not None and isinstance(getattr(cfg, attr, None), int):
                return int(getattr(cfg, attr))
        for m in layers[0][1].modules():
            if isinstance(m, nn.LayerNorm):
                return int(m.normalized_shape[0])
        raise ConfigError(f"cannot tell the hidden width of {type(model).__name__}; set it in its config")

    def _embeddings(self, model, first_layer: str) -> nn.Module | None:
        cfg: VptConfig = self.config
        if cfg.embeddings_module:
            rx = re.compile(cfg.embeddings_module)
            hits = [m for p, m in model.named_modules() if p and rx.search(p) and not p.startswith(CONTAINER)]
            if len(hits) != 1:
                raise ConfigError(f"embeddings_module {cfg.embeddings_module!r} matches {len(hits)} modules, need exactly 1")
            return hits[0]
        stack_root = first_layer.split(".")[0]
        hits = [(p, m) for p, m in model.named_modules() if re.search(r"(?:^|\.)embeddings$", p)]
        if len(hits) > 1:  # e.g. a full CLIP model: keep the stack the layers belong to
            hits = [(p, m) for p, m in hits if p.split(".")[0] == stack_root]
        return hits[0][1] if len(hits) == 1 else None

    def _prompts(self, slot: int, batch: int, device) -> torch.Tensor:
        p = self.prompts[:, slot]  # (n_copies, P, d)
        if not self.per_task:
            out = p[0].expand(batch, -1, -1)
        else:
            task = self.router.resolve(device)
            out = p[task].expand(batch, -1, -1) if isinstance(task, int) else p.index_select(0, expand_to_batch(task, batch))
        if self.config.dropout and self.training:
            out = F.dropout(out, self.config.dropout, True)
        return out

    def _insert(self, h: torch.Tensor) -> torch.Tensor:
        k = self.num_prefix
        if h.dim() != 3 or h.shape[1] < k:
            raise ConfigError(f"VPT expects (batch, tokens, width) hidden states with >= {k} tokens, got {tuple(h.shape)}")
        p = self._prompts(0, h.shape[0], h.device).to(h.dtype)
        return torch.cat([h[:, :k], p, h[:, k:]], dim=1)

    def _insert_out(self, module, args, out):
        return _replace_first(out, self._insert(_first(out)))

    def _check_mask(self, kwargs: dict, args: tuple) -> None:
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        if isinstance(mask, torch.Tensor):
            raise ConfigError("VPT cannot extend an attention mask passed to the layers; "
                              'use method "prompt" for text models')

    def _mask_guard(self, module, args, kwargs):
        self._check_mask(kwargs, args)

    def _insert_pre(self, module, args, kwargs):
        self._check_mask(kwargs, args)
        return _with_hidden(args, kwargs, self._insert(hidden_arg(args, kwargs)))

    def _replace_hook(self, slot: int):
        def hook(module, args, kwargs):
            self._check_mask(kwargs, args)
            h = hidden_arg(args, kwargs)
            k, n = self.num_prefix, self.config.num_tokens
            p = self._prompts(slot, h.shape[0], h.device).to(h.dtype)
            return _with_hidden(args, kwargs, torch.cat([h[:, :k], p, h[:, k + n:]], dim=1))
        return hook


register_method("vpt", VptConfig, VptSet)

__all__ = ["VptConfig", "VptSet", "transformer_layers", "hidden_arg"]
