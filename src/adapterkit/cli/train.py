"""``adapterkit train CONFIG --output DIR`` and ``adapterkit eval CONFIG --checkpoint DIR``."""

from __future__ import annotations

import json


def add_parser(sub):
    t = sub.add_parser("train", help="multi-task training from a config file (resumes in the same --output)")
    t.add_argument("config")
    t.add_argument("--output", required=True)
    t.add_argument("--max-steps", type=int, default=None)
    t.set_defaults(_run=run_train)
    e = sub.add_parser("eval", help="evaluate a trained run (its best checkpoint) on the test split")
    e.add_argument("config")
    e.add_argument("--checkpoint", required=True, help="the --output directory of a training run")
    e.add_argument("--split", default="test")
    e.set_defaults(_run=run_eval)
    return [t, e]


def _print_results(res):
    for task, m in res["test"].items():
        print(f"  {task:<10}" + "  ".join(f"{k} {v:.2f}" for k, v in m.items() if not k.startswith("_")))
    print(f"  trainable {res['trainable']:,} / {res['total']:,} ({res['percent']:.2f}%)")


def run_train(args) -> int:
    from adapterkit.train.trainer import Trainer, _is_main

    trainer = Trainer(args.config, args.output, max_steps=args.max_steps)
    res = trainer.fit()
    if _is_main():
        print(f"results: {args.output}/results.json ({res['checkpoint']})")
        _print_results(res)
    return 0


def run_eval(args) -> int:
    from pathlib import Path

    from adapterkit.errors import CheckpointError
    from adapterkit.train.trainer import Trainer

    run_dir = Path(args.checkpoint)
    which = next((n for n in ("best", "final") if (run_dir / n / "trainable.safetensors").exists()), None)
    if which is None:
        raise CheckpointError(f"no trained run in {run_dir} (expected best/ or final/trainable.safetensors)")
    trainer = Trainer(args.config, run_dir)
    trainer._load_best(which)
    trainer.cfg.eval.select_on = "last"  # evaluate the weights just loaded
    trainer.cfg.data.test_split = {"val": trainer.cfg.data.val_split, "test": trainer.cfg.data.test_split}.get(
        args.split, args.split)
    res = trainer.test()
    print(json.dumps({t: {k: round(v, 2) for k, v in m.items()} for t, m in res["test"].items()}))
    return 0


def run(args) -> int:  # pragma: no cover - dispatch is per sub-command
    return args._run(args)
