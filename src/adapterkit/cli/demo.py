"""``adapterkit demo`` (the offline flagship run) and ``adapterkit compare`` (every preset)."""

from __future__ import annotations


def add_parser(sub):
    d = sub.add_parser("demo", help="multi-task VL-Adapter on FashionVL (real photos, EfficientNet, SmolLM2)")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--data", default="data_cache/fashionvl")
    d.add_argument("--scale", default="default", choices=["tiny", "default", "large"],
                   help="tiny: CI smoke run; default: fits 15 min on a 2-core CPU; large: GPU")
    d.add_argument("--preset", default="single_adapter")
    d.add_argument("--steps", type=int, default=None)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(_run=run_demo)
    c = sub.add_parser("compare", help="run several presets on FashionVL with one budget; table + Pareto plot")
    c.add_argument("--presets", default="full_finetune,single_adapter,multiple_adapters,half_shared_adapters,"
                   "hyperformer,single_compacter,single_lora,single_prompt")
    c.add_argument("--out", default="runs/compare")
    c.add_argument("--data", default="data_cache/fashionvl")
    c.add_argument("--scale", default="default", choices=["tiny", "default", "large"])
    c.add_argument("--steps", type=int, default=None)
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(_run=run_compare)
    return [d, c]


def run_demo(args) -> int:
    from adapterkit.vl.benchmark import demo

    demo(args.out, args.data, args.scale, args.preset, args.steps, args.seed)
    return 0


def run_compare(args) -> int:
    from adapterkit.vl.benchmark import compare

    compare([p.strip() for p in args.presets.split(",") if p.strip()], args.out, args.data, args.scale, args.steps,
            args.seed)
    return 0


def run(args) -> int:  # pragma: no cover
    return args._run(args)
