"""Two FashionVL compare folders that differ in one setting, run by run: a - b per preset, seed
and task with 95% paired bootstrap intervals over the same test examples (e.g. `--bf16` against
fp32 on the same seeds), and over all presets at once: the mean a - b of the runs with its 95%
t-interval, how far a run moves from its b twin against how far b's seeds of one preset are
apart (a setting that acts like another seed moves a run about as far), and the rank
correlation of the presets' mean scores.

    python scripts/fashionvl_paired.py runs/fashionvl_bf16 runs/fashionvl_seeds [--out docs/results/x]
    python scripts/fashionvl_paired.py runs/fashionvl_zero_init runs/fashionvl_all \
        --as-preset single_adapter_zero_init=single_adapter     # a preset of a against another of b
"""

from __future__ import annotations

import argparse
from pathlib import Path

from adapterkit.errors import AdapterKitError
from adapterkit.safeio import atomic_write_json, atomic_write_text
from adapterkit.stats import t_interval as stats_t_interval
from adapterkit.vl import benchmark as B


def overall(res: dict) -> dict:
    """Across presets: a - b of every paired run's average score (mean, 95% t-interval over
    the runs and over the presets' means), the RMS of those differences beside the RMS
    difference between two seeds of one preset in b, and Spearman's rank correlation of the
    presets' mean scores in a and in b."""
    import numpy as np
    from scipy import stats

    runs, per_preset, reseed, mean_a, mean_b = [], [], [], [], []
    for r in res["presets"].values():
        d = [row["a"]["average"] - row["b"]["average"] for row in r["seeds"]]
        runs += d
        per_preset.append(float(np.mean(d)))
        b = [row["b"]["average"] for row in r["seeds"]]
        reseed += [x - y for i, x in enumerate(b) for y in b[i + 1:]]
        mean_a.append(float(np.mean([row["a"]["average"] for row in r["seeds"]])))
        mean_b.append(float(np.mean(b)))

    def t_interval(x):
        iv = stats_t_interval(x)
        return None if iv.low is None else [iv.low, iv.high]

    rho = stats.spearmanr(mean_a, mean_b) if len(mean_a) > 2 else None
    return {"runs": len(runs), "presets": len(per_preset), "mean_difference": float(np.mean(runs)),
            "run_interval": t_interval(runs), "preset_interval": t_interval(per_preset),
            "negative_runs": int(sum(x < 0 for x in runs)),
            "rms_difference": float(np.sqrt(np.mean(np.square(runs)))),
            "rms_b_seed_to_seed": float(np.sqrt(np.mean(np.square(reseed)))) if reseed else None,
            "spearman_preset_means": None if rho is None else float(rho.statistic)}


def overall_text(o: dict) -> str:
    def iv(x):
        return "" if x is None else f" [{x[0]:+.2f}, {x[1]:+.2f}]"
    rms_b = "" if o["rms_b_seed_to_seed"] is None else \
        f" (two seeds of one preset in b: {o['rms_b_seed_to_seed']:.2f})"
    rho = "" if o["spearman_preset_means"] is None else \
        f"; Spearman's rank correlation of the presets' mean averages, a against b: {o['spearman_preset_means']:.2f}"
    return (f"Over all {o['presets']} presets ({o['runs']} paired runs): average a - b {o['mean_difference']:+.2f}"
            f"{iv(o['run_interval'])} (95% t over the runs){iv(o['preset_interval'])} (over the presets' means); "
            f"{o['negative_runs']} of {o['runs']} runs lower in a; RMS of a run's a - b {o['rms_difference']:.2f}"
            f"{rms_b}{rho}.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--out", default=None, help="folder for paired.json and paired.md")
    ap.add_argument("--as-preset", action="append", default=[], metavar="A_NAME=B_NAME",
                    help="pair a's runs of preset A_NAME with b's of B_NAME (only the presets named so are paired)")
    a = ap.parse_args()
    try:
        mapping = dict(item.split("=", 1) for item in a.as_preset)
    except ValueError:
        raise SystemExit(f"error: --as-preset takes A_NAME=B_NAME, got {a.as_preset}") from None
    try:
        res = B.paired_folders(a.a, a.b, as_preset=mapping or None)
    except AdapterKitError as e:
        raise SystemExit(f"error: {e}") from None
    res["overall"] = overall(res)
    md = B.paired_table(res) + "\n\n" + overall_text(res["overall"])
    print(md)
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "paired.json", res)
        atomic_write_text(out / "paired.md", md + "\n")


if __name__ == "__main__":
    main()
