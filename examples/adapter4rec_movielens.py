"""Adapter4Rec on MovieLens-100k: the transfer setting with intervals over seeds and users.

Items are text: ``"Title (Year). Genre, Genre"`` (the MovieLens title carries the year;
:func:`adapterkit.rec.data.movielens_item_text`), encoded by MiniLM-L6 ([CLS] ->
Linear(384 -> 64) -> GELU); users by the SASRec encoder (post-LN, 2 blocks, 2 heads, d 64,
ReLU FFN, bias-free attention, eps 1e-6: Adapter4Rec's reference), BCE with one sampled
negative per position. Leave-last-out per user (train on all but the last two items,
validate on the second-to-last, test on the last), model chosen on validation NDCG@10,
full-ranking HR@10 / NDCG@10 over the target catalogue with each user's history masked.

Transfer setting (``read_movielens``): every movie belongs to exactly one genre group (the
group holding more of its genres: "thrill" = action, crime, horror, sci-fi, thriller, war,
...; "heart" = comedy, drama, romance, children's, ...), and the users are split into two
disjoint seeded halves. Source = the "heart" movies rated by user half "a"; target = the
"thrill" movies rated by half "b": no item and no user in common (checked and recorded).

Source pre-training (once, shared by every target row): SASRec + projection with MiniLM
frozen (its pooled features cached). Target rows, each from the source weights:

- zero-shot: the source model on the target catalogue, no training (a fair transfer: the
  target items are new text to the same item encoder);
- frozen: only the LayerNorms + the item projection train (MiniLM features cached); also
  "frozen_long", 30 epochs instead of 2: cached features make it cheaper than 2 adapter epochs;
- Houlsby adapters (MiniLM bottleneck 64 after attention and FFN, SASRec 16), parallel
  adapters (both sublayers, scale 1), LoRA (q, v; r 12 / 4, loralib's alpha / r with
  alpha 1), full fine-tuning (MiniLM included, lr 1e-4), all with the reference defaults of
  :mod:`adapterkit.rec.model`;
- random ranking: the exact expected HR@10 / NDCG@10 of a uniformly random ranking of each
  test user's unmasked candidates.

Each trained row: seeds 0..S-1 of the target stage (adapter init, data order, negatives).
Reported: the mean over seeds with a 95% t-interval, a 95% bootstrap interval over the
target test users of the seed-averaged per-user scores, the test size, the trainable %,
and the paired bootstrap difference to full fine-tuning (same users, seed-averaged).

Run:  OMP_NUM_THREADS=1 python examples/adapter4rec_movielens.py
      [--seeds 3] [--methods zero_shot,frozen,frozen_long,houlsby,lora,full,parallel] [--out runs/adapter4rec_movielens]
      [--profile]   (one Houlsby target epoch, timed, then exit)

Writes docs/results/rec/movielens.json, movielens_table.md and movielens.png; each run's engine
folder (checkpoints, predictions.json) is under --out, and a finished run is read back, not
retrained, when the script is rerun. Measured results (3 seeds, 468 test users, 8 target steps)
and which of Adapter4Rec's claims they support: docs/results/rec/movielens.md.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from adapterkit.core.base import trainable_report
from adapterkit.engine import Engine
from adapterkit.rec.domain import RecDomain, _fingerprint, load_config
from adapterkit.rec.model import attach_rec_method
from adapterkit.rec.pipeline import build_model, load_domain, load_text_model
from adapterkit.stats import bootstrap_difference, bootstrap_interval, t_interval

K = 10
RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results" / "rec"
CONFIG = {
    "name": "adapter4rec-movielens",
    "source": {"source": "movielens", "genre_group": "heart", "user_half": "a", "min_len": 5, "split_seed": 0},
    "target": {"source": "movielens", "genre_group": "thrill", "user_half": "b", "min_len": 5, "split_seed": 0},
    "model": {"text_model": "minilm", "max_title_tokens": 16, "pool": "cls", "d": 64, "heads": 2, "blocks": 2,
              "max_len": 10, "dropout": 0.1},
    "source_train": {"epochs": 60, "batch_size": 64, "lr": 1e-3, "freeze_text": True, "seed": 0},
    "target_train": {"epochs": 2, "batch_size": 128, "lr": 1e-3},
    "eval": {"batch_size": 256},
    "method": "frozen",
}
LABELS = {"random": "random ranking", "zero_shot": "zero-shot (source model, no adaptation)",
          "frozen": "frozen (LN + projection)",
          "frozen_long": "frozen, 30 epochs (cached features)", "houlsby": "Houlsby adapters", "parallel": "parallel adapters",
          "lora": "LoRA (alpha/r)", "full": "full fine-tuning"}
LR = {"full": 1e-4}  # full fine-tuning moves MiniLM itself: a smaller step, as the BBC example
EPOCHS = {"frozen_long": 30}  # frozen trains from cached features: 30 epochs cost less than 2 of an adapter


def per_user(ranks: np.ndarray) -> dict[str, np.ndarray]:
    hit = (ranks <= K).astype(float)
    return {"HR@10": hit, "NDCG@10": hit / np.log2(ranks + 1.0)}


def random_expectation(domain: RecDomain) -> dict[str, np.ndarray]:
    """Per test user, the expected HR@10 / NDCG@10 of a uniformly random order of the candidates
    (the catalogue minus the masked history; the target is one of them)."""
    hist = domain.eval_sets["test"][1]
    cand = domain.data.num_items - (hist > 0).sum(1).numpy()
    gains = 1.0 / np.log2(np.arange(1, K + 1) + 1.0)
    cum = np.concatenate([[0.0], np.cumsum(gains)])
    top = np.minimum(K, cand)
    return {"HR@10": top / cand, "NDCG@10": cum[top] / cand}


def stage(name, model, data, train_cfg, ecfg, out, full, identity, m) -> tuple[dict, RecDomain]:
    """One engine run (source pre-training or a target adaptation) into ``out``; its test ranks."""
    dom = RecDomain(model, data, m["max_len"], name, full=full, identity=identity)
    eng = Engine(dom, train_cfg, ecfg, out, name=out.name, config=identity, lr=train_cfg.lr)
    t0 = time.time()
    res = eng.fit()
    model.item_encoder.clear_cache()
    preds = json.loads((out / "predictions.json").read_text())[dom.tasks[0]]
    return {"test": res["test"][dom.tasks[0]], "ranks": [preds[u] for u in dom.uids], "steps": res["steps"],
            "checkpoint": res["checkpoint"], "train_seconds": round(time.time() - t0, 1),
            "val_history": res["val_history"]}, dom


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--methods", default="zero_shot,frozen,frozen_long,houlsby,lora,full,parallel")
    ap.add_argument("--out", default="runs/adapter4rec_movielens")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args(argv)
    methods = args.methods.split(",")
    torch.set_num_threads(1)
    cfg = load_config(CONFIG)
    m, out = cfg.model, Path(args.out)
    t_start = time.time()

    text0, tok = load_text_model(m)
    sdata, tdata = load_domain(cfg.source), load_domain(cfg.target)
    overlap = {"items": len(set(sdata.item_ids[1:]) & set(tdata.item_ids[1:])),
               "users": len(set(sdata.users) & set(tdata.users))}
    print(f"source {sdata.stats()}  target {tdata.stats()}  shared {overlap}", flush=True)

    # --- source pre-training (once) -------------------------------------------------------
    smodel = build_model(m, sdata, copy.deepcopy(text0), tok)
    for p in smodel.item_encoder.text.parameters():
        p.requires_grad_(False)
    from adapterkit.engine.engine import Engine

    Engine.seed_all(cfg.source_train.seed)
    sident = {"model": m, "data": cfg.source, "stage": "source", "source_train": dataclasses.asdict(cfg.source_train)}
    src, _ = stage("source", smodel, sdata, cfg.source_train, cfg.eval, out / "source", True, sident, m)
    print(f"source: test {src['test']}  ({src['steps']} steps, {src['train_seconds']} s)", flush=True)
    smodel.cpu()
    source_state = {k: v.detach().clone() for k, v in smodel.state_dict().items()}
    start_sha = _fingerprint(source_state)
    del smodel

    def target_model(method, seed):
        model = build_model(m, tdata, copy.deepcopy(text0), tok)
        model.load_state_dict(source_state)
        Engine.seed_all(seed)
        full = attach_rec_method(model, method, None, True)
        return model, full

    rows: dict[str, dict] = {}
    # --- references without target training ---------------------------------------------
    model, _ = target_model("frozen", 0)
    dom = RecDomain(model, tdata, m["max_len"], "target", full=False)
    model.eval()
    with torch.no_grad():
        zs = dom.predict_batch("target", "test", list(range(len(dom.uids))))
    rows["random"] = {"per_user": random_expectation(dom), "seeds": None, "trainable": 0,
                      "total": trainable_report(model)["total"]}
    if "zero_shot" in methods:
        rows["zero_shot"] = {"per_user": per_user(np.array([zs[u] for u in dom.uids], dtype=float)), "seeds": None,
                             "trainable": 0, "total": trainable_report(model)["total"]}
    n_test = len(dom.uids)
    del model, dom

    # --- target adaptation ----------------------------------------------------------------
    if args.profile:
        methods, seeds = ["houlsby"], [0]
    else:
        seeds = list(range(args.seeds))
    for method in [x for x in methods if x not in ("zero_shot", "random")]:
        runs = []
        for seed in seeds:
            folder = out / f"{method}_s{seed}"
            summary = folder / "summary.json"
            if summary.is_file() and not args.profile:
                runs.append(json.loads(summary.read_text()))
                print(f"{method} seed {seed}: read back {runs[-1]['test']}", flush=True)
                continue
            model, full = target_model(method.removesuffix("_long"), seed)
            rep = trainable_report(model)
            tcfg = dataclasses.replace(cfg.target_train, seed=seed, lr=LR.get(method, cfg.target_train.lr),
                                       epochs=EPOCHS.get(method, cfg.target_train.epochs))
            if args.profile:
                tcfg = dataclasses.replace(tcfg, epochs=1)
                folder = out / "profile"
            ident = {"model": m, "data": cfg.target, "method": method, "start_sha256": start_sha,
                     "stage": "target"}
            r, _ = stage("target", model, tdata, tcfg, cfg.eval, folder, full, ident, m)
            r.update(trainable=rep["trainable"], total=rep["total"], seed=seed, lr=tcfg.lr)
            print(f"{method} seed {seed}: test {r['test']}  {r['steps']} steps {r['train_seconds']} s "
                  f"trainable {rep['trainable']:,} ({100 * rep['trainable'] / rep['total']:.2f}%)", flush=True)
            if args.profile:
                print(f"profile: {r['train_seconds'] / max(r['steps'], 1):.1f} s per step incl. validation", flush=True)
                return
            summary.write_text(json.dumps(r))
            runs.append(r)
            del model
        rows[method] = {"per_user": None, "seeds": runs, "trainable": runs[0]["trainable"], "total": runs[0]["total"]}

    report(rows, n_test, src, sdata, tdata, overlap, seeds, time.time() - t_start, argv)


def report(rows, n_test, src, sdata, tdata, overlap, seeds, seconds, argv) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    ref = rows.get("full")
    if ref is not None:
        ref_user = {k: np.mean([per_user(np.array(r["ranks"], float))[k] for r in ref["seeds"]], 0) for k in ("HR@10", "NDCG@10")}
    table, out_rows, users = [], {}, {}
    for key, row in rows.items():
        entry = {"label": LABELS[key], "trainable": row["trainable"], "total": row["total"],
                 "trainable_percent": 100.0 * row["trainable"] / row["total"], "test_users": n_test}
        if row["seeds"] is not None:
            per_seed = [per_user(np.array(r["ranks"], float)) for r in row["seeds"]]
            user = {k: np.mean([p[k] for p in per_seed], 0) for k in ("HR@10", "NDCG@10")}
            entry["seeds"] = [r["seed"] for r in row["seeds"]]
            entry["per_seed"] = [{"seed": r["seed"], **r["test"], "steps": r["steps"], "checkpoint": r["checkpoint"],
                                  "train_seconds": r["train_seconds"], "lr": r["lr"],
                                  "val_NDCG@10_per_epoch": [h["metrics"]["target"]["NDCG@10"] for h in r["val_history"]]}
                                 for r in row["seeds"]]
        else:
            user, per_seed = row["per_user"], None
        for k in ("HR@10", "NDCG@10"):
            boot = bootstrap_interval(user[k], seed=0).to_dict()
            entry[k] = {"mean": float(user[k].mean()), "bootstrap_users": boot}
            if per_seed is not None:
                entry[k]["t_seeds"] = t_interval([float(p[k].mean()) for p in per_seed]).to_dict()
            if ref is not None and key != "full":
                entry[k]["minus_full"] = bootstrap_difference({"t": user[k]}, {"t": ref_user[k]}, seed=0).to_dict()
            for base in ("zero_shot", "frozen"):  # the paired differences to the untrained / cheapest rows
                if base in users and key != base:
                    entry[k][f"minus_{base}"] = bootstrap_difference({"t": user[k]}, {"t": users[base][k]},
                                                                     seed=0).to_dict()
        users[key] = user
        out_rows[key] = entry
        table.append(entry)

    def ci(iv):
        return "n/a" if iv["low"] is None else f"[{iv['low']:.4f}, {iv['high']:.4f}]"

    lines = ["| method | HR@10 | t-CI (seeds) | bootstrap CI (users) | NDCG@10 | t-CI (seeds) | bootstrap CI (users) "
             "| HR@10 - full [95% CI] | NDCG@10 - full [95% CI] | trainable | % params |",
             "|---|---:|---|---|---:|---|---|---|---|---:|---:|"]
    for e in table:
        cells = [e["label"]]
        for k in ("HR@10", "NDCG@10"):
            v = e[k]
            cells += [f"{v['mean']:.4f}", ci(v["t_seeds"]) if "t_seeds" in v else "—", ci(v["bootstrap_users"])]
        for k in ("HR@10", "NDCG@10"):
            d = e[k].get("minus_full")
            cells.append(f"{d['mean']:+.4f} {ci(d)}" if d else "—")
        cells += [f"{e['trainable']:,}", f"{e['trainable_percent']:.3f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    note = (f"\nTest set: {n_test} target users (one test item each). Seeds of the target stage: {seeds}. "
            "Differences to full fine-tuning: paired bootstrap over the same users of the seed-averaged "
            "per-user scores; movielens.json also has each row minus zero-shot and minus frozen "
            "(`minus_zero_shot`, `minus_frozen`).\n")
    (RESULTS / "movielens_table.md").write_text("\n".join(lines) + "\n" + note)
    print("\n".join(lines) + note)
    command = "OMP_NUM_THREADS=1 python examples/adapter4rec_movielens.py " + " ".join(argv or sys.argv[1:])
    payload = {"command": command.strip(), "config": CONFIG, "source_test": src["test"],
               "source_steps": src["steps"], "source_data": sdata.stats(), "target_data": tdata.stats(),
               "shared_between_source_and_target": overlap, "test_users": n_test, "seeds": seeds,
               "wall_seconds": round(seconds, 1), "rows": out_rows}
    (RESULTS / "movielens.json").write_text(json.dumps(payload, indent=1))
    try:
        plot(out_rows)
    except ImportError:
        pass


def plot(rows) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    names = list(rows)
    for ax, k in zip(axes, ("HR@10", "NDCG@10")):
        for i, n in enumerate(names):
            e = rows[n][k]
            b = e["bootstrap_users"]
            ax.errorbar([e["mean"]], [i], xerr=[[e["mean"] - b["low"]], [b["high"] - e["mean"]]], fmt="o", color="C0",
                        capsize=3)
            for s in rows[n].get("per_seed") or []:
                ax.plot([s[k]], [i], "x", color="C1", ms=5)
        ax.set_yticks(range(len(names)), [rows[n]["label"] for n in names] if k == "HR@10" else [""] * len(names))
        ax.set_xlabel(k)
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle("Adapter4Rec on MovieLens-100k, heart (users a) -> thrill (users b): dot = mean over seeds, "
                 "bar = 95% bootstrap over test users, x = one seed", fontsize=10)
    fig.tight_layout()
    fig.savefig(RESULTS / "movielens.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
