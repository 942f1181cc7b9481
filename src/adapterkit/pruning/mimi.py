"""MiMi (IemProg/MiMi, WACV'24): iterative structured pruning of bottleneck adapters.

Score of hidden unit ``i`` of adapter ``j`` (``few_shot_prune.py::
structured_magnitude_pruning_layer``, ``scaling=1``)::

    s_ij = (||W_down[i, :]||_1 + ||W_up[:, i]||_1) / (d_in + d_out)

With ``normalize=True`` (the function's ``weighted=1``) the scores are divided by each
adapter's maximum; the default ``normalize=False`` is ``weighted=0``, what the
reference's command line (``--weighted 0``, its default) and every released run script
use. One global threshold, the k-th largest score with ``k = floor(N * (1 - a_t))``
(``N`` the hidden units before pruning; schedule ``a_1 = rho``,
``a_t = a_{t-1} + (1 - a_{t-1}) * rho``), keeps every unit scoring at least the
threshold (ties kept, as ``torch.ge``), none when k = 0. An adapter may lose all its
units, as in the reference: it is then removed (width 0: no hidden units and no up
bias, so it adds exactly nothing). ``min_keep`` > 0 forces each adapter to keep its
best units instead. Units are removed structurally: the adapter becomes a smaller
ordinary bottleneck (the ``pruned_bottleneck`` method records the width of each
place), not a masked one. With per-task copies the L1 norms are summed over the copies
(a unit is removed from every copy at once). Between rounds a user-supplied
``train_fn(model, round)`` retrains (build a fresh optimizer in it: the pruned modules
are new tensors).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from adapterkit.core.base import get_container
from adapterkit.errors import ConfigError
from adapterkit.merging.adapter_dir import SET_PREFIX, read_adapter_dir, write_adapter_dir
from adapterkit.methods.bottleneck import Bottleneck, BottleneckSet
from adapterkit.methods.pruned_bottleneck import PrunedBottleneckConfig, resize_hidden

BOTTLENECK_METHODS = ("houlsby", "pfeiffer", "parallel", "pruned_bottleneck")


def schedule(amount: float, rounds: int) -> list[float]:
    """Cumulative pruned fractions a_1..a_rounds: a_1 = rho, a_t = a_{t-1} + (1 - a_{t-1}) rho."""
    if not 0.0 <= amount < 1.0:
        raise ConfigError(f"pruning amount must be in [0, 1), got {amount}")
    if rounds < 1:
        raise ConfigError(f"rounds must be >= 1, got {rounds}")
    out, a = [], 0.0
    for _ in range(rounds):
        a = a + (1.0 - a) * amount
        out.append(a)
    return out


def unit_scores(down: torch.Tensor, up: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """MiMi scores of the hidden units of one adapter (divided by their maximum with ``normalize``).

    ``down`` is (n, m, d_in) and ``up`` (n, d_out, m) (stacked per-task copies, n >= 1).
    """
    d_in, d_out = down.shape[-1], up.shape[-2]
    s = (down.detach().abs().sum(dim=(0, 2)) + up.detach().abs().sum(dim=(0, 1))) / (d_in + d_out)
    s = s.float()
    if not normalize or not s.numel():
        return s
    mx = s.max()
    return s / mx if mx > 0 else s


def select_units(scores: dict[str, torch.Tensor], keep_total: int, min_keep: int = 0) -> dict[str, torch.Tensor]:
    """Global selection as the reference: every unit scoring at least the ``keep_total``-th
    highest score over all adapters (ties kept; nothing when ``keep_total`` is 0).

    An adapter can lose every unit. With ``min_keep`` > 0 each adapter also keeps its
    ``min_keep`` best units. Returns sorted kept indices per adapter.
    """
    keys = list(scores)
    if not keys:
        return {}
    sizes = [scores[k].numel() for k in keys]
    flat = torch.cat([scores[k].reshape(-1) for k in keys])
    owner = torch.repeat_interleave(torch.arange(len(keys)), torch.tensor(sizes))
    offsets = torch.tensor([0] + sizes[:-1]).cumsum(0)
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    for j, k in enumerate(keys):  # forced units: each adapter's best min_keep
        m = min(min_keep, sizes[j])
        if m > 0:
            chosen[offsets[j] + torch.topk(scores[k].reshape(-1), m).indices] = True
    k = min(keep_total, flat.numel())
    if k > 0:
        threshold = torch.topk(flat, k).values[-1]
        chosen |= flat >= threshold
    out = {}
    for j, k in enumerate(keys):
        local = chosen[owner == j].nonzero().flatten()
        out[k] = local
    return out


def _bottleneck_sets(model: nn.Module, name: str | None) -> dict[str, BottleneckSet]:
    container = get_container(model)
    if container is None:
        raise ConfigError("the model has no adapters attached (call adapterkit.add_adapters first)")
    if name is not None:
        if name not in container.sets:
            raise ConfigError(f'no adapter named "{name}" is attached; attached: {list(container.sets)}')
        names = [name]
    else:
        names = [n for n, s in container.sets.items() if s.config.method in BOTTLENECK_METHODS]
    sets = {}
    for n in names:
        s = container.sets[n]
        if not isinstance(s, BottleneckSet) or s.config.method not in BOTTLENECK_METHODS:
            raise ConfigError(f'MiMi prunes bottleneck adapters ({", ".join(BOTTLENECK_METHODS)}); '
                              f'"{n}" is method "{s.config.method}"')
        if s.merged:
            raise ConfigError(f'adapter "{n}" is merged; unmerge it before pruning')
        sets[n] = s
    if not sets:
        raise ConfigError(f"the model has no bottleneck adapters to prune; attached: {list(container.sets)}")
    return sets


def pruned_config(cfg, widths: dict[str, int]) -> PrunedBottleneckConfig:
    """The ``pruned_bottleneck`` config of a bottleneck config with the given per-place widths."""
    d = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    base = d.pop("base_method", None) or cfg.method
    d.pop("widths", None)
    d["method"] = "pruned_bottleneck"
    new = PrunedBottleneckConfig(**d, base_method=base, widths=dict(widths))
    new.validate()
    return new


def prune_model(
    model: nn.Module,
    amount: float = 0.5,
    rounds: int = 2,
    train_fn: Callable[[nn.Module, int], None] | None = None,
    name: str | None = None,
    min_keep: int = 0,
    normalize: bool = False,
) -> list[dict]:
    """Prune the model's bottleneck adapters in place with MiMi; returns a per-round log.

    After each round ``train_fn(model, round_index)`` (if given) retrains. The pruned
    sets get a ``pruned_bottleneck`` config, so ``save_adapters`` / ``load_adapters``
    rebuild the smaller shapes.
    """
    sets = _bottleneck_sets(model, name)
    modules: dict[tuple[str, str], Bottleneck] = {(n, k): ad for n, s in sets.items() for k, ad in s.adapters.items()}
    n0 = sum(ad.down.out_features for ad in modules.values())
    log = []
    for t, a in enumerate(schedule(amount, rounds)):
        keep_total = int(math.floor(n0 * (1.0 - a)))
        scores = {key: unit_scores(ad.down.weight, ad.up.weight, normalize) for key, ad in modules.items()}
        keep = select_units(scores, keep_total, min_keep)
        with torch.no_grad():
            for key, ad in modules.items():
                resize_hidden(ad, keep[key])
        for s in sets.values():
            widths = {k: ad.down.out_features for k, ad in s.adapters.items()}
            s.config = pruned_config(s.config, widths)
        kept = sum(ad.down.out_features for ad in modules.values())
        log.append({"round": t + 1, "pruned_fraction": a, "target_units": keep_total, "units": kept,
                    "initial_units": n0})
        if train_fn is not None:
            train_fn(model, t)
    return log


def prune_adapter_dir(
    in_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    amount: float = 0.5,
    rounds: int = 1,
    min_keep: int = 0,
    normalize: bool = False,
) -> dict:
    """Prune a saved bottleneck adapter directory (no model, no retraining) and write a new one.

    Without retraining, several rounds only compound the schedule (scores do not
    change between rounds), so the result keeps ``floor(N * (1 - a_rounds))`` units.
    Returns a summary dict.
    """
    src = read_adapter_dir(in_dir)
    a = schedule(amount, rounds)[-1]
    places: dict[tuple[str, str], dict[str, str]] = {}
    for set_name, acfg in src.adapters.items():
        if acfg.get("method") not in BOTTLENECK_METHODS:
            continue
        for k in src.set_tensors(set_name):
            if k.startswith("adapters.") and k.endswith(".down.weight"):
                place = k[len("adapters."):-len(".down.weight")]
                if "." in place:
                    continue
                places[(set_name, place)] = {"prefix": f"{SET_PREFIX}{set_name}.adapters.{place}"}
    if not places:
        raise ConfigError(f"{in_dir} holds no bottleneck adapters to prune (methods: "
                          f"{sorted({c.get('method') for c in src.adapters.values()})})")
    t = src.tensors
    for info in places.values():
        p = info["prefix"]
        for part in ("down.weight", "up.weight"):
            if f"{p}.{part}" not in t:
                raise ConfigError(f"{in_dir}: adapter {p} has no {part}")
    n0 = sum(t[f"{v['prefix']}.down.weight"].shape[1] for v in places.values())
    keep_total = int(math.floor(n0 * (1.0 - a)))
    scores = {key: unit_scores(t[f"{v['prefix']}.down.weight"], t[f"{v['prefix']}.up.weight"], normalize)
              for key, v in places.items()}
    keep = select_units(scores, keep_total, min_keep)
    tensors = dict(t)
    widths: dict[str, dict[str, int]] = {}
    for key, v in places.items():
        p, idx = v["prefix"], keep[key]
        tensors[f"{p}.down.weight"] = t[f"{p}.down.weight"].index_select(1, idx)
        if f"{p}.down.bias" in t:
            tensors[f"{p}.down.bias"] = t[f"{p}.down.bias"].index_select(1, idx)
        tensors[f"{p}.up.weight"] = t[f"{p}.up.weight"].index_select(2, idx)
        if idx.numel() == 0:  # the adapter is removed: no up bias, no output LayerNorm (see resize_hidden)
            for part in ("up.bias", "ln_weight", "ln_bias"):
                tensors.pop(f"{p}.{part}", None)
        widths.setdefault(key[0], {})[key[1]] = int(idx.numel())
    adapters = dict(src.adapters)
    from adapterkit.core.config import config_from_dict

    for set_name, w in widths.items():
        cfg = config_from_dict(dict(src.adapters[set_name]))
        adapters[set_name] = pruned_config(cfg, w).to_dict()
    kept = sum(int(v.numel()) for v in keep.values())
    summary = {"initial_units": n0, "units": kept, "pruned_fraction": a, "amount": amount, "rounds": rounds,
               "widths": widths}
    write_adapter_dir(out_dir, adapters, tensors, base_trainable=src.config.get("base_trainable"),
                      base_model=src.config.get("base_model"),
                      extra={"pruned_from": str(Path(in_dir)), "mimi": {k: v for k, v in summary.items()
                                                                         if k != "widths"}})
    return summary


__all__ = ["prune_adapter_dir", "prune_model", "pruned_config", "schedule", "select_units", "unit_scores"]
