"""Crash-safe training checkpoints.

A checkpoint is a directory ``OUTPUT/checkpoints/step-000123/`` built with
:func:`adapterkit.safeio.atomic_dir`, holding:

* ``adapter_model.safetensors`` - the trainable (adapter) weights;
* ``optimizer.json`` + ``optimizer.safetensors`` - the optimizer state: tensors in
  safetensors, the rest of the structure (param_groups, int keys, tuples) in JSON;
* ``scheduler.json``, ``rng.json`` (+ ``rng.safetensors``), ``trainer.json`` - same
  encoding for the LR scheduler, the RNG states and the trainer's own bookkeeping;
* ``manifest.json`` - format version, step and the sha256 + size of every file.

Nothing is pickled, so loading a checkpoint never executes code. Resuming scans
checkpoints newest first and skips (with a warning) any whose files fail the
manifest check, e.g. a truncated or bit-flipped file; a checkpoint that an interrupted
replace left under its ``.step-N.old-*`` name is moved back first. What a checkpoint
holds is checked against the model before anything is copied in (:func:`check_tensors`,
:func:`check_optimizer_state`), and the run config it was written with against the
current one (:func:`config_differences`).
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import shutil
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adapterkit.errors import CheckpointError, ConfigError, did_you_mean, warn
from adapterkit.safeio import (
    atomic_dir,
    atomic_write_json,
    load_safetensors_checked,
    recover_dir,
    remove_stale_temps,
    save_safetensors_atomic,
    sha256_file,
    write_probe,
)

__all__ = [
    "ABSENT",
    "ADAPTER_FILE",
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "CheckpointManager",
    "capture_rng_state",
    "check_optimizer_state",
    "check_tensors",
    "config_differences",
    "decode_tree",
    "encode_tree",
    "optimizer_state_to_tensors",
    "restore_rng_state",
    "tensors_to_optimizer_state",
]

logger = logging.getLogger(__name__)

FORMAT_NAME = "adapterkit-checkpoint"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
ADAPTER_FILE = "adapter_model.safetensors"
CHECKPOINTS_SUBDIR = "checkpoints"
STATE_KEYS = ("adapter", "optimizer", "scheduler", "rng", "trainer", "extra")
_TREE_COMPONENTS = ("optimizer", "scheduler", "rng", "trainer", "extra")
_STEP_DIR = re.compile(r"^step-(\d+)$")
_OLD_STEP_DIR = re.compile(r"^\.(step-\d+)\.old-")
_MARKERS = ("__tensor__", "__ndarray__", "__tuple__", "__dict__", "__float__")
# numpy dtypes that torch cannot hold as-is are widened (uint16/uint32) or bit-cast (uint64)
_NP_WIDEN = {np.dtype(np.uint16), np.dtype(np.uint32)}


# ----------------------------------------------------------------------------- tree codec


def encode_tree(obj: Any, tensors: dict[str, torch.Tensor], where: str = "") -> Any:
    """Encode a nested structure into strict JSON, moving tensors/arrays into ``tensors``.

    Supports None, bool, int, float (incl. NaN/inf), str, list, tuple, dict (any
    JSON-encodable keys, e.g. the int keys of an optimizer state), torch tensors,
    numpy arrays and numpy scalars. Anything else raises :class:`CheckpointError`.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        if math.isfinite(obj):
            return float(obj)
        return {"__float__": "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")}
    if isinstance(obj, np.generic) and not isinstance(obj, np.ndarray):
        return encode_tree(obj.item(), tensors, where)
    if isinstance(obj, torch.Tensor):
        return {"__tensor__": _add_tensor(tensors, where, obj)}
    if isinstance(obj, np.ndarray):
        dtype = obj.dtype
        arr = np.ascontiguousarray(obj)
        if dtype in _NP_WIDEN:
            arr = arr.astype(np.int64)
        elif dtype == np.dtype(np.uint64):
            arr = arr.view(np.int64)
        try:
            t = torch.from_numpy(arr.copy())
        except TypeError as exc:
            raise CheckpointError(f"value at {where or '<root>'} is a numpy array of unsupported dtype {dtype}") from exc
        return {"__ndarray__": _add_tensor(tensors, where, t), "dtype": dtype.str}
    if isinstance(obj, list):
        return [encode_tree(v, tensors, f"{where}/{i}") for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_tree(v, tensors, f"{where}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode_tree(v, tensors, f"{where}/{k}") for k, v in obj.items()}
        return {
            "__dict__": [
                [encode_tree(k, tensors, f"{where}/<key {i}>"), encode_tree(v, tensors, f"{where}/{k}")]
                for i, (k, v) in enumerate(obj.items())
            ]
        }
    raise CheckpointError(
        f"value at {where or '<root>'} has type {type(obj).__name__}, which a checkpoint cannot store "
        "(use tensors, numbers, strings, lists, tuples and dicts)"
    )


def _add_tensor(tensors: dict[str, torch.Tensor], where: str, t: torch.Tensor) -> str:
    key = where.strip("/") or "root"
    if key in tensors:
        n = 1
        while f"{key}#{n}" in tensors:
            n += 1
        key = f"{key}#{n}"
    tensors[key] = t.detach()
    return key


def decode_tree(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`encode_tree`."""
    if isinstance(obj, list):
        return [decode_tree(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if any(k in _MARKERS for k in obj):
        if "__tensor__" in obj:
            return _get_tensor(tensors, obj["__tensor__"])
        if "__ndarray__" in obj:
            dtype = np.dtype(obj["dtype"])
            arr = _get_tensor(tensors, obj["__ndarray__"]).numpy()
            if dtype == np.dtype(np.uint64):
                return arr.view(np.uint64).copy()
            return arr.astype(dtype, copy=True)
        if "__tuple__" in obj:
            return tuple(decode_tree(v, tensors) for v in obj["__tuple__"])
        if "__dict__" in obj:
            return {_hashable(decode_tree(k, tensors)): decode_tree(v, tensors) for k, v in obj["__dict__"]}
        if "__float__" in obj:
            return float(obj["__float__"])
    return {k: decode_tree(v, tensors) for k, v in obj.items()}


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, list) else key


def _get_tensor(tensors: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    try:
        return tensors[key]
    except KeyError:
        raise CheckpointError(f"checkpoint structure refers to tensor {key!r}, which is missing") from None


def optimizer_state_to_tensors(sd: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into (tensors for safetensors, JSON-able structure)."""
    if not isinstance(sd, Mapping) or "state" not in sd or "param_groups" not in sd:
        raise CheckpointError("optimizer state must be optimizer.state_dict() (with 'state' and 'param_groups')")
    tensors: dict[str, torch.Tensor] = {}
    structure = encode_tree(dict(sd), tensors, "")
    return tensors, structure


def tensors_to_optimizer_state(tensors: Mapping[str, torch.Tensor], structure: Mapping[str, Any]) -> dict[str, Any]:
    """Rebuild the exact ``optimizer.state_dict()`` that :func:`optimizer_state_to_tensors` split."""
    sd = decode_tree(structure, tensors)
    if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
        raise CheckpointError("stored optimizer state is malformed: 'state' or 'param_groups' is missing")
    return sd


# ----------------------------------------------------------------------------- RNG


def capture_rng_state() -> dict[str, Any]:
    """Snapshot python ``random``, numpy global, torch CPU and (if present) CUDA RNGs."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
    return state


def _tupleize(x: Any) -> Any:
    return tuple(_tupleize(v) for v in x) if isinstance(x, (list, tuple)) else x


def restore_rng_state(rng: Mapping[str, Any]) -> None:
    """Restore RNG states captured by :func:`capture_rng_state` (possibly via a checkpoint)."""
    try:
        if rng.get("python") is not None:
            random.setstate(_tupleize(rng["python"]))
        if rng.get("numpy") is not None:
            np_state = rng["numpy"]
            if isinstance(np_state, dict):
                np.random.set_state(np_state)
            else:
                np.random.set_state(tuple(np_state))
        if rng.get("torch") is not None:
            torch.set_rng_state(torch.as_tensor(rng["torch"], dtype=torch.uint8).cpu())
    except (TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"stored RNG state is malformed and cannot be restored ({exc})") from exc
    cuda = rng.get("cuda")
    if cuda:
        if not torch.cuda.is_available():
            warnings.warn("checkpoint holds CUDA RNG states but CUDA is not available; skipping them", stacklevel=2)
            return
        n = torch.cuda.device_count()
        if n != len(cuda):
            warnings.warn(
                f"checkpoint holds CUDA RNG states for {len(cuda)} devices but {n} are visible; "
                "restoring the first min(both)",
                stacklevel=2,
            )
        for i, s in enumerate(cuda[:n]):
            torch.cuda.set_rng_state(torch.as_tensor(s, dtype=torch.uint8).cpu(), device=i)


# ----------------------------------------------------------------------------- checks

#: how :func:`config_differences` shows a key that one side does not have
ABSENT = "<absent>"
_MAX_LISTED = 6


def _shape(t: torch.Tensor) -> str:
    return str(list(t.shape))


def _listing(items: list[str]) -> str:
    more = len(items) - _MAX_LISTED
    return "; ".join(items[:_MAX_LISTED]) + (f"; and {more} more" if more > 0 else "")


def check_tensors(loaded: Mapping[str, Any], expected: Mapping[str, torch.Tensor], where: str) -> None:
    """Refuse ``loaded`` unless it has exactly the keys of ``expected``, each a tensor of the
    same shape and dtype (``Tensor.copy_`` would broadcast a ``[1]`` and cast an integer
    tensor silently). One :class:`CheckpointError` names every mismatch (the first few)."""
    problems = [f"missing {k}" for k in sorted(set(expected) - set(loaded))]
    problems += [f"unexpected {k}" for k in sorted(set(loaded) - set(expected))]
    for k in sorted(set(loaded) & set(expected)):
        got, want = loaded[k], expected[k]
        if not isinstance(got, torch.Tensor):
            problems.append(f"{k}: a {type(got).__name__}, not a tensor")
        elif got.shape != want.shape:
            problems.append(f"{k}: shape {_shape(got)}, the model has {_shape(want)}")
        elif got.dtype != want.dtype:
            problems.append(f"{k}: dtype {got.dtype}, the model has {want.dtype}")
    if problems:
        raise CheckpointError(f"{where} does not match this model: {_listing(problems)}")


def check_optimizer_state(sd: Mapping[str, Any], optimizer: torch.optim.Optimizer, where: str,
                          names: Mapping[torch.Tensor, str] | None = None) -> None:
    """Refuse an ``optimizer.state_dict()`` that does not fit ``optimizer``: other parameter
    groups or counts, state for parameters it does not have, or a per-parameter tensor
    (``exp_avg``...) whose shape or dtype is not its parameter's. ``step`` must be a
    single non-negative number. (``Optimizer.load_state_dict`` checks only group sizes and
    casts the rest.)"""
    where = f"{where}: the optimizer state"
    groups, state = sd.get("param_groups"), sd.get("state")
    if not isinstance(groups, list) or not isinstance(state, Mapping):
        raise CheckpointError(f"{where} is malformed ('param_groups' or 'state' is missing)")
    if len(groups) != len(optimizer.param_groups):
        raise CheckpointError(f"{where} has {len(groups)} parameter groups, the model has "
                              f"{len(optimizer.param_groups)}")
    params: dict[Any, torch.Tensor] = {}
    for i, (g, mine) in enumerate(zip(groups, optimizer.param_groups)):
        ids = g.get("params") if isinstance(g, Mapping) else None
        if not isinstance(ids, list):
            raise CheckpointError(f"{where}: parameter group {i} is malformed")
        if len(ids) != len(mine["params"]):
            raise CheckpointError(f"{where}: parameter group {i} has {len(ids)} parameters, the model has "
                                  f"{len(mine['params'])} (another adapter config?)")
        params.update(zip(ids, mine["params"]))
    names = names or {}
    problems = []
    for pid, entry in state.items():
        p = params.get(pid)
        if p is None:
            problems.append(f"state for parameter id {pid!r}, which no group lists")
            continue
        label = names.get(p, f"parameter {pid}")
        if not isinstance(entry, Mapping):
            problems.append(f"{label}: state is a {type(entry).__name__}")
            continue
        for k, v in entry.items():
            if k == "step":
                n = v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v
                if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n) or n < 0:
                    problems.append(f"{label} step: {v!r} is not a single non-negative number")
            elif not isinstance(v, torch.Tensor):
                problems.append(f"{label} {k}: a {type(v).__name__}, not a tensor")
            elif v.shape != p.shape:
                problems.append(f"{label} {k}: shape {_shape(v)}, the parameter has {_shape(p)}")
            elif v.dtype != p.dtype:
                problems.append(f"{label} {k}: dtype {v.dtype}, the parameter has {p.dtype}")
    if problems:
        raise CheckpointError(f"{where} does not match this model: {_listing(problems)}")


def _flatten(obj: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(obj, (list, tuple)) and obj and all(isinstance(v, Mapping) for v in obj):
        out[f"{prefix}#len"] = len(obj)
        for i, v in enumerate(obj):
            _flatten(v, f"{prefix}[{i}]", out)
    else:
        out[prefix] = [*obj] if isinstance(obj, tuple) else obj


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


def config_differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted keys (``train.lr``, ``adapters[0].r``) whose values differ between two nested
    configs, as ``key: (stored, current)``; a key one side lacks shows as :data:`ABSENT`.
    Tuples equal lists and ints equal floats of the same value (what a JSON round trip gives)."""
    a: dict[str, Any] = {}
    b: dict[str, Any] = {}
    _flatten(stored, "", a)
    _flatten(current, "", b)
    out = {}
    for k in list(a) + [k for k in b if k not in a]:
        va, vb = a.get(k, ABSENT), b.get(k, ABSENT)
        if k.endswith("#len"):
            if va != vb:
                out[k[: -len("#len")]] = (f"{va} entries", f"{vb} entries")
            continue
        if not _same(va, vb):
            out[k] = (va, vb)
    return out


# ----------------------------------------------------------------------------- manager


class CheckpointManager:
    """Save, verify, find and load training checkpoints under ``output_dir/checkpoints``.

    ``keep_last``: how many checkpoints to keep (older ones are deleted only after a
    new one is safely in place); ``None`` keeps all. ``min_free_bytes``: fail early
    (at construction) when the disk has less space than this.
    """

    def __init__(
        self,
        output_dir: str | Path,
        keep_last: int | None = 3,
        *,
        probe: bool = True,
        min_free_bytes: int | None = None,
    ) -> None:
        if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
            raise ConfigError(f"keep_last must be a positive integer or None, got {keep_last!r}")
        self.output_dir = Path(output_dir)
        self.root = self.output_dir / CHECKPOINTS_SUBDIR
        self.keep_last = keep_last
        if probe:
            write_probe(self.root, min_free_bytes=min_free_bytes)

    # -- naming ---------------------------------------------------------------------------

    def path_for(self, step: int) -> Path:
        """Directory a checkpoint for ``step`` is (or would be) stored in."""
        return self.root / f"step-{int(step):06d}"

    def list_checkpoints(self) -> list[tuple[int, Path]]:
        """All ``step-N`` directories (verified or not), sorted by step ascending."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), p))
        return sorted(found)

    # -- save -----------------------------------------------------------------------------

    def save(self, step: int, state: Mapping[str, Any]) -> Path:
        """Write a checkpoint for ``step`` atomically and prune old ones; returns its path.

        ``state`` keys: ``adapter`` (dict name -> tensor, required), ``optimizer``
        (``optimizer.state_dict()``), ``scheduler`` (state dict or None), ``rng``
        (:func:`capture_rng_state`), ``trainer`` (JSON-able dict), ``extra`` (any tree).
        """
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise CheckpointError(f"checkpoint step must be a non-negative integer, got {step!r}")
        step = int(step)
        if not isinstance(state, Mapping):
            raise CheckpointError(f"checkpoint state must be a dict, got {type(state).__name__}")
        for key in state:
            if key not in STATE_KEYS:
                raise CheckpointError(
                    f"unknown checkpoint state key {key!r}{did_you_mean(key, STATE_KEYS)}; "
                    f"expected some of {', '.join(STATE_KEYS)}"
                )
        adapter = state.get("adapter")
        if not isinstance(adapter, Mapping) or not adapter:
            raise CheckpointError("checkpoint state needs 'adapter': a non-empty dict of name -> tensor")

        remove_stale_temps(self.root)
        final = self.path_for(step)
        components: dict[str, Any] = {}
        with atomic_dir(final) as tmp:
            save_safetensors_atomic(
                adapter, tmp / ADAPTER_FILE, metadata={"format": FORMAT_NAME, "step": str(step)}
            )
            components["adapter"] = {"tensors": ADAPTER_FILE}
            for name in _TREE_COMPONENTS:
                if name not in state:
                    continue
                value = state[name]
                if value is None:
                    components[name] = None
                    continue
                tensors: dict[str, torch.Tensor] = {}
                if name == "optimizer":
                    tensors, tree = optimizer_state_to_tensors(value)
                else:
                    tree = encode_tree(value, tensors, "")
                entry: dict[str, Any] = {"structure": f"{name}.json", "tensors": None}
                atomic_write_json(
                    tmp / f"{name}.json", {"component": name, "format_version": FORMAT_VERSION, "tree": tree}
                )
                if tensors:
                    save_safetensors_atomic(tensors, tmp / f"{name}.safetensors")
                    entry["tensors"] = f"{name}.safetensors"
                components[name] = entry
            files = {
                p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                for p in sorted(tmp.iterdir())
                if p.is_file()
            }
            atomic_write_json(
                tmp / MANIFEST_FILE,
                {
                    "format": FORMAT_NAME,
                    "format_version": FORMAT_VERSION,
                    "step": step,
                    "created_unix": time.time(),
                    "components": components,
                    "files": files,
                },
            )
        self._prune(keep=final)
        return final

    def _prune(self, keep: Path) -> None:
        if self.keep_last is None:
            return
        ckpts = [p for _, p in self.list_checkpoints()]
        excess = len(ckpts) - self.keep_last
        for p in ckpts:
            if excess <= 0:
                break
            if p == keep:
                continue
            shutil.rmtree(p, ignore_errors=True)
            excess -= 1

    # -- verify / find --------------------------------------------------------------------

    def verify(self, path: str | Path) -> dict[str, Any]:
        """Check a checkpoint directory against its manifest; returns the manifest.

        Raises :class:`CheckpointError` saying what is wrong (missing manifest, bad
        version, missing file, size or sha256 mismatch)."""
        path = Path(path)
        mpath = path / MANIFEST_FILE
        if not mpath.is_file():
            raise CheckpointError(f"checkpoint {path} has no {MANIFEST_FILE} (incomplete save?)")
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise CheckpointError(f"checkpoint {path}: {MANIFEST_FILE} is unreadable or corrupt ({exc})") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
            raise CheckpointError(f"checkpoint {path}: {MANIFEST_FILE} is not an adapterkit checkpoint manifest")
        version = manifest.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
            raise CheckpointError(
                f"checkpoint {path} has format_version {version!r}; this adapterkit reads up to {FORMAT_VERSION}"
            )
        step = manifest.get("step")
        m = _STEP_DIR.match(path.name)
        if not isinstance(step, int) or (m is not None and int(m.group(1)) != step):
            raise CheckpointError(f"checkpoint {path}: manifest step {step!r} does not match the directory name")
        files = manifest.get("files")
        if not isinstance(files, dict) or ADAPTER_FILE not in files:
            raise CheckpointError(f"checkpoint {path}: manifest does not list {ADAPTER_FILE}")
        for name, info in files.items():
            if not isinstance(name, str) or Path(name).name != name or name.startswith("."):
                raise CheckpointError(f"checkpoint {path}: manifest lists an invalid file name {name!r}")
            fpath = path / name
            if not fpath.is_file():
                raise CheckpointError(f"checkpoint {path}: file {name} is missing")
            size = fpath.stat().st_size
            if not isinstance(info, dict) or size != info.get("bytes"):
                raise CheckpointError(
                    f"checkpoint {path}: file {name} is truncated or altered "
                    f"({size} bytes, manifest says {info.get('bytes') if isinstance(info, dict) else '?'})"
                )
            if sha256_file(fpath) != info.get("sha256"):
                raise CheckpointError(f"checkpoint {path}: file {name} is corrupt (sha256 mismatch)")
        return manifest

    def recover_interrupted(self) -> list[Path]:
        """Move back every checkpoint that an interrupted replace left under its
        ``.step-N.old-*`` name while ``step-N`` is missing (a kill between
        :func:`~adapterkit.safeio.atomic_dir`'s two renames); returns the restored paths.
        Call it only from the process that owns the run (it holds the run lock)."""
        if not self.root.is_dir():
            return []
        restored = []
        for p in sorted(self.root.iterdir()):
            m = _OLD_STEP_DIR.match(p.name)
            if m is None or not p.is_dir():
                continue
            final = self.root / m.group(1)
            try:
                if recover_dir(final):
                    restored.append(final)
                    logger.warning("restored checkpoint %s from %s (an interrupted save)", final, p.name)
            except OSError as exc:
                logger.warning("cannot restore checkpoint %s from %s: %s", final, p.name, exc)
        return restored

    def latest_valid(self) -> tuple[Path, int] | None:
        """Newest checkpoint that passes :meth:`verify`, as ``(path, step)``; invalid ones
        are skipped with a warning naming them and the reason. None if there is none."""
        for step, path in reversed(self.list_checkpoints()):
            try:
                self.verify(path)
            except CheckpointError as exc:
                warn(f"skipping checkpoint {path}: {exc}")  # once: a warning, not a log line as well
                continue
            return path, step
        return None

    # -- load -----------------------------------------------------------------------------

    def load(self, path: str | Path) -> dict[str, Any]:
        """Verify and load a checkpoint; returns the state dict in the shape given to :meth:`save`."""
        path = Path(path)
        manifest = self.verify(path)
        files = manifest["files"]
        components = manifest.get("components") or {}
        state: dict[str, Any] = {
            "adapter": load_safetensors_checked(path / ADAPTER_FILE)
        }
        for name in _TREE_COMPONENTS:
            if name not in components:
                continue
            entry = components[name]
            if entry is None:
                state[name] = None
                continue
            sname = entry.get("structure")
            if sname not in files:
                raise CheckpointError(f"checkpoint {path}: structure file for {name!r} is not in the manifest")
            try:
                doc = json.loads((path / sname).read_text(encoding="utf-8"))
                tree = doc["tree"]
            except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
                raise CheckpointError(f"checkpoint {path}: {sname} is unreadable or malformed ({exc})") from exc
            tensors: dict[str, torch.Tensor] = {}
            tname = entry.get("tensors")
            if tname:
                if tname not in files:
                    raise CheckpointError(f"checkpoint {path}: tensor file for {name!r} is not in the manifest")
                tensors = load_safetensors_checked(path / tname)
            try:
                if name == "optimizer":
                    state[name] = tensors_to_optimizer_state(tensors, tree)
                else:
                    state[name] = decode_tree(tree, tensors)
            except (TypeError, ValueError, KeyError, IndexError, AttributeError, RecursionError) as exc:
                raise CheckpointError(f"checkpoint {path}: {sname} holds a malformed structure ({exc!r})") from None
        return state

    def load_latest(self, *, recover: bool = True) -> tuple[dict[str, Any], int] | None:
        """Load the newest valid checkpoint: ``(state, step)``, or None when there is none.
        ``recover`` first moves back checkpoints an interrupted replace left aside
        (:meth:`recover_interrupted`)."""
        if recover:
            self.recover_interrupted()
        found = self.latest_valid()
        if found is None:
            return None
        path, step = found
        return self.load(path), step

    @staticmethod
    def restore_rng_state(rng: Mapping[str, Any]) -> None:
        """Restore RNG states from a loaded checkpoint's ``state["rng"]``."""
        restore_rng_state(rng)
