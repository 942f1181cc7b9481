"""Adapters trained inside the V&L wrapper (VLModel) load into the plain HF model it wraps.

A run folder's ``final/`` is written from the VLModel (paths ``lm.model.encoder...``); loading
it into a plain ``BartForConditionalGeneration`` reads the paths without the ``lm.`` prefix,
keeps the task names and per-task routing, and leaves the visual embedding out with a warning.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from reliability_helpers import tiny_config

import adapterkit
from adapterkit.core.io import CONFIG_NAME, adapter_state_dict, read_adapter_config, write_adapter_files
from adapterkit.errors import AdapterKitWarning, CheckpointError
from adapterkit.vl.build import build_backbone, build_vl_model

TASKS = ["vqa", "gqa", "nlvr", "caption"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from adapterkit.testing.fixtures import make_vl_fixture

    return make_vl_fixture(tmp_path_factory.mktemp("vl2hf") / "data", n_images=12)


def _train(data, out, preset):
    from adapterkit.train.config import load_config
    from adapterkit.train.trainer import Trainer

    cfg = tiny_config(data, preset=preset, max_steps=3, checkpoint_every=100)
    cfg["eval"]["select_on"] = "last"
    tr = Trainer(load_config(cfg), out)
    tr.fit()
    return tr


def _plain(tr):
    """The plain HF model the run's VLModel was built on (same tiny config, same init seed)."""
    lm, tok = build_backbone({"backbone": "tiny-bart", "corpus": tr.domain._corpus(),
                              "init_seed": tr.cfg.model.init_seed})
    return lm.eval(), tok


def _text_batch(tok):
    enc = tok(["what colour is the cube ?", "is there a ball ?", "a red ball"], return_tensors="pt",
              padding=True)
    dec = torch.tensor([[2, 1, 5, 6], [2, 1, 7, 8], [2, 1, 9, 4]])
    return enc["input_ids"], enc["attention_mask"], dec


@pytest.fixture(scope="module", params=["single_adapter", "multiple_lora"])
def run(request, data, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param) / "run"
    return _train(data, out, request.param), out, request.param


def test_final_loads_into_plain_model_with_the_same_outputs(run):
    tr, out, preset = run
    vl = tr.model.eval()
    saved = read_adapter_config(out / "final")
    assert saved["base_model"]["inner"] == {"prefix": "lm", "class": "BartForConditionalGeneration",
                                            "model_type": "bart"}
    plain, tok = _plain(tr)
    ids, mask, dec = _text_batch(tok)
    vocab = plain.config.vocab_size
    with torch.no_grad():
        bare = plain(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    with pytest.warns(AdapterKitWarning, match=r"not loaded: BartForConditionalGeneration has no such modules") as w:
        adapterkit.load_adapters(plain, out / "final")
    assert "visual.feat_embedding.0" in str(w[0].message) and "visual.img_order_embedding" in str(w[0].message)
    # every tensor of the wrapper's LM is in the plain model, with the same values
    want = {k.replace("lm__", "").removeprefix("lm."): v for k, v in adapter_state_dict(vl).items()
            if not k.startswith("visual.")}
    got = adapter_state_dict(plain)
    assert sorted(got) == sorted(want) and len(got) > 0
    for k in got:
        assert torch.equal(got[k], want[k]), k
    # the task names survive and each task's route gives the wrapper's LM output on the same text
    assert all(list(s.router.tasks) == TASKS for s in adapterkit.core.base.get_container(plain).sets.values())
    plain.eval()
    for tasks in ("vqa", ["caption", "gqa", "nlvr"]):
        with torch.no_grad(), adapterkit.route(tasks):
            a = plain(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
            b = vl.lm(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits[..., :vocab]
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert (a - bare).abs().max() > 1e-4  # the adapters change the output
    if preset == "multiple_lora":  # one LoRA per task: two tasks answer the same text differently
        with torch.no_grad():
            with adapterkit.route("vqa"):
                a = plain(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
            with adapterkit.route("caption"):
                b = plain(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        assert (a - b).abs().max() > 1e-5


def _vl(preset="single_lora"):
    model, tok = build_vl_model({"backbone": "tiny-bart", "feat_dim": 16, "corpus": ["a red cube", "a ball"]},
                                preset, ["vqa", "gqa"])
    with torch.no_grad():  # non-trivial adapter values (LoRA's up matrix starts at zero)
        g = torch.Generator().manual_seed(3)
        for n, p in model.named_parameters():
            if n.startswith("adapterkit."):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def test_wrapper_files_still_load_into_the_wrapper(tmp_path):
    vl = _vl()
    adapterkit.save_adapters(vl, tmp_path / "a")
    other = _vl()
    for p in other.parameters():
        if p.requires_grad:
            torch.nn.init.zeros_(p)
    adapterkit.load_adapters(other, tmp_path / "a")  # no warning: the wrapper has every module
    a, b = adapter_state_dict(vl), adapter_state_dict(other)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_adapter_on_a_wrapper_module_is_an_error_naming_it(tmp_path):
    vl, _ = build_vl_model({"backbone": "tiny-bart", "feat_dim": 16, "corpus": ["a"]})
    adapterkit.add_adapters(vl, {"method": "lora", "r": 2, "target_modules": [r"feat_embedding\.0$|layers\.0\.fc1$"]})
    adapterkit.save_adapters(vl, tmp_path / "a")
    plain = type(vl.lm)(vl.lm.config)
    with pytest.raises(CheckpointError, match=r"has key 'adapterkit\.sets\.lora\.layers\.visual__feat_embedding__0\..*"
                                              r"BartForConditionalGeneration does not have.*outside 'lm'"):
        adapterkit.load_adapters(plain, tmp_path / "a")


def test_pattern_of_wrapper_paths_is_an_error_saying_so(tmp_path):
    vl, _ = build_vl_model({"backbone": "tiny-bart", "feat_dim": 16, "corpus": ["a"]})
    adapterkit.add_adapters(vl, {"method": "lora", "r": 2, "target_modules": [r"^lm\.model\.encoder\.layers\.0\.fc1$"]})
    adapterkit.save_adapters(vl, tmp_path / "a")
    plain = type(vl.lm)(vl.lm.config)
    with pytest.raises(CheckpointError, match=r"cannot rebuild adapter \"lora\" .*saved from a VLModel around a "
                                              r"BartForConditionalGeneration; paths read without its 'lm\.' prefix"):
        adapterkit.load_adapters(plain, tmp_path / "a")


def test_wrong_architecture_is_an_error(tmp_path):
    vl = _vl()
    adapterkit.save_adapters(vl, tmp_path / "a")
    t5, _ = build_backbone({"backbone": "tiny-t5", "corpus": ["a"]})
    with pytest.raises(CheckpointError, match=r"adapters of a VLModel around a BartForConditionalGeneration "
                                              r"\(model_type 'bart'\); T5ForConditionalGeneration is a 't5' model"):
        adapterkit.load_adapters(t5, tmp_path / "a")


def test_manual_prompt_warns_that_the_plain_model_does_not_apply_it(tmp_path):
    vl = _vl("single_prompt")
    adapterkit.save_adapters(vl, tmp_path / "a")
    plain = type(vl.lm)(vl.lm.config)
    with pytest.warns(AdapterKitWarning, match=r"inject: manual.*nothing applies it"):
        adapterkit.load_adapters(plain, tmp_path / "a")
    assert adapterkit.core.base.get_container(plain).sets["prompt"].embedding.shape[0] >= 1


def test_older_files_without_the_inner_record_load(tmp_path):
    """Run folders written before base_model.inner existed: the VLModel's ``lm`` prefix is known."""
    vl = _vl()
    adapterkit.save_adapters(vl, tmp_path / "new")
    cfg = json.loads((tmp_path / "new" / CONFIG_NAME).read_text())
    base = {k: v for k, v in cfg["base_model"].items() if k != "inner"}
    write_adapter_files(tmp_path / "old", adapter_state_dict(vl), cfg["adapters"], cfg["base_trainable"], base)
    plain = type(vl.lm)(vl.lm.config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AdapterKitWarning)
        adapterkit.load_adapters(plain, tmp_path / "old")
    n = len([k for k in adapter_state_dict(vl) if not k.startswith("visual.")])
    assert len(adapter_state_dict(plain)) == n


@pytest.mark.parametrize("backbone, preset", [("tiny-t5", "multiple_lora"), ("tiny-llama", "single_adapter")])
def test_other_backbones_load_into_their_plain_model(tmp_path, backbone, preset):
    """T5 and a causal LM: the same text through the wrapper's LM and the plain model gives the same logits."""
    corpus = ["what colour is the cube ?", "a red ball", "is there a ball ?"]
    spec = {"backbone": backbone, "feat_dim": 16, "corpus": corpus, "init_seed": 5}
    vl, _ = build_vl_model(spec, preset, TASKS)
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for p in vl.parameters():
            if p.requires_grad:  # adapters and the trained LayerNorms / biases
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    adapterkit.save_adapters(vl, tmp_path / "a")
    plain, tok = build_backbone(spec)
    with pytest.warns(AdapterKitWarning, match="visual"):
        adapterkit.load_adapters(plain, tmp_path / "a")
    vl.eval(), plain.eval()
    enc = tok(corpus, return_tensors="pt", padding=True)
    kw = dict(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    if backbone == "tiny-t5":
        kw["decoder_input_ids"] = torch.tensor([[0, 4, 5], [0, 6, 7], [0, 8, 9]])
    vocab = plain.config.vocab_size
    with torch.no_grad(), adapterkit.route(["vqa", "caption", "gqa"]):
        torch.testing.assert_close(plain(**kw).logits, vl.lm(**kw).logits[..., :vocab], rtol=1e-5, atol=1e-5)
