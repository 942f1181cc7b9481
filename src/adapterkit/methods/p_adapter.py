"""p-Adapter (Wu et al., AAAI'24): a p-Laplacian graph adapter after attention.

For one attention module with per-head softmax attention A (N_q x N_k), the nodes
are [queries; values] of a bipartite graph with adjacency Â = [[0, A], [Aᵀ, 0]].
Node features F = W_i·Dense(X), X = [projected queries; projected values] (heads
merged), Dense the frozen attention-output projection, split into the attention's
heads. The p-Laplacian renormalisation

    G_ij = ||sqrt(Â_ij + eps)(F_i - F_j)||^(p-2),   Ã = Â ⊙ G,
    α_i = 1 / (Σ_j Ã_ij + 2μ/p),   β_i = α_i·2μ/p,   F' = diag(α) Ã F + diag(β) F

is evaluated only for the query rows (the only rows the output uses), which is exact:
a query's neighbours are the values, so Σ_j Ã_ij and (ÃF)_i only involve the A block.
The self term β_i F_i is kept for every query, also in cross-attention where
N_q ≠ N_k (the reference code slices β off the diagonal there and loses it).
Output: W_o(GELU(W_g·h) ⊙ F'_q), h the attention output, added to it before the
residual (a forward hook on the profile's attention-output projection: out_proj, o_proj,
T5's o, BERT's attention.output.dense, GPT-2's c_proj). p is learnable (init ``p_init``), μ = 2μ₀ + μ₀·tanh(m) with m learnable (init 0).

The projected query/key/value and the mask are read through adapterkit's attention
interceptor (see :mod:`adapterkit.methods.hyperpelt`), so A is recomputed from the
model's own post-RoPE/post-cache tensors, masks and position biases. In cross-attention
the key/value tokens can be adaptive-average-pooled to ``image_sample_len`` tokens
(padding-aware: pooled over valid tokens only). ``||·||`` is computed as
sqrt(Σ(·)² + eps) so G stays finite when two nodes coincide. W_o starts at zero
(``zero_init_out``) so the model starts unchanged. Combine with method ``pfeiffer``
for the FFN adapter of the paper.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from adapterkit.core.attention import attention_modules, intercept_attention, num_heads
from adapterkit.core.base import AdapterSet
from adapterkit.core.config import AdapterConfig, bounded, choice, register_method
from adapterkit.core.hooks import first as _first
from adapterkit.core.hooks import out_width as _out_width
from adapterkit.core.hooks import replace_first as _replace_first
from adapterkit.core.routing import expand_to_batch
from adapterkit.core.task_linear import TaskLinear
from adapterkit.errors import ConfigError


@dataclass
class PAdapterConfig(AdapterConfig):
    """p-Adapter options (defaults: VQA setting of the paper)."""

    method: str = "p_adapter"
    sharing: str = choice("shared", "per_task", default="shared")
    reduction_factor: float = bounded(8.0, lo=1.0)
    p_init: float = bounded(1.25, lo=0.0, lo_open=True)
    mu0: float = bounded(0.1, lo=0.0, lo_open=True)
    eps: float = bounded(1e-6, lo=0.0, lo_open=True)
    positions: list[str] = field(default_factory=lambda: ["self_attn", "cross_attn"])
    stacks: list[str] | None = field(default_factory=lambda: ["decoder", ""])
    image_sample_len: int | None = bounded(None, lo=1)
    zero_init_out: bool = True

    def validate(self) -> None:
        super().validate()
        for p in self.positions:
            if p not in ("self_attn", "cross_attn"):
                raise ConfigError(f'unknown position "{p}" for p_adapter; allowed: ["self_attn", "cross_attn"]')
        if not self.positions:
            raise ConfigError("positions must list at least one of self_attn, cross_attn")


def p_laplacian_query_update(A: torch.Tensor, Fq: torch.Tensor, Fv: torch.Tensor, p: torch.Tensor,
                             mu: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query rows of the p-Laplacian renormalised features on the bipartite graph.

    A (B, H, Nq, Nk) attention; Fq (B, H, Nq, f), Fv (B, H, Nk, f) node features;
    p, mu scalars or (B, 1, 1) tensors. Returns (F'_q, alpha_q, beta_q) with
    F'_q (B, H, Nq, f) and alpha/beta (B, H, Nq).
    """
    sq = (Fq.pow(2).sum(-1, keepdim=True) + Fv.pow(2).sum(-1).unsqueeze(-2) - 2 * Fq @ Fv.transpose(-1, -2))
    dist2 = (A + eps) * sq.clamp_min(0.0)                   # ||sqrt(A+eps)(F_i - F_j)||^2
    p4 = p.view(-1, 1, 1, 1) if isinstance(p, torch.Tensor) and p.dim() else p
    G = (dist2 + eps).pow((p4 - 2) / 2)
    At = A * G                                              # Ã on the query->value block
    two_mu_p = 2 * mu / p
    two_mu_p = two_mu_p.view(-1, 1, 1) if isinstance(two_mu_p, torch.Tensor) and two_mu_p.dim() else two_mu_p
    alpha = 1.0 / (At.sum(-1) + two_mu_p)
    beta = alpha * two_mu_p
    out = alpha.unsqueeze(-1) * (At @ Fv) + beta.unsqueeze(-1) * Fq
    return out, alpha, beta


def _pool_tokens(x: torch.Tensor, valid: torch.Tensor | None, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Adaptive-average-pool (B, H, L, hd) over L to n tokens, over valid tokens only."""
    b, h, L, hd = x.shape
    if L <= n:
        return x, valid
    flat = x.permute(0, 1, 3, 2).reshape(b, h * hd, L)
    if valid is None:
        return F.adaptive_avg_pool1d(flat, n).view(b, h, hd, n).permute(0, 1, 3, 2), None
    w = valid.to(x.dtype).view(b, 1, L)
    num = F.adaptive_avg_pool1d(flat * w, n)
    den = F.adaptive_avg_pool1d(w, n)
    pooled = (num / den.clamp_min(1e-12)).view(b, h, hd, n).permute(0, 1, 3, 2)
    return pooled, den.view(b, n) > 0


class PAdapterLayer(nn.Module):
    """W_i, W_g, W_o and the learnable p, m of one attention module."""

    def __init__(self, out_proj: nn.Module, heads: int, cross: bool, cfg: PAdapterConfig):
        super().__init__()
        d = _out_width(out_proj)
        if d % cfg.reduction_factor:
            raise ConfigError(f"reduction_factor {cfg.reduction_factor:g} does not divide the hidden width {d}")
        m = int(d // cfg.reduction_factor)
        if m % heads:
            raise ConfigError(f"p_adapter width {m} (= {d}/{cfg.reduction_factor:g}) is not divisible by {heads} heads")
        n = cfg.copies("all")
        self.heads, self.cross = heads, cross
        self.w_i = TaskLinear(d, m, n, init="kaiming")
        self.w_g = TaskLinear(d, m, n, init="kaiming")
        self.w_o = TaskLinear(m, d, n, init="zeros" if cfg.zero_init_out else "kaiming")
        self.p = nn.Parameter(torch.full((n,), float(cfg.p_init)))
        self.m = nn.Parameter(torch.zeros(n))
        self.mu0, self.eps = cfg.mu0, cfg.eps
        self.sample_len = cfg.image_sample_len if cross else None
        self.dense = [out_proj]  # the frozen attention-output projection (not a submodule)
        self.pending: torch.Tensor | None = None

    def mu(self) -> torch.Tensor:
        return 2 * self.mu0 + self.mu0 * torch.tanh(self.m)

    def graph_features(self, query, key, value, mask, kwargs, task) -> torch.Tensor:
        """F'_q (B, Nq, m) from the attention's projected tensors."""
        b, h, nq, hd = query.shape
        if key.shape[1] != h:  # grouped-query attention: repeat key/value heads
            rep = h // key.shape[1]
            key, value = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
        scaling = kwargs.get("scaling")
        if self.sample_len is not None and key.shape[-2] > self.sample_len:
            valid = _valid_keys(mask, b)
            key, pooled_valid = _pool_tokens(key, valid, self.sample_len)
            value, _ = _pool_tokens(value, valid, self.sample_len)
            scores = query @ key.transpose(-1, -2) * (hd ** -0.5 if scaling is None else scaling)
            if pooled_valid is not None:
                scores = scores.masked_fill(~pooled_valid.view(b, 1, 1, -1), torch.finfo(scores.dtype).min)
        else:
            scores = query @ key.transpose(-1, -2) * (hd ** -0.5 if scaling is None else scaling)
            pb = kwargs.get("position_bias")
            if isinstance(pb, torch.Tensor):
                scores = scores + pb[..., : scores.shape[-1]]
            if mask is not None:
                scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool \
                    else scores + mask
        A = scores.float().softmax(-1).to(query.dtype)
        xq = _frozen_dense(self.dense[0], query.transpose(1, 2).reshape(b, nq, h * hd))
        xv = _frozen_dense(self.dense[0], value.transpose(1, 2).reshape(b, value.shape[-2], h * hd))
        fq, fv = self.w_i(xq, task), self.w_i(xv, task)
        f = fq.shape[-1] // h
        fq = fq.view(b, nq, h, f).transpose(1, 2)
        fv = fv.view(b, -1, h, f).transpose(1, 2)
        p, mu = self.p, self.mu()
        if isinstance(task, torch.Tensor):
            t = expand_to_batch(task, b)
            p, mu = p.index_select(0, t), mu.index_select(0, t)
        else:
            p, mu = p[0 if task is None else task], mu[0 if task is None else task]
        out, _, _ = p_laplacian_query_update(A, fq, fv, p, mu, self.eps)
        return out.transpose(1, 2).reshape(b, nq, h * f)

    def output(self, h: torch.Tensor, fq: torch.Tensor, task) -> torch.Tensor:
        return self.w_o(F.gelu(self.w_g(h, task)) * fq.to(h.dtype), task)


def _frozen_dense(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The base output projection applied without its hooks (Linear, or GPT-2 Conv1D)."""
    if isinstance(mod, nn.Linear):
        return F.linear(x, mod.weight, mod.bias)
    if type(mod).__name__ == "Conv1D":
        y = x @ mod.weight
        return y + mod.bias if mod.bias is not None else y
    raise ConfigError(f"p_adapter needs a linear attention-output projection, got {type(mod).__name__}")


def _valid_keys(mask: torch.Tensor | None, b: int) -> torch.Tensor | None:
    """(B, Nk) validity of the key tokens from a key-padding mask (cross-attention), or None."""
    if mask is None:
        return None
    row = mask if mask.dim() == 2 else mask[:, 0, 0, :]
    valid = row.bool() if mask.dim() == 2 else (row if row.dtype == torch.bool else row > torch.finfo(row.dtype).min / 2)
    return valid.expand(b, -1)


class PAdapterSet(AdapterSet):
    merge_note = "it adds a graph-based non-linear function of the attention"

    def __init__(self, cfg: PAdapterConfig):
        super().__init__(cfg)
        self.layers = nn.ModuleDict()
        self.per_task = cfg.copies("all") > 1
        self.paths: list[str] = []
        self._removers: list = []

    def attach(self, model, profile):
        cfg: PAdapterConfig = self.config
        attns = attention_modules(model, profile, cfg, cfg.positions, cfg.stacks)
        if not attns:
            raise ConfigError(f"p_adapter found no attention module of {type(model).__name__} in stacks {cfg.stacks}")
        for a in attns:
            layer = PAdapterLayer(a.out_proj, num_heads(a.module), a.kind == "cross_attn", cfg)
            self.layers[a.path.replace(".", "__")] = layer
            self._removers.append(intercept_attention(a.module, self, observer=self._observer(layer)))
            self.add_forward_hook(a.out_proj, self._out_hook(layer))  # output: attention output before residual
            self.paths.append(a.path)

    def detach(self) -> None:
        super().detach()
        for r in self._removers:
            r()
        self._removers.clear()

    def _task(self, device):
        return self.router.resolve(device) if self.per_task else None

    def _observer(self, layer: PAdapterLayer):
        def obs(module, query, key, value, mask, kwargs):
            layer.pending = layer.graph_features(query, key, value, mask, kwargs, self._task(query.device))
        return obs

    def _out_hook(self, layer: PAdapterLayer):
        def hook(module, args, out):
            fq, layer.pending = layer.pending, None
            if fq is None:
                raise ConfigError(f"p_adapter did not see the attention tensors of {type(module).__name__}; "
                                  "was its attention implementation changed after attaching?")
            h = _first(out)
            return _replace_first(out, h + layer.output(h, fq, self._task(h.device)))
        return hook


register_method("p_adapter", PAdapterConfig, PAdapterSet)
