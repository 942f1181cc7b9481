"""``adapterkit merge --method average|aligned|task_arithmetic|ties|dare IN_DIR... --out DIR``."""

from __future__ import annotations

import argparse

from adapterkit.cli.argtypes import fraction, nonnegative_int, positive_int
from adapterkit.merging.merge import METHODS, merge_adapter_dirs


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "merge", help="merge several saved adapters into one adapter directory",
        description="Merge adapter directories: average / aligned (bottleneck or LoRA), "
                    "task_arithmetic / ties / dare (LoRA).")
    p.add_argument("in_dirs", nargs="+", metavar="IN_DIR", help="adapter directories written by save_adapters")
    p.add_argument("--out", required=True, help="output adapter directory")
    p.add_argument("--method", default="average", choices=METHODS)
    p.add_argument("--weights", type=float, nargs="+", default=None,
                   help="one weight per input (default 1/N for average/aligned, 1.0 for LoRA methods)")
    p.add_argument("--reference", type=nonnegative_int, default=0, help="aligned: index of the adapter to align the others to")
    p.add_argument("--match-on", default="down", choices=("down", "both"),
                   help="aligned: match hidden units on down rows (+bias), or also on up columns")
    p.add_argument("--density", type=fraction, default=0.5, help="ties/dare: fraction of entries kept")
    p.add_argument("--rank", type=positive_int, default=None, help="LoRA methods: rank of the merged LoRA (svd)")
    p.add_argument("--refactor", default="svd", choices=("svd", "cat"),
                   help="LoRA methods: re-factorise by SVD, or concatenate ranks (task_arithmetic only)")
    p.add_argument("--dare-mode", default="linear", choices=("linear", "ties"))
    p.add_argument("--seed", type=nonnegative_int, default=0, help="dare: seed of the random drop")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    out = merge_adapter_dirs(args.in_dirs, args.out, args.method, args.weights, reference=args.reference,
                             match_on=args.match_on, density=args.density, rank=args.rank,
                             refactor=args.refactor, dare_mode=args.dare_mode, seed=args.seed)
    print(f"merged {len(args.in_dirs)} adapters ({args.method}) into {out}")
    return 0
