"""APoLLo few-shot training on the engine and the base-to-novel protocol.

* :func:`base_novel_split`: Dassl's ``SUBSAMPLE_CLASSES`` (the sorted labels; the first
  ``ceil(C / 2)`` are *base*, the rest *novel*), :func:`subsample` relabels a split to one half.
* :class:`ApolloDomain`: one task, the few-shot *base* training set. Each training batch holds
  two independent random-resized-crop + flip views of every image (the second feeds the frozen,
  prompt-free encoder of the consistency term), normalised with the encoder's mean / std.
* :func:`train_apollo`: trains on :class:`adapterkit.engine.Engine` (checkpoints, exact resume,
  the run folder), then evaluates base (base test images over the base class names) and novel
  (novel test images over the novel class names, prompts and adapters as trained) and their
  harmonic mean.

Defaults are the reference's base-to-novel settings (SGD lr 0.0035, momentum 0.9, weight decay
5e-4, cosine schedule, 5 epochs, batch 4, test batch 100, the weights of the last epoch). One
difference: the engine warms up linearly over the first epoch, the reference holds the learning
rate at 1e-5 for that epoch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from adapterkit.engine.config import EvalConfig, TrainConfig
from adapterkit.engine.domain import Domain
from adapterkit.errors import ConfigError, DataError
from adapterkit.methods.apollo import Apollo

__all__ = ["DEFAULT_SETTINGS", "ApolloDomain", "base_novel_split", "evaluate", "harmonic_mean",
           "random_resized_crop", "subsample", "train_apollo"]

#: the reference base-to-novel settings (``configs/trainers/APOLLO/vit_b16_c2_ep5_batch4_2ctx.yaml``)
DEFAULT_SETTINGS = {
    "epochs": 5, "batch_size": 4, "lr": 0.0035, "momentum": 0.9, "weight_decay": 5e-4, "warmup_epochs": 1,
    "eval_batch_size": 100, "seed": 0, "image_size": 224, "crop_scale": (0.08, 1.0),
    "mean": (0.48145466, 0.4578275, 0.40821073), "std": (0.26862954, 0.26130258, 0.27577711),
    "max_steps": None, "checkpoint_every": 100,
}


def base_novel_split(num_classes: int) -> tuple[list[int], list[int]]:
    """(base, novel) class ids: the first ``ceil(C / 2)`` labels and the rest (Dassl's halves)."""
    if num_classes < 2:
        raise DataError(f"a base-to-novel split needs at least 2 classes, got {num_classes}")
    m = math.ceil(num_classes / 2)
    return list(range(m)), list(range(m, num_classes))


def subsample(x: torch.Tensor, y: torch.Tensor, class_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The examples of ``class_ids``, relabelled ``0 .. len(class_ids) - 1`` in that order."""
    y = torch.as_tensor(y).long()
    ids = torch.as_tensor(list(class_ids), dtype=torch.long)
    remap = torch.full((int(max(int(y.max()) if y.numel() else 0, int(ids.max())) + 1),), -1, dtype=torch.long)
    remap[ids] = torch.arange(len(ids))
    keep = remap[y] >= 0
    return x[keep], remap[y[keep]]


def harmonic_mean(a: float, b: float) -> float:
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def random_resized_crop(x: torch.Tensor, size: int, generator: torch.Generator, scale=(0.08, 1.0),
                        ratio=(3 / 4, 4 / 3), flip: bool = True) -> torch.Tensor:
    """Random-resized-crop (area fraction ``scale``, aspect ``ratio``) + random horizontal flip of
    every image of ``x`` (B, C, H, W) to ``size`` x ``size``, all in one ``grid_sample``."""
    b = x.shape[0]
    u = torch.rand(b, 5, generator=generator)
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    logr = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    r = logr.exp()
    w = (area * r).sqrt().clamp(max=1.0)  # crop width / height as fractions of the image
    h = (area / r).sqrt().clamp(max=1.0)
    cx = (1 - w) * (2 * u[:, 2] - 1)  # centre in [-1, 1] coordinates, the crop inside the image
    cy = (1 - h) * (2 * u[:, 3] - 1)
    sx = w * torch.where(u[:, 4] < 0.5, -1.0, 1.0) if flip else w
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, cx, h, cy
    grid = F.affine_grid(theta.to(x.device, torch.float32), [b, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)


class ApolloDomain(Domain):
    """The engine's view of an APoLLo run: one task (``base``) of few-shot images."""

    name = "apollo"

    def __init__(self, model: Apollo, train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
                 settings: dict, identity: dict | None = None):
        self.model, self.tasks = model, ["base"]
        self.splits = {"train": train, "test": test}
        self.s = settings
        self.mean = torch.tensor(settings["mean"], dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(settings["std"], dtype=torch.float32).view(1, -1, 1, 1)
        self._identity = identity or {}

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean.to(x.device)) / self.std.to(x.device)

    def eval_view(self, x: torch.Tensor) -> torch.Tensor:
        size = int(self.s["image_size"])
        x = x.float()
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return self.normalise(x)

    def num_train(self, task):
        return len(self.splits["train"][1])

    def train_batch(self, task, rows, seed, rank, world):
        x, y = self.splits["train"]
        idx = torch.from_numpy(np.asarray(rows)[rank::world].astype(np.int64))
        g = torch.Generator().manual_seed(seed & 0x7FFFFFFFFFFFFFFF)  # the same views in a resumed run
        size, sc = int(self.s["image_size"]), tuple(self.s["crop_scale"])
        v1 = random_resized_crop(x[idx], size, g, sc)
        v2 = random_resized_crop(x[idx], size, g, sc)
        return {"x": self.normalise(v1), "x_view": self.normalise(v2), "y": y[idx]}

    def loss(self, batch, task_index):
        view = batch["x_view"] if self.model.config.image_consistency > 0 else None
        return self.model.loss(batch["x"], batch["y"], view)

    def eval_size(self, task, split):
        return len(self.splits[split][1])

    def predict_batch(self, task, split, rows):
        x, _ = self.splits[split]
        idx = torch.from_numpy(np.asarray(rows, dtype=np.int64))
        dev = self.model.clip.logit_scale.device
        pred = self.model(self.eval_view(x[idx]).to(dev)).argmax(-1).tolist()
        return {int(i): int(p) for i, p in zip(rows, pred)}

    def score(self, task, split, predictions):
        y = self.splits[split][1]
        if len(predictions) != len(y):
            raise DataError(f"{len(predictions)} predictions for {len(y)} {split} examples")
        p = torch.tensor([predictions[i] for i in range(len(y))])
        return {"accuracy": float((p == y.cpu()).float().mean() * 100) if len(y) else math.nan, "n": len(y)}

    def identity(self):
        return self._identity


@torch.no_grad()
def evaluate(model: Apollo, domain: ApolloDomain, x: torch.Tensor, y: torch.Tensor, classnames: Sequence[str],
             batch_size: int) -> float:
    """Top-1 accuracy (percent) of ``model`` on (x, y) over ``classnames``, in fixed batches of
    ``batch_size`` (the adapters attend across a batch)."""
    if len(y) == 0:
        raise DataError("cannot evaluate on an empty split")
    old = list(model.classnames)
    model.set_classes(classnames)
    model.eval()
    dev = model.clip.logit_scale.device
    try:
        correct = 0
        for i in range(0, len(y), batch_size):
            logits = model(domain.eval_view(x[i:i + batch_size]).to(dev))
            correct += int((logits.argmax(-1).cpu() == torch.as_tensor(y[i:i + batch_size])).sum())
    finally:
        model.set_classes(old)
    return 100.0 * correct / len(y)


def train_apollo(model: Apollo, train: tuple[torch.Tensor, torch.Tensor], tests: dict, settings: dict | None = None,
                 output_dir=None, zero_shot: bool = True, identity: dict | None = None) -> dict:
    """Train ``model`` (built for the base class names) on ``train`` = (images (N, 3, H, W) in [0, 1],
    base labels) on the engine, then evaluate every entry of ``tests`` = ``{name: (x, y, classnames)}``
    (e.g. ``{"base": ..., "novel": ...}``) with the trained prompts and adapters.

    Returns ``{"accuracy": {name: acc}, "hm": harmonic mean of base and novel, "zero_shot": {name: acc},
    ...}``; ``zero_shot`` (when asked) is the frozen dual encoder alone with the plain prompt
    ``ctx_init + name`` (no prompts, no adapters), measured before training. ``identity``: what
    else defines the run (e.g. which projection heads), compared when a run folder is resumed.
    """
    from adapterkit.engine import Engine
    from adapterkit.engine.engine import run_folder

    unknown = [k for k in (settings or {}) if k not in DEFAULT_SETTINGS]
    if unknown:
        raise ConfigError(f"unknown APoLLo training setting {unknown[0]!r}; allowed: {sorted(DEFAULT_SETTINGS)}")
    s = {**DEFAULT_SETTINGS, **(settings or {})}
    if len(train[1]) < 2:
        raise DataError("APoLLo needs at least 2 training images (the contrastive term needs negatives)")
    if int(s["batch_size"]) < 2 and model.config.image_consistency > 0:
        raise ConfigError("batch_size must be >= 2 with image_consistency > 0 (the contrastive term needs negatives)")
    epochs = int(s["epochs"])
    tc = TrainConfig(epochs=epochs, max_steps=s["max_steps"], batch_size=int(s["batch_size"]), lr=float(s["lr"]),
                     optimizer="sgd", momentum=float(s["momentum"]), schedule="cosine",
                     warmup_ratio=min(1.0, float(s["warmup_epochs"]) / max(1, epochs)),
                     weight_decay=float(s["weight_decay"]), grad_clip=0.0, seed=int(s["seed"]),
                     checkpoint_every=int(s["checkpoint_every"]), eval_every_epoch=False)
    ec = EvalConfig(batch_size=int(s["eval_batch_size"]), select_on="last")
    Engine.seed_all(tc.seed)
    base_test = tests.get("base", (train[0][:0], train[1][:0], model.classnames))
    ident = {"apollo": {k: v for k, v in vars(model.config).items()}, "classes": list(model.classnames),
             "n_train": len(train[1]), "image_size": int(s["image_size"]), **(identity or {})}
    dom = ApolloDomain(model, train, (base_test[0], base_test[1]), s, identity=ident)
    out = {}
    bs = int(s["eval_batch_size"])
    if zero_shot:
        out["zero_shot"] = {name: _zero_shot(model, dom, x, y, names, bs) for name, (x, y, names) in tests.items()}
    with run_folder(output_dir, prefix="adapterkit-apollo-") as folder:
        eng = Engine(dom, tc, ec, folder, name="apollo", config={"apollo": ident["apollo"], "train": s},
                     max_steps=s["max_steps"], lr=float(s["lr"]))
        res = eng.fit()
        losses = _losses(folder / "train_log.csv")
    acc = {name: evaluate(model, dom, x, y, names, bs) for name, (x, y, names) in tests.items()}
    out.update({"accuracy": acc, "steps": res["steps"], "train_seconds": round(res["wall_time_s"], 2),
                "trainable_params": res["trainable"], "total_params": res["total"], "train_loss": losses})
    if "base" in acc and "novel" in acc:
        out["hm"] = harmonic_mean(acc["base"], acc["novel"])
    return out


@torch.no_grad()
def _zero_shot(model: Apollo, dom: ApolloDomain, x, y, names, bs) -> float:
    """The frozen dual encoder alone: cos(image, text of ``ctx_init + name``), no prompts or adapters."""
    clip = model.clip
    dev = clip.logit_scale.device
    prompts = [model.config.template.format(ctx=model.config.ctx_init or "", name=n).strip() for n in names]
    clip.eval()
    t = F.normalize(clip.encode_text(prompts).float(), dim=-1)
    correct = 0
    for i in range(0, len(y), bs):
        f = F.normalize(clip.encode_image(dom.eval_view(x[i:i + bs]).to(dev)).float(), dim=-1)
        correct += int(((f @ t.T).argmax(-1).cpu() == torch.as_tensor(y[i:i + bs])).sum())
    return 100.0 * correct / max(1, len(y))


def _losses(path: Path) -> list[float]:
    import csv

    with open(path, newline="") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]
