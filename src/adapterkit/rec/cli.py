"""``adapterkit rec train CONFIG``: source pre-training + target adaptation from a YAML file
(the same run as ``adapterkit train CONFIG --output DIR`` with ``domain: rec``)."""

from __future__ import annotations

import argparse
import json
import sys

from adapterkit.vision.common import add_train_command, config_from_args


def add_parser(subparsers) -> argparse.ArgumentParser:
    return add_train_command(subparsers, "rec", "transferable recommendation with adapters (Adapter4Rec)",
                             "pre-train on the source domain, adapt to the target, evaluate (rerun to resume)")


def run(args) -> int:
    from adapterkit.engine.engine import TrainingInterrupted
    from adapterkit.rec.pipeline import run_rec

    try:
        res = run_rec(config_from_args(args))
    except TrainingInterrupted as e:  # SIGTERM / SIGINT: a checkpoint was written; rerun to resume
        print(f"adapterkit rec train: {e}", file=sys.stderr)
        return e.exit_code
    print(json.dumps({"method": res["method"], "test": res["target"]["test"], "trainable_params": res["trainable_params"],
                      "trainable_percent": res["trainable_percent"], "wall_seconds": res["wall_seconds"]}, indent=1))
    return 0
