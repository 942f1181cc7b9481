"""Saving and loading adapters: ``adapter_config.json`` + ``adapter_model.safetensors``.

Only the trained weights are written: every adapter set's parameters plus the base
parameters its freeze policy unfroze (LayerNorms, biases, heads...). Stacked per-task
tensors mean a module shared by several tasks is stored once. Never pickle: loading
reads safetensors (legacy ``.bin``/``.pt`` only through ``torch.load(weights_only=True)``).
Each file is written atomically; the config records the weights file's SHA-256, so a
half-replaced pair or a corrupt weights file is detected on load, and a SHA-256 of its
own canonical content (``config_sha256``), so an edited or bit-flipped config (another
``alpha``, another ``r``) is refused before anything is built from it. Configs without
that field (older files) still load, with a log note.

Adapters saved from a wrapper around an HF model (the V&L model: ``VLModel.lm``) record the
wrapper's ``inner_model_prefix`` and the inner model's class (``base_model.inner``), so the
folder also loads into the plain HF model it was built on: the tensor and module paths lose
the prefix (``lm.model.encoder...`` -> ``model.encoder...``), task names and per-task routing
stay. What lives on the wrapper's own modules (the visual embedding, trained through
``trainable_modules``) is left out with a warning naming it; an adapter placed on such a
module cannot be loaded, and the error says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from torch import nn

from adapterkit.core.base import CONTAINER, NEW_HEAD_CLASSES, add_adapters, get_container
from adapterkit.core.config import check_name
from adapterkit.errors import CheckpointError, ConfigError, warn
from adapterkit.safeio import (
    atomic_write_json,
    load_weights,
    read_json_file,
    read_safetensors_index,
    save_safetensors_atomic,
    sha256_file,
)

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_NAMES = ("adapter_model.bin", "adapter_model.pt", "pytorch_model.bin")
#: the same weights under the name transformers.Trainer reloads (core/hf.py); never read by load_adapters
TRAINER_WEIGHTS_NAME = "model.safetensors"
FORMAT = "adapterkit"
FORMAT_VERSION = 1
CHECKSUM_FIELD = "config_sha256"
MAX_CONFIG_BYTES = 64 << 20
#: a wrapper model's attribute naming the submodule that is the HF model it wraps (``"lm"``)
INNER_PREFIX_ATTR = "inner_model_prefix"
#: wrappers whose files predate ``base_model.inner``: class name -> inner prefix
_LEGACY_INNER = {"VLModel": "lm"}
_PREFIX_RX = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")


def config_checksum(cfg: dict) -> str:
    """SHA-256 of a config's canonical JSON (sorted keys, no whitespace), without its own
    ``config_sha256`` field."""
    body = {k: v for k, v in cfg.items() if k != CHECKSUM_FIELD}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors ``save_adapters`` writes, keyed by their model parameter names."""
    container = get_container(model)
    if container is None:
        raise ConfigError("the model has no adapters attached (call adapterkit.add_adapters first)")
    keep = set(container.base_trainable)
    out = {}
    for n, p in model.named_parameters():
        if n.startswith("adapterkit.") or n in keep:
            out[n] = p.detach()
    for n, b in model.named_buffers():  # e.g. BatchNorm statistics inside adapters
        if n.startswith("adapterkit.") and n not in out:
            out[n] = b.detach()
    return out


def save_adapters(model: nn.Module, directory: str | os.PathLike, extra: dict | None = None,
                  state_dict: dict | None = None, trainer_copy: bool = False) -> Path:
    """Write the adapters of ``model`` to ``directory`` (created if needed).

    ``state_dict``: take the tensors from it (by model parameter name) rather than from the
    model, e.g. a state dict gathered from a sharded model; every adapter key must be in it.
    ``trainer_copy``: also make ``model.safetensors`` (a hard link to the weights file, a copy
    where links are not possible), the file ``transformers.Trainer`` reloads checkpoints from
    (see :mod:`adapterkit.core.hf`). A folder that has one already gets it refreshed anyway.
    """
    directory = Path(directory)
    container = get_container(model)
    if container is None:
        raise ConfigError("the model has no adapters attached (call adapterkit.add_adapters first)")
    if any(s.merged for s in container.sets.values()):
        raise ConfigError("unmerge the adapters before saving (adapterkit.unmerge_adapters(model))")
    tensors = adapter_state_dict(model)
    if state_dict is not None:
        missing = [k for k in tensors if k not in state_dict]
        if missing:
            raise ConfigError(f"the state_dict given to save has no {missing[0]!r}, an adapter tensor of the model"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        tensors = {k: state_dict[k].detach() for k in tensors}
    write_adapter_files(directory, tensors, container.configs(), container.base_trainable,
                        _base_info(model), extra, trainer_copy=trainer_copy)
    return directory


def write_adapter_files(directory: Path, tensors: dict[str, torch.Tensor], adapters: dict[str, dict],
                        base_trainable, base_model: dict, extra: dict | None = None,
                        trainer_copy: bool = False) -> None:
    """The weights file, then the config that records its checksum, shapes and dtypes."""
    weights = save_safetensors_atomic(tensors, directory / WEIGHTS_NAME, metadata={"format": FORMAT})
    if trainer_copy or (directory / TRAINER_WEIGHTS_NAME).exists():
        _link_trainer_copy(weights, directory / TRAINER_WEIGHTS_NAME)
    cfg = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "adapters": adapters,
        "base_trainable": list(base_trainable),
        "base_model": base_model,
        "weights_sha256": sha256_file(weights),
        "shapes": {k: list(v.shape) for k, v in tensors.items()},
        "dtypes": {k: str(v.dtype).replace("torch.", "") for k, v in tensors.items()},
    }
    if extra:
        cfg["extra"] = extra
    try:
        cfg[CHECKSUM_FIELD] = config_checksum(cfg)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"cannot write {directory / CONFIG_NAME}: value is not JSON-serialisable ({e})") from None
    atomic_write_json(directory / CONFIG_NAME, cfg)


def _link_trainer_copy(weights: Path, dst: Path) -> None:
    """``dst`` = the same bytes as ``weights``: a hard link, or a copy; replaced atomically."""
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(weights, tmp)
    except OSError:
        shutil.copyfile(weights, tmp)
    os.replace(tmp, dst)


def _base_info(model: nn.Module) -> dict:
    cfg = getattr(model, "config", None)
    info = {"class": type(model).__name__, "model_type": getattr(cfg, "model_type", None)}
    name = getattr(cfg, "_name_or_path", None) or getattr(model, "name_or_path", None)
    if isinstance(name, str) and name:
        info["name_or_path"] = name
    if type(model).__name__.endswith(NEW_HEAD_CLASSES) and isinstance(getattr(cfg, "num_labels", None), int):
        info["num_labels"] = cfg.num_labels
    prefix = getattr(model, INNER_PREFIX_ATTR, None)
    if isinstance(prefix, str) and prefix:
        try:
            inner = model.get_submodule(prefix)
        except AttributeError:
            raise ConfigError(f"{type(model).__name__}.{INNER_PREFIX_ATTR} is {prefix!r}, which is not one of its "
                              "submodules") from None
        info["inner"] = {"prefix": prefix, **_base_info(inner)}
    return info


def _config_problem(cfg: dict) -> str | None:
    """What is structurally wrong with an adapterkit adapter config (None when nothing)."""
    for name, acfg in cfg["adapters"].items():
        try:
            check_name(name, "adapter name")
        except ConfigError as e:
            return str(e)
        if not isinstance(acfg, dict) or not isinstance(acfg.get("method"), str):
            return f'adapters["{name}"] must be an object with a "method" string'
    if not isinstance(cfg.get("format_version", 1), int) or isinstance(cfg.get("format_version"), bool):
        return '"format_version" must be an integer'
    bt = cfg.get("base_trainable", [])
    if not isinstance(bt, list) or not all(isinstance(n, str) for n in bt):
        return '"base_trainable" must be a list of parameter names'
    shapes = cfg.get("shapes", {})
    if not isinstance(shapes, dict) or not all(
            isinstance(v, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in v)
            for v in shapes.values()):
        return '"shapes" must map names to lists of non-negative integers'
    dtypes = cfg.get("dtypes", {})
    if not isinstance(dtypes, dict) or not all(isinstance(v, str) for v in dtypes.values()):
        return '"dtypes" must map names to dtype strings'
    for key in ("base_model", "extra"):
        if key in cfg and not isinstance(cfg[key], dict):
            return f'"{key}" must be an object'
    inner = cfg.get("base_model", {}).get("inner")
    if inner is not None and not (isinstance(inner, dict) and isinstance(inner.get("prefix"), str)
                                  and _PREFIX_RX.fullmatch(inner["prefix"])):
        return '"base_model.inner" must be an object whose "prefix" is a module path'
    for key in ("weights_sha256", CHECKSUM_FIELD):
        if key in cfg and not isinstance(cfg[key], str):
            return f'"{key}" must be a hex string'
    return None


def read_json_object(path: str | os.PathLike) -> dict:
    """A small JSON config file (ours or a peer's) as a dict: the safe reader's limits (size,
    depth, duplicate keys, UTF-8), one CheckpointError naming the file otherwise."""
    obj = read_json_file(path, error=CheckpointError, max_bytes=MAX_CONFIG_BYTES)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return obj


def read_adapter_config(directory: str | os.PathLike) -> dict:
    """Read and verify ``adapter_config.json``: valid JSON within the depth limit, the
    adapterkit format, a well-formed structure and (when recorded) its checksum."""
    path = Path(directory) / CONFIG_NAME
    if not path.exists():
        raise CheckpointError(f"no {CONFIG_NAME} in {directory}: not an adapterkit adapter directory")
    cfg = read_json_file(path, error=CheckpointError, max_bytes=MAX_CONFIG_BYTES)
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT or not isinstance(cfg.get("adapters"), dict):
        hint = " (it looks like an HF PEFT adapter: use adapterkit.import_peft)" if isinstance(cfg, dict) and "peft_type" in cfg else ""
        raise CheckpointError(f"{path} is not an adapterkit adapter config{hint}")
    version = cfg.get("format_version", 0)
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer adapterkit (format {cfg['format_version']})")
    problem = _config_problem(cfg)
    if problem:
        raise CheckpointError(f"{path} is malformed: {problem}")
    if CHECKSUM_FIELD in cfg:
        try:
            actual = config_checksum(cfg)
        except ValueError:  # NaN/Infinity cannot have been written by save_adapters
            actual = ""
        if actual != cfg[CHECKSUM_FIELD]:
            raise CheckpointError(f"{path} was edited or is corrupt: its content does not match the "
                                  f"{CHECKSUM_FIELD} recorded when it was saved")
    else:
        logger.info("%s has no %s (an older adapterkit file): loaded without verifying it", path, CHECKSUM_FIELD)
    return cfg


def _weights_file(directory: Path) -> Path:
    p = directory / WEIGHTS_NAME
    if p.exists():
        return p
    for name in LEGACY_NAMES:
        if (directory / name).exists():
            return directory / name
    raise CheckpointError(f"no {WEIGHTS_NAME} in {directory}")


def _inner_prefix(cfg: dict, model: nn.Module, directory: Path) -> str | None:
    """The wrapper prefix to drop when a folder saved from a wrapper model (``base_model.inner``)
    is loaded into a model that is not that wrapper (no submodule at the prefix); else None."""
    base = cfg.get("base_model") or {}
    inner = base.get("inner")
    if inner is None and base.get("class") in _LEGACY_INNER:  # written before base_model.inner
        prefix = _LEGACY_INNER[base["class"]]
        if not any(n.startswith(prefix + ".") for n in cfg.get("base_trainable", [])):
            return None
        inner = {"prefix": prefix, "model_type": base.get("model_type")}
        cfg["base_model"] = {**base, "inner": inner}
    if inner is None:
        return None
    prefix = inner["prefix"]
    try:
        model.get_submodule(prefix)
        return None  # the wrapper itself (or one with the same layout): the paths fit as saved
    except AttributeError:
        pass
    have = getattr(getattr(model, "config", None), "model_type", None)
    want = inner.get("model_type")
    if have and want and have != want:
        raise CheckpointError(f"{directory} holds adapters of a {base.get('class')} around a "
                              f"{inner.get('class') or want} (model_type {want!r}); {type(model).__name__} is a "
                              f"{have!r} model")
    return prefix


def _to_inner(cfg: dict, tensors: dict, prefix: str, model: nn.Module, directory: Path) -> tuple[dict, dict]:
    """(config, tensors) of a wrapper's folder, renamed for the inner model it wraps: base
    parameter names lose ``prefix.``, adapter place keys (module paths with ``__``) lose
    ``prefix__``. The wrapper's own trained modules are left out with one warning naming them;
    adapters the plain model cannot apply (conditioned on or injected by the wrapper) get one too."""
    dot, key = prefix + ".", prefix.replace(".", "__") + "__"

    def rename(n: str) -> str | None:
        if n.startswith(CONTAINER + "."):
            return ".".join(p[len(key):] if p.startswith(key) else p for p in n.split("."))
        return n[len(dot):] if n.startswith(dot) else None

    out, left = {}, []
    for n, t in tensors.items():
        m = rename(n)
        if m is None:
            left.append(n)
        else:
            out[m] = t
    cfg = dict(cfg)
    cfg["base_trainable"] = [m for m in (rename(n) for n in cfg.get("base_trainable", [])) if m is not None]
    adapters = {}
    for name, acfg in cfg["adapters"].items():
        acfg = dict(acfg)
        if isinstance(acfg.get("widths"), dict):  # pruned bottleneck: widths keyed by place key
            acfg["widths"] = {k[len(key):] if k.startswith(key) else k: v for k, v in acfg["widths"].items()}
        adapters[name] = acfg
    cfg["adapters"] = adapters
    wrapper, plain = cfg["base_model"].get("class"), type(model).__name__
    if left:
        modules = sorted({n.rpartition(".")[0] or n for n in left})
        shown = ", ".join(modules[:8]) + (f" and {len(modules) - 8} more" if len(modules) > 8 else "")
        warn(f"{directory}: {len(left)} trained tensor(s) of {wrapper}'s own modules outside {prefix!r} ({shown}) "
             f"are not loaded: {plain} has no such modules (e.g. the visual embedding of a V&L model); the "
             f"adapters inside {prefix!r} are loaded", stacklevel=3)
    for name, acfg in adapters.items():
        if acfg.get("method") == "prompt" and acfg.get("inject") == "manual":
            warn(f'{directory}: adapter "{name}" (prompt, inject: manual) was prepended to the input by {wrapper}; '
                 f"on {plain} nothing applies it: prepend model.adapterkit.sets[{name!r}].prompts(batch, task) to "
                 "inputs_embeds yourself", stacklevel=3)
        if acfg.get("visual_dim"):
            warn(f'{directory}: adapter "{name}" ({acfg["method"]}) is conditioned on pooled visual features, '
                 f"which {wrapper} supplied; on {plain} that part of its input is zero unless you call "
                 f"model.adapterkit.sets[{name!r}].set_visual(features)", stacklevel=3)
    return cfg, out


def load_adapters(model: nn.Module, directory: str | os.PathLike, strict_dtype: bool = True) -> nn.Module:
    """Load adapters saved by :func:`save_adapters` into ``model``.

    Adapter sets named in the config that the model lacks are attached first (the
    base model must be the same architecture). Every key, shape and dtype is checked;
    a mismatch raises one :class:`CheckpointError` naming the key.

    A folder saved from a wrapper (the V&L model) loads into the wrapper, or into the plain HF
    model it wraps: see the module docstring.
    """
    directory = Path(directory)
    cfg = read_adapter_config(directory)
    wfile = _weights_file(directory)
    if wfile.suffix == ".safetensors" and cfg.get("weights_sha256") and sha256_file(wfile) != cfg["weights_sha256"]:
        raise CheckpointError(f"{wfile} is corrupt or does not belong to {directory / CONFIG_NAME} (checksum mismatch)")
    if wfile.suffix == ".safetensors" and cfg.get("shapes"):
        # cheap (the header only): before anything is built from the config or loaded
        stored = {k: list(shape) for k, (shape, _) in read_safetensors_index(wfile).items()}
        said = cfg["shapes"]
        missing = sorted(k for k in said if k not in stored)
        if missing:
            raise CheckpointError(f"{wfile} is missing key {missing[0]!r}, which {CONFIG_NAME} lists"
                                  + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        for k, shape in stored.items():
            if k not in said:
                raise CheckpointError(f"{wfile} has key {k!r}, which {CONFIG_NAME} does not list")
            if shape != said[k]:
                raise CheckpointError(f"shape mismatch for {k!r}: {wfile.name} has {tuple(shape)}, "
                                      f"{CONFIG_NAME} says {tuple(said[k])}")
    tensors = load_weights(wfile)
    prefix = _inner_prefix(cfg, model, directory)
    note = ""
    if prefix is not None:  # saved from a wrapper, loaded into the HF model it wraps
        cfg, tensors = _to_inner(cfg, tensors, prefix, model, directory)
        inner = cfg["base_model"]["inner"]
        note = (f" (saved from a {cfg['base_model'].get('class')} around a "
                f"{inner.get('class') or inner.get('model_type') or 'model'}; paths read without its "
                f"{prefix + '.'!r} prefix)")
    container = get_container(model)
    for name, acfg in cfg["adapters"].items():
        if container is None or name not in container.sets:
            try:
                add_adapters(model, dict(acfg), name=name, train_head=False)  # the config says what is trained
            except ConfigError as e:
                raise CheckpointError(f"cannot rebuild adapter \"{name}\" from {directory / CONFIG_NAME}{note}: {e}") from None
            container = get_container(model)
        elif container.sets[name].config.to_dict() != acfg:
            diff = {k for k in acfg if container.sets[name].config.to_dict().get(k) != acfg[k]}
            raise CheckpointError(f'adapter "{name}" on the model differs from the saved config in {sorted(diff)}')
    for n in cfg.get("base_trainable", []):
        if n not in container.base_trainable:
            container.base_trainable.append(n)
    params = dict(model.named_parameters())
    params.update({n: b for n, b in model.named_buffers() if n.startswith("adapterkit.")})
    expected = adapter_state_dict(model)
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise CheckpointError(f"{wfile} is missing key {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                              + note)
    unexpected = [k for k in tensors if k not in params]
    if unexpected:
        if prefix is not None:
            raise CheckpointError(
                f"{wfile} has key {unexpected[0]!r}" + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
                + f", which {type(model).__name__} does not have{note}: the adapter sits on a module of the "
                f"wrapper outside {prefix!r}, which the plain model lacks; load this folder into the "
                f"{cfg['base_model'].get('class')} instead")
        raise CheckpointError(f"{wfile} has key {unexpected[0]!r}, which the model does not have")
    with torch.no_grad():
        for k, t in tensors.items():
            p = params[k]
            if tuple(t.shape) != tuple(p.shape):
                raise CheckpointError(f"shape mismatch for {k!r}: file has {tuple(t.shape)}, model has {tuple(p.shape)}")
            if t.dtype != p.dtype and (strict_dtype or not (t.is_floating_point() and p.is_floating_point())):
                raise CheckpointError(f"dtype mismatch for {k!r}: file has {t.dtype}, model has {p.dtype} "
                                      "(pass strict_dtype=False to cast floating types)")
            p.copy_(t)
            if k in container.base_trainable and p.is_floating_point():
                p.requires_grad_(True)
    from adapterkit.core import hf

    hf.sync_ignored_keys(model)
    return model
