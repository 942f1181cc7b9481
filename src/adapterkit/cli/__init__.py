"""The ``adapterkit`` command line: one verb per job, each defined next to its code."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from adapterkit.errors import AdapterKitError

# (module, help) — each module defines add_parser(subparsers) and run(args) -> int
COMMANDS = [
    "adapterkit.cli.params",
    "adapterkit.cli.train",
    "adapterkit.cli.demo",
    "adapterkit.vl.features",
    "adapterkit.vl.feature_import",
    "adapterkit.vl.datasets.fashionvl",
    "adapterkit.bench.cli",
    "adapterkit.cache.pipeline",
    "adapterkit.sft.cli",
    "adapterkit.merging.cli",
    "adapterkit.pruning.cli",
    "adapterkit.vision.cli",
    "adapterkit.audio.cli",
    "adapterkit.rec.cli",
    "adapterkit.text.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adapterkit", description="Parameter-efficient transfer learning with adapters.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod_name in COMMANDS:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("adapterkit"):
                continue  # an optional part that is not in this build
            raise
        result = mod.add_parser(sub)
        for p in result if isinstance(result, (list, tuple)) else [result]:
            if p is not None and p.get_default("_run") is None:
                p.set_defaults(_run=mod.run)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        import adapterkit

        print(adapterkit.__version__)
        return 0
    if not getattr(args, "_run", None):
        parser.print_help()
        return 1
    if os.environ.get("ADAPTERKIT_NO_PROGRESS") == "1":
        from adapterkit.engine.engine import quiet_hf_progress

        quiet_hf_progress()
    try:
        code = int(args._run(args) or 0)
    except AdapterKitError as e:
        print(f"adapterkit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if code == 0 and "torch" in sys.modules:
        from adapterkit.engine.distributed import shutdown_distributed

        shutdown_distributed()  # a torchrun rank's process group, before the interpreter's teardown
    return code


def entry() -> None:
    """The ``adapterkit`` console script and ``python -m adapterkit.cli``: :func:`main`, then exit
    with its code. A torchrun / accelerate rank whose run finished leaves through
    :func:`adapterkit.engine.distributed.exit_now` (gloo's threads can abort the interpreter's
    teardown, and torchrun then reports the finished run as failed)."""
    code = main()
    if "torch" in sys.modules:
        from adapterkit.engine import distributed

        if distributed.left_group():
            distributed.exit_now(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
