"""TIP-X, the cache model of SuS-X (spec section 7; vishaal27/SuS-X ``tipx.py``).

Each query f and each cache key F_i gets a class "signature" s = softmax(x·W / T)
(T = 0.5). The KL affinity is::

    A_kl[q, i] = −ψ(KL(s_q ‖ s_i))

where ψ min-max rescales the KL values into the range of the visual affinities
f·F, and the logits are::

    logits = 100·f·W + γ·A_kl·L + α·exp(−β(1 − f·F))·L

Notes on the reference:

* ψ: as the reference's ``scale_`` (the default, ``rescale="global"``): the global
  min/max of the whole KL matrix (queries x keys) mapped into the global range of the
  affinity matrix f·F of the same call. A query's logits therefore depend on the other
  queries of the call, as in the reference, which rescales its whole split at once.
  ``rescale="row"`` maps each query's KL row into that query's own f·F range instead
  (independent of the batch). [code quirk, not reproduced] the reference's test split
  is rescaled into the range of the *validation* affinity matrix (a variable left over
  from its search loop); here each call uses its own f·F.
* [code quirk] the reference KL loop drops the last partial batch of 100 queries
  (those rows stay 0). Here the KL matrix is one closed-form matrix product over all
  rows: KL(p‖q) = Σ p log p − p · log q.
* The signatures are over CLASSES (SuS-X). CapS-Adapter's feature-dimension
  signatures are available through ``signature="features"`` (see caps_adapter.py).
"""

from __future__ import annotations

import torch

from adapterkit.cache.common import cache_logits, clip_logits, grid_search, resolve_grid
from adapterkit.errors import ConfigError, did_you_mean

__all__ = [
    "DEFAULT_TIPX_GRID",
    "kl_affinity",
    "kl_divergence_matrix",
    "minmax_rescale",
    "search_tipx",
    "signatures",
    "tipx_logits",
]

#: Reference SuS-X grids: α ∈ [0.1, 50) 20 steps, β ∈ [1, 50) 200 steps, γ ∈ [0.1, 30) 50 steps.
DEFAULT_TIPX_GRID = {"alpha": (0.1, 50.0, 20), "beta": (1.0, 50.0, 200), "gamma": (0.1, 30.0, 50)}

_SIGNATURES = ("classes", "features")
_RESCALE = ("row", "global")


def signatures(
    features: torch.Tensor,
    text_weights: torch.Tensor | None = None,
    temperature: float = 0.5,
    signature: str = "classes",
) -> torch.Tensor:
    """Probability signatures: softmax(f·W / T) over classes, or softmax(f / T) over features.

    ``signature="features"`` reproduces CapS-Adapter's [code quirk], where the
    class distribution is overwritten by a softmax over the feature dimensions.
    """
    if signature not in _SIGNATURES:
        raise ConfigError(
            f"unknown signature {signature!r}; expected one of {_SIGNATURES}"
            + did_you_mean(signature, _SIGNATURES)
        )
    if temperature <= 0:
        raise ConfigError(f"signature temperature must be > 0, got {temperature}")
    if signature == "classes":
        if text_weights is None:
            raise ConfigError("signature='classes' needs text_weights (D, C)")
        return torch.softmax(features @ text_weights / temperature, dim=-1)
    return torch.softmax(features / temperature, dim=-1)


def kl_divergence_matrix(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """KL(p_a ‖ q_b) for every pair of rows: (A, K), (B, K) -> (A, B), one matmul."""
    logp = p.clamp_min(eps).log()
    logq = q.clamp_min(eps).log()
    return (p * logp).sum(-1, keepdim=True) - p @ logq.T


def minmax_rescale(
    x: torch.Tensor, target: torch.Tensor, mode: str = "global", eps: float = 1e-12
) -> torch.Tensor:
    """ψ: min-max rescale ``x`` into the range of ``target`` (per row, or over the whole matrix)."""
    if mode not in _RESCALE:
        raise ConfigError(
            f"unknown rescale mode {mode!r}; expected one of {_RESCALE}" + did_you_mean(mode, _RESCALE)
        )
    if mode == "row":
        xmin, xmax = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        tmin, tmax = target.amin(-1, keepdim=True), target.amax(-1, keepdim=True)
    else:
        xmin, xmax, tmin, tmax = x.min(), x.max(), target.min(), target.max()
    return (x - xmin) / (xmax - xmin).clamp_min(eps) * (tmax - tmin) + tmin


def kl_affinity(
    features: torch.Tensor,
    keys: torch.Tensor,
    text_weights: torch.Tensor | None,
    affinity: torch.Tensor | None = None,
    temperature: float = 0.5,
    signature: str = "classes",
    rescale: str = "global",
) -> torch.Tensor:
    """A_kl = −ψ(KL(s_f ‖ s_i)) for all queries and keys, (B, N).

    ``affinity`` is the visual affinity whose range ψ targets (default f·F).
    """
    s_q = signatures(features, text_weights, temperature, signature)
    s_k = signatures(keys, text_weights, temperature, signature)
    kl = kl_divergence_matrix(s_q, s_k)
    target = features @ keys.T if affinity is None else affinity
    return -minmax_rescale(kl, target, rescale)


def tipx_logits(
    features: torch.Tensor,
    text_weights: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    alpha: float,
    beta: float,
    gamma: float,
    temperature: float = 0.5,
    signature: str = "classes",
    rescale: str = "global",
    affinity: torch.Tensor | None = None,
) -> torch.Tensor:
    """TIP-X logits (B, C). ``affinity`` overrides f·F (used by CapS-Adapter)."""
    aff = features @ keys.T if affinity is None else affinity
    a_kl = kl_affinity(features, keys, text_weights, aff, temperature, signature, rescale)
    return (
        clip_logits(features, text_weights)
        + gamma * (a_kl @ values)
        + alpha * cache_logits(aff, values, beta)
    )


def search_tipx(
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    text_weights: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    grid: dict | None = None,
    temperature: float = 0.5,
    signature: str = "classes",
    rescale: str = "global",
) -> tuple[dict[str, float], float]:
    """Grid search (α, β, γ) on the validation split; the KL term is computed once."""
    g = resolve_grid(grid, DEFAULT_TIPX_GRID)
    base = clip_logits(val_features, text_weights)
    aff = val_features @ keys.T
    kl_term = kl_affinity(val_features, keys, text_weights, aff, temperature, signature, rescale) @ values

    def terms(beta: float):
        return base, {"alpha": cache_logits(aff, values, beta), "gamma": kl_term}

    return grid_search(terms, {"beta": g["beta"]}, {"alpha": g["alpha"], "gamma": g["gamma"]}, val_labels)
