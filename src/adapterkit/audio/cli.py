"""``adapterkit audio train CONFIG``: run the audio-classification pipeline from a YAML file."""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("audio", help="audio classification with PETL-AST adapters (AST / Whisper)")
    sub = p.add_subparsers(dest="audio_command", required=True)
    t = sub.add_parser("train", help="train and evaluate from a YAML config")
    t.add_argument("config", help="YAML config file (see examples/configs/audio_*.yaml)")
    t.add_argument("--output-dir", default=None, help="override output_dir")
    return p


def run(args) -> int:
    from adapterkit.audio.pipeline import run_audio
    from adapterkit.vision.common import load_yaml

    cfg = load_yaml(args.config)
    if args.output_dir:
        cfg["output_dir"] = args.output_dir
    res = run_audio(cfg)
    print(json.dumps({k: res[k] for k in ("method", "adapter", "test_acc", "trainable_params", "trainable_percent",
                                          "wall_seconds")}, indent=1))
    return 0
