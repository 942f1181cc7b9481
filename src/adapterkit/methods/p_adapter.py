"""p-Adapter (Wu et al., AAAI'24): a p-Laplacian graph adapter after attention.

Follows the reference code (wuhy68/p-Adapter, ``eff_blip/eff_modeling_blip.py``:
``BertSelfAttention`` builds the graph, ``BertSelfOutput`` renormalises it). For one
attention module with per-head softmax attention A (N_q x N_k), node features
F = W_i·Dense(X) (X the projected queries or values, heads merged; Dense the frozen
attention-output projection) are split into the attention's heads and renormalised:

    G_ij = ||sqrt(Â_ij + e)·(F_j - F_i) + e||^(p-2),   Ã = Â ⊙ G,
    α_i = 1 / (Σ_j Ã_ij + 2μ/p),   β_i = α_i·2μ/p,   F' = diag(α) Ã F + diag(β) F

with e = ``eps`` (1e-8 as the reference; the ``+ e`` inside the norm is added to every
coordinate, as ``torch.norm(graph_grad + e)`` does). Two graphs, as in the reference:

- ``bipartite`` (cross-attention always; self-attention with ``self_attn_graph:
  bipartite``): nodes [queries; values], Â = [[0, A], [Aᵀ, 0]]. The reference keeps the
  query rows of F' and slices β off its diagonal (``beta[:, :, :q, q:]``, a block of a
  diagonal matrix), so the self term is zero: F'_q = diag(α) Ã_qv F_v. Nodes are
  [q; v] whenever this graph is built, so the block is zero in every such attention.
  In cross-attention A and the values are adaptive-average-pooled over the key tokens to
  ``image_sample_len`` tokens (16 by default, as the reference's configs): the attention
  probabilities are averaged per bin, not recomputed from pooled keys (padded key tokens
  have zero attention; pooled values average the valid tokens only, which is the
  reference's plain average when nothing is padded). As the reference's adaptive pool,
  fewer key tokens than ``image_sample_len`` are repeated up to it; ``None`` turns pooling off.
- ``values`` (self-attention, the default): the graph the reference builds whenever no
  KV cache is passed (training, and every encoder): nodes are the value vectors,
  Â = A itself, and the self term stays: F'_i = α_i Σ_j Ã_ij F_vj + β_i F_vi, where
  F_vi is the value node of query i's own token (with a KV cache, the last N_q keys).

Output: W_o(GELU(W_g·h) ⊙ F'), h the attention output, added to it before the residual
(a forward hook on the profile's attention-output projection: out_proj, o_proj, T5's o,
BERT's attention.output.dense, GPT-2's c_proj). p is learnable (init ``p_init``), μ =
2μ₀ + μ₀·tanh(m) with m learnable (init 0). Initialisation (``init: bert``): W_i, W_g,
W_o ~ N(0, 0.02) with zero biases, which is what the reference's adapters hold after
``BertLMHeadModel.init_weights`` (its ``_init_weights`` visits every nn.Linear, and the
pretrained BLIP checkpoint has no adapter keys); ``init: linear`` gives nn.Linear's own
default, ``zero_init_out`` a zero W_o (the model starts unchanged).

The projected query/key/value and the mask are read through adapterkit's attention
interceptor (see :mod:`adapterkit.methods.hyperpelt`), so A is recomputed from the
model's own post-RoPE/post-cache tensors, masks and position biases. Distances use
``torch.cdist`` without the matmul expansion, so coinciding nodes give exactly 0 as in
the reference's dense (N, N, f) difference tensor, at O(N·N) memory instead. The graph
is evaluated in float32 (e = 1e-8 vanishes in half precision). Combine with method
``pfeiffer`` for the FFN adapter of the paper.
"""

from __future__ import annotations

import math
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
    """p-Adapter options (defaults: the reference's VQA config ``eff_vqa.yaml``)."""

    method: str = "p_adapter"
    sharing: str = choice("shared", "per_task", default="shared")
    reduction_factor: float = bounded(8.0, lo=1.0)
    p_init: float = bounded(1.25, lo=0.0, lo_open=True)
    mu0: float = bounded(0.1, lo=0.0, lo_open=True)
    eps: float = bounded(1e-8, lo=0.0, lo_open=True)
    positions: list[str] = field(default_factory=lambda: ["self_attn", "cross_attn"])
    stacks: list[str] | None = field(default_factory=lambda: ["decoder", ""])
    image_sample_len: int | None = bounded(16, lo=1)
    self_attn_graph: str = choice("values", "bipartite", default="values")
    init: str = choice("bert", "linear", default="bert")
    zero_init_out: bool = False

    def validate(self) -> None:
        super().validate()
        for p in self.positions:
            if p not in ("self_attn", "cross_attn"):
                raise ConfigError(f'unknown position "{p}" for p_adapter; allowed: ["self_attn", "cross_attn"]')
        if not self.positions:
            raise ConfigError("positions must list at least one of self_attn, cross_attn")


def p_laplacian_update(A: torch.Tensor, f_rows: torch.Tensor, f_cols: torch.Tensor, p, mu, eps: float,
                       f_self: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the p-Laplacian renormalised features F' for a graph whose rows link only to columns.

    A (B, H, R, K) adjacency from the row nodes to the column nodes; f_rows (B, H, R, f)
    and f_cols (B, H, K, f) node features; p, mu scalars or (B,) tensors. The self term
    diag(β)·F is added with ``f_self`` (B, H, R, f) and dropped when it is None.
    Returns (F'_rows (B, H, R, f), alpha (B, H, R)).
    """
    f = f_rows.shape[-1]
    s = (A + eps).sqrt()
    d2 = torch.cdist(f_rows, f_cols, compute_mode="donot_use_mm_for_euclid_dist").pow(2)
    lin = f_cols.sum(-1).unsqueeze(-2) - f_rows.sum(-1, keepdim=True)  # Σ_k (F_j - F_i)_k
    # ||s (F_j - F_i) + e||^2 = s^2 ||F_j - F_i||^2 + 2 e s Σ_k (F_j - F_i)_k + f e^2
    norm2 = (s * s * d2 + 2 * eps * s * lin + f * eps * eps).clamp_min(torch.finfo(A.dtype).tiny)
    p4 = p.view(-1, 1, 1, 1) if isinstance(p, torch.Tensor) and p.dim() else p
    At = A * norm2.pow((p4 - 2) / 2)
    two_mu_p = 2 * mu / p
    two_mu_p = two_mu_p.view(-1, 1, 1) if isinstance(two_mu_p, torch.Tensor) and two_mu_p.dim() else two_mu_p
    alpha = 1.0 / (At.sum(-1) + two_mu_p)
    out = alpha.unsqueeze(-1) * (At @ f_cols)
    if f_self is not None:
        out = out + (alpha * two_mu_p).unsqueeze(-1) * f_self
    return out, alpha


def _pool_tokens(x: torch.Tensor, valid: torch.Tensor | None, n: int) -> torch.Tensor:
    """Adaptive-average-pool (B, L, D) over L to n tokens (over the valid tokens only, if given)."""
    flat = x.transpose(1, 2)
    if valid is None:
        return F.adaptive_avg_pool1d(flat, n).transpose(1, 2)
    w = valid.to(x.dtype).unsqueeze(1)
    num = F.adaptive_avg_pool1d(flat * w, n)
    den = F.adaptive_avg_pool1d(w, n)
    return (num / den.clamp_min(1e-12)).transpose(1, 2)


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
        scheme = "bert" if cfg.init == "bert" else "kaiming"
        self.w_i = TaskLinear(d, m, n, init=scheme)
        self.w_g = TaskLinear(d, m, n, init=scheme)
        self.w_o = TaskLinear(m, d, n, init="zeros" if cfg.zero_init_out else scheme)
        if cfg.init == "linear":  # nn.Linear's bias default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            with torch.no_grad():
                for lin in (self.w_i, self.w_g) + (() if cfg.zero_init_out else (self.w_o,)):
                    bound = 1 / math.sqrt(lin.in_features)
                    lin.bias.uniform_(-bound, bound)
        self.p = nn.Parameter(torch.full((n,), float(cfg.p_init)))
        self.m = nn.Parameter(torch.zeros(n))
        self.mu0, self.eps = cfg.mu0, cfg.eps
        self.sample_len = cfg.image_sample_len if cross else None
        self.graph = "bipartite" if cross else cfg.self_attn_graph
        self.dense = [out_proj]  # the frozen attention-output projection (not a submodule)
        self.pending: torch.Tensor | None = None

    def mu(self) -> torch.Tensor:
        return 2 * self.mu0 + self.mu0 * torch.tanh(self.m)

    def _nodes(self, x: torch.Tensor, task) -> torch.Tensor:
        """(B, L, D) projected tokens -> (B, H, L, f) node features W_i·Dense(x), split into heads."""
        b, L, _ = x.shape
        w = self.w_i.weight.dtype
        z = self.w_i(_frozen_dense(self.dense[0], x.to(w)), task).to(x.dtype)
        return z.view(b, L, self.heads, -1).transpose(1, 2)

    def graph_features(self, query, key, value, mask, kwargs, task) -> torch.Tensor:
        """F' (B, Nq, m) for the query tokens from the attention's projected tensors."""
        b, h, nq, hd = query.shape
        if key.shape[1] != h:  # grouped-query attention: repeat key/value heads
            rep = h // key.shape[1]
            key, value = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
        nk = key.shape[-2]
        scaling = kwargs.get("scaling")
        scores = query @ key.transpose(-1, -2) * (hd ** -0.5 if scaling is None else scaling)
        pb = kwargs.get("position_bias")
        if isinstance(pb, torch.Tensor):
            scores = scores + pb[..., : scores.shape[-1]]
        if mask is not None:
            if mask.dim() == 2:  # flash-attention style (batch, keys) padding mask
                mask = mask.bool().view(b, 1, 1, -1)
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool \
                else scores + mask
        work = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
        A = scores.to(work).softmax(-1)
        vals = value.transpose(1, 2).reshape(b, nk, h * hd).to(work)
        if self.sample_len is not None:  # the reference pools the attention and the values, not the keys
            A = F.adaptive_avg_pool1d(A.reshape(b * h * nq, 1, nk), self.sample_len).view(b, h, nq, -1)
            vals = _pool_tokens(vals, _valid_keys(mask, b), self.sample_len)
        with torch.autocast(query.device.type, enabled=False):
            f_cols = self._nodes(vals, task)
            if self.graph == "bipartite":
                f_rows = self._nodes(query.transpose(1, 2).reshape(b, nq, h * hd).to(work), task)
                f_self = None
            else:
                if nk < nq:
                    raise ConfigError(f"p_adapter's values graph needs at least as many keys ({nk}) as queries "
                                      f"({nq}) in self-attention")
                f_rows = f_self = f_cols[:, :, nk - nq:]
            p, mu = self.p, self.mu()
            if isinstance(task, torch.Tensor):
                t = expand_to_batch(task, b)
                p, mu = p.index_select(0, t), mu.index_select(0, t)
            else:
                p, mu = p[0 if task is None else task], mu[0 if task is None else task]
            out, _ = p_laplacian_update(A, f_rows, f_cols, p.to(work), mu.to(work), self.eps, f_self)
        return out.transpose(1, 2).reshape(b, nq, -1)

    def output(self, h: torch.Tensor, fq: torch.Tensor, task) -> torch.Tensor:
        return self.w_o(F.gelu(self.w_g(h, task)) * fq.to(h.dtype), task)


def _frozen_dense(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The base output projection applied without its hooks (Linear, or GPT-2 Conv1D)."""
    if isinstance(mod, nn.Linear):
        return F.linear(x, mod.weight.to(x.dtype), None if mod.bias is None else mod.bias.to(x.dtype))
    if type(mod).__name__ == "Conv1D":
        y = x @ mod.weight.to(x.dtype)
        return y + mod.bias.to(x.dtype) if mod.bias is not None else y
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
