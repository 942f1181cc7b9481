"""The image-classification transfer pipeline: config -> data -> backbone + method -> train -> metrics.

Config (YAML) sections::

    data:   {source: fashion_mnist|image_folder, root, train_dir, test_dir, classes,
             train_per_class, test_per_class, seed}
    model:  {backbone: vit|hf|efficientnet_lite0, name_or_path, vit: {ViTConfig kwargs},
             init_from: backbone.safetensors, image_size, channels, mean, std, pool, init_seed}
    method: adaptformer | adaptformer_sequential | vpt | vpt_deep | linear_probe | full | <any adapterkit method>
    adapter: {overrides of the method's adapterkit config}
    train:  {epochs, batch_size, optimizer: sgd|adamw, blr (lr = blr*batch/256), lr, momentum,
             weight_decay, warmup_epochs, min_lr, flip, ...}
    output_dir: the run folder: results.json, final/ and best/ (adapters + trainable.safetensors),
                checkpoints/ (a rerun resumes), and backbone.safetensors with save_backbone
"""

from __future__ import annotations

import time
from pathlib import Path

from adapterkit.errors import ConfigError
from adapterkit.safeio import save_safetensors_atomic
from adapterkit.vision.common import (
    TRAIN_DEFAULTS,
    method_name,
    section,
    top_level,
    write_outputs,
)
from adapterkit.vision.data import FASHION_MNIST_DIR, load_fashion_mnist, load_image_folder, select_classes
from adapterkit.vision.domain import train_classifier
from adapterkit.vision.models import (
    ImageClassifier,
    attach_method,
    build_backbone,
    load_backbone_weights,
    make_prepare,
)

DATA_DEFAULTS = {"source": "fashion_mnist", "root": FASHION_MNIST_DIR, "train_dir": None, "test_dir": None,
                 "classes": None, "train_per_class": None, "test_per_class": None, "seed": 0}
MODEL_DEFAULTS = {"backbone": "vit", "name_or_path": None, "vit": None, "init_from": None, "image_size": None,
                  "channels": None, "mean": None, "std": None, "pool": "cls", "init_seed": 0}
VISION_TRAIN_DEFAULTS = {**TRAIN_DEFAULTS, "flip": False}
TOP_KEYS = ("domain", "data", "model", "method", "adapter", "train", "output_dir", "save_backbone", "name")


def load_data(d: dict, image_size: int, channels: int):
    if d["source"] == "fashion_mnist":
        xtr, ytr = load_fashion_mnist(d["root"], "train")
        xte, yte = load_fashion_mnist(d["root"], "test")
        names = None
    elif d["source"] == "image_folder":
        if not d["train_dir"] or not d["test_dir"]:
            raise ConfigError('data.source "image_folder" needs "data.train_dir" and "data.test_dir"')
        xtr, ytr, names = load_image_folder(d["train_dir"], image_size, channels=channels)
        xte, yte, _ = load_image_folder(d["test_dir"], image_size, classes=names, channels=channels)
    else:
        raise ConfigError(f'"data.source" must be "fashion_mnist" or "image_folder", got "{d["source"]}"')
    cls = d["classes"]
    xtr, ytr = select_classes(xtr, ytr, cls, d["train_per_class"], d["seed"])
    xte, yte = select_classes(xte, yte, cls, d["test_per_class"], d["seed"] + 1)
    num_classes = len(cls) if cls is not None else int(max(ytr.max(), yte.max())) + 1
    return (xtr, ytr), (xte, yte), num_classes, names


def run_vision(config: dict, log=print, max_steps: int | None = None, allow_changes=()) -> dict:
    """Run one training job from a config dict; return the results (also written to output_dir)."""
    top_level(config, TOP_KEYS, "vision")
    d = section(config.get("data"), DATA_DEFAULTS, "data")
    m = section(config.get("model"), MODEL_DEFAULTS, "model")
    t = section(config.get("train"), VISION_TRAIN_DEFAULTS, "train")
    method = method_name(config, "adaptformer")
    t0 = time.time()
    backbone, kind, width = build_backbone(m)
    if m["init_from"]:
        load_backbone_weights(backbone, m["init_from"])
    if kind == "cnn":
        size, channels = m["image_size"] or 224, 3
        mean, std = m["mean"] or [0.5] * 3, m["std"] or [0.5] * 3
    else:
        cfg = getattr(backbone.config, "vision_config", backbone.config)
        size = m["image_size"] or int(cfg.image_size)
        channels = m["channels"] or int(getattr(cfg, "num_channels", 3))
        mean, std = m["mean"] or [0.5] * channels, m["std"] or [0.5] * channels
    train, test, num_classes, _ = load_data(d, size, channels)
    full = attach_method(backbone, kind, method, config.get("adapter"))
    model = ImageClassifier(backbone, kind, width, num_classes, m["pool"])
    prepare = make_prepare(size, channels, mean, std, t.pop("flip"))
    log(f"vision: {method} on {m['backbone']} ({kind}), {len(train[0])} train / {len(test[0])} test images, "
        f"{num_classes} classes")
    res = train_classifier(model, backbone, full, train, test, t, prepare, log, output_dir=config.get("output_dir"),
                           max_steps=max_steps, allow_changes=allow_changes,
                           identity={"data": d, "model": m, "method": method, "adapter": config.get("adapter")})
    res.update({"method": method, "backbone": m["backbone"], "num_classes": num_classes,
                "n_train": len(train[0]), "n_test": len(test[0]), "wall_seconds": round(time.time() - t0, 2)})
    write_outputs(config.get("output_dir"), model, res, config, weights=False)  # the engine wrote final/
    if config.get("save_backbone"):
        if not config.get("output_dir"):
            raise ConfigError('"save_backbone" needs "output_dir"')
        path = Path(config["output_dir"]) / "backbone.safetensors"
        state = {k: v.detach().contiguous() for k, v in backbone.state_dict().items() if not k.startswith("adapterkit.")}
        save_safetensors_atomic(state, path)
        res["backbone_path"] = str(path)
    return res



def run_training(config, output_dir, max_steps: int | None = None, allow_changes=()) -> dict:
    """``adapterkit train CONFIG --output DIR`` for ``domain: vision``: the run folder is DIR
    (a rerun resumes from its newest checkpoint)."""
    from adapterkit.text.config import read_config_dict

    cfg = dict(read_config_dict(config) if not isinstance(config, dict) else config)
    cfg["output_dir"] = str(output_dir)
    return run_vision(cfg, max_steps=max_steps, allow_changes=allow_changes)
