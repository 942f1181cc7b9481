"""CapS-Adapter (spec section 7; WLuLi/CapS-Adapter ``madapter.py``).

The cache holds two keys per support example: its image feature F_img and the
(CLIP text) feature of a caption of it, F_cap. The visual affinity mixes both::

    A = (1 − δ)·f·F_img + δ·f·F_cap,      δ ∈ {0, 0.1, ..., 1}
    logits = 100·f·W + γ·A_kl·L + α·exp(−β(1 − A))·L

A_kl is the TIP-X KL affinity (see tipx.py), rescaled into the range of A and
computed from the image keys. With δ = 0 CapS-Adapter is exactly TIP-X.

Signatures: ``signature="classes"`` (default) uses class signatures softmax(f·W/T)
as SuS-X does. [code quirk] the reference ``compute_image_text_distributions``
overwrites f·W with softmax(f/T), so its KL signatures are over FEATURE dimensions;
``signature="features"`` reproduces that.

When no caption features exist (e.g. offline, no captioner), callers may pass any
second key set aligned with the image keys; the example script uses features of a
second view of each support image as a documented stand-in.
"""

from __future__ import annotations

import torch

from adapterkit.cache.common import cache_logits, clip_logits, grid_search, resolve_grid
from adapterkit.cache.tipx import (
    DEFAULT_TIPX_GRID,
    kl_divergence_matrix,
    minmax_rescale,
    signatures,
    tipx_logits,
)
from adapterkit.errors import DataError

__all__ = ["DEFAULT_CAPS_GRID", "caps_affinity", "caps_logits", "search_caps"]

#: SuS-X's grids plus δ ∈ {0, 0.1, ..., 1}.
DEFAULT_CAPS_GRID = {**DEFAULT_TIPX_GRID, "delta": [round(0.1 * i, 1) for i in range(11)]}


def caps_affinity(
    features: torch.Tensor, image_keys: torch.Tensor, caption_keys: torch.Tensor, delta: float
) -> torch.Tensor:
    """A = (1 − δ)·f·F_img + δ·f·F_cap, (B, N); both key sets are expected L2-normalised."""
    if image_keys.shape != caption_keys.shape:
        raise DataError(
            f"caption keys {tuple(caption_keys.shape)} must match image keys {tuple(image_keys.shape)}"
        )
    return (1.0 - delta) * (features @ image_keys.T) + delta * (features @ caption_keys.T)


def caps_logits(
    features: torch.Tensor,
    text_weights: torch.Tensor,
    image_keys: torch.Tensor,
    caption_keys: torch.Tensor,
    values: torch.Tensor,
    alpha: float,
    beta: float,
    gamma: float,
    delta: float,
    temperature: float = 0.5,
    signature: str = "classes",
    rescale: str = "global",
) -> torch.Tensor:
    """CapS-Adapter logits (B, C)."""
    aff = caps_affinity(features, image_keys, caption_keys, delta)
    return tipx_logits(features, text_weights, image_keys, values, alpha, beta, gamma, temperature, signature,
                       rescale, affinity=aff)  # TIP-X with the image-caption affinity


def search_caps(
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    text_weights: torch.Tensor,
    image_keys: torch.Tensor,
    caption_keys: torch.Tensor,
    values: torch.Tensor,
    grid: dict | None = None,
    temperature: float = 0.5,
    signature: str = "classes",
    rescale: str = "global",
) -> tuple[dict[str, float], float]:
    """Grid search (α, β, γ, δ) on the validation split.

    Both affinities and the KL divergences are computed once; per δ only the
    rescale target changes, per β only the exponential.
    """
    g = resolve_grid(grid, DEFAULT_CAPS_GRID)
    base = clip_logits(val_features, text_weights)
    aff_img = val_features @ image_keys.T
    aff_cap = val_features @ caption_keys.T
    kl = kl_divergence_matrix(
        signatures(val_features, text_weights, temperature, signature),
        signatures(image_keys, text_weights, temperature, signature),
    )  # computed once; only the rescale target depends on δ
    kl_terms: dict[float, torch.Tensor] = {}

    def terms(delta: float, beta: float):
        aff = (1.0 - delta) * aff_img + delta * aff_cap
        if delta not in kl_terms:
            kl_terms[delta] = -minmax_rescale(kl, aff, rescale) @ values
        return base, {"alpha": cache_logits(aff, values, beta), "gamma": kl_terms[delta]}

    return grid_search(
        terms,
        {"delta": g["delta"], "beta": g["beta"]},
        {"alpha": g["alpha"], "gamma": g["gamma"]},
        val_labels,
    )
