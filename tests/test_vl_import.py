"""Importing the reference's released feature files (HDF5 per image id, per-video npz)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adapterkit.cli import main as cli_main
from adapterkit.errors import DataError
from adapterkit.vl.backends import grid_boxes
from adapterkit.vl.feature_import import import_features, resize_frames
from adapterkit.vl.features import FeatureStore

h5py = pytest.importorskip("h5py", reason="h5py is not installed (pip install 'adapterkit[h5]')")


def _clip_dir(root, ids, k=36, d=16, dtype=np.float16, seed=0):
    """VL_adapter's CLIP layout: data_clip_RN101_att/<img_id>.h5 with group <img_id>/features."""
    rng = np.random.default_rng(seed)
    folder = root / "data_clip_RN101_att"
    folder.mkdir(parents=True)
    arrays = {}
    for image_id in ids:
        feats = rng.normal(size=(k, d)).astype(dtype)
        with h5py.File(folder / f"{image_id}.h5", "w") as f:
            grp = f.create_group(image_id)
            grp["features"] = feats
        arrays[image_id] = feats
    return folder, arrays


def _vlt5_file(path, ids, k=36, d=16, seed=1):
    """VL-T5's layout: one file, a group per image id with features, boxes (pixels), img_h, img_w."""
    rng = np.random.default_rng(seed)
    arrays = {}
    with h5py.File(path, "w") as f:
        for image_id in ids:
            feats = rng.normal(size=(k, d)).astype(np.float32)
            w, h = 640.0, 480.0
            x1 = rng.uniform(0, w / 2, size=k)
            y1 = rng.uniform(0, h / 2, size=k)
            boxes = np.stack([x1, y1, x1 + w / 2 + 5.0, y1 + h / 3], axis=1).astype(np.float32)  # x2 may pass w
            grp = f.create_group(image_id)
            grp["features"] = feats
            grp["boxes"] = boxes
            grp["img_h"] = h
            grp["img_w"] = w
            grp["obj_id"] = np.zeros(k, dtype=np.int64)
            arrays[image_id] = (feats, boxes, w, h)
    return arrays


def test_clip_per_image_files_import_exactly(tmp_path):
    ids = [f"COCO_val2014_{i:012d}" for i in (42, 73, 7)]
    folder, arrays = _clip_dir(tmp_path, ids)
    store = import_features([folder], tmp_path / "store", chunk=2, progress=False)
    assert sorted(store.ids) == sorted(ids)
    assert store.features.dtype == np.float16 and store.num_boxes == 36 and store.dim == 16
    for image_id, feats in arrays.items():
        got, boxes = store.get(image_id)
        np.testing.assert_array_equal(got, feats)
        np.testing.assert_array_equal(boxes, grid_boxes(6))  # the grid cells of a 6x6 CLIP grid
    assert "grid6" in store.backend


def test_vlt5_single_file_boxes_normalised_and_two_sources_in_one_store(tmp_path):
    vg = _vlt5_file(tmp_path / "vg_gqa_obj36.h5", ["2354786", "2375429"])
    folder, clip = _clip_dir(tmp_path, ["dev-850-0-img0", "dev-850-0-img1"])
    store = import_features([tmp_path / "vg_gqa_obj36.h5", folder], tmp_path / "store", dtype="float32",
                            progress=False)
    assert store.ids == ["2354786", "2375429", "dev-850-0-img0", "dev-850-0-img1"]
    for image_id, (feats, boxes, w, h) in vg.items():
        got, got_boxes = store.get(image_id)
        np.testing.assert_array_equal(got, feats)
        expected = boxes / np.array([w, h, w, h], dtype=np.float32)
        np.testing.assert_allclose(got_boxes, np.clip(expected, 0.0, 1.0), rtol=0, atol=1e-7)
        assert got_boxes.max() <= 1.0
    for image_id, feats in clip.items():
        np.testing.assert_array_equal(store.get(image_id)[0], feats.astype(np.float32))


def test_duplicate_ids_and_wrong_shapes_are_named(tmp_path):
    _vlt5_file(tmp_path / "a.h5", ["1", "2"])
    _vlt5_file(tmp_path / "b.h5", ["2", "3"])
    with pytest.raises(DataError, match="'2' is in both"):
        import_features([tmp_path / "a.h5", tmp_path / "b.h5"], tmp_path / "s1", progress=False)
    store = import_features([tmp_path / "a.h5", tmp_path / "b.h5"], tmp_path / "s0", progress=False,
                            duplicates="first")
    assert store.ids == ["1", "2", "3"]
    with h5py.File(tmp_path / "a.h5") as f:
        np.testing.assert_array_equal(store.get("2")[0], f["2/features"][()])
    _vlt5_file(tmp_path / "c.h5", ["9"], k=10)
    with pytest.raises(DataError, match="10 feature tokens, the store has 36"):
        import_features([tmp_path / "a.h5", tmp_path / "c.h5"], tmp_path / "s2", progress=False)
    with pytest.raises(DataError, match="not found"):
        import_features([tmp_path / "missing.h5"], tmp_path / "s3", progress=False)


def test_interrupted_import_resumes(tmp_path):
    ids = [f"img{i}" for i in range(5)]
    folder, arrays = _clip_dir(tmp_path, ids, dtype=np.float32)
    good = arrays["img3"]
    with h5py.File(folder / "img3.h5", "w") as f:  # a broken file after the first chunk
        f.create_group("img3")["features"] = np.zeros((36, 8), np.float32)
    with pytest.raises(DataError, match="img3.*dim 8"):
        import_features([folder], tmp_path / "store", chunk=2, progress=False)
    with pytest.raises(DataError, match="incomplete"):
        FeatureStore.open(tmp_path / "store")
    with h5py.File(folder / "img3.h5", "w") as f:
        f.create_group("img3")["features"] = good
    store = import_features([folder], tmp_path / "store", chunk=2, progress=False)
    for image_id, feats in arrays.items():
        np.testing.assert_array_equal(store.get(image_id)[0], feats)


def test_resize_frames_matches_the_reference_resize():
    rng = np.random.default_rng(0)
    for n_in in (3, 64, 97, 200):
        x = rng.normal(size=(n_in, 5)).astype(np.float32)
        t = torch.from_numpy(x)
        if n_in < 64:  # the reference pads with zero frames
            ref = torch.cat([t, torch.zeros(64 - n_in, 5)], dim=0)
        else:  # and adaptive-max-pools longer clips
            ref = torch.nn.functional.adaptive_max_pool1d(t.t(), 64).t()
        np.testing.assert_array_equal(resize_frames(x, 64), ref.numpy())


def test_cli_imports_video_npz_resampled_to_64_frames(tmp_path, capsys):
    rng = np.random.default_rng(3)
    clips = tmp_path / "clip-vit"
    clips.mkdir()
    raw = {}
    for vid, n in (("s03e02_seg02_clip_10", 90), ("s01e01_seg01_clip_00", 20)):
        raw[vid] = rng.normal(size=(n, 12)).astype(np.float32)
        np.savez(clips / f"{vid}.npz", features=raw[vid])
    rc = cli_main(["import-features", "--h5", str(clips), "--out", str(tmp_path / "store"), "--frames", "64",
                   "--no-progress"])
    assert rc == 0
    assert "2 items x 64 tokens x 12 dims" in capsys.readouterr().out
    store = FeatureStore.open(tmp_path / "store")
    for vid, x in raw.items():
        feats, boxes = store.get(vid)
        np.testing.assert_array_equal(feats, resize_frames(x, 64))
        assert not boxes.any()  # video frames: zero boxes, as the reference
    np.savez(clips / "flat.npz", features=np.zeros(12, np.float32))
    with pytest.raises(DataError, match=r"flat\.npz: features must be 2-d"):
        import_features([clips], tmp_path / "s2", frames=64, progress=False)
    # a bad path: one error line, exit status 2
    assert cli_main(["import-features", "--h5", str(tmp_path / "nope"), "--out", str(tmp_path / "s")]) == 2
