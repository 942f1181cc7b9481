"""The compare's and the demo's figures (matplotlib, written with the Agg backend).

- `plot_demo`: one run's test score per task (95% bootstrap bars) beside the majority answer;
- `plot_compare`: each preset's seed-mean average against its trainable parameters (log x), with
  the interval over test examples, the interval over seeds, every seed, and the Pareto front;
- `plot_differences`: each preset minus full fine-tuning, seed by seed, with the interval over
  seeds against the +-margin band (does the preset match the reference to that margin?);
- `plot_curves`: validation score against step, every preset on one plot per task.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from adapterkit.vl.benchmark import REFERENCE, TASKS, _baseline_percent, _main_key


def plot_demo(res: dict, baseline: dict, path: Path, intervals: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = np.arange(len(TASKS))
    scores = np.array([res["test"][t][_main_key(res["test"][t])] for t in TASKS])
    base = [_baseline_percent(baseline[t]) for t in TASKS]
    yerr = None
    if intervals:
        yerr = np.array([[scores[i] - intervals[t][0], intervals[t][1] - scores[i]] for i, t in enumerate(TASKS)]).T
    ax.bar(xs - 0.2, scores, 0.4, yerr=yerr, capsize=3, label=f"{res['preset']} ({res['percent']:.1f}% trained)")
    ax.bar(xs + 0.2, base, 0.4, label="majority answer")
    ax.set_xticks(list(xs), [f"{t}\n({'CIDEr-D' if t == 'caption' else 'acc.'})" for t in TASKS])
    ax.set_ylabel("test score (95% bootstrap interval)")
    ax.set_title("FashionVL: one shared adapter, four tasks")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points on the front (fewer trainable params, higher score)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def plot_compare(summary: dict, path: Path) -> None:
    """Seed-mean test average against trainable parameters: black bars = 95% bootstrap interval over
    test examples, orange bars (offset) = 95% t-interval over seeds, small dots = each seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["presets"])
    pres = [summary["presets"][n] for n in names]
    pts = [(s["percent"], s["mean"]["average"]) for s in pres]
    front = pareto(pts)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for n, s, (x, y) in zip(names, pres, pts):
        lo, hi = s["example_interval"]["average"]
        ax.errorbar([x], [y], yerr=[[y - lo], [hi - y]], fmt="o", color="tab:blue", ecolor="black", capsize=3,
                    zorder=3)
        si = s["seed_interval"]["average"]
        if si is not None:
            ax.errorbar([x * 1.12], [y], yerr=[[y - si[0]], [si[1] - y]], fmt="none", ecolor="tab:orange",
                        capsize=2, lw=1.2)
        seeds = [r["scores"]["average"] for r in s["seeds"]]
        if len(seeds) > 1:
            ax.scatter([x * 0.9] * len(seeds), seeds, s=8, color="tab:gray", zorder=2)
        ax.annotate(n, (x, y), fontsize=7, xytext=(5, 3), textcoords="offset points")
    fx = sorted(pts[i] for i in front)
    ax.plot([p[0] for p in fx], [p[1] for p in fx], "--", color="tab:red", label="Pareto front (means)")
    ax.errorbar([], [], yerr=[], fmt="o", color="tab:blue", ecolor="black", capsize=3,
                label="95% bootstrap over test examples")
    if any(s["seed_interval"]["average"] is not None for s in pres):
        ax.errorbar([], [], yerr=[], fmt="none", ecolor="tab:orange", capsize=2, label="95% t-interval over seeds")
        ax.scatter([], [], s=8, color="tab:gray", label="each seed")
    base = summary.get("majority_baseline")
    if base:
        ax.axhline(sum(100.0 * b["score"] for b in base.values()) / len(base), color="gray", lw=0.8, ls=":",
                   label="majority answer")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (%)")
    ax.set_ylabel("FashionVL test average")
    n_seeds = len(summary["protocol"]["seeds"])
    sizes = pres[0]["test_sizes"]
    ax.set_title(f"FashionVL, {n_seeds} seed(s), test examples per task: "
                 + ", ".join(f"{t} {sizes[t]}" for t in TASKS), fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(curves: dict[str, list[list[dict]]], path: Path) -> None:
    """Validation score against step: the average and each task, one line per preset (the mean over
    seeds; a band from the lowest to the highest seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["average"] + TASKS
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.4))
    for i, (name, per_seed) in enumerate(curves.items()):
        per_seed = [c for c in per_seed if c]
        if not per_seed:
            continue
        steps = sorted(set.intersection(*[{p["step"] for p in c} for c in per_seed]))
        if not steps:
            continue
        color = plt.cm.tab10(i % 10)
        for ax, k in zip(axes, keys):
            vals = np.array([[{p["step"]: p[k] for p in c}[s] for s in steps] for c in per_seed])
            ax.plot(steps, vals.mean(0), "o-", ms=3, color=color, label=name if k == "average" else None)
            if len(per_seed) > 1:
                ax.fill_between(steps, vals.min(0), vals.max(0), color=color, alpha=0.15, lw=0)
    for ax, k in zip(axes, keys):
        ax.set_title(k + (" (CIDEr-D)" if k == "caption" else ""), fontsize=9)
        ax.set_xlabel("training step")
    axes[0].set_ylabel("validation score (subset)")
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_differences(summary: dict, path: Path) -> bool:
    """Each preset minus the reference (full fine-tuning) on the test average: a dot per paired seed,
    the 95% t-interval over seeds (orange) and the paired bootstrap over test examples (black), over a
    gray band of +-the margin. Returns False (and writes nothing) when no preset has a difference."""
    rows = [(p, s["vs_reference"]) for p, s in summary["presets"].items() if s.get("vs_reference")]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = {r["seed"]: r["scores"]["average"] for r in summary["presets"][REFERENCE]["seeds"]}
    margin = summary["protocol"].get("margin_points")
    fig, ax = plt.subplots(figsize=(7.5, 0.7 * len(rows) + 2.0))
    if margin:
        ax.axvspan(-margin, margin, color="0.9", zorder=0, label=f"±{margin:g} points")
    ax.axvline(0, color="gray", lw=0.8)
    for i, (p, vs) in enumerate(rows):
        y = len(rows) - 1 - i
        d = [r["scores"]["average"] - ref[r["seed"]] for r in summary["presets"][p]["seeds"] if r["seed"] in ref]
        ax.scatter(d, [y + 0.18] * len(d), s=10, color="tab:gray", zorder=2)
        lo, hi = vs["example_interval"]
        ax.errorbar([vs["difference"]], [y], xerr=[[vs["difference"] - lo], [hi - vs["difference"]]], fmt="o",
                    color="tab:blue", ecolor="black", capsize=3, zorder=3)
        if vs["seed_interval"] is not None:
            slo, shi = vs["seed_interval"]
            ax.errorbar([vs["difference"]], [y - 0.18], xerr=[[vs["difference"] - slo], [shi - vs["difference"]]],
                        fmt="none", ecolor="tab:orange", capsize=3, lw=1.4)
        verdict = vs.get("margin", {}).get("equivalence")
        ax.annotate(f"{vs['seeds_paired']} seed(s)" + (f", {verdict}" if verdict else ""), (hi, y),
                    fontsize=7, xytext=(6, -3), textcoords="offset points")
    ax.scatter([], [], s=10, color="tab:gray", label="each seed")
    ax.errorbar([], [], xerr=[], fmt="o", color="tab:blue", ecolor="black", capsize=3,
                label="95% paired bootstrap over test examples")
    ax.errorbar([], [], xerr=[], fmt="none", ecolor="tab:orange", capsize=3, label="95% t-interval over seeds")
    ax.set_yticks(range(len(rows)), [p for p, _ in reversed(rows)], fontsize=8)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.set_xlabel(f"test average minus {REFERENCE} (points)")
    sizes = summary["presets"][REFERENCE]["test_sizes"]
    ax.set_title("FashionVL, paired by seed; test examples per task: " + ", ".join(f"{t} {sizes[t]}" for t in TASKS),
                 fontsize=8)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=4, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
