"""FashionVL: a deterministic multi-task vision-and-language benchmark built from
real Fashion-MNIST photos (Zalando article images, 28x28 grey).

Four tasks mirror VL-Adapter's image-text tasks:

- ``vqa``: one item photo; "what is this?" (class), "what category is this?",
  and yes/no questions ("is this a bag?", "is this item footwear?", "does it
  have sleeves?", "is it dark?").
- ``gqa``: a 2x2 grid of four photos (56x56); spatial and relational questions
  ("what is in the top left?", "what is to the right of the bag?", "is there a
  coat in the bottom row?", "how many footwear items are there?"). Counts are
  answered with digits ("0".."4").
- ``nlvr``: two grid images and a statement ("the left image contains exactly
  two bags", "both images contain a sneaker", ...); targets ["true"] /
  ["false"], balanced 50/50, label 1 / 0.
- ``caption``: a grid image with four reference captions describing its items.

Attributes are derived from the class label (documented in `CLASS_CATEGORY`,
`SLEEVED_CLASSES`) except darkness, which is measured: the mean intensity of
the photo's foreground pixels (value > 0) is below `DARK_BELOW` (answer "yes")
or above `LIGHT_ABOVE` ("no"); photos in between are never asked about.

Splits: train photos come from Fashion-MNIST train images 0-49,999, val photos
from train images 50,000-59,999, test photos only from the Fashion-MNIST test
set. Photo ids ("fm-train-123", "fm-test-42") are kept in each example's
``extra["photos"]`` for leak checks; ``extra["labels"]`` holds their classes.

Output folder: images.npy (N, 56, 56) uint8 (single photos are stored
upsampled 2x by pixel repetition; `iter_fashionvl_images` gives them back at
28x28), images_index.json ({image id: row}), <task>/<split>.jsonl
(`VLExample` JSON lines) and meta.json (config, sizes, class names, file
hashes, a content hash). The same seed and sizes give byte-identical files.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import re
import tempfile
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from adapterkit.cli.argtypes import nonnegative_int, positive_int
from adapterkit.errors import ConfigError, DataError, did_you_mean

__all__ = [
    "caption_items",
    "caption_item_recall",
    "CLASS_NAMES",
    "CATEGORIES",
    "CLASS_CATEGORY",
    "SLEEVED_CLASSES",
    "TASKS",
    "SPLITS",
    "DEFAULT_SIZES",
    "TINY_SIZES",
    "FashionVLImages",
    "load_fashion_mnist",
    "build_fashionvl",
    "load_fashionvl_examples",
    "iter_fashionvl_images",
    "fashionvl_stats",
    "majority_baseline",
    "add_parser",
    "run",
]

VERSION = 1
DEFAULT_SOURCE = "/usr/share/datasets/fashion-mnist"
SOURCE_ENV = "ADAPTERKIT_FASHION_MNIST"

#: Fashion-MNIST's ten classes (label order), in the names questions use.
CLASS_NAMES = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip
CLASS_PLURALS = (
    "t-shirts", "trousers", "pullovers", "dresses", "coats", "sandals", "shirts", "sneakers", "bags", "ankle boots",
)  # fmt: skip
FASHION_MNIST_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
CATEGORIES = ("top", "bottom", "dress", "outerwear", "footwear", "accessory")
#: category index of each class: t-shirt, pullover, shirt -> top; trouser -> bottom;
#: dress -> dress; coat -> outerwear; sandal, sneaker, ankle boot -> footwear; bag -> accessory.
CLASS_CATEGORY = (0, 1, 0, 2, 3, 4, 0, 4, 5, 4)
#: classes answered "yes" to "does it have sleeves?" (a class-level convention).
SLEEVED_CLASSES = (0, 2, 4, 6)
DARK_BELOW = 100.0
LIGHT_ABOVE = 140.0

CATEGORY_IS_QUESTION = (
    "is this item a top?",
    "is this item worn on the legs?",
    "is this item a dress?",
    "is this item outerwear?",
    "is this item footwear?",
    "is this item an accessory?",
)
CATEGORY_PLURALS = ("tops", "bottoms", "dresses", "outerwear items", "footwear items", "accessories")

TASKS = ("vqa", "gqa", "nlvr", "caption")
SPLITS = ("train", "val", "test")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
REGIONS = {
    "top row": (0, 1),
    "bottom row": (2, 3),
    "left column": (0, 2),
    "right column": (1, 3),
}
#: relation -> {position of the named item: position of the answer}
RELATIONS = {
    "to the right of": {0: 1, 2: 3},
    "to the left of": {1: 0, 3: 2},
    "above": {2: 0, 3: 1},
    "below": {0: 2, 1: 3},
}
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
QUESTIONS_PER_IMAGE = 3

#: examples per task and split (train, val, test); the test split has 1,000 examples per
#: task, so a task's score has a 95% interval of about +-3 points (a Bernoulli accuracy near
#: 50%) rather than +-9 at 120 examples. Train and val are drawn with their own seeds, so the
#: size of the test split does not change them. EfficientNet-Lite0 features of all 6,718
#: images at 112 px took 4m37s on a shared 2-core CPU.
DEFAULT_SIZES: dict[str, tuple[int, int, int]] = {
    "vqa": (2400, 300, 1000),
    "gqa": (2400, 300, 1000),
    "nlvr": (1200, 150, 1000),
    "caption": (800, 100, 1000),
}
TINY_SIZES: dict[str, tuple[int, int, int]] = {
    "vqa": (48, 12, 24),
    "gqa": (48, 12, 24),
    "nlvr": (40, 12, 20),
    "caption": (16, 6, 8),
}
# photo pools: (Fashion-MNIST split, first index, end index)
PHOTO_POOLS = {"train": ("train", 0, 50_000), "val": ("train", 50_000, 60_000), "test": ("test", 0, 10_000)}
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _a(name: str) -> str:
    """Name with its indefinite article."""
    return ("an " if name[0] in "aeiou" else "a ") + name


# ----------------------------------------------------------------------------- source data


def _source_dir(source: str | os.PathLike | None) -> Path:
    return Path(source or os.environ.get(SOURCE_ENV) or DEFAULT_SOURCE)


def _read_idx(folder: Path, stem: str, magic: int) -> np.ndarray:
    for name in (stem + ".gz", stem):
        file = folder / name
        if file.is_file():
            break
    else:
        raise DataError(
            f"Fashion-MNIST file {stem}.gz not found in {folder} "
            f"(install it with `apt-get install dataset-fashion-mnist` or set {SOURCE_ENV})"
        )
    opener = gzip.open if file.suffix == ".gz" else open
    try:
        with opener(file, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read Fashion-MNIST file {file}: {exc}") from None
    header = 16 if magic == 2051 else 8
    if len(raw) < header or int.from_bytes(raw[:4], "big") != magic:
        raise DataError(f"{file} is not an IDX file with magic {magic}")
    n = int.from_bytes(raw[4:8], "big")
    data = np.frombuffer(raw, dtype=np.uint8, offset=header)
    expected = n * 28 * 28 if magic == 2051 else n
    if data.size != expected:
        raise DataError(f"{file}: expected {expected} bytes of data after the header, found {data.size}")
    return data.reshape(n, 28, 28) if magic == 2051 else data


@lru_cache(maxsize=4)
def _load_cached(split: str, folder: str) -> tuple[np.ndarray, np.ndarray]:
    img_stem, lab_stem = _IDX_FILES[split]
    images = _read_idx(Path(folder), img_stem, 2051)
    labels = _read_idx(Path(folder), lab_stem, 2049)
    if len(images) != len(labels):
        raise DataError(f"Fashion-MNIST {split} in {folder}: {len(images)} images but {len(labels)} labels")
    return images, labels


def load_fashion_mnist(
    split: str = "train", source: str | os.PathLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images (n, 28, 28) uint8 and labels (n,) uint8 of "train" or "test"."""
    if split not in _IDX_FILES:
        raise ConfigError(f"Fashion-MNIST split must be train or test, got {split!r}")
    return _load_cached(split, str(_source_dir(source)))


def foreground_brightness(images: np.ndarray) -> np.ndarray:
    """Mean intensity of the foreground (pixels > 0) of each (n, 28, 28) photo."""
    fg = images > 0
    total = np.where(fg, images, 0).sum(axis=(1, 2), dtype=np.float64)
    return total / np.maximum(fg.sum(axis=(1, 2)), 1)


class _Pool:
    """The photos of one split: Fashion-MNIST index range, labels, brightness."""

    def __init__(self, split: str, source: str | os.PathLike | None) -> None:
        fm_split, lo, hi = PHOTO_POOLS[split]
        images, labels = load_fashion_mnist(fm_split, source)
        if hi > len(images):
            raise DataError(f"Fashion-MNIST {fm_split} has {len(images)} images; FashionVL needs {hi}")
        self.fm_split, self.lo, self.hi = fm_split, lo, hi
        self.images = images
        self.labels = labels
        self.size = hi - lo

    def sample(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        """Fashion-MNIST indices of `shape`, without repeats while the pool allows."""
        n = int(np.prod(shape))
        idx = rng.choice(self.size, size=n, replace=n > self.size) + self.lo
        return idx.reshape(shape)

    def photo_ids(self, idx: np.ndarray) -> list[str]:
        return [f"fm-{self.fm_split}-{int(i)}" for i in idx]


def _grids(images: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """(n, 4) photo indices -> (n, 56, 56) 2x2 composites in reading order."""
    tiles = images[idx]  # (n, 4, 28, 28)
    n = tiles.shape[0]
    return tiles.reshape(n, 2, 2, 28, 28).transpose(0, 1, 3, 2, 4).reshape(n, 56, 56)


def _singles(images: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """(n,) photo indices -> (n, 56, 56) photos upsampled 2x by pixel repetition."""
    return images[idx].repeat(2, axis=1).repeat(2, axis=2)


# ----------------------------------------------------------------------------- task generators


def _example(task: str, uid: str, image_ids: list[str], text: str, answer: str, extra: dict) -> Any:
    from adapterkit.vl.datasets.base import VLExample

    return VLExample(
        uid=uid, task=task, image_ids=image_ids, text=text, targets=[answer],
        target_scores={answer: 1.0}, extra=extra,
    )  # fmt: skip


def _vqa_question(kind: str, label: int, bright: float, rng: np.random.Generator) -> tuple[str, str, dict]:
    cat = CLASS_CATEGORY[label]
    if kind == "class":
        return "what is this?", CLASS_NAMES[label], {}
    if kind == "category":
        return "what category is this?", CATEGORIES[cat], {}
    if kind == "is_class":
        c = label if rng.random() < 0.5 else int(rng.choice([k for k in range(10) if k != label]))
        return f"is this {_a(CLASS_NAMES[c])}?", "yes" if c == label else "no", {"class": CLASS_NAMES[c]}
    if kind == "is_category":
        c = cat if rng.random() < 0.5 else int(rng.choice([k for k in range(len(CATEGORIES)) if k != cat]))
        return CATEGORY_IS_QUESTION[c], "yes" if c == cat else "no", {"category": CATEGORIES[c]}
    if kind == "sleeves":
        return "does it have sleeves?", "yes" if label in SLEEVED_CLASSES else "no", {}
    if kind == "dark":
        return "is it dark?", "yes" if bright < DARK_BELOW else "no", {}
    raise AssertionError(kind)


VQA_KINDS = ("class", "category", "is_class", "is_category", "sleeves", "dark")
GQA_KINDS = (
    "what_at",
    "category_at",
    "relate",
    "exist_region",
    "count_class",
    "count_category",
    "same_category",
)


def _gen_vqa(pool: _Pool, split: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, list[str], list]:
    n_images = math.ceil(n / QUESTIONS_PER_IMAGE)
    idx = pool.sample(rng, (n_images,))
    labels = pool.labels[idx].astype(int)
    bright = foreground_brightness(pool.images[idx])
    image_ids = [f"vqa-{split}-{i:06d}" for i in range(n_images)]
    examples = []
    for i in range(n_images):
        kinds = [k for k in VQA_KINDS if k != "dark" or not DARK_BELOW <= bright[i] <= LIGHT_ABOVE]
        k_take = min(QUESTIONS_PER_IMAGE, n - len(examples))
        for kind in rng.choice(kinds, size=k_take, replace=False):
            text, answer, args = _vqa_question(str(kind), int(labels[i]), float(bright[i]), rng)
            extra = {
                "photos": pool.photo_ids(idx[i : i + 1]),
                "labels": [int(labels[i])],
                "qtype": str(kind),
                "args": args,
            }
            if kind == "dark":
                extra["brightness"] = round(float(bright[i]), 3)
            examples.append(
                _example("vqa", f"vqa-{split}-q{len(examples):06d}", [image_ids[i]], text, answer, extra)
            )
    return _singles(pool.images, idx), image_ids, examples


def _gqa_question(kind: str, labels: list[int], rng: np.random.Generator) -> tuple[str, str, dict] | None:
    counts = Counter(labels)
    if kind == "what_at":
        p = int(rng.integers(4))
        return f"what is in the {POSITIONS[p]}?", CLASS_NAMES[labels[p]], {"position": POSITIONS[p]}
    if kind == "category_at":
        p = int(rng.integers(4))
        return (
            f"what category is the item in the {POSITIONS[p]}?",
            CATEGORIES[CLASS_CATEGORY[labels[p]]],
            {"position": POSITIONS[p]},
        )
    if kind == "relate":
        options = [
            (rel, p) for rel, table in RELATIONS.items() for p in table if counts[labels[p]] == 1
        ]  # the named item must be unique so "the X" is unambiguous
        if not options:
            return None
        rel, p = options[int(rng.integers(len(options)))]
        name = CLASS_NAMES[labels[p]]
        return (
            f"what is {rel} the {name}?",
            CLASS_NAMES[labels[RELATIONS[rel][p]]],
            {"relation": rel, "class": name},
        )
    if kind == "exist_region":
        region = list(REGIONS)[int(rng.integers(len(REGIONS)))]
        inside = sorted({labels[p] for p in REGIONS[region]})
        if rng.random() < 0.5:
            c = inside[int(rng.integers(len(inside)))]
        else:
            c = int(rng.choice([k for k in range(10) if k not in inside]))
        return (
            f"is there {_a(CLASS_NAMES[c])} in the {region}?",
            "yes" if c in inside else "no",
            {"class": CLASS_NAMES[c], "region": region},
        )
    if kind == "count_class":
        present = sorted(counts)
        c = present[int(rng.integers(len(present)))] if rng.random() < 0.75 else int(rng.integers(10))
        return f"how many {CLASS_PLURALS[c]} are there?", str(counts[c]), {"class": CLASS_NAMES[c]}
    if kind == "count_category":
        cats = [CLASS_CATEGORY[label] for label in labels]
        c = cats[int(rng.integers(4))] if rng.random() < 0.75 else int(rng.integers(len(CATEGORIES)))
        return f"how many {CATEGORY_PLURALS[c]} are there?", str(cats.count(c)), {"category": CATEGORIES[c]}
    if kind == "same_category":
        a, b = (int(v) for v in rng.choice(4, size=2, replace=False))
        a, b = min(a, b), max(a, b)
        same = CLASS_CATEGORY[labels[a]] == CLASS_CATEGORY[labels[b]]
        return (
            f"are the items in the {POSITIONS[a]} and the {POSITIONS[b]} the same category?",
            "yes" if same else "no",
            {"positions": [POSITIONS[a], POSITIONS[b]]},
        )
    raise AssertionError(kind)


def _gen_gqa(pool: _Pool, split: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, list[str], list]:
    n_images = math.ceil(n / QUESTIONS_PER_IMAGE)
    idx = pool.sample(rng, (n_images, 4))
    labels = pool.labels[idx].astype(int)
    image_ids = [f"gqa-{split}-{i:06d}" for i in range(n_images)]
    examples = []
    for i in range(n_images):
        labs = labels[i].tolist()
        asked = 0
        for kind in rng.permutation(GQA_KINDS):
            if asked == QUESTIONS_PER_IMAGE or len(examples) == n:
                break
            q = _gqa_question(str(kind), labs, rng)
            if q is None:
                continue
            text, answer, args = q
            extra = {"photos": pool.photo_ids(idx[i]), "labels": labs, "qtype": str(kind), "args": args}
            examples.append(
                _example("gqa", f"gqa-{split}-q{len(examples):06d}", [image_ids[i]], text, answer, extra)
            )
            asked += 1
    return _grids(pool.images, idx), image_ids, examples


NLVR_KINDS = ("exactly", "both", "neither", "more", "same_count_category", "at_position", "only_one")


def _nlvr_statement(
    kind: str, left: list[int], right: list[int], rng: np.random.Generator
) -> tuple[str, bool, dict]:
    sides = {"left": left, "right": right}
    present = sorted(set(left) | set(right))
    c = present[int(rng.integers(len(present)))] if rng.random() < 0.7 else int(rng.integers(10))
    name, plural = CLASS_NAMES[c], CLASS_PLURALS[c]
    if kind == "exactly":
        side = ("left", "right")[int(rng.integers(2))]
        k = int(rng.integers(1, 4))
        noun = name if k == 1 else plural
        return (
            f"the {side} image contains exactly {NUMBER_WORDS[k]} {noun}",
            sides[side].count(c) == k,
            {"side": side, "count": k, "class": name},
        )
    if kind == "both":
        return f"both images contain {_a(name)}", c in left and c in right, {"class": name}
    if kind == "neither":
        return f"neither image contains {_a(name)}", c not in left and c not in right, {"class": name}
    if kind == "only_one":
        return f"only one of the images contains {_a(name)}", (c in left) != (c in right), {"class": name}
    if kind == "more":
        first = ("left", "right")[int(rng.integers(2))]
        second = "right" if first == "left" else "left"
        return (
            f"there are more {plural} in the {first} image than in the {second} image",
            sides[first].count(c) > sides[second].count(c),
            {"class": name, "first": first},
        )
    if kind == "same_count_category":
        cat = CLASS_CATEGORY[c]
        count = [sum(CLASS_CATEGORY[x] == cat for x in s) for s in (left, right)]
        return (
            f"the two images contain the same number of {CATEGORY_PLURALS[cat]}",
            count[0] == count[1],
            {"category": CATEGORIES[cat]},
        )
    if kind == "at_position":
        side = ("left", "right")[int(rng.integers(2))]
        p = int(rng.integers(4))
        return (
            f"the {POSITIONS[p]} of the {side} image shows {_a(name)}",
            sides[side][p] == c,
            {"side": side, "position": POSITIONS[p], "class": name},
        )
    raise AssertionError(kind)


def _gen_nlvr(
    pool: _Pool, split: str, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, list[str], list]:
    from adapterkit.vl.datasets.base import VLExample

    n_images = max(2, n)
    idx = pool.sample(rng, (n_images, 4))
    labels = pool.labels[idx].astype(int)
    image_ids = [f"nlvr-{split}-{i:06d}" for i in range(n_images)]
    truths = rng.permutation(np.arange(n) % 2 == 0)  # exactly balanced
    examples = []
    for e in range(n):
        want = bool(truths[e])
        for _attempt in range(10_000):
            a, b = (int(v) for v in rng.choice(n_images, size=2, replace=False))
            left, right = labels[a].tolist(), labels[b].tolist()
            found = None
            for _ in range(30):
                kind = NLVR_KINDS[int(rng.integers(len(NLVR_KINDS)))]
                text, truth, args = _nlvr_statement(kind, left, right, rng)
                if truth == want:
                    found = (kind, text, args)
                    break
            if found is not None:
                break
        else:  # pragma: no cover - every pair admits true and false statements
            raise AssertionError("could not generate an NLVR statement")
        kind, text, args = found
        answer = "true" if want else "false"
        extra = {
            "photos": pool.photo_ids(idx[a]) + pool.photo_ids(idx[b]),
            "labels": [left, right],
            "qtype": kind,
            "args": args,
        }
        examples.append(
            VLExample(
                uid=f"nlvr-{split}-q{e:06d}",
                task="nlvr",
                image_ids=[image_ids[a], image_ids[b]],
                text=text,
                targets=[answer],
                target_scores={answer: 1.0},
                label=int(want),
                extra=extra,
            )  # fmt: skip
        )
    return _grids(pool.images, idx), image_ids, examples


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def caption_references(labels: Sequence[int]) -> list[str]:
    """The four reference captions of a 2x2 grid with class `labels` in reading order."""
    names = [_a(CLASS_NAMES[c]) for c in labels]
    counts = Counter(labels)
    order = list(dict.fromkeys(labels))
    grouped = [
        _a(CLASS_NAMES[c]) if counts[c] == 1 else f"{NUMBER_WORDS[counts[c]]} {CLASS_PLURALS[c]}"
        for c in order
    ]
    return [
        _join(names),
        ", ".join(f"{POSITIONS[p]} {names[p]}" for p in range(4)),
        f"{names[0]} and {names[1]} on top, {names[2]} and {names[3]} below",
        f"{_join(grouped)} in a two by two grid",
    ]


_ITEM_RE = re.compile(
    r"\b(?:(" + "|".join(NUMBER_WORDS[1:]) + r")\s+)?("
    + "|".join(re.escape(w) for w in sorted(CLASS_NAMES + CLASS_PLURALS, key=len, reverse=True)) + r")\b"
)
_ITEM_CLASS = {**{n: c for c, n in enumerate(CLASS_NAMES)}, **{n: c for c, n in enumerate(CLASS_PLURALS)}}


def caption_items(caption: str) -> Counter:
    """The items a caption names, as a multiset of class ids ("two coats and a bag" -> coat x2, bag):
    every class name or plural, counted by a number word before it ("one" .. "four") or once."""
    found: Counter = Counter()
    for number, name in _ITEM_RE.findall(caption.lower()):
        found[_ITEM_CLASS[name]] += NUMBER_WORDS.index(number) if number else 1
    return found


def caption_item_recall(caption: str, labels: Sequence[int]) -> float:
    """Share of a grid's items the caption names (multiset overlap / number of items): reads the
    picture, unlike CIDEr-D, which the caption template alone scores highly. A caption naming four
    items at random scores the chance level; the references score 1."""
    want = Counter(int(c) for c in labels)
    return sum((caption_items(caption) & want).values()) / max(1, sum(want.values()))


def _gen_caption(
    pool: _Pool, split: str, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, list[str], list]:
    from adapterkit.vl.datasets.base import VLExample

    idx = pool.sample(rng, (n, 4))
    labels = pool.labels[idx].astype(int)
    image_ids = [f"caption-{split}-{i:06d}" for i in range(n)]
    examples = []
    for i in range(n):
        labs = labels[i].tolist()
        extra = {"photos": pool.photo_ids(idx[i]), "labels": labs}
        examples.append(
            VLExample(
                uid=f"caption-{split}-q{i:06d}",
                task="caption",
                image_ids=[image_ids[i]],
                text="",
                targets=caption_references(labs),
                extra=extra,
            )  # fmt: skip
        )
    return _grids(pool.images, idx), image_ids, examples


_GENERATORS = {"vqa": _gen_vqa, "gqa": _gen_gqa, "nlvr": _gen_nlvr, "caption": _gen_caption}
NATIVE_SIZE = {"vqa": 28, "gqa": 56, "nlvr": 56, "caption": 56}


# ----------------------------------------------------------------------------- building


def _resolve_sizes(
    n_train: int | dict | None,
    n_val: int | dict | None,
    n_test: int | dict | None,
    tiny: bool,
    tasks: Sequence[str],
) -> dict[str, dict[str, int]]:
    base = TINY_SIZES if tiny else DEFAULT_SIZES
    sizes: dict[str, dict[str, int]] = {}
    for task in tasks:
        if task not in TASKS:
            raise ConfigError(
                f"unknown FashionVL task {task!r}{did_you_mean(task, TASKS)}; choose from {', '.join(TASKS)}"
            )
        sizes[task] = {}
        for s, (split, given) in enumerate(zip(SPLITS, (n_train, n_val, n_test))):
            value = given.get(task, base[task][s]) if isinstance(given, dict) else given
            value = base[task][s] if value is None else value
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(
                    f"FashionVL size of {task}/{split} must be a positive integer, got {value!r}"
                )
            if task == "nlvr" and value < 2:
                raise ConfigError(f"FashionVL nlvr/{split} needs at least 2 examples, got {value}")
            sizes[task][split] = int(value)
    return sizes


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _config(seed: int, sizes: dict, tiny: bool) -> dict:
    return {"name": "FashionVL", "version": VERSION, "seed": int(seed), "sizes": sizes, "tiny": bool(tiny)}


def _is_built(out: Path, config: dict) -> bool:
    try:
        meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(meta, dict) or {k: meta.get(k) for k in config} != config:
        return False
    files = meta.get("files", {})
    return bool(files) and all(
        (out / name).is_file() and (out / name).stat().st_size == info.get("bytes")
        for name, info in files.items()
    )


def build_fashionvl(
    out_dir: str | os.PathLike,
    seed: int = 0,
    n_train: int | dict[str, int] | None = None,
    n_val: int | dict[str, int] | None = None,
    n_test: int | dict[str, int] | None = None,
    tiny: bool = False,
    tasks: Sequence[str] = TASKS,
    source: str | os.PathLike | None = None,
    force: bool = False,
) -> dict:
    """Build FashionVL into `out_dir` and return its meta.json content.

    Sizes count examples per task and split (an int for every task or a
    {task: n} dict); unset sizes come from `DEFAULT_SIZES` (`TINY_SIZES` with
    tiny=True). VQA and GQA ask three questions per image; NLVR draws its
    image pairs from a pool of as many grid images as examples. A folder whose
    meta.json matches the request is left as it is (unless `force`).
    """
    out = Path(out_dir)
    sizes = _resolve_sizes(n_train, n_val, n_test, tiny, tasks)
    config = _config(seed, sizes, tiny)
    if not force and _is_built(out, config):
        return json.loads((out / "meta.json").read_text(encoding="utf-8"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # the folder is not valid until meta.json is rewritten

    from adapterkit.vl.datasets.base import atomic_write_text, write_examples_jsonl

    pools = {split: _Pool(split, source) for split in SPLITS}
    parts: list[np.ndarray] = []
    index: dict[str, int] = {}
    example_files: list[str] = []
    for t, task in enumerate(TASKS):
        if task not in sizes:
            continue
        for s, split in enumerate(SPLITS):
            rng = np.random.default_rng(np.random.SeedSequence([int(seed), t, s]))
            images, image_ids, examples = _GENERATORS[task](pools[split], split, sizes[task][split], rng)
            for image_id in image_ids:
                index[image_id] = len(index)
            parts.append(images)
            rel = f"{task}/{split}.jsonl"
            write_examples_jsonl(out / rel, examples)
            example_files.append(rel)

    total = sum(len(p) for p in parts)
    fd, tmp = tempfile.mkstemp(prefix=".images.", suffix=".npy", dir=out)
    os.close(fd)
    try:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(total, 56, 56))
        row = 0
        for p in parts:
            arr[row : row + len(p)] = p
            row += len(p)
        arr.flush()
        del arr
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, out / "images.npy")
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    atomic_write_text(out / "images_index.json", json.dumps(index, separators=(",", ":")) + "\n")

    files = {}
    for rel in ["images.npy", "images_index.json", *example_files]:
        files[rel] = {"sha256": _sha256(out / rel), "bytes": (out / rel).stat().st_size}
    content_hash = hashlib.sha256(
        "".join(f"{k}:{v['sha256']}\n" for k, v in files.items()).encode()
    ).hexdigest()
    meta = {
        **config,
        "tasks": [t for t in TASKS if t in sizes],
        "splits": list(SPLITS),
        "classes": list(CLASS_NAMES),
        "fashion_mnist_classes": list(FASHION_MNIST_NAMES),
        "categories": list(CATEGORIES),
        "class_category": {CLASS_NAMES[c]: CATEGORIES[CLASS_CATEGORY[c]] for c in range(10)},
        "sleeved_classes": [CLASS_NAMES[c] for c in SLEEVED_CLASSES],
        "dark_below": DARK_BELOW,
        "light_above": LIGHT_ABOVE,
        "questions_per_image": QUESTIONS_PER_IMAGE,
        "photo_pools": {
            k: {"fashion_mnist_split": v[0], "start": v[1], "stop": v[2]} for k, v in PHOTO_POOLS.items()
        },
        "image_shape": [56, 56],
        "native_size": NATIVE_SIZE,
        "num_images": total,
        "num_examples": {t: dict(v) for t, v in sizes.items()},
        "files": files,
        "content_hash": content_hash,
    }
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2) + "\n")
    return meta


# ----------------------------------------------------------------------------- reading


def _read_meta(out_dir: str | os.PathLike) -> dict:
    path = Path(out_dir) / "meta.json"
    if not path.is_file():
        raise DataError(
            f"FashionVL not found: {path} is missing (run `adapterkit fashionvl build --out {out_dir}`)"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise DataError(f"FashionVL meta file {path} is corrupt ({exc})") from None


def load_fashionvl_examples(out_dir: str | os.PathLike, task: str, split: str) -> list:
    """The `VLExample`s of one task and split."""
    from adapterkit.vl.datasets.base import read_examples_jsonl

    meta = _read_meta(out_dir)
    if task not in meta["tasks"]:
        raise DataError(f"FashionVL in {out_dir} has no task {task!r}{did_you_mean(task, meta['tasks'])}")
    if split not in SPLITS:
        raise DataError(f"FashionVL has no split {split!r}{did_you_mean(split, SPLITS)}")
    return read_examples_jsonl(Path(out_dir) / task / f"{split}.jsonl")


class FashionVLImages(Sequence):
    """Lazy (image id, uint8 array) pairs over images.npy (memory-mapped), in row
    order; single-item photos come back at their native 28x28."""

    def __init__(self, out_dir: str | os.PathLike) -> None:
        out = Path(out_dir)
        self.meta = _read_meta(out)
        try:
            self.array = np.load(out / "images.npy", mmap_mode="r")
            index = json.loads((out / "images_index.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DataError(f"FashionVL images in {out} are missing or corrupt ({exc})") from None
        self.ids = sorted(index, key=index.__getitem__)
        if len(self.ids) != len(self.array) or any(index[i] != r for r, i in enumerate(self.ids)):
            raise DataError(f"FashionVL {out}: images_index.json does not match images.npy")
        self._rows = index
        native = self.meta.get("native_size", NATIVE_SIZE)
        self._step = [56 // int(native.get(i.split("-", 1)[0], 56)) for i in self.ids]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        step = self._step[i]
        return self.ids[i], np.ascontiguousarray(self.array[i, ::step, ::step])

    def image(self, image_id: str) -> np.ndarray:
        """One image by id."""
        if image_id not in self._rows:
            raise DataError(f"FashionVL has no image {image_id!r}{did_you_mean(image_id, self.ids[:1000])}")
        return self[self._rows[image_id]][1]


def iter_fashionvl_images(out_dir: str | os.PathLike) -> FashionVLImages:
    """All FashionVL images as lazy (id, array) pairs, usable by `extract_features`."""
    return FashionVLImages(out_dir)


def fashionvl_stats(out_dir: str | os.PathLike, top_k: int = 10) -> dict:
    """Counts per task/split (examples, images, question types) and the top-k
    train answers per task (caption: the most common reference captions)."""
    meta = _read_meta(out_dir)
    stats: dict[str, Any] = {"num_images": meta["num_images"], "seed": meta["seed"], "tasks": {}}
    for task in meta["tasks"]:
        entry: dict[str, Any] = {}
        for split in SPLITS:
            exs = load_fashionvl_examples(out_dir, task, split)
            info: dict[str, Any] = {
                "examples": len(exs),
                "images": len({i for ex in exs for i in ex.image_ids}),
            }
            qtypes = Counter(ex.extra.get("qtype") for ex in exs if ex.extra.get("qtype"))
            if qtypes:
                info["question_types"] = dict(sorted(qtypes.items()))
            if task == "nlvr":
                info["true_fraction"] = round(sum(ex.label == 1 for ex in exs) / max(len(exs), 1), 4)
            if split == "train":
                answers = Counter(
                    t for ex in exs for t in (ex.targets if task == "caption" else ex.targets[:1])
                )
                ranked = sorted(answers.items(), key=lambda kv: (-kv[1], kv[0]))  # ties: alphabetical
                entry["top_answers"] = [[a, c] for a, c in ranked[:top_k]]
                entry["distinct_answers"] = len(answers)
            entry[split] = info
        stats["tasks"][task] = entry
    return stats


def majority_baseline(out_dir: str | os.PathLike) -> dict:
    """Score of always predicting the most common train answer on test, per task
    (accuracy for vqa / gqa / nlvr; CIDEr-D of the most common train reference
    caption for caption)."""
    meta = _read_meta(out_dir)
    result: dict[str, dict] = {}
    for task in meta["tasks"]:
        train = load_fashionvl_examples(out_dir, task, "train")
        test = load_fashionvl_examples(out_dir, task, "test")
        if task == "caption":
            counts = Counter(t for ex in train for t in ex.targets)
            top = min(counts, key=lambda a: (-counts[a], a))
            from adapterkit.vl.metrics.captions import cider_d

            score = cider_d({ex.uid: ex.targets for ex in test}, {ex.uid: top for ex in test})
            result[task] = {"prediction": top, "metric": "cider_d", "score": float(score), "n": len(test)}
            continue
        counts = Counter(ex.targets[0] for ex in train)
        top = min(counts, key=lambda a: (-counts[a], a))
        acc = sum((ex.target_scores or {t: 1.0 for t in ex.targets}).get(top, 0.0) for ex in test) / len(test)
        result[task] = {"prediction": top, "metric": "accuracy", "score": float(acc), "n": len(test)}
    return result


# ----------------------------------------------------------------------------- CLI


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``adapterkit fashionvl build|stats``."""
    p = subparsers.add_parser(
        "fashionvl",
        help="build or describe the FashionVL benchmark (real Fashion-MNIST photos)",
        description="FashionVL: a deterministic VQA / GQA / NLVR / caption benchmark built from Fashion-MNIST.",
    )
    p.add_argument("action", choices=["build", "stats"], help="build the benchmark or print its statistics")
    p.add_argument("--out", required=True, metavar="DIR", help="benchmark folder")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--tiny", action="store_true", help="tiny sizes (for tests and smoke runs)")
    p.add_argument(
        "--n-train", type=positive_int, default=None, help="train examples per task (default: per-task defaults)"
    )
    p.add_argument("--n-val", type=positive_int, default=None, help="val examples per task")
    p.add_argument("--n-test", type=positive_int, default=None, help="test examples per task")
    p.add_argument(
        "--source", default=None, help=f"Fashion-MNIST folder (default ${SOURCE_ENV} or {DEFAULT_SOURCE})"
    )
    p.add_argument("--force", action="store_true", help="rebuild even when the folder matches")
    p.add_argument("--json", action="store_true", help="stats: print JSON")
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``adapterkit fashionvl``; returns the exit status."""
    if args.action == "build":
        meta = build_fashionvl(
            args.out, seed=args.seed, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test,
            tiny=args.tiny, source=args.source, force=args.force,
        )  # fmt: skip
        sizes = ", ".join(f"{t} {'/'.join(str(v) for v in s.values())}" for t, s in meta["sizes"].items())
        print(f"FashionVL in {args.out}: {meta['num_images']} images; examples train/val/test: {sizes}")
        print(f"content hash {meta['content_hash'][:16]}")
        return 0
    stats = fashionvl_stats(args.out)
    baseline = majority_baseline(args.out)
    if args.json:
        print(json.dumps({"stats": stats, "majority_baseline": baseline}, indent=2))
        return 0
    print(f"FashionVL {args.out}: {stats['num_images']} images (seed {stats['seed']})")
    for task, entry in stats["tasks"].items():
        counts = " / ".join(f"{entry[s]['examples']} ex, {entry[s]['images']} img" for s in SPLITS)
        base = baseline[task]
        print(f"  {task:8s} train / val / test: {counts}")
        print(
            f"           majority baseline ({base['metric']}): {base['score']:.4f} predicting {base['prediction']!r}"
        )
        top = ", ".join(f"{a} ({c})" for a, c in entry["top_answers"][:5])
        print(f"           top train answers: {top}")
    return 0
