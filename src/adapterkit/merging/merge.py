"""Merge several saved adapters into one ordinary adapter directory.

- ``average``: weighted mean of every tensor (weights default to 1/N).
- ``aligned`` (MerA-style, experimental): each adapter's hidden units are first
  permuted to match the reference adapter (Hungarian matching on down-projection
  rows + bias; see :mod:`adapterkit.merging.align`), then averaged.
- ``task_arithmetic`` / ``ties`` / ``dare``: LoRA adapters only; the updates
  ``scaling * B A`` are merged per layer (see :mod:`adapterkit.merging.lora_merge`)
  and re-factorised by SVD to ``rank`` (default: the largest input rank), or, for
  task arithmetic with ``refactor="cat"``, exactly by concatenating the ranks.
  Weights default to 1.0 each (task vectors are added).

Base-model tensors saved with the adapters (heads, LayerNorms unfrozen by the freeze
policy) are averaged with the weights normalised to sum to 1. The result is written
atomically and loads with :func:`adapterkit.load_adapters`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from adapterkit.errors import ConfigError
from adapterkit.merging.adapter_dir import SET_PREFIX, AdapterDir, read_adapter_dir, write_adapter_dir
from adapterkit.merging.align import align_to, hidden_groups
from adapterkit.merging.lora_merge import LORA_METHODS, combine, svd_factor

METHODS = ("average", "aligned") + LORA_METHODS


def _check_same_sets(dirs: list[AdapterDir]) -> None:
    ref = dirs[0]
    for d in dirs[1:]:
        if set(d.adapters) != set(ref.adapters):
            raise ConfigError(f"{d.path} has adapter sets {sorted(d.adapters)} but {ref.path} has "
                              f"{sorted(ref.adapters)}: only adapters of the same layout can be merged")
        for name, cfg in d.adapters.items():
            if cfg.get("method") != ref.adapters[name].get("method"):
                raise ConfigError(f'adapter set "{name}" is method "{cfg.get("method")}" in {d.path} '
                                  f'but "{ref.adapters[name].get("method")}" in {ref.path}')


def _check_same_tensors(dirs: list[AdapterDir], keys: set[str] | None = None) -> None:
    """Every directory has the same tensors (or at least ``keys``) with the same shapes."""
    ref = dirs[0]
    ref_keys = set(ref.tensors) if keys is None else set(keys)
    for d in dirs[1:]:
        missing = sorted(ref_keys - set(d.tensors))
        if missing:
            raise ConfigError(f"{d.path} lacks tensor {missing[0]!r} that {ref.path} has")
        if keys is None:
            extra = sorted(set(d.tensors) - ref_keys)
            if extra:
                raise ConfigError(f"{d.path} has tensor {extra[0]!r} that {ref.path} lacks")
        for k in sorted(ref_keys):
            if tuple(d.tensors[k].shape) != tuple(ref.tensors[k].shape):
                raise ConfigError(f"shape mismatch for {k!r}: {tuple(ref.tensors[k].shape)} in {ref.path}, "
                                  f"{tuple(d.tensors[k].shape)} in {d.path}")


def _weighted_sum(tensors: list[torch.Tensor], weights: list[float], key: str) -> torch.Tensor:
    ref = tensors[0]
    if not ref.is_floating_point():
        if any(not torch.equal(t, ref) for t in tensors[1:]):
            raise ConfigError(f"cannot merge non-floating tensor {key!r}: it differs between the adapters")
        return ref.clone()
    acc = torch.zeros(ref.shape, dtype=torch.float64)
    for t, w in zip(tensors, weights):
        acc += float(w) * t.double()
    return acc.to(ref.dtype)


def _lora_scaling(cfg: dict) -> float:
    r, alpha = cfg.get("r", 8), cfg.get("alpha", 16.0)
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def _merge_lora_set(name: str, dirs: list[AdapterDir], weights: list[float], method: str, *, density: float,
                    rank: int | None, refactor: str, dare_mode: str, generator: torch.Generator):
    """Merged tensors (keyed inside the set) and config of one LoRA set."""
    cfgs = [d.adapters[name] for d in dirs]
    per = [d.set_tensors(name) for d in dirs]
    groups = hidden_groups(per[0])
    for d, t in zip(dirs[1:], per[1:]):
        other = hidden_groups(t)
        for p in groups:
            if p not in other:
                raise ConfigError(f'{d.path}: LoRA set "{name}" has no layer {p} (targets differ)')
        for p in other:
            if p not in groups:
                raise ConfigError(f'{d.path}: LoRA set "{name}" has layer {p} that {dirs[0].path} lacks')
    leftovers = sorted(k for k in per[0] if not any(k.startswith(p + ".") for p in groups))
    if leftovers:
        raise ConfigError(f'LoRA set "{name}" holds tensor {leftovers[0]!r} that a LoRA merge cannot combine')
    scalings = [_lora_scaling(c) for c in cfgs]
    ranks = [int(c.get("r", 8)) for c in cfgs]
    out: dict[str, torch.Tensor] = {}
    new_cfg = dict(cfgs[0])
    if refactor == "cat":
        if method != "task_arithmetic":
            raise ConfigError(f'refactor="cat" is exact only for task_arithmetic; use refactor="svd" for {method}')
        for p in groups:
            As = [t[f"{p}.A.weight"] for t in per]
            Bs = [t[f"{p}.B.weight"] for t in per]
            if len({a.shape[0] for a in As}) != 1 or len({b.shape[0] for b in Bs}) != 1:
                raise ConfigError(f"{p}: the adapters have different numbers of task copies")
            out[f"{p}.A.weight"] = torch.cat([(a.double() * (w * s)).to(a.dtype)
                                              for a, w, s in zip(As, weights, scalings)], dim=1)
            out[f"{p}.B.weight"] = torch.cat(Bs, dim=2)
        new_r = sum(ranks)
        new_cfg.update(r=new_r, alpha=float(new_r), use_rslora=False)
        return out, new_cfg
    if refactor != "svd":
        raise ConfigError(f'refactor must be "svd" or "cat", got {refactor!r}')
    new_r = int(rank) if rank is not None else max(ranks)
    if new_r < 1:
        raise ConfigError(f"rank must be >= 1, got {rank}")
    n_copies = 1
    for p in groups:
        As = [t[f"{p}.A.weight"] for t in per]
        Bs = [t[f"{p}.B.weight"] for t in per]
        n_a, n_b = {a.shape[0] for a in As}, {b.shape[0] for b in Bs}
        if len(n_a) != 1 or len(n_b) != 1:
            raise ConfigError(f"{p}: the adapters have different numbers of task copies")
        n = max(n_a.pop(), n_b.pop())
        n_copies = max(n_copies, n)
        a_out, b_out = [], []
        for c in range(n):
            deltas = [(b[min(c, b.shape[0] - 1)].float() @ a[min(c, a.shape[0] - 1)].float()) * s
                      for a, b, s in zip(As, Bs, scalings)]
            merged = combine(deltas, weights, method, density, dare_mode, generator)
            b_c, a_c = svd_factor(merged, new_r)
            a_out.append(a_c.to(As[0].dtype))
            b_out.append(b_c.to(Bs[0].dtype))
        out[f"{p}.A.weight"] = torch.stack(a_out)
        out[f"{p}.B.weight"] = torch.stack(b_out)
    new_cfg.update(r=new_r, alpha=float(new_r), use_rslora=False)
    if n_copies > 1:
        new_cfg["sharing"] = "per_task"
    return out, new_cfg


def merge_adapter_dirs(
    in_dirs: list[str | os.PathLike],
    out_dir: str | os.PathLike,
    method: str = "average",
    weights: list[float] | None = None,
    *,
    reference: int = 0,
    match_on: str = "down",
    density: float = 0.5,
    rank: int | None = None,
    refactor: str = "svd",
    dare_mode: str = "linear",
    seed: int = 0,
) -> Path:
    """Merge the adapter directories ``in_dirs`` by ``method`` and write ``out_dir``.

    See the module docstring for the methods. ``reference`` is the index of the
    adapter the others are aligned to (``aligned``); ``density`` is the kept fraction
    for TIES / DARE; ``seed`` seeds DARE's random drop.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown merge method {method!r}; known: {list(METHODS)}")
    if len(in_dirs) < 2:
        raise ConfigError(f"merging needs at least two adapter directories, got {len(in_dirs)}")
    dirs = [read_adapter_dir(p) for p in in_dirs]
    n = len(dirs)
    if weights is None:
        weights = [1.0 / n] * n if method in ("average", "aligned") else [1.0] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise ConfigError(f"got {len(weights)} weights for {n} adapters")
    if not all(math.isfinite(w) for w in weights):
        raise ConfigError(f"weights must be finite numbers, got {weights}")
    if not 0 <= reference < n:
        raise ConfigError(f"reference must index one of the {n} adapters, got {reference}")
    _check_same_sets(dirs)
    first = dirs[0]
    adapters = {k: dict(v) for k, v in first.adapters.items()}
    tensors: dict[str, torch.Tensor] = {}
    wsum = sum(weights)
    norm_w = [w / wsum for w in weights] if wsum else weights

    if method in ("average", "aligned"):
        _check_same_tensors(dirs)
        per = [dict(d.tensors) for d in dirs]
        if method == "aligned":
            ref_set = {k: v for k, v in per[reference].items() if k.startswith(SET_PREFIX)}
            for i in range(n):
                if i != reference:
                    own = {k: v for k, v in per[i].items() if k.startswith(SET_PREFIX)}
                    per[i].update(align_to(ref_set, own, match_on))
        for k in first.tensors:
            tensors[k] = _weighted_sum([p[k] for p in per], weights, k)
    else:
        non_lora = [f'"{k}" ({v.get("method")})' for k, v in first.adapters.items() if v.get("method") != "lora"]
        if non_lora:
            raise ConfigError(f"{method} merges LoRA adapters only; {non_lora[0]} is not one "
                              "(use --method average or aligned)")
        base_keys = set(first.base_tensors())
        _check_same_tensors(dirs, keys=base_keys)
        gen = torch.Generator().manual_seed(int(seed))
        for name in first.adapters:
            merged, cfg = _merge_lora_set(name, dirs, weights, method, density=density, rank=rank,
                                          refactor=refactor, dare_mode=dare_mode, generator=gen)
            adapters[name] = cfg
            tensors.update({f"{SET_PREFIX}{name}.{k}": v for k, v in merged.items()})
        for k in base_keys:
            tensors[k] = _weighted_sum([d.tensors[k] for d in dirs], norm_w, k)

    extra = {"merged_from": [str(d.path) for d in dirs], "merge_method": method, "weights": weights}
    if method in LORA_METHODS:
        extra.update(density=density, refactor=refactor, rank=rank, dare_mode=dare_mode, seed=seed)
    if method == "aligned":
        extra.update(reference=reference, match_on=match_on)
    return write_adapter_dir(out_dir, adapters, tensors, base_trainable=first.config.get("base_trainable"),
                             base_model=first.config.get("base_model"), extra=extra)


__all__ = ["METHODS", "merge_adapter_dirs"]
