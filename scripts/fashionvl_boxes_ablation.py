"""The demo's run (single_adapter, 260 steps, seed 0, 500 test examples per task) with the visual
boxes as a switch: `zero_boxes true` (the reference's default for CLIP grid features, the library's
default) or `false` (the feature store's grid-cell boxes, what the demo used before). Run the demo first
(it builds data_cache/fashionvl and the features).

    python scripts/fashionvl_boxes_ablation.py false [--data data_cache/fashionvl] [--out runs/boxes_false]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from adapterkit.train.trainer import Trainer
from adapterkit.vl import benchmark as B


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("zero_boxes", choices=["true", "false"])
    ap.add_argument("--data", default="data_cache/fashionvl")
    ap.add_argument("--out", default=None)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    data = Path(a.data)
    feats = B.feature_dir(data, B.SCALES["default"]["resolution"])
    scale = dict(B.SCALES["default"], eval_examples=500)
    cfg = B.run_config(data, feats, "single_adapter", scale, a.seed)
    cfg["data"]["zero_boxes"] = a.zero_boxes == "true"
    res = Trainer(cfg, Path(a.out or f"runs/boxes_{a.zero_boxes}")).fit()
    print(json.dumps({"zero_boxes": a.zero_boxes == "true", "test": res["test"]}))


if __name__ == "__main__":
    main()
