"""Sparse fine-tuning differences (composable SFTs): storage, apply, remove, compose.

A :class:`SparseDiff` holds, per base parameter, the flat indices and values of
``phi = theta - theta_0`` at its non-zero entries, plus optional dense tensors
(task heads) that are stored whole. On disk: ``sft_config.json`` (shapes, counts,
checksum) + ``sft_weights.safetensors`` (``<param>::indices`` int32/int64,
``<param>::values``, ``<param>::dense``), written atomically.

- :func:`apply_sft` adds ``phi`` in place (dense tensors replace the parameter) and
  records the overwritten values, so :func:`remove_sft` restores the base bit for bit
  when the entries still hold what apply wrote; otherwise (e.g. applied in another
  process) it subtracts ``phi``.
- :func:`compose` sums differences (union of indices; values added where they
  overlap); differences on disjoint entries compose exactly.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from adapterkit.errors import CheckpointError, ConfigError
from adapterkit.safeio import (
    atomic_dir,
    atomic_write_json,
    load_safetensors_checked,
    save_safetensors_atomic,
    sha256_file,
)

SFT_CONFIG = "sft_config.json"
SFT_WEIGHTS = "sft_weights.safetensors"
SFT_FORMAT = "adapterkit-sft"
SFT_VERSION = 1
_LOG_ATTR = "_adapterkit_sft_applied"


@dataclass
class SparseDiff:
    """Sparse parameter differences ``{name: (flat indices, values)}`` plus dense tensors."""

    indices: dict[str, torch.Tensor] = field(default_factory=dict)
    values: dict[str, torch.Tensor] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    dense: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    uid: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __post_init__(self) -> None:
        for name in self.indices:
            idx, val = self.indices[name], self.values.get(name)
            if val is None or idx.shape != val.shape or idx.dim() != 1:
                raise ConfigError(f"sparse diff for {name!r}: indices and values must be 1-D and of equal length")
            if name not in self.shapes:
                raise ConfigError(f"sparse diff for {name!r} has no shape")

    # ------------------------------------------------------------------ building
    @classmethod
    def from_states(
        cls,
        base: Mapping[str, torch.Tensor],
        tuned: Mapping[str, torch.Tensor],
        k: int | None = None,
        *,
        names: Iterable[str] | None = None,
        threshold: float = 1e-7,
        dense: Iterable[str] = (),
        meta: dict | None = None,
    ) -> SparseDiff:
        """The difference ``tuned - base`` over ``names`` (default: every shared key).

        With ``k``, only the ``k`` entries of largest ``|tuned - base|`` (globally) are
        kept; entries with ``|diff| <= threshold`` are always dropped. ``dense`` names
        tensors stored whole (the tuned values).
        """
        dense = list(dense)
        names = [n for n in (names if names is not None else base) if n not in dense]
        for n in names:
            if n not in tuned:
                raise ConfigError(f"tuned state has no parameter {n!r}")
            if tuned[n].shape != base[n].shape:
                raise ConfigError(f"shape mismatch for {n!r}: base {tuple(base[n].shape)}, tuned {tuple(tuned[n].shape)}")
        deltas = {n: (tuned[n].detach() - base[n].detach().to(tuned[n].dtype)).reshape(-1) for n in names
                  if base[n].is_floating_point()}
        keep: dict[str, torch.Tensor] = {}
        if k is not None:
            if k < 0:
                raise ConfigError(f"k must be >= 0, got {k}")
            keep = top_k_masks({n: d.abs() for n, d in deltas.items()}, k)
        out = cls(meta=dict(meta or {}))
        for n, d in deltas.items():
            m = d.abs() > threshold
            if k is not None:
                m &= keep[n]
            idx = m.nonzero().flatten()
            if idx.numel():
                out.indices[n] = idx
                out.values[n] = d[idx].clone()
                out.shapes[n] = tuple(base[n].shape)
        for n in dense:
            if n not in tuned:
                raise ConfigError(f"tuned state has no dense parameter {n!r}")
            out.dense[n] = tuned[n].detach().clone()
            out.shapes[n] = tuple(tuned[n].shape)
        return out

    # ------------------------------------------------------------------ info
    @property
    def nnz(self) -> int:
        """Number of stored sparse entries."""
        return sum(int(i.numel()) for i in self.indices.values())

    def __repr__(self) -> str:
        return f"SparseDiff(params={len(self.indices)}, nnz={self.nnz}, dense={sorted(self.dense)})"

    def scaled(self, factor: float) -> SparseDiff:
        """A copy with every sparse value multiplied by ``factor`` (dense tensors unchanged)."""
        return SparseDiff({n: i.clone() for n, i in self.indices.items()},
                          {n: v * factor for n, v in self.values.items()}, dict(self.shapes),
                          {n: t.clone() for n, t in self.dense.items()}, dict(self.meta))

    def sparse_only(self) -> SparseDiff:
        """A copy without the dense tensors (heads): the reference's ``apply(with_abs=False)``,
        used to compose a language SFT, whose MLM head a task model lacks, with a task SFT."""
        return SparseDiff({n: i.clone() for n, i in self.indices.items()},
                          {n: v.clone() for n, v in self.values.items()},
                          {n: s for n, s in self.shapes.items() if n in self.indices}, {}, dict(self.meta))

    def to_dense(self, name: str) -> torch.Tensor:
        """The full difference tensor of parameter ``name``."""
        if name not in self.indices:
            raise ConfigError(f"the diff has no sparse entries for {name!r}")
        out = torch.zeros(self.shapes[name], dtype=self.values[name].dtype).reshape(-1)
        out[self.indices[name]] = self.values[name]
        return out.reshape(self.shapes[name])

    # ------------------------------------------------------------------ disk
    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``sft_config.json`` + ``sft_weights.safetensors`` atomically."""
        directory = Path(directory)
        tensors = {}
        for n, idx in self.indices.items():
            numel = 1
            for s in self.shapes[n]:
                numel *= int(s)
            tensors[f"{n}::indices"] = idx.to(torch.int32 if numel < 2**31 else torch.int64)
            tensors[f"{n}::values"] = self.values[n]
        for n, t in self.dense.items():
            tensors[f"{n}::dense"] = t
        with atomic_dir(directory) as tmp:
            w = save_safetensors_atomic(tensors, tmp / SFT_WEIGHTS, metadata={"format": SFT_FORMAT})
            atomic_write_json(tmp / SFT_CONFIG, {
                "format": SFT_FORMAT, "format_version": SFT_VERSION,
                "shapes": {n: list(s) for n, s in self.shapes.items()},
                "sparse": sorted(self.indices), "dense": sorted(self.dense), "nnz": self.nnz,
                "weights_sha256": sha256_file(w), "meta": self.meta,
            })
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> SparseDiff:
        """Read a diff written by :meth:`save`, checking checksum, shapes and index ranges."""
        import json

        directory = Path(directory)
        cpath = directory / SFT_CONFIG
        if not cpath.exists():
            raise CheckpointError(f"no {SFT_CONFIG} in {directory}: not an adapterkit sparse fine-tuning directory")
        try:
            cfg = json.loads(cpath.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{cpath} is not valid JSON: {e}") from None
        if not isinstance(cfg, dict) or cfg.get("format") != SFT_FORMAT:
            raise CheckpointError(f"{cpath} is not an adapterkit sparse fine-tuning config")
        if cfg.get("format_version", 0) > SFT_VERSION:
            raise CheckpointError(f"{cpath} was written by a newer adapterkit (format {cfg['format_version']})")
        t = load_safetensors_checked(directory / SFT_WEIGHTS, expected_sha256=cfg.get("weights_sha256"))
        shapes = {n: tuple(int(x) for x in s) for n, s in cfg.get("shapes", {}).items()}
        out = cls(shapes=shapes, meta=cfg.get("meta") or {})
        for n in cfg.get("sparse", []):
            try:
                idx, val = t[f"{n}::indices"].long(), t[f"{n}::values"]
            except KeyError as e:
                raise CheckpointError(f"{directory / SFT_WEIGHTS} is missing {e.args[0]!r}") from None
            numel = 1
            for s in shapes.get(n, ()):
                numel *= s
            if n not in shapes or idx.shape != val.shape or (idx.numel() and (idx.min() < 0 or idx.max() >= numel)):
                raise CheckpointError(f"{directory / SFT_WEIGHTS}: entries of {n!r} do not fit its shape {shapes.get(n)}")
            out.indices[n], out.values[n] = idx, val
        for n in cfg.get("dense", []):
            if f"{n}::dense" not in t:
                raise CheckpointError(f"{directory / SFT_WEIGHTS} is missing '{n}::dense'")
            out.dense[n] = t[f"{n}::dense"]
        if out.nnz != cfg.get("nnz", out.nnz):
            raise CheckpointError(f"{cpath} records {cfg['nnz']} entries but the weights hold {out.nnz}")
        return out


def top_k_masks(scores: Mapping[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Boolean masks selecting the ``k`` largest entries of all ``scores`` together (flat)."""
    names = list(scores)
    if not names:
        return {}
    flat = torch.cat([scores[n].reshape(-1).float() for n in names])
    k = min(k, flat.numel())
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    if k:
        chosen[torch.topk(flat, k, sorted=False).indices] = True
    out, start = {}, 0
    for n in names:
        size = scores[n].numel()
        out[n] = chosen[start:start + size].reshape(scores[n].shape)
        start += size
    return out


def compose(diffs: Iterable[SparseDiff], scales: Iterable[float] | None = None) -> SparseDiff:
    """Sum several differences (e.g. language SFT + task SFT).

    Indices are united and values added where they overlap; dense tensors are united
    (the same dense name in two diffs must hold the same value).
    """
    diffs = list(diffs)
    scales = [1.0] * len(diffs) if scales is None else [float(s) for s in scales]
    if len(scales) != len(diffs):
        raise ConfigError(f"got {len(scales)} scales for {len(diffs)} diffs")
    out = SparseDiff(meta={"composed_of": [d.meta for d in diffs]})
    names = []
    for d in diffs:
        names += [n for n in d.indices if n not in names]
    for n in names:
        shapes = {d.shapes[n] for d in diffs if n in d.indices}
        if len(shapes) > 1:
            raise ConfigError(f"cannot compose: parameter {n!r} has different shapes {sorted(shapes)}")
        parts = [(d.indices[n], d.values[n] if s == 1.0 else d.values[n] * s)
                 for d, s in zip(diffs, scales) if n in d.indices]
        if len(parts) == 1:
            idx, val = parts[0][0].clone(), parts[0][1].clone()
        else:
            idx_all = torch.cat([p[0] for p in parts])
            val_all = torch.cat([p[1] for p in parts])
            idx, inv = torch.unique(idx_all, return_inverse=True)
            val = torch.zeros(idx.numel(), dtype=val_all.dtype).index_add_(0, inv, val_all)
        out.indices[n], out.values[n], out.shapes[n] = idx, val, shapes.pop()
    for d in diffs:
        for n, t in d.dense.items():
            if n in out.dense and not torch.equal(out.dense[n], t):
                raise ConfigError(f"cannot compose: two diffs hold different dense values for {n!r}")
            out.dense[n] = t
            out.shapes[n] = tuple(t.shape)
    return out


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters()) | dict(model.named_buffers())


def _flat(p: torch.Tensor, name: str) -> torch.Tensor:
    if not p.is_contiguous():
        raise ConfigError(f"parameter {name!r} is not contiguous; cannot patch it in place")
    return p.data.view(-1)


def _check(diff: SparseDiff, params: dict[str, torch.Tensor]) -> None:
    for n in list(diff.indices) + list(diff.dense):
        if n not in params:
            raise ConfigError(f"the model has no parameter {n!r} that the sparse diff patches")
        if tuple(params[n].shape) != tuple(diff.shapes[n]):
            raise ConfigError(f"shape mismatch for {n!r}: diff {tuple(diff.shapes[n])}, model {tuple(params[n].shape)}")


@torch.no_grad()
def apply_sft(model: nn.Module, diff: SparseDiff, scale: float = 1.0) -> nn.Module:
    """Add ``scale * phi`` to the model's parameters in place; dense tensors replace theirs."""
    params = _params(model)
    _check(diff, params)
    record = {"uid": diff.uid, "scale": scale, "backup": {}, "after": {}, "dense_backup": {}, "dense_after": {}}
    for n, idx in diff.indices.items():
        flat = _flat(params[n], n)
        idx = idx.to(flat.device)
        before = flat[idx].clone()
        val = diff.values[n].to(device=flat.device, dtype=flat.dtype)
        flat[idx] = before + (val if scale == 1.0 else val * scale)
        record["backup"][n] = before
        record["after"][n] = flat[idx].clone()
    for n, t in diff.dense.items():
        p = params[n]
        record["dense_backup"][n] = p.data.clone()
        p.data.copy_(t.to(device=p.device, dtype=p.dtype))
        record["dense_after"][n] = p.data.clone()
    model.__dict__.setdefault(_LOG_ATTR, []).append(record)
    return model


@torch.no_grad()
def remove_sft(model: nn.Module, diff: SparseDiff, scale: float = 1.0) -> nn.Module:
    """Undo :func:`apply_sft`: restore the recorded base values bit for bit where the
    patched entries are unchanged since apply; otherwise subtract ``scale * phi``."""
    params = _params(model)
    _check(diff, params)
    log = model.__dict__.get(_LOG_ATTR, [])
    rec = next((r for r in reversed(log) if r["uid"] == diff.uid), None)
    for n, idx in diff.indices.items():
        flat = _flat(params[n], n)
        idx = idx.to(flat.device)
        if rec is not None and torch.equal(flat[idx], rec["after"][n]):
            flat[idx] = rec["backup"][n]
        else:
            s = rec["scale"] if rec is not None else scale
            val = diff.values[n].to(device=flat.device, dtype=flat.dtype)
            flat[idx] -= val if s == 1.0 else val * s
    for n in diff.dense:
        p = params[n]
        if rec is None or n not in rec["dense_backup"]:
            raise ConfigError(f"cannot remove dense tensor {n!r}: it was not applied to this model by apply_sft "
                              "(the base value is unknown)")
        if not torch.equal(p.data, rec["dense_after"][n]):
            raise ConfigError(f"cannot remove dense tensor {n!r}: it changed after apply_sft")
        p.data.copy_(rec["dense_backup"][n])
    if rec is not None:
        log.remove(rec)
    return model


__all__ = ["SFT_CONFIG", "SFT_WEIGHTS", "SparseDiff", "apply_sft", "compose", "remove_sft", "top_k_masks"]
