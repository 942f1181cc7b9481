"""``adapterkit vision train CONFIG``: run the image-classification pipeline from a YAML file."""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("vision", help="image classification with adapters (AdaptFormer, VPT, linear probe)")
    sub = p.add_subparsers(dest="vision_command", required=True)
    t = sub.add_parser("train", help="train and evaluate from a YAML config")
    t.add_argument("config", help="YAML config file (see examples/configs/vision_*.yaml)")
    t.add_argument("--output-dir", default=None, help="override output_dir")
    return p


def run(args) -> int:
    from adapterkit.vision.common import load_yaml
    from adapterkit.vision.pipeline import run_vision

    cfg = load_yaml(args.config)
    if args.output_dir:
        cfg["output_dir"] = args.output_dir
    res = run_vision(cfg)
    print(json.dumps({k: res[k] for k in ("method", "test_acc", "trainable_params", "trainable_percent",
                                          "wall_seconds")}, indent=1))
    return 0
