"""Caption Fashion-MNIST support images with the library's own trained V&L captioner (for CapS-Adapter).

The captioner is a finished ``adapterkit demo`` run: VL-Adapter's ``single_adapter`` preset
(SmolLM2-135M + frozen EfficientNet-Lite0 grid features) trained on FashionVL, whose
``caption`` task describes 2x2 grids of Fashion-MNIST photos. It is loaded the way
``adapterkit eval`` loads a run (:class:`adapterkit.train.trainer.Trainer` on the run's
config, then the run's ``final/`` weights). Each support-pool image of
``examples/cache_clip_fewshot.py`` (the same 1,000 train images: 100 per class, seed 0) is
tiled four times into the 56x56 2x2 grid the captioner was trained on, encoded by the same
extractor at the same resolution and grid (:func:`adapterkit.vl.features.extract_features`,
``efficientnet-lite0``, 112 px, 2x2), and captioned by the trainer's own caption generation
(greedy, 16 new tokens, batches of 64).

Output: a JSON with ``captions`` ({"train/<Fashion-MNIST train index>": caption}), the
command, the checkpoint, and the share of captions that name the image's true class (the
captioner was trained on Fashion-MNIST train photos with their class-derived captions, so
its captions carry label information).

Run (about 4 min on one CPU thread; the demo run first: ``adapterkit demo``)::

    OMP_NUM_THREADS=1 python examples/cache_vl_captions.py --run /tmp/democlone/runs/demo \\
        --out docs/results/cache/vl_captions_fmnist.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

FMNIST_NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")


def support_pool_indices(labels: np.ndarray, per_class: int = 100, seed: int = 0) -> np.ndarray:
    """Fashion-MNIST train indices of cache_clip_fewshot.py's support pool (its per_class_split, first part)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from cache_clip_fewshot import per_class_split

    (pool,) = per_class_split(labels, [per_class], np.random.default_rng(seed))
    return pool


def tiled_grids(images: np.ndarray) -> np.ndarray:
    """(n, 28, 28) photos -> (n, 56, 56): each photo repeated in the four cells of a 2x2 grid."""
    return np.tile(images, (1, 2, 2))


def names_class(caption: str) -> list[int]:
    """Classes whose name (or plural) appears in a caption ("shirt" not counted inside "t-shirt")."""
    import re

    found = []
    for c, name in enumerate(FMNIST_NAMES):
        pat = r"(?<![\w-])" + re.escape(name) + r"s?\b"
        if re.search(pat, caption):
            found.append(c)
    return found


def load_captioner(run_dir: Path, work: Path, which: str = "final"):
    """The trainer of a finished V&L run with its ``which/`` weights loaded (as ``adapterkit eval``)."""
    from adapterkit.train.trainer import Trainer

    res = json.loads((run_dir / "results.json").read_text())
    cfg = res["config"]
    root = run_dir.parent.parent  # runs/demo -> the folder the demo ran in (relative data paths)
    for key in ("root", "features"):
        p = Path(cfg["data"][key])
        cfg["data"][key] = str(p if p.is_absolute() else root / p)
    preset_dir = run_dir / cfg["preset"]
    out = work / "captioner"
    out.mkdir(parents=True, exist_ok=True)
    (out / which).symlink_to((preset_dir / which).resolve())  # read-only use: the trainer writes only a probe
    trainer = Trainer(cfg, out)
    if not trainer._load_best(which):
        raise SystemExit(f"no {which}/ weights in {preset_dir}")
    return trainer, cfg, preset_dir / which


def caption_images(trainer, cfg, grids: np.ndarray, ids: list[str], work: Path, batch_size: int = 64,
                   max_new_tokens: int = 16, log=print) -> dict[str, str]:
    """{id: caption} of (n, 56, 56) grid images, through the run's own extractor and caption generation."""
    from adapterkit.vl.data import TaskData
    from adapterkit.vl.datasets.base import VLExample
    from adapterkit.vl.features import extract_features, parse_backend_description

    backend = trainer.domain.store.backend  # the run's store records its extractor: "efficientnet-lite0@112/grid2"
    spec = parse_backend_description(backend)
    name, res, grid = spec["name"], spec["resolution"], spec["grid"]
    log(f"features: {name}, {res} px, {grid}x{grid} grid (as the run's store: {backend})")
    store = extract_features(list(zip(ids, grids)), name, work / "features", batch_size=64,
                             grid=grid, resolution=res, progress=False)
    if store.dim != trainer.domain.store.dim or store.num_boxes != trainer.domain.store.num_boxes:
        raise SystemExit(f"feature shape {store.num_boxes}x{store.dim} differs from the run's")
    exs = [VLExample(uid=i, task="caption", image_ids=[i], text="", targets=["-"]) for i in ids]
    d = trainer.domain
    trainer._eval_cache[("caption", "support")] = TaskData("caption", exs, store, d.tok, d.spec, cfg["model"]["n_images"], False)
    trainer.ecfg.batch_size, trainer.ecfg.caption_beams, trainer.ecfg.caption_max_new_tokens = batch_size, 1, max_new_tokens
    with torch.no_grad():
        return trainer.predict("caption", "support")


def check_against_run(trainer, cfg, run_dir: Path, work: Path, n: int) -> dict:
    """Caption the run's first ``n`` FashionVL caption-test grids through this path and compare
    with the captions the run itself predicted (its predictions.json): the same model, features
    and generation give the same strings."""
    from adapterkit.vl.datasets.fashionvl import iter_fashionvl_images, load_fashionvl_examples

    preds = json.loads((run_dir / cfg["preset"] / "predictions.json").read_text())["caption"]
    exs = [e for e in load_fashionvl_examples(cfg["data"]["root"], "caption", "test") if e.uid in preds][:n]
    imgs = iter_fashionvl_images(cfg["data"]["root"])
    ids = [e.image_ids[0] for e in exs]
    caps = caption_images(trainer, cfg, np.stack([imgs.image(i) for i in ids]), ids, work / "check")
    same = sum(caps[i] == preds[e.uid] for i, e in zip(ids, exs))
    return {"n": len(exs), "equal": int(same), "run_test_predictions": len(preds),
            "run_test_distinct_captions": len(set(preds.values()))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="/tmp/democlone/runs/demo", help="an `adapterkit demo` output (results.json + <preset>/final)")
    ap.add_argument("--which", default="final")
    ap.add_argument("--check", type=int, default=48, help="first reproduce the run's own captions of N FashionVL test grids (0: skip)")
    ap.add_argument("--limit", type=int, default=None, help="caption only the first N pool images (a smoke run)")
    ap.add_argument("--out", default="docs/results/cache/vl_captions_fmnist.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    from adapterkit.vl.datasets.fashionvl import load_fashion_mnist

    images, labels = load_fashion_mnist("train")
    pool = support_pool_indices(labels.astype(np.int64))
    if args.limit:
        pool = pool[:: max(1, len(pool) // args.limit)][: args.limit]
    ids = [f"train/{int(i)}" for i in pool]
    with tempfile.TemporaryDirectory(prefix="vl-captions-") as tmp:
        trainer, cfg, ckpt = load_captioner(Path(args.run), Path(tmp), args.which)
        print(f"[{time.strftime('%H:%M:%S')}] captioner loaded from {ckpt}", flush=True)
        check = check_against_run(trainer, cfg, Path(args.run), Path(tmp), args.check) if args.check else None
        if check:
            print(f"check: {check['equal']}/{check['n']} captions of FashionVL test grids equal the run's own", flush=True)
        caps = caption_images(trainer, cfg, tiled_grids(images[pool]), ids, Path(tmp))
    caps = {i: caps[i] for i in ids}
    y = labels[pool].astype(int)
    named = [names_class(caps[i]) for i in ids]
    right = np.array([int(c) in n for c, n in zip(y, named)])
    only = np.array([n == [int(c)] for c, n in zip(y, named)])
    per_class = {FMNIST_NAMES[c]: round(float(right[y == c].mean() * 100), 1) for c in range(10)}
    step = max(1, len(ids) // 10)
    out = {
        "command": "OMP_NUM_THREADS=1 python examples/cache_vl_captions.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items() if v is not None),
        "checkpoint": str(ckpt),
        "captioner": f"adapterkit demo: preset {cfg['preset']}, backbone {cfg['model']['backbone']}, trained on FashionVL {cfg['data']['tasks']} ({cfg['train']['max_steps']} steps)",
        "input": "each Fashion-MNIST support-pool image tiled into the four cells of a 56x56 2x2 grid; EfficientNet-Lite0 grid features as the run's store; greedy, 16 new tokens, batch 64",
        "n_images": len(ids),
        "distinct_captions": len(set(caps.values())),
        "reproduces_run": check,
        "names_true_class_pct": round(float(right.mean() * 100), 2),
        "names_only_true_class_pct": round(float(only.mean() * 100), 2),
        "names_true_class_pct_by_class": per_class,
        "caveat": "the captioner was trained on Fashion-MNIST train photos with class-derived captions: its captions carry label information a generic captioner's would not",
        "examples": [{"image": ids[j], "class": FMNIST_NAMES[y[j]], "caption": caps[ids[j]]} for j in range(0, len(ids), step)][:10],
        "seconds": round(time.time() - t0, 1),
        "captions": caps,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}: {len(ids)} captions ({out['distinct_captions']} distinct), {out['names_true_class_pct']:.1f}% name the true class; {out['seconds']} s")
    for e in out["examples"]:
        print(f"  {e['image']} ({e['class']}): {e['caption']}")


if __name__ == "__main__":
    main()
