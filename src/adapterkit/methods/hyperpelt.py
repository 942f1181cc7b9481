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

Prefix mechanism: see :mod:`adapterkit.core.attention` (intercepts the attention function
through transformers' AttentionInterface; prefixes never enter the KV cache).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from adapterkit.core.activations import get_activation
from adapterkit.core.attention import (  # noqa: F401  (re-exported for users of this module)
    attention_modules,
    explicit_mask,
    find_attention_module,
    intercept_attention,
    kv_shape,
    num_heads,
)
from adapterkit.core.base import AdapterSet, get_container, sublayer_places
from adapterkit.core.config import ACTIVATIONS, AdapterConfig, bounded, choice, register_method
from adapterkit.core.hooks import first as _first
from adapterkit.core.hooks import out_width as _out_width
from adapterkit.core.hooks import replace_first as _replace_first
from adapterkit.core.task_linear import task_linear
from adapterkit.errors import ConfigError
from adapterkit.methods.hyperformer import Generator

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
        adapters = sublayer_places(model, profile, cfg, cfg.adapter_positions)
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
            self.adapter_gen = Generator(cfg.projected_dim, d, int(d // cfg.reduction_factor),
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
