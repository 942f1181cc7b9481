"""Pieces shared by the vision, audio and rec pipelines: config sections with defaults,
the learning rate, train mode for a frozen backbone, result writing (the training itself is
:func:`adapterkit.vision.domain.train_classifier`, on the engine)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from adapterkit.core.base import get_container
from adapterkit.errors import ConfigError, did_you_mean
from adapterkit.safeio import atomic_write_json, save_safetensors_atomic

# ----------------------------------------------------------------------------- config


def section(user: dict | None, defaults: dict, where: str) -> dict:
    """``defaults`` updated with ``user``; unknown keys and wrong value types raise ConfigError."""
    if user is None:
        user = {}
    if not isinstance(user, dict):
        raise ConfigError(f'"{where}" must be a mapping, got {type(user).__name__}')
    out = dict(defaults)
    for k, v in user.items():
        if k not in defaults:
            raise ConfigError(f'unknown key "{where}.{k}"{did_you_mean(k, defaults)}; allowed: {sorted(defaults)}')
        d = defaults[k]
        if d is not None and v is not None:
            ok = (isinstance(v, bool) == isinstance(d, bool)) and (
                isinstance(v, type(d)) or (isinstance(d, float) and isinstance(v, int) and not isinstance(v, bool))
            )
            if not ok:
                raise ConfigError(f'"{where}.{k}" must be a {type(d).__name__}, got {v!r}')
            if isinstance(d, float):
                v = float(v)
        out[k] = v
    return out


def top_level(cfg: dict, allowed: tuple[str, ...], where: str) -> None:
    if not isinstance(cfg, dict):
        raise ConfigError(f"the {where} config must be a mapping, got {type(cfg).__name__}")
    for k in cfg:
        if k not in allowed:
            raise ConfigError(f'unknown key "{k}" in the {where} config{did_you_mean(k, allowed)}; allowed: {list(allowed)}')


def method_name(cfg: dict, default: str) -> str:
    """The config's ``method`` (a string), or ``default``."""
    method = cfg.get("method", default)
    if not isinstance(method, str):
        raise ConfigError(f'"method" must be a string, got {method!r}')
    return method


def hf_config(config_cls, options: dict | None, where: str):
    """``config_cls(**options)``; an unknown option is one ConfigError naming ``where``."""
    try:
        return config_cls(**(options or {}))
    except TypeError as e:
        raise ConfigError(f'"{where}" has an invalid {config_cls.__name__} option: {e}') from None


def load_pretrained(loader, name_or_path: str, what: str, error=ConfigError):
    """``loader.from_pretrained(name_or_path)``; a missing/unreadable model is one ``error`` naming it."""
    try:
        return loader.from_pretrained(name_or_path)
    except OSError as e:
        raise error(f'cannot load {what} "{name_or_path}": {e}') from None


def load_yaml(path: str | os.PathLike) -> dict:
    """A config file through the library's safe YAML reader (``safeio.loads_yaml``: duplicate
    keys, deep nesting and alias bombs refused; ``1e-3`` read as a number)."""
    from adapterkit.safeio import loads_yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e.strerror or e}") from None
    data = loads_yaml(raw, what=f"config file {p}", error=ConfigError)
    if not isinstance(data, dict):
        raise ConfigError(f"{p} must hold a mapping at the top level")
    return data


# ----------------------------------------------------------------------------- training

TRAIN_DEFAULTS: dict[str, Any] = {
    "epochs": 10,
    "batch_size": 64,
    "optimizer": "sgd",          # sgd (AdaptFormer/MAE) or adamw (PETL-AST)
    "blr": 0.1,                  # sgd: lr = blr * batch_size / 256
    "lr": None,                  # explicit lr (overrides blr)
    "momentum": 0.9,
    "betas": [0.9, 0.999],
    "weight_decay": 0.0,
    "warmup_epochs": 1.0,
    "min_lr": 0.0,
    "grad_clip": None,
    "eval_batch_size": 256,
    "seed": 0,
    "label_smoothing": 0.0,
    "eval_each_epoch": True,     # with val_fraction: validate after every epoch (False: after the last)
    "val_fraction": 0.0,         # hold out this fraction of the training set; the best epoch on it is tested
    "schedule": "cosine",        # after the warm-up: cosine to min_lr (MAE), linear, or constant
    "checkpoint_every": 100,     # steps between checkpoints (and at every epoch's end) in output_dir
    "adam_eps": 1e-8,
}


def learning_rate(t: dict) -> float:
    if t["lr"] is not None:
        return float(t["lr"])
    return float(t["blr"]) * t["batch_size"] / 256.0


def set_train_mode(model: nn.Module, backbone: nn.Module, full: bool) -> None:
    """Train mode for what trains; a frozen backbone stays in eval mode (BatchNorm statistics and
    dropout of the pretrained network untouched) while its adapters run in train mode."""
    model.train()
    if not full:
        backbone.eval()
        c = get_container(backbone)
        if c is not None:
            c.train()


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    if len(y) == 0:
        return float("nan")
    return float((logits.argmax(-1) == y).float().mean().item() * 100.0)


# ----------------------------------------------------------------------------- outputs


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters plus every tensor of the attached adapter sets (e.g. BN statistics)."""
    out = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    for n, b in model.state_dict().items():
        if ".adapterkit." in f".{n}" and n not in out:
            out[n] = b.detach().contiguous()
    return out


def write_outputs(output_dir: str | None, model: nn.Module, results: dict, config: dict, weights: bool = True) -> None:
    """``results.json`` (config, results, versions) in ``output_dir``, and with ``weights`` the
    trainable tensors in ``trainable.safetensors`` (a pipeline run on the engine has them in
    ``final/`` and ``best/`` already: weights=False)."""
    from adapterkit.engine.distributed import is_main

    if not output_dir or not is_main():  # rank 0 of a multi-process run writes
        return
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if weights:
        save_safetensors_atomic(trainable_state(model), out / "trainable.safetensors", metadata={"format": "adapterkit"})
    atomic_write_json(out / "results.json", {"config": config, "results": _jsonable(results),
                                             "versions": {"torch": torch.__version__}})


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def add_train_command(subparsers, name: str, help: str, train_help: str = "train and evaluate from a YAML config"):
    """``adapterkit NAME train CONFIG [--output-dir DIR]`` (shared by the vision, audio and rec pipelines)."""
    p = subparsers.add_parser(name, help=help)
    sub = p.add_subparsers(dest=f"{name}_command", required=True)
    t = sub.add_parser("train", help=train_help)
    t.add_argument("config", help=f"YAML config file (see examples/configs/{name}_*.yaml)")
    t.add_argument("--output-dir", default=None, help="override output_dir")
    return p


def config_from_args(args) -> dict:
    """The YAML config named on the command line, with ``--output-dir`` applied."""
    cfg = load_yaml(args.config)
    if args.output_dir:
        cfg["output_dir"] = args.output_dir
    return cfg
