"""Merging LoRA weight updates: task arithmetic, TIES and DARE (as HF PEFT defines them).

Every function works on the dense updates ``delta_k = scaling_k * B_k A_k`` of one
layer (one task copy), stacked over the merged adapters:

- task arithmetic: ``sum_k w_k delta_k``;
- TIES: keep each update's top ``density`` fraction by magnitude (trim), elect the
  sign per entry from the sum of the trimmed updates, then average the weighted
  updates that agree with it (disjoint mean: divide by how many agree);
- DARE: drop each entry with probability ``1 - density`` and rescale the survivors
  by ``1 / density``, then combine linearly (``dare_mode="linear"``) or with TIES's
  sign election and disjoint mean (``dare_mode="ties"``).

The merged update is re-factorised into a LoRA of a chosen rank by a truncated SVD
(``B = U sqrt(S)``, ``A = sqrt(S) V^T``, scaling 1), or, for task arithmetic, exactly by
concatenating the ranks (``A = [w_k s_k A_k]``, ``B = [B_k]``).
"""

from __future__ import annotations

import torch

from adapterkit.errors import ConfigError

LORA_METHODS = ("task_arithmetic", "ties", "dare")


def trim_magnitude(t: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the ``int(density * numel)`` largest-magnitude entries."""
    k = int(density * t.numel())
    if k <= 0:
        return torch.zeros_like(t)
    if k >= t.numel():
        return t.clone()
    flat = t.reshape(-1)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[torch.topk(flat.abs(), k).indices] = True
    return (flat * mask).reshape(t.shape)


def random_drop(t: torch.Tensor, density: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Keep each entry with probability ``density`` and rescale the survivors by ``1/density``."""
    if density <= 0:
        return torch.zeros_like(t)
    if density >= 1:
        return t.clone()
    keep = torch.bernoulli(torch.full(t.shape, density, dtype=torch.float32), generator=generator)
    return t * keep.to(t) / density


def majority_sign_mask(stack: torch.Tensor) -> torch.Tensor:
    """Entries whose sign agrees with the elected sign (that of the sum; ties count as +)."""
    elected = torch.where(stack.sum(dim=0) >= 0, 1.0, -1.0).to(stack)
    return stack.sign() == elected


def disjoint_mean(weighted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of the agreeing entries divided by how many agree (at least 1)."""
    return (weighted * mask).sum(dim=0) / mask.sum(dim=0).clamp(min=1)


def combine(deltas: list[torch.Tensor], weights: list[float], method: str, density: float = 0.5,
            dare_mode: str = "linear", generator: torch.Generator | None = None) -> torch.Tensor:
    """Merge dense updates of one layer by ``method`` (task_arithmetic, ties, dare)."""
    if method not in LORA_METHODS:
        raise ConfigError(f"unknown LoRA merge method {method!r}; known: {list(LORA_METHODS)}")
    if not 0.0 <= density <= 1.0:
        raise ConfigError(f"density must be in [0, 1], got {density}")
    w = torch.tensor(weights, dtype=deltas[0].dtype).view(-1, *([1] * deltas[0].dim()))
    if method == "task_arithmetic":
        return (torch.stack(deltas) * w).sum(dim=0)
    if method == "ties":
        stack = torch.stack([trim_magnitude(d, density) for d in deltas])
        return disjoint_mean(stack * w, majority_sign_mask(stack))
    stack = torch.stack([random_drop(d, density, generator) for d in deltas])
    if dare_mode == "linear":
        return (stack * w).sum(dim=0)
    if dare_mode == "ties":
        return disjoint_mean(stack * w, majority_sign_mask(stack))
    raise ConfigError(f'dare_mode must be "linear" or "ties", got {dare_mode!r}')


def svd_factor(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B (out, r), A (r, in)) with ``B @ A`` the best rank-``r`` approximation of ``delta``."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    b = (u[:, :r] * root).to(delta.dtype)
    a = (root[:, None] * vh[:r]).to(delta.dtype)
    if r < rank:  # pad with zero directions so every layer has the configured rank
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - r)], dim=1)
        a = torch.cat([a, a.new_zeros(rank - r, a.shape[1])], dim=0)
    return b, a


__all__ = ["LORA_METHODS", "combine", "disjoint_mean", "majority_sign_mask", "random_drop", "svd_factor",
           "trim_magnitude"]
