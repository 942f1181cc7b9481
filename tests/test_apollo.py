"""APoLLo on tiny random-init HF encoders: shapes, what trains, the loss against its formula,
the base-to-novel split, and a few engine steps lowering the loss."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertModel, BertTokenizer, Dinov2Config, Dinov2Model, ViTConfig, ViTModel

from adapterkit.errors import ConfigError, DataError
from adapterkit.methods.apollo import Apollo, ApolloConfig, CrossModalLayer, DualEncoder, co2_loss
from adapterkit.vision.apollo_train import (
    base_novel_split,
    random_resized_crop,
    subsample,
    train_apollo,
)

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "x", ".", "cat", "dog", "car", "tree",
         "shoe", "bag", "bird", "ship"]
NAMES = ["cat", "dog", "car", "tree", "shoe", "bag"]


def tiny_clip(seed=0, layers=3, image="vit"):
    torch.manual_seed(seed)
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)})
    tm = BertModel(BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                              intermediate_size=64), add_pooling_layer=False)
    if image == "dinov2":
        im = Dinov2Model(Dinov2Config(image_size=16, patch_size=8, hidden_size=24, num_hidden_layers=layers,
                                      num_attention_heads=4, mlp_ratio=2))
    else:
        im = ViTModel(ViTConfig(image_size=16, patch_size=8, hidden_size=24, num_hidden_layers=layers,
                                num_attention_heads=4, intermediate_size=48), add_pooling_layer=False)
    return DualEncoder(tm, tok, im, embed_dim=16)


def make(names=NAMES[:3], image="vit", **cfg):
    cfg = {"prompt_depth": 3, "adapter_heads": 4, **cfg}
    return Apollo(tiny_clip(image=image), names, ApolloConfig(**cfg))


@pytest.mark.parametrize("image", ["vit", "dinov2"])
def test_shapes_and_prompt_positions(image):
    m = make(image=image)
    x = torch.randn(5, 3, 16, 16)
    assert m(x).shape == (5, 3)
    img, txt = m.features(x)
    assert img.shape == (5, 16) and txt.shape == (3, 16)
    # the visual prompts are appended: the prompted image sequence is longer by n_ctx
    seen = {}
    def grab(mod, args, out):
        seen["n"] = (out[0] if isinstance(out, tuple) else out).shape[1]

    h = m.clip.image_layers[-1].register_forward_hook(grab)
    m.image_features(x)
    h.remove()
    assert seen["n"] == 1 + 4 + 2
    # the context starts from the embeddings of "a photo", after [CLS]
    emb = m.clip.text_model.get_input_embeddings().weight
    assert torch.allclose(m.ctx, emb[[VOCAB.index("a"), VOCAB.index("photo")]])
    assert m._ctx_start == 1
    # the frozen encoder is untouched outside prompting(): no hook changes its output
    with torch.no_grad():
        plain = m.clip.encode_image(x)
        m.detach_hooks()
        assert torch.equal(plain, m.clip.encode_image(x))


def test_prompts_reach_both_towers():
    m = make(use_adapter=False)
    with torch.no_grad():
        t0 = m.text_features().clone()
        m.deep_text[0].add_(1.0)
        t1 = m.text_features()
    assert not torch.allclose(t0, t1)  # a deep prompt changes the class features
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        i0 = m.image_features(x).clone()
        m.visual_proj[1].bias.add_(torch.randn(24))  # the deep image prompt of layer 1 (not a constant: LN removes it)
        i1 = m.image_features(x).clone()
        assert not torch.allclose(i0, i1)
        m.ctx.add_(torch.randn(2, 32))  # the shallow prompt reaches both towers (Linear_0(ctx) on the image side)
        assert not torch.allclose(t1, m.text_features())
        assert not torch.allclose(i1, m.image_features(x))


def test_only_prompts_and_adapters_train():
    m = make()
    before = {n: p.detach().clone() for n, p in m.clip.named_parameters()}
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(not n.startswith("clip.") for n in trainable)
    assert any(n.startswith("adapter.image_adapter") for n in trainable)
    assert any(n.startswith("adapter.text_adapter") for n in trainable)
    assert {"ctx", "deep_text.0", "visual_proj.0.weight"} <= trainable
    opt = torch.optim.SGD(m.trainable_parameters(), lr=0.1)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    m.train()
    assert not m.clip.training  # frozen encoders stay in eval mode
    for _ in range(2):
        loss = m.loss(x, y, x.flip(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(p.grad is not None for p in m.trainable_parameters())
    for n, p in m.clip.named_parameters():
        assert torch.equal(p, before[n]), n


def _reference_co2(x, v, T, Tc, w, div):
    """The formula, written out with loops (the spec's notation)."""
    b = x.shape[0]
    cos = lambda a, c: float(F.cosine_similarity(a, c, dim=0))  # noqa: E731
    l_con = 0.0
    for i in range(b):
        num = math.exp(cos(x[i], v[i]) / T)
        den = sum(math.exp(cos(x[i], v[j]) / T) for j in range(b) if j != i)
        l_con -= math.log(num / den) / b
    d = 0.0
    for i in range(b):
        js = [j for j in range(b) if j != i]
        p = torch.tensor([math.exp(cos(x[i], x[j]) / Tc) for j in js], dtype=torch.float64)
        q = torch.tensor([math.exp(cos(v[i], x[j]) / Tc) for j in js], dtype=torch.float64)
        p, q = p / p.sum(), q / q.sum()
        kl = lambda a, c: float((a * (a / c).log()).sum())  # noqa: E731
        if div == "js":
            mm = (p + q) / 2
            d += (0.5 * kl(p, mm) + 0.5 * kl(q, mm)) / b
        elif div == "forward_kl":
            d += kl(q, p) / b
        elif div == "reverse_kl":
            d += kl(p, q) / b
        elif div == "symmetric_kl":
            d += (0.5 * kl(q, p) + 0.5 * kl(p, q)) / b
        else:
            d += float(((p ** 0.5) * (q ** 0.5)).sum().log() / (0.5 - 1)) / b
    return l_con + w * d


@pytest.mark.parametrize("div", ["js", "forward_kl", "reverse_kl", "symmetric_kl", "renyi"])
def test_co2_loss_matches_the_formula(div):
    torch.manual_seed(1)
    x, v = torch.randn(4, 3), torch.randn(4, 3)
    got = co2_loss(x, v, temperature=0.2, consistency_temperature=0.5, divergence=div, weight=2.0)
    assert float(got) == pytest.approx(_reference_co2(x, v, 0.2, 0.5, 2.0, div), rel=1e-4, abs=1e-5)


def test_co2_loss_hand_built_case():
    # orthonormal x, and views identical to x: s_ii = 1/T, s_ij = 0; P == Q so the divergence is 0
    x = torch.eye(3)
    loss, parts = co2_loss(x, x.clone(), temperature=0.5, return_parts=True)
    assert float(parts["contrastive"]) == pytest.approx(-math.log(math.exp(2.0) / 2.0), abs=1e-6)
    assert float(parts["divergence"]) == pytest.approx(0.0, abs=1e-7)
    # a view that swaps examples 0 and 1: the positive of row 0 is orthogonal, negatives include itself
    v = x[[1, 0, 2]]
    con = co2_loss(v, x, temperature=0.5, weight=0.0)
    expect = (2 * -math.log(1.0 / (math.exp(2.0) + 1.0)) + -math.log(math.exp(2.0) / 2.0)) / 3
    assert float(con) == pytest.approx(expect, abs=1e-6)
    with pytest.raises(DataError, match="at least 2"):
        co2_loss(x[:1], x[:1])


def test_total_loss_is_ce_plus_weighted_co2():
    m = make(adapter_dropout=0.0, image_consistency=0.7)
    m.eval()
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    xv = x.flip(-1)
    with torch.no_grad():
        total, parts = m.loss(x, y, xv, return_parts=True)
        img, txt = m.features(x)
        ce = F.cross_entropy(m.logits_from(img, txt), y)
        co2 = co2_loss(img, m.clip.encode_image(xv))
    assert float(parts["ce"]) == pytest.approx(float(ce), rel=1e-5)
    assert float(total) == pytest.approx(float(ce + 0.7 * co2), rel=1e-5)
    with pytest.raises(DataError, match="pixels_view"):
        m.loss(x, y)


def test_text_consistency_uses_text_views():
    m = Apollo(tiny_clip(), NAMES[:3], ApolloConfig(prompt_depth=2, adapter_heads=4, text_consistency=1.0,
                                                    image_consistency=0.0),
               text_views=["a photo of a cat", "a dog", "a car"])
    _, parts = m.loss(torch.randn(2, 3, 16, 16), torch.tensor([0, 1]), return_parts=True)
    assert "co2_text" in parts and "co2_image" not in parts
    m.set_classes(NAMES[:3])  # no views any more
    with pytest.raises(ConfigError, match="text_views"):
        m.loss(torch.randn(2, 3, 16, 16), torch.tensor([0, 1]))


def test_adapter_forms():
    torch.manual_seed(0)
    x, y = torch.randn(5, 8), torch.randn(3, 8)
    for form in ("figure", "code"):
        layer = CrossModalLayer(8, 2, 16, 0.0, form).eval()
        out = layer(x, y)
        assert out.shape == x.shape
        # the output depends on y (cross-attention) and on the other rows of x (self-attention)
        assert not torch.allclose(out, layer(x, y + 1.0))
        assert not torch.allclose(out[0], layer(x[:2], y)[0])
    code = CrossModalLayer(8, 2, 16, 0.0, "code")
    assert not hasattr(code, "cross_attn")  # one MHA serves self- and cross-attention
    with pytest.raises(ConfigError, match="divisible"):
        CrossModalLayer(10, 4)


def test_config_errors():
    with pytest.raises(ConfigError, match="prompt_depth"):
        make(prompt_depth=4)
    with pytest.raises(ConfigError, match="ctx_init"):
        make(n_ctx=5)
    with pytest.raises(ConfigError, match="divergence"):
        ApolloConfig.from_dict({"divergence": "kl"})
    with pytest.raises(ConfigError, match="unknown|did you mean"):
        ApolloConfig.from_dict({"n_ctxx": 3})
    m = make(ctx_init="", n_ctx=3)  # random context, "X X X <class>."
    assert m.ctx.shape == (3, 32) and m(torch.randn(2, 3, 16, 16)).shape == (2, 3)


def test_base_novel_split_is_disjoint():
    base, novel = base_novel_split(7)
    assert base == [0, 1, 2, 3] and novel == [4, 5, 6]
    assert not set(base) & set(novel) and sorted(base + novel) == list(range(7))
    x = torch.arange(14).float().view(14, 1)
    y = torch.arange(14) % 7
    xb, yb = subsample(x, y, base)
    xn, yn = subsample(x, y, novel)
    assert set(yb.tolist()) == {0, 1, 2, 3} and set(yn.tolist()) == {0, 1, 2}
    assert not set(xb.flatten().tolist()) & set(xn.flatten().tolist())
    assert len(yb) + len(yn) == 14
    assert torch.equal(y[xn.flatten().long()], yn + 4)  # relabelled in order
    with pytest.raises(DataError):
        base_novel_split(1)


def test_random_resized_crop_is_seeded_and_flips():
    x = torch.rand(3, 3, 16, 16)
    a = random_resized_crop(x, 8, torch.Generator().manual_seed(0))
    b = random_resized_crop(x, 8, torch.Generator().manual_seed(0))
    assert a.shape == (3, 3, 8, 8) and torch.equal(a, b)
    full = random_resized_crop(x, 16, torch.Generator().manual_seed(0), scale=(1.0, 1.0), ratio=(1.0, 1.0),
                               flip=False)
    assert torch.allclose(full, x, atol=1e-5)  # the whole image, unflipped, at its own size


def test_a_few_engine_steps_lower_the_training_loss(tmp_path):
    m = make(NAMES[:2], adapter_dropout=0.0)
    torch.manual_seed(0)
    # two separable classes: bright vs dark images
    x = torch.cat([torch.rand(8, 3, 16, 16) * 0.3 + 0.7, torch.rand(8, 3, 16, 16) * 0.3])
    y = torch.tensor([0] * 8 + [1] * 8)
    xb, yb = subsample(x, y, [0, 1])
    from adapterkit.vision.apollo_train import DEFAULT_SETTINGS, ApolloDomain

    s = {**DEFAULT_SETTINGS, "image_size": 16}
    dom = ApolloDomain(m, (xb, yb), (xb, yb), s)
    fixed = dom.train_batch("base", list(range(16)), 123, 0, 1)
    m.eval()
    with torch.no_grad():
        before = float(m.loss(fixed["x"], fixed["y"], fixed["x_view"]))
    res = train_apollo(m, (xb, yb), {"base": (x[:8], y[:8], NAMES[:1] + NAMES[1:2]), "novel": (x[8:], y[8:] - 1,
                       NAMES[1:2] + NAMES[:1])},
                       {"image_size": 16, "epochs": 2, "batch_size": 4, "lr": 0.05, "warmup_epochs": 0,
                        "eval_batch_size": 8}, output_dir=tmp_path / "run")
    m.eval()
    with torch.no_grad():
        after = float(m.loss(fixed["x"], fixed["y"], fixed["x_view"]))
    assert after < before - 0.05, (before, after)
    assert res["steps"] == 8 and len(res["train_loss"]) == 8
    assert set(res["accuracy"]) == {"base", "novel"} and 0 <= res["hm"] <= 100
    assert (tmp_path / "run" / "results.json").exists()
    assert m.classnames == NAMES[:2]  # evaluation restores the training classes
