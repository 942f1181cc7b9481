"""``adapterkit audio train CONFIG``: run the audio-classification pipeline from a YAML file."""

from __future__ import annotations

import argparse
import json

from adapterkit.vision.common import add_train_command, config_from_args


def add_parser(subparsers) -> argparse.ArgumentParser:
    return add_train_command(subparsers, "audio", "audio classification with PETL-AST adapters (AST / Whisper)")


def run(args) -> int:
    from adapterkit.audio.pipeline import run_audio

    res = run_audio(config_from_args(args))
    print(json.dumps({k: res[k] for k in ("method", "adapter", "test_acc", "trainable_params", "trainable_percent",
                                          "wall_seconds")}, indent=1))
    return 0
