"""BBC News topic classification on MiniLM through the text domain: LoRA, full fine-tuning,
a linear probe (frozen encoder + head) and the majority class, 3 seeds each, on the whole
test split (444 articles), with 95% intervals (bootstrap over test articles per seed; t over
seeds) and the paired difference to full fine-tuning.

    adapterkit text export-bbc data/text
    python examples/text_bbc_compare.py --data data/text --out runs/bbc-compare --seeds 3

Writes docs/results/text/bbc.json and bbc.md (with --results).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import time
from pathlib import Path

import numpy as np

METHODS = {
    "lora": {"adapters": [{"method": "lora", "r": 8, "alpha": 16}], "lr": 2e-3},
    "full_finetune": {"adapters": [], "lr": 5e-5},
    "linear_probe": {"adapters": [], "lr": 1e-2, "freeze_backbone": True},
}


def config(data, method, seed, epochs, max_train):
    m = METHODS[method]
    model = {"name_or_path": "minilm", "max_length": 128, "pool": "mean", "init_seed": seed}
    if m.get("freeze_backbone"):
        model["freeze_backbone"] = True
    return {"domain": "text", "name": f"bbc-{method}-s{seed}", "model": model, "adapters": m["adapters"],
            "data": {"root": str(data), "tasks": ["bbc"], **({"max_train_examples": max_train} if max_train else {})},
            "train": {"epochs": epochs, "batch_size": 16, "lr": m["lr"], "warmup_ratio": 0.06, "seed": seed,
                      "checkpoint_every": 1000},
            "eval": {"batch_size": 64}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="data/text")
    ap.add_argument("--out", default="runs/bbc-compare")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--max-train", type=int, default=None)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--results", default=None, help="write bbc.json / bbc.md into this folder")
    a = ap.parse_args()
    os.environ.setdefault("ADAPTERKIT_NO_PROGRESS", "1")
    from adapterkit.stats import bootstrap_difference, bootstrap_interval, t_interval
    from adapterkit.text.config import load_text_config
    from adapterkit.text.data import read_split
    from adapterkit.text.domain import build_engine

    test = read_split(Path(a.data) / "bbc" / "test.jsonl")
    gold = {e.uid: e.label for e in test}
    train_labels = collections.Counter(e.label for e in read_split(Path(a.data) / "bbc" / "train.jsonl"))
    majority = train_labels.most_common(1)[0][0]
    rows: dict = {"majority_class": {"seeds": [], "correct": [[float(g == majority) for g in gold.values()]]}}
    for method in a.methods.split(","):
        rows[method] = {"seeds": [], "correct": []}
        for seed in range(a.seeds):
            out = Path(a.out) / f"{method}-s{seed}"
            t0 = time.time()
            res = build_engine(load_text_config(config(a.data, method, seed, a.epochs, a.max_train)), out).fit()
            preds = json.loads((out / "predictions.json").read_text())["bbc"]
            correct = [float(preds[u] == g) for u, g in gold.items()]
            rows[method]["correct"].append(correct)
            rows[method]["seeds"].append({"seed": seed, "accuracy": 100 * float(np.mean(correct)),
                                          "macro_f1": res["test"]["bbc"]["macro_f1"], "steps": res["steps"],
                                          "trainable": res["trainable"], "percent": res["percent"],
                                          "checkpoint": res["checkpoint"], "seconds": round(time.time() - t0, 1)})
            print(method, seed, rows[method]["seeds"][-1], flush=True)
    summary = {}
    for method, r in rows.items():
        per_seed = [100 * float(np.mean(c)) for c in r["correct"]]
        ex = bootstrap_interval([100 * x for x in np.mean(r["correct"], axis=0)])
        summary[method] = {"accuracy_mean": float(np.mean(per_seed)), "per_seed": per_seed,
                           "seed_interval": t_interval(per_seed).__dict__ if len(per_seed) > 1 else None,
                           "example_interval": ex.__dict__, "n_test": len(gold),
                           "trainable_percent": r["seeds"][0]["percent"] if r["seeds"] else 0.0}
        if method != "full_finetune" and "full_finetune" in rows and method != "majority_class":
            d = bootstrap_difference({"bbc": [100 * x for x in np.mean(r["correct"], axis=0)]},
                                     {"bbc": [100 * x for x in np.mean(rows["full_finetune"]["correct"], axis=0)]})
            summary[method]["minus_full_finetune"] = d.__dict__
    print(json.dumps(summary, indent=1, default=str))
    if a.results:
        res_dir = Path(a.results)
        res_dir.mkdir(parents=True, exist_ok=True)
        cmd = (f"python examples/text_bbc_compare.py --data {a.data} --out {a.out} --seeds {a.seeds} "
               f"--epochs {a.epochs}" + (f" --max-train {a.max_train}" if a.max_train else "") +
               f" --results {a.results}")
        (res_dir / "bbc.json").write_text(json.dumps({"command": cmd, "summary": summary,
                                                      "runs": {m: r["seeds"] for m, r in rows.items()}},
                                                     indent=1, default=str))
        lines = ["# BBC News topics on MiniLM (text domain)", "", f"Command: `{cmd}`", "",
                 f"Test split: {len(gold)} articles, 5 topics. Accuracy (%): mean over seeds, 95% t-interval over "
                 "seeds, and a 95% bootstrap interval over test articles (of the seed-averaged correctness).", "",
                 "| method | trainable % | accuracy | seeds | interval over seeds | interval over articles | minus full FT |",
                 "|---|---|---|---|---|---|---|"]
        for m, s in summary.items():
            si = s["seed_interval"]
            ei = s["example_interval"]
            d = s.get("minus_full_finetune")
            lines.append(f"| {m} | {s['trainable_percent']:.2f} | {s['accuracy_mean']:.1f} | "
                         f"{', '.join(f'{x:.1f}' for x in s['per_seed'])} | "
                         + (f"[{si['low']:.1f}, {si['high']:.1f}]" if si and si.get("low") is not None else "-")
                         + f" | [{ei['low']:.1f}, {ei['high']:.1f}] | "
                         + (f"{d['mean']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}]" if d else "-") + " |")
        (res_dir / "bbc.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
