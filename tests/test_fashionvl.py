"""FashionVL: determinism, leak-freedom, answers re-derived from the raw
Fashion-MNIST labels / pixels, NLVR balance, stats and majority baselines."""

from __future__ import annotations

import argparse
import gzip
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from adapterkit.errors import ConfigError, DataError
from adapterkit.vl.datasets import fashionvl as fvl
from adapterkit.vl.datasets.base import read_examples_jsonl

SOURCE = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.skipif(not SOURCE.is_dir(), reason="Fashion-MNIST is not installed")

# independent restatement of the documented conventions
NAMES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
PLURALS = {n: (n + "es" if n == "dress" else n + "s") for n in NAMES}
CATEGORY = {
    "t-shirt": "top", "pullover": "top", "shirt": "top", "trouser": "bottom", "dress": "dress",
    "coat": "outerwear", "sandal": "footwear", "sneaker": "footwear", "ankle boot": "footwear", "bag": "accessory",
}  # fmt: skip
SLEEVED = {"t-shirt", "pullover", "coat", "shirt"}
POS = {"top left": 0, "top right": 1, "bottom left": 2, "bottom right": 3}
# (row, col) of each position
RC = {0: (0, 0), 1: (0, 1), 2: (1, 0), 3: (1, 1)}
WORDS = {"one": 1, "two": 2, "three": 3}


def _raw(split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    with gzip.open(SOURCE / f"{prefix}-images-idx3-ubyte.gz", "rb") as fh:
        images = np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(SOURCE / f"{prefix}-labels-idx1-ubyte.gz", "rb") as fh:
        labels = np.frombuffer(fh.read(), np.uint8, offset=8)
    return images, labels


@pytest.fixture(scope="module")
def raw():
    return {"train": _raw("train"), "test": _raw("test")}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("fvl") / "a"
    meta = fvl.build_fashionvl(out, seed=0, tiny=True)
    return out, meta


def _photo(raw, pid: str) -> tuple[np.ndarray, str]:
    _, split, idx = pid.split("-")
    images, labels = raw[split]
    return images[int(idx)], NAMES[int(labels[int(idx)])]


def _all_examples(out: Path) -> dict[tuple[str, str], list]:
    return {(t, s): read_examples_jsonl(out / t / f"{s}.jsonl") for t in fvl.TASKS for s in fvl.SPLITS}


def test_deterministic_bytes_and_idempotent(built, tmp_path):
    out_a, meta_a = built
    out_b = tmp_path / "b"
    meta_b = fvl.build_fashionvl(out_b, seed=0, tiny=True)
    files_a = sorted(p.relative_to(out_a) for p in out_a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(out_b) for p in out_b.rglob("*") if p.is_file())
    assert files_a == files_b
    for rel in files_a:
        assert (out_a / rel).read_bytes() == (out_b / rel).read_bytes(), rel
    assert meta_a["content_hash"] == meta_b["content_hash"]
    # idempotent: a matching folder is not rewritten
    mtime = (out_b / "images.npy").stat().st_mtime_ns
    assert fvl.build_fashionvl(out_b, seed=0, tiny=True) == meta_b
    assert (out_b / "images.npy").stat().st_mtime_ns == mtime
    # another seed gives another benchmark in place
    meta_c = fvl.build_fashionvl(out_b, seed=1, tiny=True)
    assert meta_c["content_hash"] != meta_a["content_hash"]
    assert json.loads((out_b / "meta.json").read_text())["seed"] == 1


def test_sizes_and_meta(built):
    out, meta = built
    exs = _all_examples(out)
    for t in fvl.TASKS:
        for s_i, s in enumerate(fvl.SPLITS):
            assert len(exs[t, s]) == fvl.TINY_SIZES[t][s_i] == meta["sizes"][t][s]
    assert meta["num_images"] == len(np.load(out / "images.npy", mmap_mode="r"))
    custom = fvl._resolve_sizes(5, {"vqa": 7}, None, True, fvl.TASKS)
    assert (
        custom["gqa"]["train"] == 5
        and custom["vqa"]["val"] == 7
        and custom["gqa"]["val"] == fvl.TINY_SIZES["gqa"][1]
    )


def test_leak_free_and_unique_ids(built):
    out, _ = built
    exs = _all_examples(out)
    photos = {s: set() for s in fvl.SPLITS}
    image_ids = {s: set() for s in fvl.SPLITS}
    for (_, s), items in exs.items():
        for ex in items:
            photos[s].update(ex.extra["photos"])
            image_ids[s].update(ex.image_ids)
    assert all(p.startswith("fm-test-") for p in photos["test"])
    assert all(p.startswith("fm-train-") and int(p.split("-")[2]) < 50_000 for p in photos["train"])
    assert all(p.startswith("fm-train-") and int(p.split("-")[2]) >= 50_000 for p in photos["val"])
    assert not (photos["train"] | photos["val"]) & photos["test"]
    assert not photos["train"] & photos["val"]
    assert not image_ids["train"] & image_ids["test"] and not image_ids["train"] & image_ids["val"]
    index = json.loads((out / "images_index.json").read_text())
    assert sorted(index.values()) == list(range(len(index)))
    assert set().union(*image_ids.values()) <= set(index)
    # uids are unique
    uids = [ex.uid for items in exs.values() for ex in items]
    assert len(uids) == len(set(uids))


def test_images_are_the_photos(built, raw):
    out, _ = built
    images = fvl.iter_fashionvl_images(out)
    assert len(images) == len(images.ids)
    for (task, _), items in _all_examples(out).items():
        for ex in items[:6]:
            per_image = 1 if task == "vqa" else 4
            for k, image_id in enumerate(ex.image_ids):
                img = images.image(image_id)
                pids = ex.extra["photos"][k * per_image : (k + 1) * per_image]
                tiles = [_photo(raw, p)[0] for p in pids]
                if task == "vqa":
                    assert img.shape == (28, 28)
                    np.testing.assert_array_equal(img, tiles[0])
                else:
                    assert img.shape == (56, 56)
                    expect = np.block([[tiles[0], tiles[1]], [tiles[2], tiles[3]]])
                    np.testing.assert_array_equal(img, expect)


def _check_vqa(ex, raw):
    (pid,) = ex.extra["photos"]
    pixels, name = _photo(raw, pid)
    q, a, args = ex.text, ex.targets[0], ex.extra["args"]
    kind = ex.extra["qtype"]
    assert ex.target_scores == {a: 1.0}
    if kind == "class":
        assert q == "what is this?" and a == name
    elif kind == "category":
        assert q == "what category is this?" and a == CATEGORY[name]
    elif kind == "is_class":
        assert args["class"] in q and a == ("yes" if args["class"] == name else "no")
    elif kind == "is_category":
        assert a == ("yes" if args["category"] == CATEGORY[name] else "no")
    elif kind == "sleeves":
        assert a == ("yes" if name in SLEEVED else "no")
    elif kind == "dark":
        fg = pixels[pixels > 0].astype(float)
        mean = fg.mean()
        assert not 100 <= mean <= 140, "ambiguous brightness must not be asked"
        assert a == ("yes" if mean < 100 else "no")
    else:
        raise AssertionError(kind)


def _check_gqa(ex, raw):
    names = [_photo(raw, p)[1] for p in ex.extra["photos"]]
    q, a, args, kind = ex.text, ex.targets[0], ex.extra["args"], ex.extra["qtype"]
    if kind == "what_at":
        assert args["position"] in q and a == names[POS[args["position"]]]
    elif kind == "category_at":
        assert a == CATEGORY[names[POS[args["position"]]]]
    elif kind == "relate":
        name = args["class"]
        assert f"the {name}?" in q and names.count(name) == 1
        r, c = RC[names.index(name)]
        dr, dc = {"to the right of": (0, 1), "to the left of": (0, -1), "above": (-1, 0), "below": (1, 0)}[
            args["relation"]
        ]
        target = [p for p, rc in RC.items() if rc == (r + dr, c + dc)]
        assert len(target) == 1 and a == names[target[0]]
    elif kind == "exist_region":
        rows = {"top row": [0, 1], "bottom row": [2, 3], "left column": [0, 2], "right column": [1, 3]}
        inside = [names[p] for p in rows[args["region"]]]
        assert args["region"] in q and a == ("yes" if args["class"] in inside else "no")
    elif kind == "count_class":
        assert PLURALS[args["class"]] in q and a == str(names.count(args["class"]))
    elif kind == "count_category":
        assert a == str(sum(CATEGORY[n] == args["category"] for n in names))
    elif kind == "same_category":
        pa, pb = (POS[p] for p in args["positions"])
        assert a == ("yes" if CATEGORY[names[pa]] == CATEGORY[names[pb]] else "no")
    else:
        raise AssertionError(kind)


def _check_nlvr(ex, raw):
    flat = [_photo(raw, p)[1] for p in ex.extra["photos"]]
    sides = {"left": flat[:4], "right": flat[4:]}
    left, right = sides["left"], sides["right"]
    q, args, kind = ex.text, ex.extra["args"], ex.extra["qtype"]
    if kind == "exactly":
        k = WORDS[q.split("exactly ")[1].split()[0]]
        truth = sides[args["side"]].count(args["class"]) == k
    elif kind == "both":
        truth = args["class"] in left and args["class"] in right
    elif kind == "neither":
        truth = args["class"] not in left and args["class"] not in right
    elif kind == "only_one":
        truth = (args["class"] in left) != (args["class"] in right)
    elif kind == "more":
        first = q.split(" image than")[0].rsplit(" ", 1)[1]
        second = "right" if first == "left" else "left"
        truth = sides[first].count(args["class"]) > sides[second].count(args["class"])
    elif kind == "same_count_category":
        cat = args["category"]
        truth = sum(CATEGORY[n] == cat for n in left) == sum(CATEGORY[n] == cat for n in right)
    elif kind == "at_position":
        truth = sides[args["side"]][POS[args["position"]]] == args["class"]
    else:
        raise AssertionError(kind)
    assert ex.targets == ["true" if truth else "false"], ex.text
    assert ex.label == int(truth)
    assert len(ex.image_ids) == 2 and ex.image_ids[0] != ex.image_ids[1]


def _check_caption(ex, raw):
    names = [_photo(raw, p)[1] for p in ex.extra["photos"]]
    assert ex.text == "" and 3 <= len(ex.targets) <= 5
    art = [("an " if n[0] in "aeiou" else "a ") + n for n in names]
    # the first reference lists the four items in reading order, the second names positions
    assert ex.targets[0] == f"{art[0]}, {art[1]}, {art[2]} and {art[3]}"
    assert ex.targets[1] == ", ".join(f"{p} {a}" for p, a in zip(POS, art))
    # the grouped reference counts every class correctly
    grouped = ex.targets[3]
    for n, k in Counter(names).items():
        expect = (
            ("an " if n[0] in "aeiou" else "a ") + n
            if k == 1
            else f"{['', '', 'two', 'three', 'four'][k]} {PLURALS[n]}"
        )
        assert expect in grouped, (grouped, names)


@pytest.mark.parametrize("task", fvl.TASKS)
def test_answers_match_labels(built, raw, task):
    out, _ = built
    checker = {"vqa": _check_vqa, "gqa": _check_gqa, "nlvr": _check_nlvr, "caption": _check_caption}[task]
    kinds = Counter()
    for split in fvl.SPLITS:
        for ex in read_examples_jsonl(out / task / f"{split}.jsonl"):
            assert ex.task == task
            checker(ex, raw)
            kinds[ex.extra.get("qtype")] += 1
    if task in ("vqa", "gqa", "nlvr"):
        assert len(kinds) >= 5, kinds  # the question types are all exercised


def test_nlvr_balanced(built):
    out, _ = built
    for split in fvl.SPLITS:
        exs = read_examples_jsonl(out / "nlvr" / f"{split}.jsonl")
        labels = [ex.label for ex in exs]
        assert abs(sum(labels) - len(labels) / 2) <= 0.5
        assert all(ex.targets == ["true" if ex.label else "false"] for ex in exs)


def test_stats_and_majority_baseline(built):
    out, meta = built
    stats = fvl.fashionvl_stats(out)
    assert stats["num_images"] == meta["num_images"]
    for t in fvl.TASKS:
        for s in fvl.SPLITS:
            assert stats["tasks"][t][s]["examples"] == meta["sizes"][t][s]
    assert stats["tasks"]["nlvr"]["test"]["true_fraction"] == 0.5
    base = fvl.majority_baseline(out)
    for t in ("vqa", "gqa", "nlvr"):
        train = read_examples_jsonl(out / t / "train.jsonl")
        test = read_examples_jsonl(out / t / "test.jsonl")
        counts = Counter(ex.targets[0] for ex in train)
        assert counts[base[t]["prediction"]] == max(counts.values())
        assert base[t]["prediction"] == stats["tasks"][t]["top_answers"][0][0]
        acc = np.mean([ex.targets[0] == base[t]["prediction"] for ex in test])
        assert base[t]["score"] == pytest.approx(acc) and base[t]["metric"] == "accuracy"
    assert base["nlvr"]["score"] == pytest.approx(0.5)
    assert base["caption"]["metric"] == "cider_d" and 0.0 <= base["caption"]["score"] < 10.0


def test_cli_build_and_stats(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    fvl.add_parser(sub)
    out = tmp_path / "cli"
    args = parser.parse_args(["fashionvl", "build", "--out", str(out), "--tiny", "--seed", "3"])
    assert fvl.run(args) == 0
    assert json.loads((out / "meta.json").read_text())["seed"] == 3
    args = parser.parse_args(["fashionvl", "stats", "--out", str(out), "--json"])
    assert fvl.run(args) == 0
    printed = json.loads(capsys.readouterr().out.split("\n", 2)[-1])
    assert set(printed["majority_baseline"]) == set(fvl.TASKS)


def test_errors(tmp_path):
    with pytest.raises(DataError, match="meta.json"):
        fvl.fashionvl_stats(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="nlvr/val"):
        fvl.build_fashionvl(tmp_path / "x", tiny=True, n_val={"nlvr": 1})
    with pytest.raises(ConfigError, match='did you mean "gqa"'):
        fvl.build_fashionvl(tmp_path / "x", tiny=True, tasks=["gqaa"])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        fvl.build_fashionvl(tmp_path / "y", tiny=True, source=tmp_path / "no-data")
    assert not (tmp_path / "y" / "meta.json").exists()


def test_default_test_split_and_its_size_leaves_train_and_val_alone(built, tmp_path):
    # at least 1,000 test examples per task by default: a 95% interval of about +-3 points per task
    assert all(fvl.DEFAULT_SIZES[t][2] >= 1000 for t in fvl.TASKS)
    out, meta = built
    other = fvl.build_fashionvl(tmp_path / "b", seed=0, tiny=True, n_test=30)
    for task in fvl.TASKS:
        for split in ("train", "val"):
            rel = f"{task}/{split}.jsonl"
            assert other["files"][rel]["sha256"] == meta["files"][rel]["sha256"], rel
        assert other["files"][f"{task}/test.jsonl"]["sha256"] != meta["files"][f"{task}/test.jsonl"]["sha256"]
        assert len(read_examples_jsonl(tmp_path / "b" / task / "test.jsonl")) == 30
