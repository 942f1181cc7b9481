"""Build a cache from features, search hyperparameters on validation, evaluate on test.

Python API: :func:`run_cache_adapter`. CLI (wired as ``adapterkit cache``)::

    adapterkit cache --method tip|tip-f|tipx|caps|dual --features STORE_DIR \\
        --labels LABELS.json [--text-weights W.npy] [--shots 16] --out results.json

The feature store is a directory with ``features.npy`` ((N, K, D), read as a memmap)
and ``index.json`` (``{"ids": [...], ...}``); features are mean-pooled over K and
L2-normalised. ``LABELS.json`` maps id -> {"label": int, "split": "train"|"val"|"test"}.

Without ``--text-weights`` the run is "image-only": the zero-shot CLIP classifier
is replaced by normalised class means of the few-shot training features
(a prototype classifier, NOT CLIP zero-shot), and the reported baseline is that
prototype classifier.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from adapterkit.cache.caps_adapter import caps_logits, search_caps
from adapterkit.cache.common import (
    accuracy,
    build_cache,
    class_prototypes,
    clip_logits,
    l2_normalize,
    normalize_text_weights,
)
from adapterkit.cache.dual_adapter import DualAdapter, search_dual_adapter, train_dual_adapter
from adapterkit.cache.tip_adapter import (
    TipAdapterF,
    search_tip_adapter,
    tip_adapter_logits,
    train_tip_adapter_f,
)
from adapterkit.cache.tipx import search_tipx, tipx_logits
from adapterkit.cli.argtypes import nonnegative_int, positive_int
from adapterkit.errors import ConfigError, DataError, did_you_mean
from adapterkit.safeio import atomic_write_json

__all__ = ["METHODS", "add_parser", "load_feature_store", "load_split_features", "run", "run_cache_adapter"]

METHODS = ("tip", "tip-f", "tipx", "caps", "dual")

_OPTIONS = {
    "num_classes": None,
    "grid": None,
    "caption_feats": None,
    "aug_feats": None,
    "cupl_weights": None,
    "negative_text_weights": None,
    "epochs": 20,
    "batch_size": 256,
    "temperature": 0.5,
    "signature": "classes",
    "rescale": "global",
    "device": "cpu",
}


def _tensor(x, name: str, device: str, ndim: int | None = None) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).to(device)
    if ndim is not None and t.ndim != ndim:
        raise DataError(f"{name} must have {ndim} dimensions; got shape {tuple(t.shape)}")
    return t


def run_cache_adapter(
    method: str,
    train_feats,
    train_labels,
    val_feats,
    val_labels,
    test_feats,
    test_labels,
    text_weights=None,
    shots: int | None = 16,
    seed: int = 0,
    **kw,
) -> dict:
    """Run one cache method end to end and return a JSON-ready result dict.

    Hyperparameters (and, for tip-f / dual, the training epoch) are chosen on the
    validation split only; the test split is used once, for the final accuracies.

    Extra keyword options: num_classes, grid (dict of name -> list or (start, stop,
    steps)), caption_feats (caps: (N_train, D) caption features aligned with
    train_feats; defaults to the image features, i.e. TIP-X), cupl_weights and
    negative_text_weights (dual), aug_feats ((V, N_train, D) or (N_train, D) features of
    augmented views aligned with train_feats: tip-f and dual train on the support
    examples' views, as the references train on augmented images; default: the
    support features themselves), epochs, batch_size, temperature, signature
    ("classes"|"features"), rescale ("row"|"global"), device.
    """
    if method not in METHODS:
        raise ConfigError(
            f"unknown cache method {method!r}; expected one of {METHODS}" + did_you_mean(method, METHODS)
        )
    unknown = [k for k in kw if k not in _OPTIONS]
    if unknown:
        raise ConfigError(
            f"unknown option {unknown[0]!r} for run_cache_adapter" + did_you_mean(unknown[0], _OPTIONS)
        )
    opt = {**_OPTIONS, **kw}
    dev = opt["device"]
    tr_x = l2_normalize(_tensor(train_feats, "train_feats", dev, 2).float())
    va_x = l2_normalize(_tensor(val_feats, "val_feats", dev, 2).float())
    te_x = l2_normalize(_tensor(test_feats, "test_feats", dev, 2).float())
    tr_y = _tensor(train_labels, "train_labels", dev, 1).long()
    va_y = _tensor(val_labels, "val_labels", dev, 1).long()
    te_y = _tensor(test_labels, "test_labels", dev, 1).long()
    for name, x, y in (("train", tr_x, tr_y), ("val", va_x, va_y), ("test", te_x, te_y)):
        if x.shape[0] != y.shape[0]:
            raise DataError(f"{name} split has {x.shape[0]} feature rows but {y.shape[0]} labels")
        if x.shape[0] == 0:
            raise DataError(f"{name} split is empty")
        if x.shape[1] != tr_x.shape[1]:
            raise DataError(f"{name} features have dim {x.shape[1]}; train features have {tr_x.shape[1]}")
    c = opt["num_classes"] or int(max(tr_y.max(), va_y.max(), te_y.max())) + 1
    d = tr_x.shape[1]

    if method == "dual" and not shots:
        raise ConfigError("method 'dual' needs a fixed number of shots per class (shots > 0)")
    w = (
        None
        if text_weights is None
        else normalize_text_weights(_tensor(text_weights, "text_weights", dev), d, c)
    )
    cache = build_cache(tr_x, tr_y, c, shots, seed)
    if w is not None:
        mode, baseline = "text", "zero-shot"
    else:
        w = class_prototypes(cache.keys, cache.labels, c)
        mode, baseline = "image-only", "prototype"

    result: dict = {
        "method": method,
        "mode": mode,
        "baseline": baseline,
        "num_classes": c,
        "shots": shots,
        "seed": seed,
        "cache_size": int(cache.keys.shape[0]),
        "baseline_val_acc": accuracy(clip_logits(va_x, w), va_y),
        "baseline_test_acc": accuracy(clip_logits(te_x, w), te_y),
    }
    fit_x, fit_y = cache.keys, cache.labels
    if opt["aug_feats"] is not None:
        aug = _tensor(opt["aug_feats"], "aug_feats", dev).float()
        aug = aug.unsqueeze(0) if aug.ndim == 2 else aug
        if aug.ndim != 3 or tuple(aug.shape[1:]) != tuple(tr_x.shape):
            raise DataError(
                f"aug_feats shape {tuple(aug.shape)} must be (V, {tr_x.shape[0]}, {d}) aligned with train_feats"
            )
        views = l2_normalize(aug[:, cache.index])  # (V, N_cache, D)
        fit_x = torch.cat([cache.keys, views.reshape(-1, d)])
        fit_y = torch.cat([cache.labels, cache.labels.repeat(views.shape[0])])
    grid = opt["grid"]
    sig = {"temperature": opt["temperature"], "signature": opt["signature"], "rescale": opt["rescale"]}
    keys, values = cache.keys, cache.values
    torch.manual_seed(seed)

    if method == "tip":
        params, val_acc = search_tip_adapter(va_x, va_y, w, keys, values, grid)
        test_logits = tip_adapter_logits(te_x, w, keys, values, params["alpha"], params["beta"])
    elif method == "tip-f":
        init, init_acc = search_tip_adapter(va_x, va_y, w, keys, values, grid)
        model = TipAdapterF(cache, w, init["alpha"], init["beta"])
        train = train_tip_adapter_f(
            model,
            fit_x,
            fit_y,
            va_x,
            va_y,
            epochs=opt["epochs"],
            batch_size=opt["batch_size"],
            seed=seed,
        )
        learned = model.keys.detach()
        params, val_acc = search_tip_adapter(va_x, va_y, w, learned, values, grid)
        with torch.no_grad():
            test_logits = model(te_x, params["alpha"], params["beta"])
        result["train"] = {**train, "init_params": init, "init_val_acc": init_acc}
    elif method == "tipx":
        params, val_acc = search_tipx(va_x, va_y, w, keys, values, grid, **sig)
        test_logits = tipx_logits(
            te_x, w, keys, values, params["alpha"], params["beta"], params["gamma"], **sig
        )
    elif method == "caps":
        if opt["caption_feats"] is None:
            cap_keys = keys
            grid = {"delta": [0.0], **(grid or {})}
            result["caption_keys"] = "image keys (no caption features given: CapS-Adapter reduces to TIP-X)"
        else:
            cap = _tensor(opt["caption_feats"], "caption_feats", dev, 2).float()
            if tuple(cap.shape) != tuple(tr_x.shape):
                raise DataError(
                    f"caption_feats shape {tuple(cap.shape)} must match train_feats {tuple(tr_x.shape)}"
                )
            cap_keys = l2_normalize(cap[cache.index])
            result["caption_keys"] = "given"
        params, val_acc = search_caps(va_x, va_y, w, keys, cap_keys, values, grid, **sig)
        test_logits = caps_logits(
            te_x,
            w,
            keys,
            cap_keys,
            values,
            params["alpha"],
            params["beta"],
            params["gamma"],
            params["delta"],
            **sig,
        )
    else:  # dual
        cupl = opt["cupl_weights"]
        neg = opt["negative_text_weights"]
        model = DualAdapter(
            cache,
            w,
            None if cupl is None else normalize_text_weights(_tensor(cupl, "cupl_weights", dev), d, c),
            None if neg is None else normalize_text_weights(_tensor(neg, "negative_text_weights", dev), d, c),
        )
        train = train_dual_adapter(
            model,
            fit_x,
            fit_y,
            va_x,
            va_y,
            epochs=opt["epochs"],
            batch_size=opt["batch_size"],
            seed=seed,
        )
        params, val_acc = search_dual_adapter(model, va_x, va_y, grid)
        with torch.no_grad():
            test_logits = model(te_x, params["alpha"], params["beta"], params["lam"])
        result["train"] = train

    result.update({"params": params, "val_acc": val_acc, "test_acc": accuracy(test_logits, te_y)})
    return result


# ----------------------------------------------------------------------------- feature store I/O


_STORE_SCHEMA = ("ids", "num_boxes", "dim", "dtype", "complete")


def _read_index(path: Path) -> dict:
    index_path = path / "index.json"
    if not index_path.is_file():
        raise DataError(f"feature store file not found: {index_path}")
    try:
        index = json.loads(index_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"feature store index {index_path} is not valid JSON: {e}") from e
    if not isinstance(index, dict) or not isinstance(index.get("ids"), list):
        raise DataError(f"feature store index {index_path} must be an object with an 'ids' list")
    return index


def _read_store_direct(path: Path, index: dict) -> np.ndarray:
    feat_path = path / "features.npy"
    if not feat_path.is_file():
        raise DataError(f"feature store file not found: {feat_path}")
    try:
        return np.load(feat_path, mmap_mode="r")
    except ValueError:  # raw memmap without an .npy header: shape/dtype come from the index
        if "shape" not in index:
            raise DataError(
                f"{feat_path} has no .npy header and {path / 'index.json'} gives no 'shape'"
            ) from None
        try:
            return np.memmap(
                feat_path, dtype=index.get("dtype", "float32"), mode="r", shape=tuple(index["shape"])
            )
        except (ValueError, TypeError, OSError) as e:
            raise DataError(f"cannot map {feat_path} with shape {index['shape']}: {e}") from None


def load_feature_store(path) -> tuple[list[str], np.ndarray]:
    """Return (ids, features array (N, K, D) or (N, D)) of a feature store directory.

    A store written by ``adapterkit.vl.features`` (its index.json carries ids,
    num_boxes, dim, dtype, complete) is opened through ``FeatureStore.open``, which
    validates it. A minimal store (``features.npy`` + an index with just ``ids``, and
    ``shape``/``dtype`` when features.npy is a raw memmap) is read directly.
    """
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"feature store directory not found: {path}")
    index = _read_index(path)
    store_cls = None
    if all(k in index for k in _STORE_SCHEMA):
        try:
            from adapterkit.vl.features import FeatureStore as store_cls
        except ImportError:
            store_cls = None
    if store_cls is not None:
        store = store_cls.open(path)
        ids, arr = [str(i) for i in store.ids], store.features
    else:
        ids, arr = [str(i) for i in index["ids"]], _read_store_direct(path, index)
    if len(ids) != arr.shape[0]:
        raise DataError(
            f"feature store {path}: index has {len(ids)} ids but features have {arr.shape[0]} rows"
        )
    if arr.ndim not in (2, 3):
        raise DataError(
            f"feature store {path}: features must be (N, K, D) or (N, D); got shape {tuple(arr.shape)}"
        )
    return ids, arr


def _pooled(arr: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Mean-pool rows over K (reading the memmap in sorted order), L2-normalised."""
    order = np.argsort(rows, kind="stable")
    block = np.asarray(arr[rows[order]], dtype=np.float32)
    if block.ndim == 3:
        block = block.mean(axis=1)
    out = np.empty_like(block)
    out[order] = block
    norm = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.maximum(norm, 1e-12)


def load_split_features(store_dir, labels_path) -> dict[str, tuple[np.ndarray, np.ndarray, list[str]]]:
    """Read a feature store + labels file into {split: (features (n, D), labels (n,), ids)}."""
    ids, arr = load_feature_store(store_dir)
    labels_path = Path(labels_path)
    if not labels_path.is_file():
        raise DataError(f"labels file not found: {labels_path}")
    try:
        table = json.loads(labels_path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"labels file {labels_path} is not valid JSON: {e}") from e
    if not isinstance(table, dict):
        raise DataError(f"labels file {labels_path} must map id -> {{'label': int, 'split': str}}")
    pos = {i: n for n, i in enumerate(ids)}
    splits: dict[str, tuple[list[int], list[int], list[str]]] = {
        s: ([], [], []) for s in ("train", "val", "test")
    }
    for key, entry in table.items():
        if not isinstance(entry, dict) or "label" not in entry or "split" not in entry:
            raise DataError(f"labels file {labels_path}: entry {key!r} needs 'label' and 'split'")
        split = entry["split"]
        if split not in splits:
            raise DataError(
                f"labels file {labels_path}: entry {key!r} has split {split!r}; expected train, val or test"
                + did_you_mean(split, splits)
            )
        if str(key) not in pos:
            raise DataError(f"labels file {labels_path}: id {key!r} is not in the feature store {store_dir}")
        rows, labs, names = splits[split]
        rows.append(pos[str(key)])
        labs.append(int(entry["label"]))
        names.append(str(key))
    out = {}
    for split, (rows, labs, names) in splits.items():
        if not rows:
            raise DataError(f"labels file {labels_path} has no {split!r} examples")
        out[split] = (_pooled(arr, np.asarray(rows)), np.asarray(labs, dtype=np.int64), names)
    return out


# ----------------------------------------------------------------------------- CLI


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``cache``: training-free CLIP cache adapters on stored features."""
    p = subparsers.add_parser(
        "cache",
        help="Tip-Adapter / Tip-Adapter-F / TIP-X / CapS-Adapter / DualAdapter on a feature store",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--features", required=True, help="feature store directory (features.npy + index.json)")
    p.add_argument("--labels", required=True, help="LABELS.json: id -> {label, split}")
    p.add_argument(
        "--text-weights", default=None, help="(D, C) .npy text classifier weights; omit for image-only"
    )
    p.add_argument(
        "--caption-features", default=None, help="caps: feature store of caption features (same ids)"
    )
    p.add_argument(
        "--shots", type=nonnegative_int, default=16, help="support examples per class (0 = all training examples)"
    )
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--epochs", type=positive_int, default=20, help="training epochs for tip-f and dual")
    p.add_argument("--signature", choices=("classes", "features"), default="classes")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True, help="results JSON path")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    """Execute ``adapterkit cache``; writes the results JSON and prints a one-line summary."""
    data = load_split_features(args.features, args.labels)
    kw: dict = {"epochs": args.epochs, "signature": args.signature, "device": args.device}
    text_weights = None
    if args.text_weights:
        wp = Path(args.text_weights)
        if not wp.is_file():
            raise DataError(f"text weights file not found: {wp}")
        try:
            text_weights = np.load(wp)
        except ValueError as e:
            raise DataError(f"text weights file {wp} is not a readable .npy array: {e}") from e
    if args.caption_features:
        ids, arr = load_feature_store(args.caption_features)
        pos = {i: n for n, i in enumerate(ids)}
        missing = [i for i in data["train"][2] if i not in pos]
        if missing:
            raise DataError(f"caption feature store {args.caption_features} lacks train id {missing[0]!r}")
        kw["caption_feats"] = _pooled(arr, np.asarray([pos[i] for i in data["train"][2]]))
    res = run_cache_adapter(
        args.method,
        data["train"][0],
        data["train"][1],
        data["val"][0],
        data["val"][1],
        data["test"][0],
        data["test"][1],
        text_weights=text_weights,
        shots=args.shots or None,
        seed=args.seed,
        **kw,
    )
    atomic_write_json(Path(args.out), res)
    print(
        f"{res['method']}: {res['baseline']} test acc {res['baseline_test_acc']:.2f} -> "
        f"{res['test_acc']:.2f} (val {res['val_acc']:.2f}; params {res['params']}) -> {args.out}"
    )
    return 0
