"""Classification over in-memory tensors on the training engine: the vision and audio pipelines.

:class:`ClassifierDomain` is one task: inputs ``x`` (images, spectrograms, features) and
integer labels ``y``; ``model(prepare(x, training))`` returns logits; cross-entropy (with
label smoothing) is the loss; accuracy is the metric. ``prepare`` holds the pipeline's
per-batch transform (normalisation, a seeded random flip). A frozen backbone stays in eval
mode while its adapters train (BatchNorm statistics and the pretrained dropout untouched).
:func:`train_classifier` runs it on :class:`adapterkit.engine.Engine` (checkpoints with exact
resume, validation selection on a held-out part of the training set, torchrun runs).
"""

from __future__ import annotations

import csv
import dataclasses
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adapterkit.engine.config import EvalConfig, TrainConfig
from adapterkit.engine.domain import Domain
from adapterkit.errors import ConfigError


class ClassifierDomain(Domain):
    name = "classification"

    def __init__(self, model: nn.Module, backbone: nn.Module, full: bool, splits: dict, prepare: Callable,
                 label_smoothing: float = 0.0, task: str = "classify", identity: dict | None = None):
        self.model, self.backbone, self.full = model, backbone, full
        self.splits = splits  # {"train": (x, y), "val": (x, y) | None, "test": (x, y)}
        self.prepare, self.smoothing = prepare, float(label_smoothing)
        self.tasks = [task]
        self._identity = identity or {}
        from adapterkit.engine import distributed as d

        d.init_distributed()
        if d._dist() and torch.cuda.is_available():  # BatchNorm over the global batch, as one process
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(model)

    def num_train(self, task):
        return len(self.splits["train"][1])

    def train_mode(self):
        from adapterkit.vision.common import set_train_mode

        set_train_mode(self.model, self.backbone, self.full)

    def train_batch(self, task, rows, seed, rank, world):
        x, y = self.splits["train"]
        idx = torch.from_numpy(np.asarray(rows)[rank::world].astype(np.int64))
        g = torch.Generator().manual_seed(seed & 0x7FFFFFFFFFFFFFFF)  # the batch's augmentation, the same in a resume
        with _fork_rng(g):
            xb = self.prepare(x[idx], True)
        return {"x": xb, "y": y[idx]}

    def loss(self, batch, task_index):
        logits = self.model(batch["x"])
        return F.cross_entropy(logits.float(), batch["y"], label_smoothing=self.smoothing)

    def eval_size(self, task, split):
        return len(self.splits[split][1])

    def predict_batch(self, task, split, rows):
        x, _ = self.splits[split]
        idx = torch.from_numpy(np.asarray(rows, dtype=np.int64))
        dev = next(self.model.parameters()).device
        pred = self.model(self.prepare(x[idx], False).to(dev)).argmax(-1).tolist()
        return {int(i): int(p) for i, p in zip(rows, pred)}

    def score(self, task, split, predictions):
        y = self.splits[split][1]
        if len(predictions) != len(y):
            raise ConfigError(f"{len(predictions)} predictions for {len(y)} {split} examples")
        p = torch.tensor([predictions[i] for i in range(len(y))])
        return {"accuracy": float((p == y.cpu()).float().mean() * 100) if len(y) else math.nan, "n": len(y)}

    def identity(self):
        return self._identity


class _fork_rng:
    """Draw the batch transform's randomness from ``g`` (the global RNG is left as it was)."""

    def __init__(self, g: torch.Generator):
        self.g = g

    def __enter__(self):
        self.state = torch.random.get_rng_state()
        torch.random.set_rng_state(self.g.get_state())

    def __exit__(self, *exc):
        torch.random.set_rng_state(self.state)


def engine_settings(t: dict, lr: float) -> tuple[TrainConfig, EvalConfig]:
    """The engine's train/eval settings for a vision/audio ``train:`` section."""
    epochs = int(t["epochs"])
    sched = t.get("schedule") or "cosine"
    tc = TrainConfig(epochs=epochs, batch_size=int(t["batch_size"]), lr=lr, optimizer=t["optimizer"],
                     momentum=float(t["momentum"]), schedule=sched,
                     min_lr_ratio=min(1.0, float(t["min_lr"]) / lr) if lr > 0 else 0.0,
                     warmup_ratio=min(1.0, float(t["warmup_epochs"]) / max(1, epochs)),
                     weight_decay=float(t["weight_decay"]), adam_eps=float(t.get("adam_eps") or 1e-8),
                     grad_clip=float(t["grad_clip"] or 0.0), seed=int(t["seed"]),
                     checkpoint_every=int(t.get("checkpoint_every") or 100), eval_every_epoch=bool(t["eval_each_epoch"]))
    tc.betas = tuple(t["betas"])
    ec = EvalConfig(batch_size=int(t["eval_batch_size"]), select_on="val" if t.get("val_fraction") else "last")
    return tc, ec


def hold_out(train: tuple[torch.Tensor, torch.Tensor], fraction: float, seed: int):
    """(train, val): a seeded random ``fraction`` of the training set held out for selection."""
    x, y = train
    if not fraction:
        return train, None
    if not 0 < fraction < 1:
        raise ConfigError(f"train.val_fraction must be in (0, 1), got {fraction}")
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(len(y)))
    n_val = max(1, round(len(y) * fraction))
    v, tr = perm[:n_val], perm[n_val:]
    return (x[tr], y[tr]), (x[v], y[v])


def train_classifier(model: nn.Module, backbone: nn.Module, full: bool, train: tuple[torch.Tensor, torch.Tensor],
                     test: tuple[torch.Tensor, torch.Tensor], t: dict, prepare: Callable,
                     log: Callable[[str], None] = print, output_dir=None, identity: dict | None = None,
                     max_steps: int | None = None, allow_changes=()) -> dict:
    """Train ``model`` (logits = model(prepare(x, training))) with cross-entropy on the engine
    (its run folder: ``output_dir``, else a temporary one); return the metrics."""
    from adapterkit.engine import Engine
    from adapterkit.engine.engine import run_folder
    from adapterkit.vision.common import learning_rate

    if len(train[1]) == 0:
        raise ConfigError("the training set is empty")
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("nothing to train: the method leaves no trainable parameter")
    lr = learning_rate(t)
    tc, ec = engine_settings(t, lr)
    tr, val = hold_out(train, float(t.get("val_fraction") or 0.0), int(t["seed"]))
    splits = {"train": tr, "val": val, "test": test}
    Engine.seed_all(tc.seed)
    ident = {"settings": {k: v for k, v in t.items() if k not in ("eval_batch_size", "eval_each_epoch",
                                                                 "checkpoint_every")}, **(identity or {})}
    ident = _jsonable(ident)
    with run_folder(output_dir) as out:
        dom = ClassifierDomain(model, backbone, full, splits, prepare, t.get("label_smoothing", 0.0), identity=ident)
        eng = Engine(dom, tc, ec, out, name="classify", config=None, max_steps=max_steps, allow_changes=allow_changes,
                     lr=lr)
        res = eng.fit()
        history = _epoch_history(out / "train_log.csv", res.get("val_history", []))
    for h in history:
        log(f"epoch {h['epoch']}/{tc.epochs}  loss {h['train_loss']:.4f}"
            + (f"  val acc {h['val_acc']:.2f}" if "val_acc" in h else ""))
    acc = res["test"][dom.tasks[0]]["accuracy"]
    log(f"test acc {acc:.2f} ({res['checkpoint']})")
    return {"test_acc": acc, "history": history, "train_seconds": round(res["wall_time_s"], 2),
            "trainable_params": res["trainable"], "total_params": res["total"], "trainable_percent": res["percent"],
            "lr": lr, "steps": res["steps"], "checkpoint": res["checkpoint"], "n_val": 0 if val is None else len(val[1])}


def _epoch_history(log_path: Path, val_history: list) -> list[dict]:
    rows: dict[int, list[float]] = {}
    with open(log_path, newline="") as f:
        for r in csv.DictReader(f):
            rows.setdefault(int(r["epoch"]), []).append(float(r["loss"]))
    vals = {v["epoch"]: v["val_avg"] for v in val_history}
    out = []
    for ep in sorted(rows):
        h = {"epoch": ep + 1, "train_loss": float(np.mean(rows[ep]))}
        if ep + 1 in vals:
            h["val_acc"] = vals[ep + 1]
        out.append(h)
    return out


def _jsonable(x):
    if dataclasses.is_dataclass(x):
        x = dataclasses.asdict(x)
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return x
