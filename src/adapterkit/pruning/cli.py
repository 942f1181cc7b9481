"""``adapterkit prune --amount 0.5 --rounds 2 IN_DIR --out DIR`` (MiMi, no retraining)."""

from __future__ import annotations

import argparse

from adapterkit.cli.argtypes import fraction, nonnegative_int, positive_int
from adapterkit.pruning.mimi import prune_adapter_dir


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "prune", help="MiMi structured pruning of a saved bottleneck adapter",
        description="Remove the hidden units with the lowest MiMi scores (global threshold, schedule "
                    "a_t = a_{t-1} + (1 - a_{t-1}) * amount) and write a smaller adapter. Without retraining, "
                    "several rounds compound the schedule; use adapterkit.pruning.prune_model to retrain "
                    "between rounds.")
    p.add_argument("in_dir", metavar="IN_DIR", help="adapter directory written by save_adapters")
    p.add_argument("--out", required=True, help="output adapter directory")
    p.add_argument("--amount", type=fraction, default=0.5, help="fraction pruned per round (rho)")
    p.add_argument("--rounds", type=positive_int, default=1)
    p.add_argument("--min-keep", type=nonnegative_int, default=0,
                   help="hidden units every adapter keeps at least (default 0: an adapter may be removed, as MiMi)")
    p.add_argument("--normalize", action="store_true",
                   help="divide each adapter's scores by their maximum (MiMi's weighted=1; its scripts use 0)")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    s = prune_adapter_dir(args.in_dir, args.out, args.amount, args.rounds, args.min_keep, args.normalize)
    print(f"pruned {s['initial_units']} -> {s['units']} hidden units "
          f"({100 * (1 - s['units'] / max(s['initial_units'], 1)):.1f}% removed) into {args.out}")
    return 0
