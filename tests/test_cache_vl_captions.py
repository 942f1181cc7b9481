"""examples/cache_vl_captions.py and cache_clip_fewshot.py's --fm-captions: the pieces that need no trained run."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _load(name):
    sys.path.insert(0, str(REPO / "examples"))
    spec = importlib.util.spec_from_file_location(name, REPO / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def vl():
    return _load("cache_vl_captions")


@pytest.fixture(scope="module")
def fs():
    return _load("cache_clip_fewshot")


def test_tiled_grid_repeats_the_photo_in_four_cells(vl):
    x = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    g = vl.tiled_grids(x)
    assert g.shape == (2, 56, 56)
    for r in (0, 28):
        for c in (0, 28):
            assert np.array_equal(g[:, r : r + 28, c : c + 28], x)


def test_names_class_tells_shirt_from_t_shirt(vl):
    assert vl.names_class("a t-shirt, a sneaker, a bag and a dress") == [0, 3, 7, 8]
    assert vl.names_class("two shirts and an ankle boot") == [6, 9]
    assert vl.names_class("four t-shirts in a two by two grid") == [0]


def test_support_pool_is_the_fewshot_examples_pool(vl, fs):
    labels = np.random.default_rng(3).integers(0, 10, 2000)
    pool, _ = fs.per_class_split(labels, [100, 30], np.random.default_rng(0))
    assert np.array_equal(vl.support_pool_indices(labels), pool)


def test_fm_captions_json_in_pool_order_and_missing_ids_refused(fs, tmp_path):
    p = tmp_path / "caps.json"
    p.write_text(json.dumps({"captioner": "stub", "captions": {"train/5": "a bag", "train/1": "a coat"}}))
    texts, source = fs.fmnist_captions(p, ["train/1", "train/5"])
    assert texts == ["a coat", "a bag"] and "stub" in source and "2 distinct of 2" in source
    with pytest.raises(SystemExit, match="train/9"):
        fs.fmnist_captions(p, ["train/1", "train/9"])
