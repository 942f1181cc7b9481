"""The offline flagship benchmark: multi-task VL-Adapter on FashionVL.

``prepare`` builds FashionVL from the real Fashion-MNIST photos and extracts frozen
EfficientNet-Lite0 grid features (cached); ``run_preset`` trains one preset on all four
tasks with a causal VL model (SmolLM2-135M with visual prefix tokens by default) and
evaluates on test; ``demo`` prints the table and writes results + a plot;
``compare`` runs several presets with the same budget and plots score against
trainable parameters with the Pareto front.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from adapterkit.safeio import atomic_write_json

TASKS = ["vqa", "gqa", "nlvr", "caption"]

SCALES = {
    # name: (fashionvl sizes (None = package default), backbone, steps, batch, eval examples per task, feature px)
    "tiny": dict(fashionvl_tiny=True, backbone="tiny-llama", steps=24, batch_size=8, eval_examples=None,
                 resolution=64),
    "default": dict(fashionvl_tiny=False, backbone="smollm2", steps=260, batch_size=16, eval_examples=120,
                    resolution=112),
    "large": dict(fashionvl_tiny=False, backbone="smollm2", steps=3000, batch_size=32, eval_examples=None,
                  resolution=224),
}


def prepare(data_dir: str | Path, tiny: bool, resolution: int, grid: int = 2, seed: int = 0) -> tuple[Path, Path]:
    """Build FashionVL (if missing) and its EfficientNet-Lite0 feature store (if missing)."""
    from adapterkit.data.fashionvl import build_fashionvl, iter_fashionvl_images
    from adapterkit.vl.features import FeatureStore, extract_features

    data_dir = Path(data_dir)
    print(f"[1/4] FashionVL from Fashion-MNIST photos -> {data_dir}")
    build_fashionvl(data_dir, seed=seed, tiny=tiny)
    feats = data_dir / f"features-effnet-lite0-{resolution}px-g{grid}"
    try:
        FeatureStore.open(feats)
        print(f"[2/4] features cached in {feats}")
    except Exception:
        print(f"[2/4] extracting EfficientNet-Lite0 features ({resolution}px, {grid}x{grid} grid) -> {feats}")
        extract_features(iter_fashionvl_images(data_dir), "efficientnet-lite0", feats, batch_size=64, grid=grid,
                         resolution=resolution)
    return data_dir, feats


def run_config(data_dir, feats, preset: str, scale: dict, seed: int = 0, lr: float | None = None) -> dict:
    cpu_eval = {"batch_size": 32, "max_new_tokens": 4, "caption_max_new_tokens": 16, "caption_beams": 1,
                "select_on": "last"}
    return {
        "name": f"fashionvl-{preset}",
        "model": {"backbone": scale["backbone"], "feat_dim": 1280, "n_images": 2},
        "preset": preset,
        "data": {"root": str(data_dir), "features": str(feats), "tasks": TASKS,
                 "max_eval_examples": scale["eval_examples"]},
        "train": {"epochs": 100, "max_steps": scale["steps"], "batch_size": scale["batch_size"],
                  "task_batch_scale": {t: 1.0 for t in TASKS}, "seed": seed, "checkpoint_every": 100,
                  "max_text_len": 32, "max_target_len": 24, "eval_every_epoch": False, "warmup_ratio": 0.05,
                  **({"lr": lr} if lr else {})},
        "eval": cpu_eval,
    }


def run_preset(data_dir, feats, preset, scale, out_dir, seed=0, lr=None) -> dict:
    from adapterkit.train.trainer import Trainer

    trainer = Trainer(run_config(data_dir, feats, preset, scale, seed, lr), out_dir)
    return trainer.fit()


def _baseline_percent(b: dict) -> float:
    return 100.0 * b["score"]


def table(res: dict, baseline: dict) -> str:
    rows = [f"{'task':<9}{'metric':<10}{'score':>8}{'majority':>10}"]
    for t in TASKS:
        m = res["test"][t]
        key = "CIDEr" if "CIDEr" in m else "accuracy"
        rows.append(f"{t:<9}{key:<10}{m[key]:>8.1f}{_baseline_percent(baseline[t]):>10.1f}")
    rows.append(f"{'average':<19}{res['test_avg']:>8.1f}"
                f"{sum(_baseline_percent(baseline[t]) for t in TASKS) / len(TASKS):>10.1f}")
    rows.append(f"trainable {res['trainable']:,} of {res['total']:,} parameters ({res['percent']:.2f}%), "
                f"{res['steps']} steps, wall time {res['wall_time_s']:.0f} s")
    return "\n".join(rows)


def plot_demo(res: dict, baseline: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = range(len(TASKS))
    scores = [res["test"][t].get("accuracy", res["test"][t].get("CIDEr")) for t in TASKS]
    base = [_baseline_percent(baseline[t]) for t in TASKS]
    ax.bar([x - 0.2 for x in xs], scores, 0.4, label=f"{res['preset']} ({res['percent']:.1f}% trained)")
    ax.bar([x + 0.2 for x in xs], base, 0.4, label="majority answer")
    ax.set_xticks(list(xs), [f"{t}\n({'CIDEr-D' if t == 'caption' else 'acc.'})" for t in TASKS])
    ax.set_ylabel("test score")
    ax.set_title("FashionVL: one shared adapter, four tasks")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def demo(out_dir="runs/demo", data_dir="data_cache/fashionvl", scale_name="default", preset="single_adapter",
         steps=None, seed=0) -> dict:
    from adapterkit.data.fashionvl import fashionvl_stats, majority_baseline

    t0 = time.time()
    scale = dict(SCALES[scale_name])
    if steps:
        scale["steps"] = steps
    data_dir, feats = prepare(data_dir, scale["fashionvl_tiny"], scale["resolution"], seed=seed)
    stats = fashionvl_stats(data_dir)
    base = majority_baseline(data_dir)
    out = Path(out_dir)
    print("[3/4] train " + f"{preset} on {', '.join(TASKS)} with {scale['backbone']} ({scale['steps']} steps)")
    res = run_preset(data_dir, feats, preset, scale, out / preset, seed)
    res["majority_baseline"] = base
    res["fashionvl_stats"] = stats
    res["total_wall_time_s"] = time.time() - t0
    atomic_write_json(out / "results.json", res)
    plot_demo(res, base, out / "demo.png")
    print("[4/4] test results (FashionVL test split: photos never seen in training)")
    print(table(res, base))
    print(f"results: {out / 'results.json'}  plot: {out / 'demo.png'}  total {res['total_wall_time_s']:.0f} s")
    return res


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points on the front (fewer trainable params, higher score)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def compare(presets: list[str], out_dir="runs/compare", data_dir="data_cache/fashionvl", scale_name="default",
            steps=None, seed=0) -> dict:
    from adapterkit.data.fashionvl import majority_baseline

    scale = dict(SCALES[scale_name])
    if steps:
        scale["steps"] = steps
    data_dir, feats = prepare(data_dir, scale["fashionvl_tiny"], scale["resolution"], seed=seed)
    base = majority_baseline(data_dir)
    out = Path(out_dir)
    results = {}
    for p in presets:
        done = out / p / "results.json"
        if done.exists():
            results[p] = json.loads(done.read_text())
            print(f"{p}: cached ({results[p]['test_avg']:.2f})")
            continue
        print(f"== {p}")
        results[p] = run_preset(data_dir, feats, p, scale, out / p, seed)
    summary = {
        "scale": scale, "majority_baseline": base,
        "presets": {p: {"percent": r["percent"], "trainable": r["trainable"], "test_avg": r["test_avg"],
                        "wall_time_s": r["wall_time_s"],
                        **{t: _main(r["test"][t]) for t in TASKS}} for p, r in results.items()},
    }
    atomic_write_json(out / "compare.json", summary)
    lines = [f"| preset | trainable % | {' | '.join(TASKS)} | average | wall s |", "|---" * (len(TASKS) + 4) + "|"]
    for p, s in summary["presets"].items():
        lines.append(f"| {p} | {s['percent']:.2f} | " + " | ".join(f"{s[t]:.1f}" for t in TASKS)
                     + f" | {s['test_avg']:.1f} | {s['wall_time_s']:.0f} |")
    lines.append("| majority answer | - | " + " | ".join(f"{_baseline_percent(base[t]):.1f}" for t in TASKS)
                 + f" | {sum(_baseline_percent(base[t]) for t in TASKS) / 4:.1f} | - |")
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot_compare(summary, out / "compare.png")
    return summary


def _main(m: dict) -> float:
    from adapterkit.train.trainer import Trainer

    return Trainer.main_score(m)


def plot_compare(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["presets"])
    pts = [(summary["presets"][n]["percent"], summary["presets"][n]["test_avg"]) for n in names]
    front = pareto(pts)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.scatter([p[0] for p in pts], [p[1] for p in pts])
    for n, (x, y) in zip(names, pts):
        ax.annotate(n, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    fx = sorted(pts[i] for i in front)
    ax.plot([p[0] for p in fx], [p[1] for p in fx], "o--", color="tab:red", label="Pareto front")
    base = summary.get("majority_baseline")
    if base:
        ax.axhline(sum(100.0 * b["score"] for b in base.values()) / len(base), color="gray", lw=0.8, ls=":",
                   label="majority answer")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (%)")
    ax.set_ylabel("FashionVL test average")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
