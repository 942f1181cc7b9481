"""``adapterkit demo`` (the offline flagship run) and ``adapterkit compare`` (every preset)."""

from __future__ import annotations

from adapterkit.cli.argtypes import nonnegative_int, positive_float, positive_int


def add_parser(sub):
    d = sub.add_parser("demo", help="multi-task VL-Adapter on FashionVL (real photos, EfficientNet, SmolLM2)")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--data", default="data_cache/fashionvl")
    d.add_argument("--scale", default="default", choices=["tiny", "default", "large"],
                   help="tiny: CI smoke run; default: fits 15 min on a 2-core CPU; large: GPU")
    d.add_argument("--preset", default="single_adapter")
    d.add_argument("--steps", type=positive_int, default=None)
    d.add_argument("--seed", type=nonnegative_int, default=0)
    d.add_argument("--eval-examples", type=_eval_n, default=-1, metavar="N|all",
                   help="test examples per task (default: 500 at the default scale, all otherwise)")
    d.set_defaults(_run=run_demo)
    c = sub.add_parser("compare", help="run several presets on FashionVL with one budget; table + Pareto plot")
    c.add_argument("--presets", default="full_finetune,single_adapter,multiple_adapters,half_shared_adapters,"
                   "hyperformer,single_compacter,single_lora,single_prompt")
    c.add_argument("--out", default="runs/compare")
    c.add_argument("--data", default="data_cache/fashionvl")
    c.add_argument("--scale", default="default", choices=["tiny", "default", "large"])
    c.add_argument("--steps", type=positive_int, default=None)
    c.add_argument("--seed", type=nonnegative_int, default=0, help="the first seed")
    c.add_argument("--seeds", type=positive_int, default=1, help="runs per preset (seeds SEED, SEED+1, ...)")
    c.add_argument("--eval-examples", type=_eval_n, default=-1, metavar="N|all",
                   help="test examples per task (default: all of the test split)")
    c.add_argument("--curve-every", type=nonnegative_int, default=None, metavar="K",
                   help="score the validation subset every K steps (0: no learning curve)")
    c.add_argument("--curve-examples", type=positive_int, default=None, metavar="N",
                   help="validation examples per task for the learning curve")
    c.add_argument("--curve-seeds", type=nonnegative_int, default=None, metavar="N",
                   help="record the curve for the first N seeds only (default: every seed)")
    c.add_argument("--lr", type=positive_float, default=None, help="one learning rate for every preset (default: each "
                   "preset's own)")
    c.add_argument("--jobs", type=positive_int, default=1, help="runs in parallel processes (each gets cores / jobs threads)")
    c.add_argument("--threads", type=positive_int, default=None, help="torch threads per run (on a CPU shared with other "
                   "jobs, 1 is much faster than 2)")
    c.add_argument("--bf16", action="store_true", default=None,
                   help="bf16 autocast, frozen weights in bf16 (faster only on CPUs with AVX-512 BF16 or AMX, "
                   "there about 1.8x; without them bf16 is emulated and much slower). It changes the scores: on "
                   "FashionVL a run from the same initial weights moved 4.7 and 7.6 points, both ways; over "
                   "24 runs -1.7 [-4.4, +1.0] on average (docs/results/fashionvl_bf16)")
    c.add_argument("--eval-batch-size", type=positive_int, default=None, metavar="N",
                   help="examples per generation batch (default: the scale's, 64)")
    c.add_argument("--checkpoint-every", type=positive_int, default=None, metavar="K",
                   help="steps between resumable checkpoints (default 100)")
    c.add_argument("--keep-checkpoints", action="store_true",
                   help="keep each finished run's resumable checkpoints (default: removed once the run is recorded; "
                   "a FashionVL full fine-tuning run's were 4.6 GB; the trained weights stay in final/)")
    c.add_argument("--no-estimate", action="store_true",
                   help="start without measuring the estimated duration and the disk it needs")
    c.add_argument("--estimate-only", action="store_true", help="measure, print the estimated duration and disk, stop")
    c.add_argument("--summarize", action="store_true",
                   help="run nothing: rewrite compare.json / .md / plots in --out from the finished runs of these "
                   "presets and seeds (runs several compares added), listing the missing ones")
    c.add_argument("--reuse", nargs="+", default=None, metavar="DIR",
                   help="copy the finished runs of these presets and seeds (same budget) from other compare "
                   "folders into --out before running the rest (more seeds or presets on top of a compare)")
    c.set_defaults(_run=run_compare)
    return [d, c]


def run_demo(args) -> int:
    from adapterkit.vl.benchmark import demo

    demo(args.out, args.data, args.scale, args.preset, args.steps, args.seed, args.eval_examples)
    return 0


def run_compare(args) -> int:
    import shlex
    import sys

    from adapterkit.vl.benchmark import compare

    compare([p.strip() for p in args.presets.split(",") if p.strip()], args.out, args.data, args.scale, args.steps,
            args.seed, seeds=args.seeds, eval_examples=args.eval_examples, curve_every=args.curve_every,
            curve_examples=args.curve_examples, curve_seeds=args.curve_seeds, estimate=not args.no_estimate,
            estimate_only=args.estimate_only, jobs=args.jobs, lr=args.lr, threads=args.threads, bf16=args.bf16,
            command="adapterkit " + shlex.join(sys.argv[1:]), summarize_only=args.summarize,
            eval_batch_size=args.eval_batch_size, checkpoint_every=args.checkpoint_every, reuse=args.reuse,
            keep_checkpoints=args.keep_checkpoints)
    return 0


def _eval_n(text: str):
    """--eval-examples: a positive count, or "all" (None: the whole split; the option's metavar says so)."""
    return None if text == "all" else positive_int(text)


def run(args) -> int:  # pragma: no cover
    return args._run(args)
