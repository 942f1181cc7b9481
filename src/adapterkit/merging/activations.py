"""Activation-based alignment of adapter hidden units (MerA's "model fusion", experimental).

Adapters trained separately compute the same kind of function with their hidden units in
an arbitrary order, so a plain average mixes unrelated units. Activation-based alignment
(as in OT model fusion, Singh & Jaggi 2020, with a hard permutation) matches the units by
what they *do* on shared inputs:

1. each adapter is loaded in turn into (a copy of) the base model and run on the same
   batches; the input of every up-projection (bottleneck: f(W_down x + b), LoRA: the
   scaled A x) is recorded, one row per real token: Z_i^l (T, m) for adapter i, module l;
2. for each module, the cross-correlation C[a, b] = corr(Z_ref[:, a], Z_i[:, b]) over the
   T tokens (or the raw inner products ``Z_refᵀ Z_i``, ``criterion="inner"``, the
   activation matching of Git Re-Basin) is maximised over permutations by linear
   assignment (``scipy.optimize.linear_sum_assignment``);
3. the permutation reorders adapter i's rows of W_down / b_down (A) and columns of W_up (B),
   which leaves its function unchanged, and the aligned adapters are averaged.

Correlation is invariant to a positive rescaling of a unit (ReLU: c·f(z) = f(c·z)), which
weight matching is not. Units that never vary on the inputs (dead ReLUs) correlate with
nothing (0) and are assigned arbitrarily among themselves.

:func:`mera_few_shot` is MerA's pipeline: merge adapters trained on source tasks (the
"same-track" variant: only sources of the target's track, chosen by the caller), load the
merged adapter, and tune it on the few target examples.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from adapterkit.errors import ConfigError
from adapterkit.merging.adapter_dir import SET_PREFIX, read_adapter_dir, write_adapter_dir
from adapterkit.merging.align import hidden_groups, permute_hidden
from adapterkit.merging.merge import _check_same_sets, _check_same_tensors, _weighted_sum

CRITERIA = ("correlation", "inner")


def _assignment(score: torch.Tensor) -> torch.Tensor:
    """``perm`` maximising Σ_a score[a, perm[a]] (a permutation of the columns)."""
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as e:  # pragma: no cover - scipy is a dependency of this feature
        raise ConfigError("activation alignment needs scipy (pip install scipy)") from e
    rows, cols = linear_sum_assignment(score.double().numpy(), maximize=True)
    perm = torch.empty(score.shape[0], dtype=torch.long)
    perm[torch.as_tensor(rows, dtype=torch.long)] = torch.as_tensor(cols, dtype=torch.long)
    return perm


def unit_similarity(ref: torch.Tensor, other: torch.Tensor, criterion: str = "correlation") -> torch.Tensor:
    """(m, m) similarity of the units (columns) of two activation matrices (T, m) over the same T tokens."""
    if criterion not in CRITERIA:
        raise ConfigError(f"criterion must be one of {list(CRITERIA)}, got {criterion!r}")
    if ref.shape != other.shape or ref.dim() != 2:
        raise ConfigError(f"cannot compare hidden activations of shapes {tuple(ref.shape)} and {tuple(other.shape)}")
    if ref.shape[0] < 2:
        raise ConfigError("activation alignment needs at least two tokens of input")
    a, b = ref.double(), other.double()
    if criterion == "inner":
        return a.T @ b
    a = a - a.mean(0)
    b = b - b.mean(0)
    na, nb = a.norm(dim=0), b.norm(dim=0)
    c = (a.T @ b) / (na[:, None] * nb[None, :])
    return torch.nan_to_num(c, nan=0.0, posinf=0.0, neginf=0.0)  # a constant unit correlates with nothing


def _set_prefixes(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[str, str]]:
    groups = hidden_groups({k: v for k, v in tensors.items() if k.startswith(SET_PREFIX)})
    if not groups:
        raise ConfigError("activation alignment found no bottleneck (down/up) or LoRA (A/B) modules to align")
    for prefix, (d, u) in groups.items():
        for name in (d, u):
            n = tensors[f"{prefix}.{name}.weight"].shape[0]
            if n != 1:
                raise ConfigError(f"{prefix} has {n} task copies: activation alignment aligns single-copy adapters "
                                  "(one adapter per source task); use the weight-based 'aligned' merge for per-task sets")
    return groups


def _batch_mask(batch: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    m = batch.get("attention_mask")
    return None if m is None else m.bool()


@torch.no_grad()
def collect_hidden_activations(model: nn.Module, directory: str | os.PathLike,
                               batches: Iterable[Mapping[str, torch.Tensor]],
                               forward: Callable[[nn.Module, Mapping], object] | None = None
                               ) -> dict[str, torch.Tensor]:
    """Hidden activations of the adapter saved in ``directory``, loaded into ``model`` (a base
    model without adapters, left unchanged: a copy is used): ``{module prefix: (T, m)}``, one
    row per real token of ``batches`` (``attention_mask`` 0 rows are left out when the batch
    has one and the activations are per token). ``forward(model, batch)`` runs one batch
    (default ``model(**batch)``)."""
    from adapterkit import load_adapters
    from adapterkit.core.base import get_container

    work = copy.deepcopy(model)
    load_adapters(work, directory)
    work.eval()
    for adapter_set in get_container(work).sets.values():
        if hasattr(adapter_set, "fused"):
            adapter_set.fused = "off"  # the module path (down -> act -> up modules) runs, so the hooks see it
    tensors = read_adapter_dir(directory).tensors
    groups = _set_prefixes(tensors)
    store: dict[str, list[torch.Tensor]] = {p: [] for p in groups}
    current: dict[str, torch.Tensor | None] = {"mask": None}
    handles = []

    def hook_for(prefix: str):
        def hook(module, args):
            z = args[0].detach().float()
            mask = current["mask"]
            if mask is not None and z.dim() >= 3 and tuple(z.shape[:2]) == tuple(mask.shape):
                z = z[mask]
            store[prefix].append(z.reshape(-1, z.shape[-1]))
        return hook

    for prefix, (_, up) in groups.items():
        try:
            mod = work.get_submodule(f"{prefix}.{up}")
        except AttributeError as e:
            raise ConfigError(f"{directory}: the model has no adapter module {prefix}.{up} after loading") from e
        handles.append(mod.register_forward_pre_hook(hook_for(prefix)))
    n_batches = 0
    try:
        for batch in batches:
            current["mask"] = _batch_mask(batch)
            forward(work, batch) if forward is not None else work(**batch)
            n_batches += 1
    finally:
        for h in handles:
            h.remove()
    if n_batches == 0:
        raise ConfigError("activation alignment needs at least one batch of shared inputs")
    out = {}
    for prefix, rows in store.items():
        if not rows:
            raise ConfigError(f"{prefix} was never run on the alignment batches (is it on the forward path?)")
        out[prefix] = torch.cat(rows)
    return out


def activation_permutations(model: nn.Module, in_dirs: list[str | os.PathLike],
                            batches: Iterable[Mapping[str, torch.Tensor]], reference: int = 0,
                            criterion: str = "correlation",
                            forward: Callable[[nn.Module, Mapping], object] | None = None
                            ) -> list[dict[str, torch.Tensor]]:
    """Per adapter, ``{module prefix: perm}`` such that :func:`~adapterkit.merging.align.permute_hidden`
    with ``perm`` puts its hidden units in the order of the reference adapter's units (the
    reference gets the identity). ``batches`` is iterated once per adapter (pass a list)."""
    if not 0 <= reference < len(in_dirs):
        raise ConfigError(f"reference must index one of the {len(in_dirs)} adapters, got {reference}")
    batches = list(batches)
    acts = [collect_hidden_activations(model, d, batches, forward) for d in in_dirs]
    ref = acts[reference]
    perms = []
    for i, a in enumerate(acts):
        if set(a) != set(ref):
            raise ConfigError(f"{in_dirs[i]} has adapter modules {sorted(set(a) ^ set(ref))[:1]} the reference "
                              "lacks (or the other way round): only adapters of the same layout can be aligned")
        out = {}
        for prefix, z in a.items():
            if i == reference:
                out[prefix] = torch.arange(z.shape[1])
            else:
                out[prefix] = _assignment(unit_similarity(ref[prefix], z, criterion))
        perms.append(out)
    return perms


def merge_by_activations(model: nn.Module, in_dirs: list[str | os.PathLike], out_dir: str | os.PathLike,
                         batches: Iterable[Mapping[str, torch.Tensor]], weights: list[float] | None = None,
                         *, reference: int = 0, criterion: str = "correlation",
                         forward: Callable[[nn.Module, Mapping], object] | None = None) -> Path:
    """MerA-style merge: align every adapter's hidden units to the reference's by their
    activations on ``batches`` (see the module docstring), then write the weighted average
    (weights default to 1/N) as an ordinary adapter directory."""
    if len(in_dirs) < 2:
        raise ConfigError(f"merging needs at least two adapter directories, got {len(in_dirs)}")
    dirs = [read_adapter_dir(p) for p in in_dirs]
    n = len(dirs)
    weights = [1.0 / n] * n if weights is None else [float(w) for w in weights]
    if len(weights) != n or not all(math.isfinite(w) for w in weights):
        raise ConfigError(f"need {n} finite weights, got {weights}")
    _check_same_sets(dirs)
    _check_same_tensors(dirs)
    perms = activation_permutations(model, in_dirs, batches, reference, criterion, forward)
    per = []
    for d, p in zip(dirs, perms):
        t = dict(d.tensors)
        for prefix, perm in p.items():
            t = permute_hidden(t, prefix, perm)
        per.append(t)
    tensors = {k: _weighted_sum([p[k] for p in per], weights, k) for k in dirs[0].tensors}
    extra = {"merged_from": [str(d.path) for d in dirs], "merge_method": "activations", "weights": weights,
             "reference": reference, "criterion": criterion}
    first = dirs[0]
    return write_adapter_dir(out_dir, {k: dict(v) for k, v in first.adapters.items()}, tensors,
                             base_trainable=first.config.get("base_trainable"),
                             base_model=first.config.get("base_model"), extra=extra)


def mera_few_shot(model: nn.Module, source_dirs: list[str | os.PathLike], merged_dir: str | os.PathLike,
                  align_batches: Iterable[Mapping[str, torch.Tensor]],
                  train_batches: Iterable[Mapping[str, torch.Tensor]], *, method: str = "activations",
                  epochs: int = 1, lr: float = 1e-3, weight_decay: float = 0.0,
                  loss_fn: Callable[[nn.Module, Mapping], torch.Tensor] | None = None,
                  train_base: Iterable[str] = (), reference: int = 0, criterion: str = "correlation",
                  ) -> tuple[nn.Module, list[float]]:
    """MerA: merge the adapters trained on source tasks into ``merged_dir``, load it into
    ``model`` (a base model without adapters) and tune it on the few target ``train_batches``.

    ``method``: ``activations`` (default; aligned on ``align_batches``), or any method of
    :func:`~adapterkit.merging.merge_adapter_dirs` (``average``, ``aligned`` by weights...).
    ``loss_fn(model, batch)`` gives the loss (default ``model(**batch).loss``). The adapter
    parameters and the base parameters the freeze policy saved with the adapters are trained;
    ``train_base`` names further base parameters (substrings, e.g. a new target head
    ``"classifier"``) to train. Returns the tuned model and the loss of every step."""
    from adapterkit import load_adapters
    from adapterkit.merging.merge import merge_adapter_dirs

    if epochs < 1 or not lr > 0:
        raise ConfigError(f"few-shot tuning needs epochs >= 1 and lr > 0, got epochs {epochs}, lr {lr}")
    if method == "activations":
        merge_by_activations(model, source_dirs, merged_dir, align_batches, reference=reference, criterion=criterion)
    else:
        merge_adapter_dirs(source_dirs, merged_dir, method, reference=reference)
    load_adapters(model, merged_dir)
    extra = list(train_base)
    for name, p in model.named_parameters():
        if extra and any(s in name for s in extra):
            p.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("nothing to train after loading the merged adapter")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    train_batches = list(train_batches)
    if not train_batches:
        raise ConfigError("few-shot tuning needs at least one target batch")
    losses = []
    model.train()
    for _ in range(epochs):
        for batch in train_batches:
            loss = loss_fn(model, batch) if loss_fn is not None else model(**batch).loss
            if loss is None:
                raise ConfigError("the model returned no loss: pass labels in the batches or a loss_fn")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    model.eval()
    return model, losses


__all__ = ["CRITERIA", "activation_permutations", "collect_hidden_activations", "merge_by_activations",
           "mera_few_shot", "unit_similarity"]
