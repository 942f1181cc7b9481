"""DualAdapter: positive + negative cache paths (spec section 17; zhangce01/DualAdapter).

Positive path::

    logits⁺ = 100·f·W̃⁺ + α·exp(−β(1 − f·K̃⁺))·L_soft
    W̃⁺ = 0.45·norm(W_tmpl + R_t) + 0.55·norm(W_cupl + R_c),   K̃⁺ = norm(K + R_k)

Negative path::

    logits⁻ = 0.15·100·(1 − f·W̃⁻) + α·exp(−β·f·K̃⁻)·L
    W̃⁻ = norm(W⁻ + R_n),   K̃⁻ = norm(K⁻ + R_k⁻)

Final logits: λ·logits⁺ + (1 − λ)·logits⁻.

* R_t, R_c, R_n, R_k, R_k⁻ are zero-initialised (C, D) residuals (5·C·D trainable
  numbers); the key residuals are one per class, shared across that class's shots.
* K⁻ (negative keys): for class i and shot j, the normalised mean of shot j's keys of
  all OTHER classes (the reference takes the C−1 least similar classes, which is
  every class but i). Averaging over shots gives the mean of all other-class keys.
* Soft labels L_soft: per class, a softmax over its shots of each shot's mean cosine
  similarity to the other shots of that class, divided by 0.1, times the number of
  shots (one-hot when there is a single shot).
* W⁻ comes from negative prompts ("a photo without a {}") in the reference. When no
  negative text weights are given, a stand-in is used: for each class the normalised
  mean of the OTHER classes' positive weights ("everything but this class").
* If only one positive text weight set is given, it is used for both W_tmpl and W_cupl.

Training (``train_dual_adapter``): loss = CE + adaptive re-ranking margin loss
(k = 3, scale 4, on the tuned positive weights) + 8 × cosine consistency between the
tuned positive weights and the original template / CuPL weights (0.45 / 0.55).
AdamW, lr 1e-4 for the positive residuals and 5× for the negative ones, wd 0.1,
cosine schedule, 20 epochs. Deviations from the reference, documented:

* the best epoch is selected on VALIDATION (the reference also uses val here);
* the consistency cosine is taken per class (over the feature axis); the reference
  applies ``CosineSimilarity(dim=1)`` to the (D, C) matrices, i.e. over the class axis
  for each feature dimension, which looks unintended;
* all computations stay in float32 (the reference casts keys and weights to fp16).
"""

from __future__ import annotations

import torch
from torch import nn

from adapterkit.cache.common import (
    CacheModel,
    fit_on_features,
    grid_search,
    l2_normalize,
    one_hot,
    resolve_grid,
)
from adapterkit.errors import ConfigError, DataError

__all__ = [
    "DEFAULT_DUAL_GRID",
    "DualAdapter",
    "adaptive_reranking_loss",
    "default_negative_text_weights",
    "negative_cache_keys",
    "search_dual_adapter",
    "soft_cache_values",
    "train_dual_adapter",
]

#: Spec ImageNet ranges: β ∈ [0, 4), α ∈ [0, 4), λ ∈ [0.6, 0.9).
DEFAULT_DUAL_GRID = {"beta": (0.0, 4.0, 100), "alpha": (0.0, 4.0, 40), "lam": (0.6, 0.9, 10)}

NEGATIVE_TEXT_SCALE = 0.15


def negative_cache_keys(keys_csd: torch.Tensor) -> torch.Tensor:
    """(C, S, D) keys -> (C, S, D) negative keys: shot-wise mean over all other classes, normalised."""
    c = keys_csd.shape[0]
    if c < 2:
        raise DataError("DualAdapter's negative cache needs at least 2 classes")
    others = (keys_csd.sum(0, keepdim=True) - keys_csd) / (c - 1)
    return l2_normalize(others)


def soft_cache_values(keys_csd: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Soft labels (C·S, C): per class, S · softmax_s(mean cosine of shot s to the other shots / T)."""
    c, s, _ = keys_csd.shape
    hard = one_hot(torch.arange(c, device=keys_csd.device).repeat_interleave(s), c)
    if s == 1:
        return hard
    sims = keys_csd @ keys_csd.transpose(1, 2)  # (C, S, S)
    avg = (sims.sum(-1) - sims.diagonal(dim1=1, dim2=2)) / (s - 1)  # (C, S)
    conf = torch.softmax(avg / temperature, dim=-1) * s
    return hard * conf.reshape(-1, 1)


def default_negative_text_weights(text_weights: torch.Tensor) -> torch.Tensor:
    """Stand-in negative weights (D, C): normalised mean of the other classes' columns."""
    c = text_weights.shape[1]
    if c < 2:
        raise DataError("DualAdapter's negative text weights need at least 2 classes")
    return l2_normalize((text_weights.sum(1, keepdim=True) - text_weights) / (c - 1), dim=0)


def adaptive_reranking_loss(
    features: torch.Tensor, prototypes: torch.Tensor, labels: torch.Tensor, scale: float = 4.0, knn: int = 3
) -> torch.Tensor:
    """Margin re-ranking loss: the true prototype must be nearer than the k nearest ones by a margin.

    ``prototypes`` is (C, D). For each query and each of its k nearest prototypes p,
    hinge(‖f − p_y‖ + (1 − p·p_y)/scale − ‖f − p‖), averaged.
    """
    k = min(knn, prototypes.shape[0])
    dist = torch.cdist(features, prototypes)  # (B, C)
    near_d, near_i = dist.topk(k, dim=1, largest=False)
    anchor = dist.gather(1, labels.view(-1, 1))  # (B, 1)
    p_y = prototypes[labels]  # (B, D)
    margins = (1.0 - (prototypes[near_i] * p_y.unsqueeze(1)).sum(-1)) / scale  # (B, k)
    return torch.relu(anchor + margins - near_d).mean()


class DualAdapter(nn.Module):
    """Positive + negative cache adapter with zero-initialised trainable residuals."""

    def __init__(
        self,
        cache: CacheModel,
        text_weights: torch.Tensor,
        cupl_weights: torch.Tensor | None = None,
        negative_text_weights: torch.Tensor | None = None,
        alpha: float = 3.0,
        beta: float = 1.0,
        lam: float = 0.75,
        soft_temperature: float = 0.1,
        template_weight: float = 0.45,
    ):
        super().__init__()
        keys_csd = cache.keys_by_class()
        c, s, d = keys_csd.shape
        if tuple(text_weights.shape) != (d, c):
            raise ConfigError(
                f"text weights have shape {tuple(text_weights.shape)}; expected (D, C) = ({d}, {c})"
            )
        w_t = l2_normalize(text_weights.float(), dim=0)
        w_c = w_t if cupl_weights is None else l2_normalize(cupl_weights.float(), dim=0)
        w_n = (
            default_negative_text_weights(w_t)
            if negative_text_weights is None
            else l2_normalize(negative_text_weights.float(), dim=0)
        )
        for name, w in (("cupl", w_c), ("negative", w_n)):
            if tuple(w.shape) != (d, c):
                raise ConfigError(f"{name} text weights have shape {tuple(w.shape)}; expected ({d}, {c})")
        self.num_classes, self.shots, self.dim = c, s, d
        self.alpha, self.beta, self.lam = float(alpha), float(beta), float(lam)
        self.template_weight = float(template_weight)
        self.register_buffer("keys", keys_csd.reshape(c * s, d).clone())
        self.register_buffer("neg_keys", negative_cache_keys(keys_csd).reshape(c * s, d))
        self.register_buffer("values", cache.values.float().clone())
        self.register_buffer("soft_values", soft_cache_values(keys_csd, soft_temperature))
        self.register_buffer("w_template", w_t)
        self.register_buffer("w_cupl", w_c)
        self.register_buffer("w_negative", w_n)
        zeros = lambda: nn.Parameter(torch.zeros(c, d, device=keys_csd.device))  # noqa: E731
        self.res_template, self.res_cupl, self.res_keys = zeros(), zeros(), zeros()
        self.res_negative_text, self.res_negative_keys = zeros(), zeros()

    def positive_parameters(self) -> list[nn.Parameter]:
        return [self.res_template, self.res_cupl, self.res_keys]

    def negative_parameters(self) -> list[nn.Parameter]:
        return [self.res_negative_text, self.res_negative_keys]

    def tuned(self) -> dict[str, torch.Tensor]:
        """Current tuned weights: W_pos (D, C), K_pos (N, D), W_neg (D, C), K_neg (N, D)."""
        tw = self.template_weight
        w_pos = tw * l2_normalize(self.w_template + self.res_template.T, dim=0) + (1 - tw) * l2_normalize(
            self.w_cupl + self.res_cupl.T, dim=0
        )
        k_pos = l2_normalize(self.keys + self.res_keys.repeat_interleave(self.shots, 0))
        w_neg = l2_normalize(self.w_negative + self.res_negative_text.T, dim=0)
        k_neg = l2_normalize(self.neg_keys + self.res_negative_keys.repeat_interleave(self.shots, 0))
        return {"w_pos": w_pos, "k_pos": k_pos, "w_neg": w_neg, "k_neg": k_neg}

    def path_terms(self, features: torch.Tensor, tuned: dict[str, torch.Tensor] | None = None):
        """Return (clip⁺, aff⁺, clip⁻, aff⁻): text logits and key affinities for both paths."""
        t = self.tuned() if tuned is None else tuned
        clip_pos = 100.0 * features @ t["w_pos"]
        clip_neg = NEGATIVE_TEXT_SCALE * 100.0 * (1.0 - features @ t["w_neg"])
        return clip_pos, features @ t["k_pos"].T, clip_neg, features @ t["k_neg"].T

    def combine(self, terms, alpha: float, beta: float, lam: float) -> torch.Tensor:
        """Final logits from :meth:`path_terms` output."""
        clip_pos, aff_pos, clip_neg, aff_neg = terms
        pos = clip_pos + alpha * torch.exp(-beta * (1.0 - aff_pos)) @ self.soft_values
        neg = clip_neg + alpha * torch.exp(-beta * aff_neg) @ self.values
        return lam * pos + (1.0 - lam) * neg

    def forward(self, features: torch.Tensor, alpha=None, beta=None, lam=None) -> torch.Tensor:
        a = self.alpha if alpha is None else alpha
        b = self.beta if beta is None else beta
        lm = self.lam if lam is None else lam
        return self.combine(self.path_terms(features), a, b, lm)

    def loss(
        self, features: torch.Tensor, labels: torch.Tensor, consistency_weight: float = 8.0
    ) -> torch.Tensor:
        """CE + adaptive re-ranking margin loss + consistency_weight × cosine consistency."""
        t = self.tuned()
        logits = self.combine(self.path_terms(features, t), self.alpha, self.beta, self.lam)
        ce = nn.functional.cross_entropy(logits, labels)
        rerank = adaptive_reranking_loss(features, t["w_pos"].T, labels)
        cos_t = nn.functional.cosine_similarity(t["w_pos"], self.w_template, dim=0)
        cos_c = nn.functional.cosine_similarity(t["w_pos"], self.w_cupl, dim=0)
        tw = self.template_weight
        consistency = (tw * (1 - cos_t) + (1 - tw) * (1 - cos_c)).mean()
        return ce + rerank + consistency_weight * consistency


def train_dual_adapter(
    model: DualAdapter,
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    epochs: int = 20,
    lr: float = 1e-4,
    negative_lr_scale: float = 5.0,
    weight_decay: float = 0.1,
    eps: float = 1e-3,
    batch_size: int = 256,
    seed: int = 0,
) -> dict:
    """Train the residuals; keep the epoch with the best VALIDATION accuracy (loaded into model)."""
    opt = torch.optim.AdamW(
        [
            {"params": model.positive_parameters(), "lr": lr},
            {"params": model.negative_parameters(), "lr": lr * negative_lr_scale},
        ],
        eps=eps,
        weight_decay=weight_decay,
    )
    return fit_on_features(model, model.loss, opt, train_features, train_labels, val_features, val_labels,
                           epochs, batch_size, seed)


def search_dual_adapter(
    model: DualAdapter, val_features: torch.Tensor, val_labels: torch.Tensor, grid: dict | None = None
) -> tuple[dict[str, float], float]:
    """Grid search (β, λ, α) on the validation split with the model's current residuals.

    logits = [λ·clip⁺ + (1−λ)·clip⁻] + α·[λ·cache⁺(β) + (1−λ)·cache⁻(β)], so α is scored in
    one batched op per (β, λ); the β-dependent cache terms are computed once per β.
    """
    g = resolve_grid(grid, DEFAULT_DUAL_GRID)
    with torch.no_grad():
        clip_pos, aff_pos, clip_neg, aff_neg = model.path_terms(val_features)
        memo: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}

        def terms(beta: float, lam: float):
            if beta not in memo:
                memo.clear()
                memo[beta] = (
                    torch.exp(-beta * (1.0 - aff_pos)) @ model.soft_values,
                    torch.exp(-beta * aff_neg) @ model.values,
                )
            cp, cn = memo[beta]
            return lam * clip_pos + (1 - lam) * clip_neg, {"alpha": lam * cp + (1 - lam) * cn}

        return grid_search(terms, {"beta": g["beta"], "lam": g["lam"]}, {"alpha": g["alpha"]}, val_labels)
