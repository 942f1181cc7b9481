"""Shared pieces of the training-free CLIP cache adapters (spec section 7 and 17).

Conventions used by every cache method in this package:

* query features ``f``: (B, D), L2-normalised rows;
* text classifier weights ``W``: (D, C), L2-normalised columns;
* cache keys ``F``: (N, D), L2-normalised rows (one per support example);
* cache values ``L``: (N, C), one-hot rows (or soft labels for DualAdapter).

When no text encoder exists (the offline case) :func:`class_prototypes` gives an
"image-only" stand-in for the zero-shot CLIP weights: the normalised per-class mean
of the few-shot training features. It is a nearest-class-mean classifier, *not*
CLIP zero-shot; accuracies obtained with it measure the cache methods on top of a
prototype baseline.

Hyperparameters are chosen by :func:`grid_search`, which only ever sees the
validation split (it takes no test arguments at all).
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from adapterkit.errors import ConfigError, DataError, did_you_mean

__all__ = [
    "CacheModel",
    "accuracy",
    "fit_on_features",
    "build_cache",
    "cache_logits",
    "class_prototypes",
    "clip_logits",
    "grid_search",
    "l2_normalize",
    "linear_grid",
    "normalize_text_weights",
    "one_hot",
    "resolve_grid",
    "sample_few_shot",
]


def l2_normalize(x: torch.Tensor, dim: int = -1, eps: float = 1e-12) -> torch.Tensor:
    """Return ``x`` scaled to unit L2 norm along ``dim`` (zero vectors stay zero)."""
    return x / x.norm(dim=dim, keepdim=True).clamp_min(eps)


def one_hot(labels: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N,) integer labels -> (N, C) one-hot matrix; raises DataError on out-of-range labels."""
    labels = torch.as_tensor(labels).long()
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"labels must lie in [0, {num_classes}); got range [{int(labels.min())}, {int(labels.max())}]"
        )
    return torch.nn.functional.one_hot(labels, num_classes).to(dtype)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    labels = torch.as_tensor(labels, device=logits.device).long()
    if labels.numel() == 0:
        raise DataError("cannot compute accuracy on an empty split")
    return int((logits.argmax(-1) == labels).sum()) * 100.0 / labels.numel()


def linear_grid(start: float, stop: float, steps: int) -> list[float]:
    """``steps`` evenly spaced values in [start, stop) — the reference repos' search grids."""
    if steps < 1:
        raise ConfigError(f"grid steps must be >= 1, got {steps}")
    return [start + i * (stop - start) / steps for i in range(steps)]


def resolve_grid(grid: Mapping | None, defaults: Mapping) -> dict[str, list[float]]:
    """Merge a user grid over ``defaults``; values are lists or (start, stop, steps) tuples."""
    unknown = [k for k in (grid or {}) if k not in defaults]
    if unknown:
        raise ConfigError(
            f"unknown hyperparameter {unknown[0]!r} in grid" + did_you_mean(unknown[0], defaults)
        )
    out: dict[str, list[float]] = {}
    for name, val in {**defaults, **(grid or {})}.items():
        if isinstance(val, (int, float)):
            out[name] = [float(val)]
        elif isinstance(val, tuple) and len(val) == 3 and isinstance(val[2], int):
            out[name] = linear_grid(float(val[0]), float(val[1]), int(val[2]))
        else:
            out[name] = [float(v) for v in val]
    return out


def sample_few_shot(labels: torch.Tensor, shots: int | None, num_classes: int, seed: int = 0) -> torch.Tensor:
    """Indices of ``shots`` random examples per class, ordered class-major (class 0 shots first).

    Vectorised: one random permutation, a stable sort by label, then the rank of each
    example inside its class. ``shots=None`` (or 0) keeps every example (class-sorted).
    Raises DataError naming the class when a class has fewer than ``shots`` examples.
    """
    labels = torch.as_tensor(labels).long().cpu()
    n = labels.numel()
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=gen)
    order = perm[torch.sort(labels[perm], stable=True).indices]
    sorted_labels = labels[order]
    counts = torch.bincount(labels, minlength=num_classes)
    if not shots:
        return order
    if shots < 0:
        raise ConfigError(f"shots must be positive, got {shots}")
    short = (counts < shots).nonzero().flatten()
    if short.numel():
        c = int(short[0])
        raise DataError(f"class {c} has only {int(counts[c])} training examples; {shots} shots requested")
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n) - starts[sorted_labels]
    return order[rank < shots]


@dataclass
class CacheModel:
    """Key/value cache: keys (N, D) normalised, values (N, C) one-hot, labels (N,).

    ``index`` holds the positions of the cached examples in the features the cache
    was built from (so aligned side information, e.g. caption features, can follow).
    """

    keys: torch.Tensor
    values: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    index: torch.Tensor | None = None

    @property
    def shots_per_class(self) -> torch.Tensor:
        return torch.bincount(self.labels, minlength=self.num_classes)

    def keys_by_class(self) -> torch.Tensor:
        """Keys reshaped to (C, S, D); requires equal shots per class, class-major order."""
        counts = self.shots_per_class
        s = int(counts[0])
        if not bool((counts == s).all()) or s == 0:
            raise DataError(
                f"cache needs the same number of shots for every class; got counts {counts.tolist()}"
            )
        expected = torch.arange(self.num_classes, device=self.labels.device).repeat_interleave(s)
        if not torch.equal(self.labels, expected):
            raise DataError(
                "cache keys must be ordered class-major (all shots of class 0, then class 1, ...)"
            )
        return self.keys.reshape(self.num_classes, s, -1)


def build_cache(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int | None = None,
    shots: int | None = None,
    seed: int = 0,
) -> CacheModel:
    """Build a cache from support features and labels (few-shot sampled when ``shots`` is set)."""
    features = torch.as_tensor(features).float()
    labels = torch.as_tensor(labels).long()
    if features.ndim != 2 or features.shape[0] != labels.shape[0]:
        raise DataError(
            f"support features must be (N, D) with one label each; got features {tuple(features.shape)} "
            f"and labels {tuple(labels.shape)}"
        )
    if features.shape[0] == 0:
        raise DataError("cannot build a cache from an empty support set")
    c = int(num_classes) if num_classes is not None else int(labels.max()) + 1
    idx = sample_few_shot(labels, shots, c, seed).to(features.device)
    keys = l2_normalize(features[idx])
    lab = labels.to(features.device)[idx]
    return CacheModel(keys=keys, values=one_hot(lab, c), labels=lab, num_classes=c, index=idx)


def class_prototypes(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Image-only stand-in for zero-shot text weights: normalised class means, (D, C).

    This is NOT CLIP zero-shot; it is a nearest-class-mean classifier built from the
    (few-shot) training features and is used when no text encoder is available.
    """
    labels = torch.as_tensor(labels, device=features.device).long()
    counts = torch.bincount(labels, minlength=num_classes)
    if bool((counts == 0).any()):
        missing = int((counts == 0).nonzero()[0])
        raise DataError(f"class {missing} has no training example to build its prototype")
    sums = one_hot(labels, num_classes, features.dtype).T @ l2_normalize(features.float())
    return l2_normalize(sums, dim=-1).T.contiguous()


def normalize_text_weights(weights, dim: int, num_classes: int) -> torch.Tensor:
    """Validate text classifier weights and return them as an L2-normalised (D, C) tensor.

    Accepts (D, C); a (C, D) matrix is transposed when the orientation is unambiguous.
    """
    w = torch.as_tensor(weights).float()
    if w.ndim != 2:
        raise ConfigError(f"text weights must be a 2-D (D, C) matrix; got shape {tuple(w.shape)}")
    if tuple(w.shape) != (dim, num_classes):
        if tuple(w.shape) == (num_classes, dim):
            w = w.T
        else:
            raise ConfigError(
                f"text weights have shape {tuple(w.shape)}; expected (D, C) = ({dim}, {num_classes})"
            )
    return l2_normalize(w, dim=0).contiguous()


def clip_logits(features: torch.Tensor, text_weights: torch.Tensor) -> torch.Tensor:
    """Zero-shot (or prototype) logits 100·f·W."""
    return 100.0 * features @ text_weights


def cache_logits(affinity: torch.Tensor, values: torch.Tensor, beta: float) -> torch.Tensor:
    """Tip-Adapter cache term exp(−β(1 − A))·L for a precomputed affinity A (B, N)."""
    return torch.exp(-beta * (1.0 - affinity)) @ values


TermsFn = Callable[..., tuple[torch.Tensor, Mapping[str, torch.Tensor]]]


def grid_search(
    build_terms: TermsFn,
    outer_grid: Mapping[str, Sequence[float]],
    linear_grid_: Mapping[str, Sequence[float]],
    val_labels: torch.Tensor,
    max_elements: int = 8_000_000,
) -> tuple[dict[str, float], float]:
    """Pick hyperparameters by VALIDATION accuracy only (this function never sees test data).

    The logits must be affine in the "linear" hyperparameters::

        logits = base + sum_k  p_k * term_k          (base, term_k depend on the outer ones)

    ``build_terms(**outer)`` returns ``(base, {name: term})`` with (B, C) tensors for the
    validation queries. For each outer combination (a small Python loop over
    hyperparameters) every combination of the linear grid is scored at once with one
    batched tensor op. A query counts as correct when its true class scores strictly
    above every other class (an exact tie counts as an error). Ties between
    combinations keep the first one in iteration order.
    """
    val_labels = torch.as_tensor(val_labels).long()
    lin_names = list(linear_grid_)
    outer_names = list(outer_grid)
    for name, values in {**outer_grid, **linear_grid_}.items():
        if len(values) == 0:
            raise ConfigError(f"hyperparameter grid for {name!r} is empty")
    best_acc, best = -math.inf, {}
    combos = list(itertools.product(*[linear_grid_[n] for n in lin_names]))
    coefs = torch.tensor(combos, dtype=torch.float32).reshape(len(combos), len(lin_names))
    n_val = max(1, val_labels.numel())
    for outer_vals in itertools.product(*[outer_grid[n] for n in outer_names]):
        outer = dict(zip(outer_names, (float(v) for v in outer_vals)))
        base, terms = build_terms(**outer)
        missing = [n for n in lin_names if n not in terms]
        if missing:
            raise ConfigError(f"build_terms did not return a term for linear hyperparameter {missing[0]!r}")
        labels = val_labels.to(base.device)
        b, c = base.shape
        stack = torch.stack([terms[n].float() for n in lin_names]) if lin_names else base.new_zeros(0, b, c)
        cf = coefs.to(base.device)
        flat_base, flat_terms = base.float().reshape(1, -1), stack.reshape(len(lin_names), -1)
        chunk = max(1, max_elements // max(1, b * c))
        for start in range(0, cf.shape[0], chunk):
            part = cf[start : start + chunk]
            logits = torch.addmm(flat_base, part, flat_terms).view(part.shape[0], b, c)
            idx = labels.view(1, b, 1).expand(part.shape[0], b, 1)
            true = logits.gather(2, idx)
            logits.scatter_(2, idx, float("-inf"))  # max over the other classes
            correct = (true > logits.amax(-1, keepdim=True)).sum((1, 2))
            g = int(torch.argmax(correct))  # first maximum
            acc = int(correct[g]) * 100.0 / n_val
            if acc > best_acc:
                best_acc = acc
                best = {**outer, **{n: float(v) for n, v in zip(lin_names, combos[start + g])}}
    return best, best_acc


def fit_on_features(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    opt: torch.optim.Optimizer,
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    epochs: int,
    batch_size: int,
    seed: int,
) -> dict:
    """The training-based cache adapters' loop on cached CLIP features: ``loss_fn(x, y)`` over
    seeded shuffled batches with a cosine schedule over all steps, validation accuracy after every
    epoch (and before the first), the best epoch's weights loaded back into ``model`` (validation,
    never test, selects). Returns ``{"best_epoch", "best_val_acc", "history"}``."""
    if epochs < 1:
        raise ConfigError(f"epochs must be >= 1, got {epochs}")
    train_features = l2_normalize(train_features.float())
    train_labels = torch.as_tensor(train_labels, device=train_features.device).long()
    n = train_features.shape[0]
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * math.ceil(n / batch_size))
    gen = torch.Generator().manual_seed(int(seed))
    model.eval()
    with torch.no_grad():
        best_acc = accuracy(model(val_features), val_labels)
    best_epoch, best_state = 0, copy.deepcopy(model.state_dict())
    history = [{"epoch": 0, "val_acc": best_acc}]
    for epoch in range(1, epochs + 1):
        model.train()
        perm = torch.randperm(n, generator=gen).to(train_features.device)
        total = 0.0
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            loss = loss_fn(train_features[idx], train_labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * idx.numel()
        model.eval()
        with torch.no_grad():
            acc = accuracy(model(val_features), val_labels)
        history.append({"epoch": epoch, "train_loss": total / n, "val_acc": acc})
        if acc > best_acc:
            best_acc, best_epoch = acc, epoch
            best_state = copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return {"best_epoch": best_epoch, "best_val_acc": best_acc, "history": history}
