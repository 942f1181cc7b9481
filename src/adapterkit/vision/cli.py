"""``adapterkit vision train CONFIG``: run the image-classification pipeline from a YAML file."""

from __future__ import annotations

import argparse
import json

from adapterkit.vision.common import add_train_command, config_from_args


def add_parser(subparsers) -> argparse.ArgumentParser:
    return add_train_command(subparsers, "vision", "image classification with adapters (AdaptFormer, VPT, linear probe)")


def run(args) -> int:
    from adapterkit.vision.pipeline import run_vision

    res = run_vision(config_from_args(args))
    print(json.dumps({k: res[k] for k in ("method", "test_acc", "trainable_params", "trainable_percent",
                                          "wall_seconds")}, indent=1))
    return 0
