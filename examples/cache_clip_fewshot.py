"""The CLIP cache methods with a real text tower: zero-shot, Tip-Adapter(-F), TIP-X, CapS-Adapter, DualAdapter, SuS-X.

Model: the offline dual encoder (frozen EfficientNet-Lite0 + all-MiniLM-L6-v2, projection
heads trained contrastively on openclipart titles/descriptions; build it first with
``examples/cache_build_dual_encoder.py``). Every method sees only its embeddings.

Data:

* **openclipart** categories (the classes the build held out: pictures never paired with
  text in training). Per class, from the held-out pictures (seeded, fixed): 10 validation,
  20 in the support pool the K shots are drawn from, the rest (at most 90) test.
* **Fashion-MNIST** (real grey photos; a domain shift from clip art): 100 support-pool and
  30 validation images per class from the train split, 100 test images per class from the
  test split, upsampled to the encoder's resolution.

Protocol per dataset: zero-shot = prompt-ensemble text weights of the class names. For
K in --shots and each seed (a different K-shot draw), every cache method runs through
:func:`adapterkit.cache.pipeline.run_cache_adapter` (hyperparameters, and the epoch for
Tip-Adapter-F / DualAdapter, on validation only; test used once). CapS-Adapter's caption
keys: openclipart pictures' own human captions (title + description) through the text
tower; Fashion-MNIST has none, so each support image gets the nearest openclipart caption
by the dual encoder (a retrieval captioner standing in for ShareCaptioner), or, with
``--fm-captions``, the captions of the library's own V&L captioner from
``examples/cache_vl_captions.py``. DualAdapter's
negative prompts: "a picture without {}" etc. Linear probe: multinomial logistic
regression on the same K-shot embeddings, L2 strength chosen on validation. SuS-X: no
labelled image at all; K pool images per class retrieved by the class-name text query
(SuS-LC, :func:`adapterkit.cache.susx.sus_lc_cache`), then TIP-X (and Tip-Adapter) on that
cache; seeds subsample 80% of the pool. Ablation ``tip-wide``: Tip-Adapter searched over TIP-X's
alpha / beta ranges (TIP-X at gamma = 0 is Tip-Adapter), so TIP-X - tip-wide is the KL term alone.
Intervals: 95% Student-t over seeds; a claim holds when its paired-difference interval is above 0.

Run (3.7 min measured on one CPU thread for both datasets, K = 1-16 and 5 seeds, after the
build and a first run that caches the Fashion-MNIST features; results: docs/results/cache/README.md)::

    OMP_NUM_THREADS=1 python examples/cache_clip_fewshot.py --shots 1,2,4,8,16 --seeds 0,1,2,3,4 --out docs/results/cache

Fashion-MNIST alone with the V&L captioner's captions (to fm_vl_captions.json / _tables.md / .png)::

    OMP_NUM_THREADS=1 python examples/cache_clip_fewshot.py --datasets fashion-mnist --shots 1,2,4,8,16 \
        --seeds 0,1,2,3,4 --out docs/results/cache --stem fm_vl_captions \
        --fm-captions docs/results/cache/vl_captions_fmnist.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from adapterkit.cache.common import sample_few_shot
from adapterkit.cache.dual_encoder import (
    cached_features,
    default_cache_dir,
    load_dual_encoder,
    retrieval_recall,
    zero_shot_weights,
)
from adapterkit.cache.openclipart import OPENCLIPART_ROOT, clipart_texts, load_openclipart, read_clipart_image
from adapterkit.cache.pipeline import run_cache_adapter
from adapterkit.cache.susx import sus_lc_cache
from adapterkit.stats import bootstrap_interval, t_interval
from adapterkit.vision.data import load_fashion_mnist

CACHE_METHODS = ("tip", "tip-f", "tipx", "caps", "dual")
TEMPLATES = ("{}.", "a picture of {}.", "clip art of {}.", "an illustration of {}.")
NEG_TEMPLATES = ("a picture without {}.", "clip art of something other than {}.")
FMNIST_NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
FMNIST_TEMPLATES = ("a {}.", "a picture of a {}.", "a photo of a {}.", "clip art of a {}.")
FMNIST_NEG = ("a picture without a {}.", "a photo of something other than a {}.")
#: search grids: the references' ranges, coarser in beta / gamma so 150 runs fit a CPU
GRIDS = {
    "tip": {"beta": (0.1, 7.0, 50), "alpha": (0.1, 3.0, 20)},
    "tip-f": {"beta": (0.1, 7.0, 50), "alpha": (0.1, 3.0, 20)},
    "tipx": {"alpha": (0.1, 50.0, 20), "beta": (1.0, 50.0, 50), "gamma": (0.1, 30.0, 20)},
    "caps": {"alpha": (0.1, 50.0, 20), "beta": (1.0, 50.0, 25), "gamma": (0.1, 30.0, 20), "delta": [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]},
    "dual": {"beta": (0.0, 4.0, 40), "alpha": (0.0, 4.0, 20), "lam": (0.6, 0.9, 4)},
}
#: ablation: Tip-Adapter searched over TIP-X's (wider) alpha / beta ranges, so "tipx - tip-wide"
#: is the KL term alone (TIP-X at gamma = 0 is exactly Tip-Adapter)
ABLATIONS = {"tip-wide": ("tip", {"alpha": GRIDS["tipx"]["alpha"], "beta": GRIDS["tipx"]["beta"]})}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def per_class_split(labels: np.ndarray, counts: list[int | None], rng) -> list[np.ndarray]:
    """Disjoint random index sets per class; a None count takes the rest (capped later)."""
    out = [[] for _ in counts]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        start = 0
        for j, n in enumerate(counts):
            take = idx[start:] if n is None else idx[start : start + n]
            out[j].extend(take.tolist())
            start += len(take)
    return [np.asarray(o) for o in out]


# ----------------------------------------------------------------------------- datasets


def openclipart_data(model, model_dir: Path, root: str, test_cap: int = 90):
    split = json.loads((model_dir / "split.json").read_text())
    items = load_openclipart(root)
    pos = {it.id: i for i, it in enumerate(items)}
    backbone = model.image_backbone
    res = backbone.resolution
    feats = cached_features(
        f"openclipart-effnetlite0-{res}",
        [it.id for it in items],
        lambda p: backbone.encode([read_clipart_image(items[q].png, res) for q in p], grid=None)[:, 0],
        log=log,
    )
    emb = model.embed_image_features(torch.from_numpy(feats)).detach()
    classes = split["classes"]
    held = np.asarray([pos[i] for i in split["heldout"]])
    labels = np.asarray([classes.index(items[i].category) for i in held])
    rng = np.random.default_rng(0)
    val_i, pool_i, test_i = per_class_split(labels, [10, 20, None], rng)
    test_i = np.concatenate([test_i[labels[test_i] == c][:test_cap] for c in range(len(classes))])
    # captions of the support-pool pictures: their own title + description (longest text view)
    caps = []
    for i in held[pool_i]:
        views = clipart_texts(items[i])
        caps.append(views[-1] if views else None)
    have = [j for j, c in enumerate(caps) if c is not None]
    cap_emb = emb[held[pool_i]].clone()  # no caption: the picture's own key (delta mixing is then a no-op)
    cap_emb[have] = model.encode_text([caps[j] for j in have])
    # the held-out pictures were never paired with their text in training: a clean retrieval test.
    # Many pictures share one title ("gramastar" x 103, "card" x 60): a shared text makes recall
    # ambiguous (ties count as hits image->text, misses text->image), so only unique texts count
    held_all = [(i, clipart_texts(items[i])[-1]) for i in held if clipart_texts(items[i])]
    n_text = Counter(t for _, t in held_all)
    held_text = [(i, t) for i, t in held_all if n_text[t] == 1]
    recall = retrieval_recall(model, torch.from_numpy(feats[[i for i, _ in held_text]]), model.text_features([t for _, t in held_text]))
    log(f"held-out image-text retrieval over {len(held_text)} pairs: {recall}")
    sus_pool = np.asarray([pos[i] for i in split["train_pairs"] + split["val_pairs"]])
    sus_labels = np.asarray([classes.index(items[i].category) if items[i].category in classes else -1 for i in sus_pool])
    names = [c.replace("_", " ") for c in classes]
    return {
        "name": "openclipart",
        "classes": names,
        "templates": TEMPLATES,
        "neg_templates": NEG_TEMPLATES,
        "train": (emb[held[pool_i]], torch.from_numpy(labels[pool_i])),
        "val": (emb[held[val_i]], torch.from_numpy(labels[val_i])),
        "test": (emb[held[test_i]], torch.from_numpy(labels[test_i])),
        "captions": cap_emb,
        "caption_source": f"the pictures' own human title + description ({len(have)} of {len(caps)} have one; the rest use their image key)",
        "sus_pool": (emb[sus_pool], torch.from_numpy(sus_labels)),
        "sus_pool_note": "the dual encoder's training pictures (all categories, category labels never used)",
        "heldout_retrieval": {"n_pairs": len(held_text), "n_heldout_with_text": len(held_all), "text": "each picture's longest text view (title + description when both exist); only pictures whose text no other held-out picture shares", **recall},
    }


def fmnist_captions(path: str | Path, ids: list[str]) -> tuple[list[str], str]:
    """Captions of the support images from a JSON ({"captions": {image id: caption}} or the map
    itself, ids "train/<Fashion-MNIST train index>"), e.g. examples/cache_vl_captions.py's."""
    doc = json.loads(Path(path).read_text())
    caps = doc.get("captions", doc)
    missing = [i for i in ids if i not in caps]
    if missing:
        raise SystemExit(f"{path}: no caption for {len(missing)} support image(s), e.g. {missing[0]!r}")
    src = doc.get("captioner", "captions") if isinstance(doc.get("captions"), dict) else "captions"
    return [caps[i] for i in ids], f"generated by {src} ({path}; {len({caps[i] for i in ids})} distinct of {len(ids)})"


def fmnist_data(model, caption_bank: tuple[torch.Tensor, list[str]] | None, captions_json: str | None = None):
    tr_x, tr_y = load_fashion_mnist(split="train")
    te_x, te_y = load_fashion_mnist(split="test")
    rng = np.random.default_rng(0)
    pool_i, val_i = per_class_split(tr_y.numpy(), [100, 30], rng)
    (test_i,) = per_class_split(te_y.numpy(), [100], rng)
    images = np.concatenate([tr_x[pool_i, 0].numpy(), tr_x[val_i, 0].numpy(), te_x[test_i, 0].numpy()])
    ids = [f"train/{i}" for i in pool_i] + [f"train/{i}" for i in val_i] + [f"test/{i}" for i in test_i]
    backbone = model.image_backbone
    feats = cached_features(f"fmnist-effnetlite0-{backbone.resolution}", ids, lambda p: backbone.encode([images[q] for q in p], grid=None)[:, 0], log=log)
    emb = model.embed_image_features(torch.from_numpy(feats)).detach()
    n1, n2 = len(pool_i), len(pool_i) + len(val_i)
    pool_emb = emb[:n1]
    if captions_json:  # captions from a captioner (the support images' own), through the text tower
        texts, source = fmnist_captions(captions_json, ids[:n1])
        cap_emb, examples = model.encode_text(texts), texts[:: max(1, n1 // 10)][:10]
    else:  # the retrieval stand-in: the nearest openclipart caption
        bank_emb, bank_text = caption_bank
        nearest = (pool_emb @ bank_emb.T).argmax(1)
        cap_emb, examples = bank_emb[nearest], [bank_text[int(j)] for j in nearest[:: len(nearest) // 10][:10]]
        source = "retrieved: the nearest openclipart caption to each support image (no captions exist for Fashion-MNIST)"
    return {
        "name": "fashion-mnist",
        "classes": list(FMNIST_NAMES),
        "templates": FMNIST_TEMPLATES,
        "neg_templates": FMNIST_NEG,
        "train": (pool_emb, tr_y[pool_i]),
        "val": (emb[n1:n2], tr_y[val_i]),
        "test": (emb[n2:], te_y[test_i]),
        "captions": cap_emb,
        "caption_source": source,
        "caption_examples": examples,
        "sus_pool": (pool_emb, tr_y[pool_i]),
        "sus_pool_note": "the 1,000 Fashion-MNIST train images of the support pool, labels hidden",
    }


# ----------------------------------------------------------------------------- baselines


def linear_probe(tr_x, tr_y, va_x, va_y, te_x, te_y, c, wds=(1e-4, 1e-3, 1e-2, 1e-1, 1.0)):
    """Logistic regression (LBFGS, full batch) on the K-shot embeddings; L2 strength picked on validation."""
    best = (-1.0, None, None)
    for wd in wds:
        torch.manual_seed(0)
        lin = torch.nn.Linear(tr_x.shape[1], c)
        opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=200, line_search_fn="strong_wolfe")
        x = tr_x * 10.0  # unit-norm inputs: scale so weak L2 can reach confident logits

        def closure(lin=lin, opt=opt, wd=wd, x=x):
            opt.zero_grad()
            loss = F.cross_entropy(lin(x), tr_y) + wd * lin.weight.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            va = float((lin(va_x * 10.0).argmax(1) == va_y).float().mean() * 100)
            if va > best[0]:
                best = (va, wd, float((lin(te_x * 10.0).argmax(1) == te_y).float().mean() * 100))
    return {"val_acc": best[0], "wd": best[1], "test_acc": best[2]}


def acc(logits, y):
    return float((logits.argmax(1) == y).float().mean() * 100)


# ----------------------------------------------------------------------------- experiment


def run_dataset(model, data, shots_list, seeds):
    c = len(data["classes"])
    w = zero_shot_weights(model, data["classes"], data["templates"])
    w_neg = zero_shot_weights(model, data["classes"], data["neg_templates"])
    w_one = zero_shot_weights(model, data["classes"], data["templates"][1:2])
    (tr_x, tr_y), (va_x, va_y), (te_x, te_y) = data["train"], data["val"], data["test"]
    zs = {"val_acc": acc(va_x @ w, va_y), "test_acc": acc(te_x @ w, te_y), "single_template_test_acc": acc(te_x @ w_one, te_y)}
    zs_iv = bootstrap_interval(((te_x @ w).argmax(1) == te_y).float().numpy() * 100)
    zs["test_acc_bootstrap95"] = [zs_iv.low, zs_iv.high]
    # label-free floors: chance, and always answering the support pool's most frequent class
    zs["chance_acc"] = 100.0 / c
    zs["majority_test_acc"] = float((te_y == torch.bincount(tr_y, minlength=c).argmax()).float().mean() * 100)
    log(f"{data['name']}: zero-shot test {zs['test_acc']:.2f} (single template {zs['single_template_test_acc']:.2f}); n_test {len(te_y)}")
    runs = []
    for k in shots_list:
        for seed in seeds:
            idx = sample_few_shot(tr_y, k, c, seed)
            lp = linear_probe(tr_x[idx], tr_y[idx], va_x, va_y, te_x, te_y, c)
            runs.append({"method": "linear-probe", "shots": k, "seed": seed, **lp})
            for method in CACHE_METHODS:
                kw = {"grid": GRIDS[method]}
                if method == "caps":
                    kw["caption_feats"] = data["captions"]
                if method == "dual":
                    kw["cupl_weights"] = w
                    kw["negative_text_weights"] = w_neg
                t = time.time()
                res = run_cache_adapter(method, tr_x, tr_y, va_x, va_y, te_x, te_y, text_weights=w_one if method == "dual" else w, shots=k, seed=seed, num_classes=c, **kw)
                runs.append({"method": method, "shots": k, "seed": seed, "val_acc": res["val_acc"], "test_acc": res["test_acc"], "params": res["params"], "zero_shot_test_acc": res["baseline_test_acc"], "seconds": round(time.time() - t, 2), **({"best_epoch": res["train"]["best_epoch"]} if "train" in res else {})})
            for name, (method, grid) in ABLATIONS.items():
                res = run_cache_adapter(method, tr_x, tr_y, va_x, va_y, te_x, te_y, text_weights=w, shots=k, seed=seed, num_classes=c, grid=grid)
                runs.append({"method": name, "shots": k, "seed": seed, "val_acc": res["val_acc"], "test_acc": res["test_acc"], "params": res["params"]})
            n_logged = 1 + len(CACHE_METHODS) + len(ABLATIONS)
            log(f"{data['name']} K={k} seed={seed}: " + " ".join(f"{r['method']}={r['test_acc']:.1f}" for r in runs[-n_logged:]))
        # SuS-X: support set retrieved from the pool by the class-name queries, no labels
        pool_x, pool_y = data["sus_pool"]
        for seed in seeds:
            g = torch.Generator().manual_seed(1000 + seed)
            sub = torch.randperm(len(pool_x), generator=g)[: int(0.8 * len(pool_x))]
            cache, ridx = sus_lc_cache(pool_x[sub], w, k)
            precision = float((pool_y[sub][ridx] == torch.arange(c).unsqueeze(1)).float().mean() * 100)
            for name, method, grid in (("tipx", "tipx", GRIDS["tipx"]), ("tip", "tip", GRIDS["tip"]), *((n, m, g) for n, (m, g) in ABLATIONS.items())):
                res = run_cache_adapter(method, cache.keys, cache.labels, va_x, va_y, te_x, te_y, text_weights=w, shots=k, seed=seed, num_classes=c, grid=grid)
                runs.append({"method": f"sus-x:{name}", "shots": k, "seed": seed, "val_acc": res["val_acc"], "test_acc": res["test_acc"], "params": res["params"], "retrieval_precision": precision})
        log(f"{data['name']} K={k} SuS-X: " + " ".join(f"{r['method']}={r['test_acc']:.1f}(p={r['retrieval_precision']:.0f})" for r in runs[-(2 + len(ABLATIONS)) * len(seeds):]))
    return {"zero_shot": zs, "runs": runs, "n_test": int(len(te_y)), "n_val": int(len(va_y)), "n_support_pool": int(len(tr_y)), "classes": data["classes"], "templates": list(data["templates"]), "caption_source": data["caption_source"], "sus_pool": data["sus_pool_note"], **{key: data[key] for key in ("caption_examples", "heldout_retrieval") if key in data}}


#: paired comparisons (same seed = same K-shot draw), each a paper's claim: a - b > 0
PAIRS = (
    ("tip", "linear-probe"), ("tip-f", "tip"), ("tipx", "tip"), ("tipx", "tip-wide"), ("tip-wide", "tip"), ("caps", "tipx"), ("dual", "tip"), ("dual", "tip-f"),
    ("tip-f", "linear-probe"), ("tipx", "linear-probe"), ("caps", "linear-probe"), ("dual", "linear-probe"),
    ("sus-x:tipx", "sus-x:tip"), ("sus-x:tipx", "sus-x:tip-wide"),
)


def summarise(result, shots_list):
    methods = ["linear-probe", *CACHE_METHODS, *ABLATIONS, "sus-x:tipx", "sus-x:tip", *(f"sus-x:{a}" for a in ABLATIONS)]
    table, paired = {}, {}
    zs = result["zero_shot"]["test_acc"]
    by = {(r["method"], r["shots"], r["seed"]): r for r in result["runs"]}
    for m in methods:
        for k in shots_list:
            vals = [r["test_acc"] for r in result["runs"] if r["method"] == m and r["shots"] == k]
            if not vals:
                continue
            iv = t_interval(vals)
            entry = {"mean": iv.mean, "low": iv.low, "high": iv.high, "n_seeds": iv.n, "gain_over_zero_shot": iv.mean - zs}
            if m.startswith("sus-x"):
                entry["retrieval_precision"] = float(np.mean([r["retrieval_precision"] for r in result["runs"] if r["method"] == m and r["shots"] == k]))
            table.setdefault(m, {})[str(k)] = entry
    for m in methods:
        for k in shots_list:
            diffs = [r["test_acc"] - zs for r in result["runs"] if r["method"] == m and r["shots"] == k]
            if len(diffs) >= 2:
                d = t_interval(diffs)
                paired.setdefault(f"{m} - zero-shot", {})[str(k)] = {"mean": d.mean, "low": d.low, "high": d.high, "n_seeds": d.n}
    for a, b in PAIRS:
        for k in shots_list:
            diffs = [by[(a, k, s)]["test_acc"] - by[(b, k, s)]["test_acc"] for (m, kk, s) in by if m == a and kk == k and (b, k, s) in by]
            if len(diffs) >= 2:
                d = t_interval(diffs)
                paired.setdefault(f"{a} - {b}", {})[str(k)] = {"mean": d.mean, "low": d.low, "high": d.high, "n_seeds": d.n}
    result["table"], result["paired"] = table, paired
    return result


#: accuracies are percentages of a few hundred images: a difference under this is a tie, not a gain
TIE_TOL = 1e-6


def verdict(low, high, tol: float = TIE_TOL):
    """Decide a claim "a - b > 0" from the 95% interval [low, high] of the paired difference.

    'holds' when the whole interval is above 0 by more than ``tol``, 'reversed' when it is
    below -tol, else 'not shown'. The tolerance keeps float noise from deciding ties (a
    method equal to its baseline on every seed gives a zero-width interval at about 0, and
    rounding can put it at +1e-14). No interval (one seed: low / high None) is 'not shown'.
    """
    if low is None or high is None:
        return "not shown"
    if low > tol:
        return "holds"
    if high < -tol:
        return "reversed"
    return "not shown"


def claims(res, shots_list):
    """Plain statements, derived from the intervals (nothing here is typed in by hand)."""
    zs = res["zero_shot"]["test_acc"]
    out = []

    def over_k(label, rows):
        verdicts = {k: verdict(rows[str(k)]["low"], rows[str(k)]["high"]) for k in shots_list if str(k) in rows}
        held = [k for k, v in verdicts.items() if v == "holds"]
        rev = [k for k, v in verdicts.items() if v == "reversed"]
        txt = f"holds at K = {held}" if held else "holds at no K"
        txt += f"; reversed at K = {rev}" if rev else ""
        out.append(f"- {label}: {txt} (95% intervals over seeds; elsewhere the interval includes 0).")

    for m in (*CACHE_METHODS, *ABLATIONS, "sus-x:tipx", "sus-x:tip", *(f"sus-x:{a}" for a in ABLATIONS)):
        if f"{m} - zero-shot" in res["paired"]:
            over_k(f"{m} improves on zero-shot ({zs:.1f})", res["paired"][f"{m} - zero-shot"])
    names = {"tip - linear-probe": "Tip-Adapter beats a linear probe on the same K shots",
             "tip-f - tip": "Tip-Adapter-F improves on Tip-Adapter", "tipx - tip": "TIP-X improves on Tip-Adapter (same cache, each with its paper's search ranges)",
             "tipx - tip-wide": "TIP-X's KL term alone improves on Tip-Adapter (same cache, same alpha / beta ranges)",
             "tip-wide - tip": "Tip-Adapter gains from TIP-X's wider alpha / beta ranges",
             "caps - tipx": "CapS-Adapter's caption keys improve on TIP-X", "dual - tip": "DualAdapter improves on Tip-Adapter",
             "dual - tip-f": "DualAdapter improves on Tip-Adapter-F", "sus-x:tipx - sus-x:tip": "on SuS-X's retrieved support set, TIP-X beats Tip-Adapter",
             "sus-x:tipx - sus-x:tip-wide": "on SuS-X's retrieved support set, TIP-X's KL term alone beats Tip-Adapter (same alpha / beta ranges)"}
    for key, label in names.items():
        if key in res["paired"]:
            over_k(label, res["paired"][key])
    lp1 = res["table"].get("linear-probe", {}).get(str(shots_list[0]))
    d1 = res["paired"].get("linear-probe - zero-shot", {}).get(str(shots_list[0]))
    if lp1 and d1:
        out.append(f"- A {shots_list[0]}-shot linear probe falls below zero-shot (as in CLIP): {lp1['mean']:.1f} [{lp1['low']:.1f}, {lp1['high']:.1f}] vs {zs:.1f}: "
                   f"{verdict(-d1['high'], -d1['low'])}.")
    return out


def plot(results, shots_list, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5))
    axes = np.atleast_1d(axes)
    for ax, (name, res) in zip(axes, results.items()):
        for m, rows in res["table"].items():
            ks = [k for k in shots_list if str(k) in rows]
            mean = np.array([rows[str(k)]["mean"] for k in ks])
            lo = np.array([rows[str(k)]["low"] for k in ks])
            hi = np.array([rows[str(k)]["high"] for k in ks])
            ax.plot(ks, mean, marker="o", label=m, linestyle="--" if m.startswith("sus") or m == "linear-probe" else "-")
            ax.fill_between(ks, lo, hi, alpha=0.12)
        ax.axhline(res["zero_shot"]["test_acc"], color="k", linestyle=":", label="zero-shot")
        ax.set_xscale("log", base=2)
        ax.set_xticks(shots_list, [str(k) for k in shots_list])
        ax.set_xlabel("shots per class (K)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{name} (n_test={res['n_test']}, {len(res['classes'])} classes)")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def fmt(e):
    if e["low"] is None:  # one seed: no interval
        return f"{e['mean']:.1f}"
    return f"{e['mean']:.1f} [{e['low']:.1f}, {e['high']:.1f}]"


def markdown(results, shots_list, meta):
    lines = ["# CLIP cache methods with the offline dual encoder", "", f"Command: `{meta['command']}`", "",
             f"Model: `{meta['model']}` (heads: {meta['heads']}; images at {meta.get('resolution')} px); seeds {meta['seeds']}; 95% Student-t intervals over seeds (different K-shot draws; SuS-X: different 80% pool subsamples). Generated {meta['date']}.", ""]
    for name, res in results.items():
        zs = res["zero_shot"]
        lines += [f"## {name}", "", f"{len(res['classes'])} classes; test {res['n_test']} images, validation {res['n_val']}, support pool {res['n_support_pool']}. "
                  f"Zero-shot (prompt ensemble): **{zs['test_acc']:.1f}** [{zs['test_acc_bootstrap95'][0]:.1f}, {zs['test_acc_bootstrap95'][1]:.1f}] (95% bootstrap over test images; single template {zs['single_template_test_acc']:.1f}). "
                  f"Floors: chance {zs['chance_acc']:.1f}, majority class {zs['majority_test_acc']:.1f}. CapS captions: {res['caption_source']}. SuS-X pool: {res['sus_pool']}.", "",
                  f"| method (test n = {res['n_test']}) | " + " | ".join(f"K={k}" for k in shots_list) + " |", "|---|" + "---:|" * len(shots_list)]
        iv = f"{zs['test_acc']:.1f} [{zs['test_acc_bootstrap95'][0]:.1f}, {zs['test_acc_bootstrap95'][1]:.1f}]"
        lines += ["| zero-shot (no shots; bootstrap interval) | " + " | ".join(iv for _ in shots_list) + " |",
                  "| chance | " + " | ".join(f"{zs['chance_acc']:.1f}" for _ in shots_list) + " |",
                  "| majority class | " + " | ".join(f"{zs['majority_test_acc']:.1f}" for _ in shots_list) + " |"]
        for m, rows in res["table"].items():
            lines.append(f"| {m} | " + " | ".join(fmt(rows[str(k)]) if str(k) in rows else "" for k in shots_list) + " |")
        lines += ["", "Paired differences by seed (same K-shot draw), mean [95% interval]:", "",
                  "| difference | " + " | ".join(f"K={k}" for k in shots_list) + " |", "|---|" + "---:|" * len(shots_list)]
        for key, rows in res["paired"].items():
            lines.append(f"| {key} | " + " | ".join(fmt(rows[str(k)]) if str(k) in rows else "" for k in shots_list) + " |")
        if "sus-x:tipx" in res["table"]:
            lines += ["", "SuS-X retrieval precision (share of retrieved images whose true class is the query's): " + ", ".join(f"K={k}: {res['table']['sus-x:tipx'][str(k)]['retrieval_precision']:.0f}%" for k in shots_list)]
        if "heldout_retrieval" in res:
            r = res["heldout_retrieval"]
            lines += ["", f"Dual encoder image-text retrieval on the {r['n_pairs']} held-out pictures with text (never paired in training; {r['text']}; chance R@1 {100 / r['n_pairs']:.2f}): "
                      + ", ".join(f"{k} {v:.1f}" for k, v in r.items() if "@" in k)]
        lines += ["", "Claims, as measured here (generated from the intervals above):", "", *claims(res, shots_list), ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(default_cache_dir() / "openclipart"))
    ap.add_argument("--root", default=OPENCLIPART_ROOT)
    ap.add_argument("--datasets", default="openclipart,fashion-mnist")
    ap.add_argument("--shots", default="1,2,4,8,16")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default="docs/results/cache")
    ap.add_argument("--stem", default="fewshot", help="output names: STEM.json, STEM_tables.md, STEM.png")
    ap.add_argument("--fm-captions", default=None, help="Fashion-MNIST CapS captions from this JSON (examples/cache_vl_captions.py) instead of the retrieval stand-in")
    args = ap.parse_args()
    shots_list = [int(s) for s in args.shots.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    model_dir = Path(args.model).expanduser()
    model = load_dual_encoder(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    results = {}
    for name in args.datasets.split(","):
        if name == "openclipart":
            data = openclipart_data(model, model_dir, args.root)
        elif name == "fashion-mnist":
            bank = None
            if not args.fm_captions:
                items = load_openclipart(args.root)
                split = json.loads((model_dir / "split.json").read_text())
                pos = {it.id: it for it in items}
                texts = sorted({clipart_texts(pos[i])[-1] for i in split["train_pairs"] if clipart_texts(pos[i])})
                bank = (model.encode_text(texts), texts)
            data = fmnist_data(model, bank, args.fm_captions)
        else:
            raise SystemExit(f"unknown dataset {name!r}: openclipart or fashion-mnist")
        results[name] = summarise(run_dataset(model, data, shots_list, seeds), shots_list)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"command": "OMP_NUM_THREADS=1 python examples/cache_clip_fewshot.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items() if k not in ("model", "root") and v is not None),
            "model": "EfficientNet-Lite0 + all-MiniLM-L6-v2, heads from examples/cache_build_dual_encoder.py", "heads": cfg.get("meta", {}).get("heads"), "resolution": cfg.get("meta", {}).get("resolution"),
            "seeds": seeds, "date": time.strftime("%Y-%m-%d"), "grids": GRIDS, "dual_encoder_report": cfg.get("meta", {}).get("report")}
    (out / f"{args.stem}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    (out / f"{args.stem}_tables.md").write_text(markdown(results, shots_list, meta))
    plot(results, shots_list, out / f"{args.stem}.png")
    log(f"wrote {out}/{args.stem}.json, {args.stem}_tables.md, {args.stem}.png")


if __name__ == "__main__":
    main()
