"""Vision pipeline: IDX/image-folder readers, AdaptFormer / VPT placement, head, schedule, end-to-end."""

from __future__ import annotations

import gzip
import json
import math
import tempfile

import numpy as np
import pytest
import torch
from torch import nn

import adapterkit
from adapterkit.core.base import get_container
from adapterkit.engine.engine import lr_factor
from adapterkit.errors import ConfigError, DataError
from adapterkit.testing.tiny import tiny_inputs, tiny_model
from adapterkit.vision.common import section
from adapterkit.vision.data import read_idx, select_classes
from adapterkit.vision.models import ADAPTFORMER, ADAPTFORMER_SEQUENTIAL, LinearProbeHead, attach_method
from adapterkit.vision.pipeline import run_vision


def _write_idx(path, arr: np.ndarray, code: int, gz: bool = True):
    head = bytes([0, 0, code, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    data = head + arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def test_read_idx_roundtrip_and_errors(tmp_path):
    imgs = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", imgs, 0x08)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), imgs)
    ints = np.array([-5, 7, 1 << 20], dtype=np.int32)
    _write_idx(tmp_path / "b", ints, 0x0C, gz=False)
    assert np.array_equal(read_idx(tmp_path / "b"), ints)
    (tmp_path / "c").write_bytes((tmp_path / "b").read_bytes()[:-2])
    with pytest.raises(DataError, match="data bytes"):
        read_idx(tmp_path / "c")
    (tmp_path / "d").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(DataError, match="magic"):
        read_idx(tmp_path / "d")


def test_select_classes_remaps_and_caps():
    y = torch.tensor([0, 5, 6, 5, 9, 6, 5, 0])
    x = torch.arange(len(y))
    xs, ys = select_classes(x, y, [5, 6], per_class=2, seed=0)
    assert sorted(ys.tolist()) == [0, 0, 1, 1]
    assert all(y[int(i)] == [5, 6][int(c)] for i, c in zip(xs, ys, strict=True))


def _set_nonzero(model):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.startswith("adapterkit."):
                p.normal_(0, 0.3)


def test_adaptformer_reads_unnormalised_post_attention_stream():
    model = tiny_model("vit")
    adapterkit.add_adapters(model, {**ADAPTFORMER, "bottleneck_dim": 4})
    model.eval()  # adapters are created in train mode (branch dropout 0.1)
    _set_nonzero(model)
    x = tiny_inputs("vit")
    layer = model.layers[0]
    ad = get_container(model).sets["parallel"].adapters["layers__0__mlp__fc2"]
    seen = {}
    layer.layernorm_after.register_forward_pre_hook(lambda m, a: seen.__setitem__("stream", a[0].clone()))
    ad.register_forward_pre_hook(lambda m, a: seen.__setitem__("adapter_in", a[0].clone()))
    layer.register_forward_pre_hook(lambda m, a, k: seen.__setitem__("layer_in", (a[0] if a else k["hidden_states"]).clone()),
                                    with_kwargs=True)
    layer.register_forward_hook(lambda m, a, o: seen.__setitem__("layer_out", (o[0] if isinstance(o, tuple) else o).clone()))
    model(**x)
    assert torch.equal(seen["adapter_in"], seen["stream"])
    # x_out = x' + MLP(LN2 x') + s * up(relu(down(x')))
    xp = seen["stream"]
    with torch.no_grad():
        ln = torch.nn.functional.layer_norm(xp, (32,), layer.layernorm_after.weight, layer.layernorm_after.bias,
                                            layer.layernorm_after.eps)
        fc1, fc2 = layer.mlp.fc1, layer.mlp.fc2  # recomputed without the modules' hooks
        mlp = torch.nn.functional.linear(layer.mlp.activation_fn(torch.nn.functional.linear(ln, fc1.weight, fc1.bias)),
                                         fc2.weight, fc2.bias)
        branch = ad.up(torch.relu(ad.down(xp, None)), None) * 0.1
    torch.testing.assert_close(seen["layer_out"], xp + mlp + branch, rtol=1e-5, atol=1e-5)
    # and x' is the post-attention residual stream: x + Attn(LN1 x)
    with torch.no_grad():
        attn = layer.attention(layer.layernorm_before(seen["layer_in"]))[0]
    torch.testing.assert_close(xp, seen["layer_in"] + attn, rtol=1e-5, atol=1e-5)


def test_adaptformer_init_is_identity_and_trainables():
    model = tiny_model("vit")
    x = tiny_inputs("vit")
    base = model(**x).last_hidden_state
    adapterkit.add_adapters(model, {**ADAPTFORMER, "bottleneck_dim": 4})
    model.eval()
    torch.testing.assert_close(model(**x).last_hidden_state, base)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(n.startswith("adapterkit.") for n in names)  # LayerNorms stay frozen
    ad = get_container(model).sets["parallel"].adapters["layers__0__mlp__fc2"]
    assert ad.p == pytest.approx(0.1) and ad.fixed_scale == pytest.approx(0.1)
    assert torch.count_nonzero(ad.up.weight) == 0 and torch.count_nonzero(ad.down.weight) > 0


def test_adaptformer_sequential_acts_on_mlp_output():
    model = tiny_model("vit")
    adapterkit.add_adapters(model, {**ADAPTFORMER_SEQUENTIAL, "bottleneck_dim": 4})
    _set_nonzero(model)
    ad = get_container(model).sets["pfeiffer"].adapters["layers__1__mlp__fc2"]
    seen = {}
    fc2 = model.layers[1].mlp.fc2
    fc2.register_forward_pre_hook(lambda m, a: seen.__setitem__("fc2_in", a[0].clone()))
    fc2.register_forward_hook(lambda m, a, o: seen.__setitem__("fc2_out", o.clone()))  # runs after the adapter
    ad.register_forward_pre_hook(lambda m, a: seen.__setitem__("in", a[0].clone()))
    model.eval()
    model(**tiny_inputs("vit"))
    raw = torch.nn.functional.linear(seen["fc2_in"], fc2.weight, fc2.bias)
    torch.testing.assert_close(seen["in"], raw)
    with torch.no_grad():
        branch = 0.1 * ad.up(torch.relu(ad.down(raw, None)), None)
    torch.testing.assert_close(seen["fc2_out"], raw + branch)


@pytest.mark.parametrize("family,prefix", [("vit", 1), ("ast", 2)])
def test_vpt_inserts_after_prefix_and_deep_replaces(family, prefix):
    model = tiny_model(family)
    x = tiny_inputs(family)
    n_base = model(**x).last_hidden_state.shape[1]
    adapterkit.add_adapters(model, {"method": "vpt", "num_tokens": 3, "deep": True})
    s = get_container(model).sets["vpt"]
    assert s.num_prefix == prefix and s.prompts.shape == (1, 2, 3, 32)
    seen = {}
    for i in (0, 1):
        model.layers[i].register_forward_pre_hook(
            lambda m, a, k, i=i: seen.__setitem__(i, (a[0] if a else k["hidden_states"]).clone()), with_kwargs=True)
    out = model(**x).last_hidden_state
    assert out.shape[1] == n_base + 3
    torch.testing.assert_close(seen[0][:, prefix:prefix + 3], s.prompts[0, 0].expand(3, -1, -1))
    torch.testing.assert_close(seen[1][:, prefix:prefix + 3], s.prompts[0, 1].expand(3, -1, -1))
    bound = math.sqrt(6.0 / (3 * 8 * 8 + 32))
    assert s.prompts.abs().max() <= bound
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["adapterkit.sets.vpt.prompts"]


def test_vpt_rejects_text_models_with_masks():
    model = tiny_model("bert")
    adapterkit.add_adapters(model, {"method": "vpt", "num_tokens": 2})
    x = tiny_inputs("bert")
    x["attention_mask"][0, -2:] = 0  # real padding: the mask reaches the layers
    with pytest.raises(ConfigError, match="attention mask"):
        model(**x)


def test_linear_probe_head_and_schedule():
    head = LinearProbeHead(256, 10)
    assert not head.norm.affine and torch.count_nonzero(head.fc.bias) == 0
    assert 0.009 < float(head.fc.weight.detach().std()) < 0.011  # trunc_normal(std=0.01), as MAE's linear probe
    # the engine's warm-up then half-cycle cosine (MAE): step 0 at 1/warm, the floor at the end
    assert lr_factor(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert lr_factor(4, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(55, 100, 10, "linear") == pytest.approx(0.5)


def test_config_errors():
    with pytest.raises(ConfigError, match="epochz"):
        section({"epochz": 3}, {"epochs": 1}, "train")
    with pytest.raises(ConfigError, match="must be a int"):
        section({"epochs": "3"}, {"epochs": 1}, "train")
    with pytest.raises(ConfigError, match="CNN"):
        attach_method(nn.Linear(2, 2), "cnn", "adaptformer", None)
    with pytest.raises(ConfigError, match="unknown key"):
        run_vision({"dataa": {}})


def _image_folder(root, rng):
    from PIL import Image

    for split, n in (("train", 6), ("test", 3)):
        for c, name in enumerate(["dark", "light"]):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                a = rng.integers(0, 80, (12, 12, 3)) + 150 * c
                Image.fromarray(a.astype(np.uint8)).save(d / f"{i}.png")


@pytest.mark.parametrize("method", ["adaptformer", "vpt_deep", "linear_probe"])
def test_end_to_end_image_folder(tmp_path, method, monkeypatch):
    _image_folder(tmp_path / "data", np.random.default_rng(0))
    scratch = tmp_path / "scratch"  # where tempfile would put a temporary run folder
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    cfg = {"data": {"source": "image_folder", "train_dir": str(tmp_path / "data/train"),
                    "test_dir": str(tmp_path / "data/test")},
           "model": {"backbone": "vit", "vit": {"image_size": 16, "patch_size": 8, "hidden_size": 32,
                                               "num_hidden_layers": 2, "num_attention_heads": 2,
                                               "intermediate_size": 64}},
           "method": method, "adapter": {"bottleneck_dim": 4} if method == "adaptformer" else None,
           "train": {"epochs": 3, "batch_size": 4, "blr": 1.0, "warmup_epochs": 1},
           "output_dir": str(tmp_path / "out")}
    res = run_vision(cfg, log=lambda s: None)
    assert res["n_train"] == 12 and res["n_test"] == 6 and 0 <= res["test_acc"] <= 100
    assert len(res["history"]) == 3 and all(math.isfinite(h["train_loss"]) for h in res["history"])
    saved = json.loads((tmp_path / "out/results.json").read_text())
    assert saved["results"]["method"] == method
    assert not list(scratch.glob("adapterkit-run-*"))  # the run folder was given: no temporary one

    from adapterkit.engine.engine import read_trained

    state = read_trained(tmp_path / "out/final")  # the run's weights: adapters + head, each once
    assert "head.fc.weight" in state
    assert any("adapterkit" in k for k in state) == (method != "linear_probe")
