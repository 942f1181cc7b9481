"""A small learnable 4-task V&L fixture (VQA, GQA, NLVR2, captions) with synthetic
region features, in the same files the real pipeline uses (VLExample JSON lines +
a memory-mapped feature store). For tests and smoke runs: not a benchmark."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from adapterkit.vl.datasets.base import VLExample, write_examples_jsonl

OBJECTS = ["cat", "dog", "car", "tree", "boat", "bird"]
COLOURS = ["red", "blue", "green"]


def make_vl_fixture(root: str | Path, n_images: int = 48, feat_dim: int = 16, boxes: int = 4, seed: int = 0,
                    splits=(("train", 0.7), ("val", 0.15), ("test", 0.15))) -> Path:
    from adapterkit.vl.features import FeatureStoreWriter

    root = Path(root)
    rng = np.random.default_rng(seed)
    protos_o = rng.normal(size=(len(OBJECTS), feat_dim))
    protos_c = rng.normal(size=(len(COLOURS), feat_dim))
    obj = rng.integers(len(OBJECTS), size=n_images)
    col = rng.integers(len(COLOURS), size=n_images)
    ids = [f"img{i:04d}" for i in range(n_images)]
    feats = np.empty((n_images, boxes, feat_dim), dtype=np.float32)
    for i in range(n_images):
        feats[i] = protos_o[obj[i]] + protos_c[col[i]] + 0.1 * rng.normal(size=(boxes, feat_dim))
    w = FeatureStoreWriter(root / "features", ids, boxes, feat_dim, "float32", "fixture")
    w.write(feats, np.tile(np.array([0, 0, 1, 1], dtype=np.float32), (n_images, boxes, 1)))
    w.finalize()
    order = rng.permutation(n_images)
    start = 0
    for split, frac in splits:
        n = max(2, int(round(frac * n_images)))
        sel = order[start:start + n]
        start += n
        per = {"vqa": [], "gqa": [], "nlvr": [], "caption": []}
        for j, i in enumerate(sel):
            o, c = OBJECTS[obj[i]], COLOURS[col[i]]
            per["vqa"].append(VLExample(f"v{i}", "vqa", [ids[i]], "what is in the image?", [o], {o: 1.0}))
            per["gqa"].append(VLExample(f"g{i}", "gqa", [ids[i]], "what colour is the object?", [c], {c: 1.0}))
            k = sel[(j + 1) % len(sel)]
            same = obj[i] == obj[k]
            per["nlvr"].append(VLExample(f"n{i}", "nlvr", [ids[i], ids[k]], "both images show the same thing .",
                                         ["true" if same else "false"], label=int(same)))
            per["caption"].append(VLExample(f"c{i}", "caption", [ids[i]], "", [f"a {c} {o}", f"the {o} is {c}"]))
        for t, exs in per.items():
            write_examples_jsonl(root / t / f"{split}.jsonl", exs)
    return root


def make_text_fixture(root, n_train: int = 96, n_eval: int = 32, seed: int = 0, fmt: str = "jsonl") -> dict:
    """A tiny text data set in the text domain's layout, ``ROOT/<task>/<split>.jsonl``:
    ``sentiment`` (2 classes, told by a cue word), ``topic`` (3 classes, by a cue word) and
    ``copy`` (generation: the target is the text's cue word). Learnable in a few steps."""
    import csv
    import io

    from adapterkit.text.data import write_jsonl

    rng = np.random.default_rng(seed)
    filler = ["the", "a", "day", "it", "was", "quite", "very", "and", "so", "then", "we", "saw"]
    cues = {"sentiment": {"pos": ["good", "great"], "neg": ["bad", "awful"]},
            "topic": {"sport": ["goal", "match"], "money": ["bank", "price"], "tech": ["phone", "code"]}}
    counts = {}
    for task in ("sentiment", "topic", "copy"):
        for split, n in (("train", n_train), ("val", n_eval), ("test", n_eval)):
            rows = []
            for i in range(n):
                words = list(rng.choice(filler, size=5))
                if task == "copy":
                    cue = str(rng.choice(["red", "blue", "green", "gold"]))
                    words.insert(int(rng.integers(0, 6)), cue)
                    rows.append({"id": f"{task}-{split}-{i}", "text": " ".join(words), "target": cue})
                    continue
                label = str(rng.choice(sorted(cues[task])))
                words.insert(int(rng.integers(0, 6)), str(rng.choice(cues[task][label])))
                rows.append({"id": f"{task}-{split}-{i}", "text": " ".join(words), "label": label})
            folder = Path(root) / task
            folder.mkdir(parents=True, exist_ok=True)
            if fmt == "csv":
                buf = io.StringIO()
                w = csv.DictWriter(buf, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
                (folder / f"{split}.csv").write_text(buf.getvalue())
            else:
                write_jsonl(folder / f"{split}.jsonl", rows)
            counts[(task, split)] = n
    return counts
