"""One compare folder read on an average over some of its tasks (e.g. the three answer tasks,
without captioning, whose CIDEr-D carries most of the seed-to-seed spread): per preset the mean
of that average over its seeds, and minus the reference preset, paired over the same test
examples and over seeds, read against +-2 points exactly as `adapterkit compare` reads the
four-task average.

    python scripts/fashionvl_task_subset.py runs/fashionvl_bf16_1040 --tasks vqa,gqa,nlvr \
        [--reference full_finetune] [--out docs/results/x]   # writes task_subset.json / .md
"""

from __future__ import annotations

import argparse
from pathlib import Path

from adapterkit.errors import AdapterKitError, DataError
from adapterkit.safeio import atomic_write_json, atomic_write_text
from adapterkit.stats import t_interval
from adapterkit.vl import benchmark as B


def subset(folder, tasks: list[str], reference: str = "full_finetune", n_resamples: int = 2000) -> dict:
    tasks = B.task_names(tasks)
    runs = B.load_runs(folder)
    if reference not in runs:
        raise DataError(f"{folder}: no finished run of the reference preset {reference!r} "
                        f"(presets there: {', '.join(runs) or 'none'})")
    out = {"folder": str(folder), "tasks": tasks, "reference": reference, "margin": B.MARGIN, "presets": {}}
    for name, rs in runs.items():
        avgs = [B.task_average(r, tasks) for r in rs]
        iv = t_interval(avgs)
        row = {"seeds": [r["seed"] for r in rs], "averages": avgs, "mean": iv.mean,
               "seed_interval": None if iv.low is None else [iv.low, iv.high]}
        vs = None if name == reference else B.vs_reference(rs, runs[reference], n_resamples, tasks=tasks)
        if vs is not None:
            row["vs_reference"] = vs
        out["presets"][name] = row
    return out


def table(res: dict) -> str:
    tasks = ", ".join(res["tasks"])
    lines = [f"Average over {tasks} (`{res['folder']}`); minus {res['reference']} on the seeds both have.", "",
             "| preset | seeds | mean [95% t over seeds] | minus reference [95% paired over test examples] | "
             "over seeds | ±2 |", "|---|---|---|---|---|---|"]
    for name, r in res["presets"].items():
        mean = f"{r['mean']:.1f}{B._iv(r['seed_interval'])}"
        vs = r.get("vs_reference")
        if vs is None:
            lines.append(f"| {name} | {len(r['seeds'])} | {mean} | - | - | - |")
            continue
        lines.append(f"| {name} | {len(r['seeds'])} | {mean} | {vs['difference']:+.1f}{B._iv(vs['example_interval'])} "
                     f"| {B._iv(vs['seed_interval']).strip() or '-'} ({vs['seeds_paired']} seeds) "
                     f"| {B._margin_cell(vs).removeprefix('; ')} |")
    lines += ["", "±2: the interval over seeds (over test examples with one seed) read against ±2 points, as in "
              "`adapterkit compare`: within / outside / undetermined; no worse when its low end is above -2."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder")
    ap.add_argument("--tasks", required=True, help="comma-separated, among " + ", ".join(B.TASKS))
    ap.add_argument("--reference", default="full_finetune")
    ap.add_argument("--out", help="folder for task_subset.json and task_subset.md")
    args = ap.parse_args(argv)
    try:
        res = subset(Path(args.folder), [t.strip() for t in args.tasks.split(",") if t.strip()], args.reference)
    except AdapterKitError as e:
        raise SystemExit(f"fashionvl_task_subset: {e}") from None
    md = table(res)
    print(md, end="")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "task_subset.json", res)
        atomic_write_text(out / "task_subset.md", md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
