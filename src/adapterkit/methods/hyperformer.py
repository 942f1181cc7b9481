"""Hyperformer (Karimi Mahabadi et al.; VL-Adapter's Hyperformer++-style setting):
one shared hypernetwork generates every adapter's weights from task and layer
embeddings.

Per task a learned embedding z_t (``task_embedding_dim``, shared by all stacks); per
stack (encoder/decoder) a layer-id embedding; I = LN(MLP([z_t; e_l])) of width
``projected_dim``; per stack and block type (ffn, self-attention, cross-attention)
generators map I to W_down (d/r x d), b_down, W_up (d x d/r), b_up. With
``block_embedding`` (Hyperformer++ in the Compacter repo) a block-type embedding joins
the input and one generator pair serves every block type.

A forward generates weights for all declared tasks at once per place (tiny matmuls)
and serves the batch with the task-stacked linear (gathered for mixed batches).
"""

from __future__ import annotations

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


@dataclass
class HyperformerConfig(AdapterConfig):
    method: str = "hyperformer"
    sharing: str = choice("per_task", default="per_task")
    reduction_factor: float = bounded(8.0, lo=1.0)
    task_embedding_dim: int = bounded(512, lo=1)
    hidden_dim: int = bounded(128, lo=1)
    projected_dim: int = bounded(8, lo=1)
    block_embedding: bool = False
    activation: str = choice(*ACTIVATIONS, default="gelu_new")
    generator_init_std: float = bounded(0.01, lo=0.0)
    positions: list[str] = field(default_factory=lambda: ["attn_out", "cross_attn_out", "ffn_out"])


class Generator(nn.Module):
    """I (R, p) -> W_down (R, m, d), b_down (R, m), W_up (R, d, m), b_up (R, d); shared with HyperPELT.
    ``zero_up``: the up-projection generators start at zero (the model starts unchanged)."""

    def __init__(self, p: int, d: int, m: int, std: float, zero_up: bool = False):
        super().__init__()
        self.d, self.m = d, m
        self.down_w = nn.Linear(p, m * d)
        self.down_b = nn.Linear(p, m)
        self.up_w = nn.Linear(p, d * m)
        self.up_b = nn.Linear(p, d)
        for lin in (self.down_w, self.down_b, self.up_w, self.up_b):
            nn.init.normal_(lin.weight, std=std)
            nn.init.zeros_(lin.bias)
        if zero_up:
            nn.init.zeros_(self.up_w.weight)
            nn.init.zeros_(self.up_b.weight)

    def forward(self, emb: torch.Tensor):
        t = emb.shape[0]
        return (self.down_w(emb).view(t, self.m, self.d), self.down_b(emb),
                self.up_w(emb).view(t, self.d, self.m), self.up_b(emb))


class StackHypernet(nn.Module):
    """Layer embeddings + projector + per-block generators for one stack."""

    def __init__(self, n_layers: int, blocks: list[str], d: int, m: int, cfg: HyperformerConfig):
        super().__init__()
        e = cfg.task_embedding_dim
        self.layer_emb = nn.Embedding(n_layers, e)
        self.block_ids = {b: i for i, b in enumerate(blocks)}
        in_dim = 2 * e
        if cfg.block_embedding:
            self.block_emb = nn.Embedding(len(blocks), e)
            in_dim += e
        self.proj = nn.Sequential(nn.Linear(in_dim, cfg.hidden_dim), nn.ReLU(), nn.Linear(cfg.hidden_dim, cfg.projected_dim),
                                  nn.LayerNorm(cfg.projected_dim))
        gen_blocks = ["all"] if cfg.block_embedding else blocks
        self.generators = nn.ModuleDict({b: Generator(cfg.projected_dim, d, m, cfg.generator_init_std) for b in gen_blocks})
        self.use_block_emb = cfg.block_embedding

    def weights(self, task_emb: torch.Tensor, block: str):
        """Weights of every layer of this stack for one block type, in one batched pass:
        (W_down (L*t, m, d), b_down (L*t, m), W_up (L*t, d, m), b_up (L*t, d)), row l*t + task."""
        t, n_layers = task_emb.shape[0], self.layer_emb.num_embeddings
        parts = [task_emb.unsqueeze(0).expand(n_layers, -1, -1),
                 self.layer_emb.weight.unsqueeze(1).expand(-1, t, -1)]
        if self.use_block_emb:
            parts.append(self.block_emb.weight[self.block_ids[block]].expand(n_layers, t, -1))
        emb = self.proj(torch.cat(parts, dim=-1)).reshape(n_layers * t, -1)
        return self.generators["all" if self.use_block_emb else block](emb)


class HyperformerSet(AdapterSet):
    def __init__(self, cfg: HyperformerConfig):
        super().__init__(cfg)
        self.task_embedding = mark_task_stacked(nn.Parameter(torch.randn(len(cfg.tasks), cfg.task_embedding_dim)))
        self.stacks = nn.ModuleDict()
        self.act = get_activation(cfg.activation)
        self._forward_id, self._cache_key, self._cache = 0, None, {}
        self._traced_cache: dict | None = None  # the cache while torch.compile traces a forward
        self._params: list | None = None

    def attach(self, model, profile):
        cfg: HyperformerConfig = self.config
        found = sublayer_places(model, profile, cfg, cfg.positions)
        by_stack: dict[str, list] = {}
        for p in found:
            by_stack.setdefault(p.stack or "main", []).append(p)
        widths = {_out_width(p.module) for p in found}
        if len(widths) != 1:
            raise ConfigError(f"hyperformer needs one hidden width across places, found {sorted(widths)}")
        d = widths.pop()
        if d % cfg.reduction_factor:
            raise ConfigError(f"reduction_factor {cfg.reduction_factor:g} does not divide the hidden width {d}")
        m = int(d // cfg.reduction_factor)
        for stack, places in by_stack.items():
            n_layers = max(p.layer for p in places) + 1
            blocks = sorted({p.kind for p in places})
            self.stacks[stack] = StackHypernet(n_layers, blocks, d, m, cfg)
            for p in places:
                self.add_forward_hook(p.module, self._hook(stack, p.layer, p.kind))
        self.add_pre_hook(model, self._new_forward)

    # Generated weights are computed once per forward for all layers of a (stack, block) pair
    # and reused by every place; the cache key changes with each top-level forward, each
    # routing context and any in-place update of the hypernetwork's parameters.
    def _new_forward(self, module, args):
        if torch.compiler.is_compiling():  # a counter read in compiled code would be guarded on
            self._traced_cache = {}           # a fresh cache inside the traced call instead
        else:
            self._forward_id += 1

    def _generated(self, stack: str, block: str):
        from adapterkit.core.routing import current_route

        if torch.compiler.is_compiling():
            cache = self._traced_cache if self._traced_cache is not None else {}
        else:
            if self._params is None:  # the hypernetwork's parameters, listed once (not a module walk per place)
                self._params = list(self.parameters())
            key = (self._forward_id, id(current_route()), tuple(p._version for p in self._params))
            if key != self._cache_key:
                self._cache, self._cache_key = {}, key
            cache = self._cache
        hit = cache.get((stack, block))
        if hit is None:
            hit = cache[(stack, block)] = self.stacks[stack].weights(self.task_embedding, block)
        return hit

    def _hook(self, stack: str, layer: int, block: str):
        n_tasks = len(self.config.tasks)

        def hook(module, args, out):
            h = _first(out)
            task = self.router.resolve(h.device)
            wd, bd, wu, bu = self._generated(stack, block)
            sl = slice(layer * n_tasks, (layer + 1) * n_tasks)
            wd, bd, wu, bu = wd[sl], bd[sl], wu[sl], bu[sl]
            z = self.act(task_linear(h, wd, bd, task))
            return _replace_first(out, h + task_linear(z, wu, bu, task))
        return hook


register_method("hyperformer", HyperformerConfig, HyperformerSet)
