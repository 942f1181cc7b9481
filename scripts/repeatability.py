"""Is a FashionVL run repeatable on this machine, and what does the thread count change?

For each thread count: the EfficientNet-Lite0 features of the first ``--images`` photos, encoded
twice (digest of the fp16 values the feature store keeps), and the first ``--steps`` training
steps of ``--preset`` from seed ``--seed``, taken twice from a fresh model (each step's loss and
the digest of the trainable weights after the last). Then, between thread counts: the share of
fp16 feature values that differ, and the first step whose loss differs.

    python scripts/repeatability.py --threads 1,2 --images 256 --steps 12 --out docs/results/demo/repeatability.json

Needs data_cache/fashionvl (``adapterkit demo`` builds it). Prints one JSON document.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path


def feature_digest(images, threads: int, resolution: int, grid: int = 2):
    """(sha256 of the fp16 features, the fp16 array) of ``images`` encoded with ``threads`` threads."""
    import numpy as np
    import torch

    from adapterkit.vl.backends import get_backend

    torch.set_num_threads(threads)
    backend = get_backend("efficientnet-lite0", resolution=resolution)
    f = np.concatenate([backend.encode(images[i:i + 64], grid=grid).numpy() for i in range(0, len(images), 64)])
    f = f.astype(np.float16)  # what the feature store keeps
    return hashlib.sha256(f.tobytes()).hexdigest(), f


def train_steps(data, preset: str, seed: int, steps: int, threads: int, scale: str = "default") -> dict:
    """Losses of the first ``steps`` steps of a fresh run and the trainable weights' digest after."""
    import torch

    from adapterkit.vl.benchmark import _train_step, init_digest, scratch_trainer
    from adapterkit.vl.data import task_schedule

    torch.set_num_threads(threads)
    with scratch_trainer(data, preset, seed=seed, scale_name=scale) as tr:
        start = init_digest(tr.model)
        orders = {t: tr.domain.epoch_order(t, seed, 0) for t in tr.tasks}
        # the run's first steps, as fit() takes them
        losses = [_train_step(tr, orders, seed, task, b) for task, b in task_schedule(tr.num_batches, seed, 0)[:steps]]
        return {"init_digest": start, "final_digest": init_digest(tr.model), "losses": losses}


def first_difference(a: list, b: list) -> int | None:
    """The index of the first unequal item (None: equal)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--data", default="data_cache/fashionvl")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--preset", default="single_adapter")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", default="default", choices=["tiny", "default"], help="the demo scale (tiny: the "
                    "random-init stand-in model and 64 px features of the tiny split)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import numpy as np

    from adapterkit.engine.engine import versions
    from adapterkit.vl.benchmark import SCALES
    from adapterkit.vl.datasets.fashionvl import iter_fashionvl_images

    threads = [int(t) for t in args.threads.split(",") if t]
    images = []
    for i, item in enumerate(iter_fashionvl_images(args.data)):
        if i >= args.images:
            break
        images.append(item[1])
    resolution = SCALES[args.scale]["resolution"]
    res: dict = {"images": len(images), "steps": args.steps, "preset": args.preset, "seed": args.seed, "scale": args.scale,
                 "versions": versions(), "per_threads": {}}
    arrays = {}
    for t in threads:
        d1, f1 = feature_digest(images, t, resolution)
        d2, _ = feature_digest(images, t, resolution)
        arrays[t] = f1
        r1, r2 = (train_steps(args.data, args.preset, args.seed, args.steps, t, args.scale) for _ in range(2))
        res["per_threads"][str(t)] = {
            "features_repeat_equal": d1 == d2, "features_digest": d1,
            "train_repeat_equal": r1 == r2, "first_run": r1,
            "second_run_first_loss_difference": first_difference(r1["losses"], r2["losses"]),
        }
    if len(threads) > 1:
        a, b = threads[0], threads[1]
        ra, rb = res["per_threads"][str(a)]["first_run"], res["per_threads"][str(b)]["first_run"]
        diff = arrays[a] != arrays[b]
        res["between_threads"] = {
            "threads": [a, b],
            "feature_values_differing": float(diff.mean()),
            "feature_max_abs_difference": float(np.abs(arrays[a].astype(np.float32) - arrays[b]).max()),
            "same_init": ra["init_digest"] == rb["init_digest"],
            "first_step_loss_differs": first_difference(ra["losses"], rb["losses"]),
            "last_loss": [ra["losses"][-1], rb["losses"][-1]],
            "final_weights_equal": ra["final_digest"] == rb["final_digest"],
        }
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
