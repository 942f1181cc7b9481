"""``adapterkit rec train CONFIG``: source pre-training + target adaptation from a YAML file."""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("rec", help="transferable recommendation with adapters (Adapter4Rec)")
    sub = p.add_subparsers(dest="rec_command", required=True)
    t = sub.add_parser("train", help="pre-train on the source domain, adapt to the target, evaluate")
    t.add_argument("config", help="YAML config file (see examples/configs/rec_*.yaml)")
    t.add_argument("--output-dir", default=None, help="override output_dir")
    return p


def run(args) -> int:
    from adapterkit.rec.pipeline import run_rec
    from adapterkit.vision.common import load_yaml

    cfg = load_yaml(args.config)
    if args.output_dir:
        cfg["output_dir"] = args.output_dir
    res = run_rec(cfg)
    print(json.dumps({"method": res["method"], "test": res["target"]["test"], "trainable_params": res["trainable_params"],
                      "trainable_percent": res["trainable_percent"], "wall_seconds": res["wall_seconds"]}, indent=1))
    return 0
