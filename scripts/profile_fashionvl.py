"""Profile a short FashionVL run: model build, one training step of each task (after a
warm-up step) and the evaluation of N test examples of each task, with cProfile.

    python scripts/profile_fashionvl.py --preset single_adapter --eval-examples 128 --threads 1 --cpu-clock \
        --set train.bf16=true --set eval.batch_size=64

``--cpu-clock`` times with the process CPU clock: on a shared machine (other jobs on the
same cores) wall time measures the neighbours more than the code; with one thread the CPU
time is what the work costs on one free core. Prints one JSON line of timings, then the
top functions of the training and evaluation profiles. Needs ``adapterkit demo`` (or
``adapterkit compare``) to have built data_cache/fashionvl first.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="single_adapter")
    ap.add_argument("--data", default="data_cache/fashionvl")
    ap.add_argument("--resolution", type=int, default=112)
    ap.add_argument("--eval-examples", type=int, default=128, help="test examples per task")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cpu-clock", action="store_true", help="time with the process CPU clock")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=JSON",
                    help="override a run-config value, e.g. train.bf16=true")
    ap.add_argument("--top", type=int, default=25, help="functions shown per profile")
    args = ap.parse_args()

    import numpy as np
    import torch

    from adapterkit.train.trainer import Trainer
    from adapterkit.vl.benchmark import SCALES, TASKS, feature_dir, run_config
    from adapterkit.vl.data import _seed, task_schedule

    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.cpu_clock else time.perf_counter
    scale = {**SCALES["default"], "eval_examples": args.eval_examples}
    feats = feature_dir(args.data, args.resolution)
    cfg = run_config(args.data, feats, args.preset, scale)
    for item in args.set:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        cfg[section][name] = json.loads(value)
    work = Path(tempfile.mkdtemp(prefix="profile-fashionvl-"))
    try:
        t0 = time.perf_counter()
        tr = Trainer(cfg, work / "run")
        build_s = time.perf_counter() - t0
        sched = task_schedule(tr.num_batches, 0, 0)
        orders = {t: d.epoch_order(0, 0) for t, d in tr.train_data.items()}

        def step(i):
            task, b = sched[i]
            bs = tr.batch_sizes[task]
            tr.train_step(task, orders[task][b * bs:(b + 1) * bs], _seed(0, 0, task, b))
            return task

        step(0)  # warm-up
        step_s: dict[str, float] = {}
        train_prof = cProfile.Profile()
        for i in range(1, len(sched)):
            if len(step_s) == len(TASKS):
                break
            if sched[i][0] in step_s:
                continue
            train_prof.enable()
            t = clock()
            task = step(i)
            step_s[task] = clock() - t
            train_prof.disable()
        eval_prof = cProfile.Profile()
        eval_s = {}
        for task in TASKS:
            eval_prof.enable()
            t = clock()
            n = len(tr.predict(task, "test"))
            eval_s[task] = 100 * (clock() - t) / n
            eval_prof.disable()
        w = {t: n / sum(tr.num_batches.values()) for t, n in tr.num_batches.items()}
        print(json.dumps({
            "preset": args.preset, "threads": torch.get_num_threads(), "clock": clock.__name__,
            "overrides": args.set, "build_wall_s": round(build_s, 1),
            "step_s": {t: round(v, 3) for t, v in step_s.items()},
            "mean_step_s": round(sum(w[t] * step_s[t] for t in TASKS), 3),
            "eval_s_per_100": {t: round(v, 2) for t, v in eval_s.items()},
            "eval_s_per_100_mean": round(float(np.mean(list(eval_s.values()))), 2),
            "load_average": os.getloadavg()[0],
        }))
        for name, prof in (("training steps", train_prof), ("evaluation", eval_prof)):
            print(f"===== {name}")
            pstats.Stats(prof).sort_stats("cumulative").print_stats(args.top)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
