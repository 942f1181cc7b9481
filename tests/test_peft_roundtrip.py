"""Lossless PEFT files both ways: heads, biases and modules_to_save survive adapterkit -> PEFT ->
adapterkit and PEFT -> adapterkit -> PEFT, checked by outputs and tensor by tensor (PEFT live)."""

import json

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file

import adapterkit
from adapterkit.core.io import adapter_state_dict
from adapterkit.testing.tiny import main_output, tiny_inputs, tiny_model

peft = pytest.importorskip("peft")


def bert_classifier(seed=0):
    cfg = tf.BertConfig(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=3)
    torch.manual_seed(seed)
    return tf.BertForSequenceClassification(cfg).eval()


def _randomise_trainable(model, seed=3, scale=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def _out(model, inputs):
    with torch.no_grad():
        return main_output(model(**inputs))


def _peft_out(directory, base, inputs):
    pm = peft.PeftModel.from_pretrained(base, directory)
    pm.eval()
    return _out(pm, inputs)


def _assert_same_tensors(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    assert a

    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)


CASES = {
    # name: (model factory, family for inputs, adapterkit config)
    "bert_head_biases": (bert_classifier, "bert",
                         {"method": "lora", "r": 4, "alpha": 8, "target_modules": ["query", "value"],
                          "train_biases": True, "trainable_modules": [r"^classifier\."]}),
    "bert_head_layernorms": (bert_classifier, "bert",
                             {"method": "lora", "r": 2, "target_modules": ["query"], "train_layernorms": True,
                              "trainable_modules": [r"^classifier\.", r"^bert\.pooler\."]}),
    "gpt2_lora_only_biases": (lambda: tiny_model("gpt2"), "gpt2",
                              {"method": "lora", "r": 4, "targets": ["qkv"],
                               "trainable_modules": [r"attn\.c_attn\.bias$"]}),
    "bart_all_biases": (lambda: tiny_model("bart"), "bart",
                        {"method": "lora", "r": 4, "train_biases": True}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_adapterkit_peft_adapterkit_keeps_every_tensor(tmp_path, case):
    make, family, cfg = CASES[case]
    ours = make()
    adapterkit.add_adapters(ours, cfg)
    _randomise_trainable(ours)
    inputs = tiny_inputs(family)
    ref = _out(ours, inputs)
    assert ref.abs().sum() > 0
    adapterkit.export_peft(ours, tmp_path / "p")
    written = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    # PEFT itself computes the same function from the file (heads, biases, LayerNorms included)
    torch.testing.assert_close(_peft_out(tmp_path / "p", make(), inputs), ref, atol=1e-5, rtol=1e-5)
    back = make()
    adapterkit.import_peft(back, tmp_path / "p")
    torch.testing.assert_close(_out(back, inputs), ref, atol=1e-6, rtol=1e-6)
    _assert_same_tensors(adapter_state_dict(ours), adapter_state_dict(back))
    if cfg.get("train_biases"):
        assert written["bias"] == "all"
    if case == "gpt2_lora_only_biases":
        assert written["bias"] == "lora_only" and written["modules_to_save"] is None
    if "classifier" in str(cfg.get("trainable_modules")):
        assert "classifier" in written["modules_to_save"]


def test_without_extras_peft_logits_differ(tmp_path):
    """The check above can fail: dropping the trained head from the file changes PEFT's logits."""
    make, family, cfg = CASES["bert_head_biases"]
    ours = make()
    adapterkit.add_adapters(ours, cfg)
    _randomise_trainable(ours)
    inputs = tiny_inputs(family)
    ref = _out(ours, inputs)
    adapterkit.export_peft(ours, tmp_path / "p")
    f = tmp_path / "p" / "adapter_model.safetensors"
    t = {k: v for k, v in load_file(f).items() if "classifier" not in k}
    save_file(t, f)
    c = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    c["modules_to_save"] = None
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps(c))
    assert not torch.allclose(_peft_out(tmp_path / "p", make(), inputs), ref, atol=1e-4)


def _peft_file(tmp_path, base, config, seed=5):
    pm = peft.get_peft_model(base, config)
    _randomise_trainable(pm, seed)
    pm.eval()
    d = tmp_path / "peft_in"
    pm.save_pretrained(d)
    return pm, d


def _read(f):
    """A PEFT file's tensors as its forward reads them: PEFT's bias="all" also saves a modules_to_save
    module's bias as <m>.modules_to_save.bias (same value) and <m>.original_module.bias (unread)."""
    out = {}
    for k, v in load_file(f).items():
        if ".original_module." not in k:
            out.setdefault(k.replace(".modules_to_save.", "."), v)
    return out


@pytest.mark.parametrize("kind", ["bert_seq_cls_all", "bart_lora_only", "gpt2_head_all"])
def test_peft_adapterkit_peft_keeps_every_tensor(tmp_path, kind):
    if kind == "bert_seq_cls_all":
        make, family = bert_classifier, "bert"
        config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["query", "value"], bias="all",
                                 task_type="SEQ_CLS")
    elif kind == "bart_lora_only":
        make, family = (lambda: tiny_model("bart")), "bart"
        config = peft.LoraConfig(r=4, target_modules=["q_proj", "fc1"], bias="lora_only")
    else:
        make, family = (lambda: tiny_model("gpt2")), "gpt2"
        config = peft.LoraConfig(r=2, target_modules=["c_attn"], bias="all", modules_to_save=["ln_f", "h.1.ln_2"],
                                 fan_in_fan_out=True)
    pm, d = _peft_file(tmp_path, make(), config)
    inputs = tiny_inputs(family)
    ref = _out(pm, inputs)
    ours = make()
    adapterkit.import_peft(ours, d)
    torch.testing.assert_close(_out(ours, inputs), ref, atol=1e-5, rtol=1e-5)
    adapterkit.export_peft(ours, tmp_path / "again")
    _assert_same_tensors(_read(d / "adapter_model.safetensors"), _read(tmp_path / "again" / "adapter_model.safetensors"))
    again = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert again["bias"] == config.bias
    torch.testing.assert_close(_peft_out(tmp_path / "again", make(), inputs), ref, atol=1e-5, rtol=1e-5)


def test_tied_modules_to_save_is_refused(tmp_path):
    """GPT-2's lm_head is tied to the input embeddings: PEFT trains an untied copy, which adapterkit cannot hold."""
    _, d = _peft_file(tmp_path, tiny_model("gpt2"), peft.LoraConfig(r=2, target_modules=["c_attn"],
                                                                      modules_to_save=["lm_head"]))
    with pytest.raises(adapterkit.ConfigError, match="lm_head"):
        adapterkit.import_peft(tiny_model("gpt2"), d)


def test_peft_lora_bias_is_folded_into_the_layer_bias(tmp_path):
    make = lambda: tiny_model("bart")  # noqa: E731
    pm, d = _peft_file(tmp_path, make(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_bias=True))
    assert any(k.endswith("lora_B.bias") for k in load_file(d / "adapter_model.safetensors"))
    inputs = tiny_inputs("bart")
    ref = _out(pm, inputs)
    ours = make()
    adapterkit.import_peft(ours, d)
    torch.testing.assert_close(_out(ours, inputs), ref, atol=1e-5, rtol=1e-5)
    adapterkit.export_peft(ours, tmp_path / "again")  # written as the layers' own (trained) biases
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["bias"] == "lora_only"
    torch.testing.assert_close(_peft_out(tmp_path / "again", make(), inputs), ref, atol=1e-5, rtol=1e-5)
    # and saved/loaded the adapterkit way, the folded biases come along
    adapterkit.save_adapters(ours, tmp_path / "ak")
    fresh = make()
    adapterkit.load_adapters(fresh, tmp_path / "ak")
    torch.testing.assert_close(_out(fresh, inputs), ref, atol=1e-5, rtol=1e-5)


def test_peft_default_seq2seq_prompt_file_loads(tmp_path):
    """PEFT's SEQ_2_SEQ_LM prompt tuning stores 2 x V rows (num_transformer_submodules=2)."""
    pm, d = _peft_file(tmp_path, tiny_model("bart"), peft.PromptTuningConfig(num_virtual_tokens=5,
                                                                             task_type="SEQ_2_SEQ_LM"))
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert cfg["num_transformer_submodules"] == 2
    assert load_file(d / "adapter_model.safetensors")["prompt_embeddings"].shape[0] == 10
    inputs = tiny_inputs("bart")
    ref = _out(pm, inputs)
    ours = tiny_model("bart")
    adapterkit.import_peft(ours, d)
    torch.testing.assert_close(_out(ours, inputs), ref, atol=1e-5, rtol=1e-5)


def test_peft_prompt_tuning_with_classifier_head_round_trip(tmp_path):
    pm, d = _peft_file(tmp_path, bert_classifier(), peft.PromptTuningConfig(num_virtual_tokens=3,
                                                                            task_type="SEQ_CLS"))
    inputs = tiny_inputs("bert")
    ref = _out(pm, inputs)
    ours = bert_classifier()
    adapterkit.import_peft(ours, d)
    torch.testing.assert_close(_out(ours, inputs), ref, atol=1e-5, rtol=1e-5)
    adapterkit.export_peft(ours, tmp_path / "again")
    _assert_same_tensors(load_file(d / "adapter_model.safetensors"),
                         load_file(tmp_path / "again" / "adapter_model.safetensors"))
    torch.testing.assert_close(_peft_out(tmp_path / "again", bert_classifier(), inputs), ref, atol=1e-5, rtol=1e-5)


def _write(d, cfg, tensors):
    d.mkdir(parents=True, exist_ok=True)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(tensors, d / "adapter_model.safetensors")


LORA_T = {"base_model.model.model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 32),
          "base_model.model.model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(32, 2)}


def test_unrepresentable_fields_are_named_in_one_config_error(tmp_path):
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "use_dora": True, "rank_pattern": {"q_proj": 4},
           "some_future_option": {"on": 1}, "layer_replication": None, "bias": "none"}
    _write(tmp_path / "x", cfg, LORA_T)
    with pytest.raises(adapterkit.ConfigError) as e:
        adapterkit.import_peft(tiny_model("bart"), tmp_path / "x")
    msg = str(e.value)
    assert all(f'"{f}"' in msg for f in ("use_dora", "rank_pattern", "some_future_option"))
    assert "layer_replication" not in msg  # off (null) is representable
    _write(tmp_path / "y", {"peft_type": "LORA", "r": 2, "bias": "sometimes"}, LORA_T)
    with pytest.raises(adapterkit.ConfigError, match='"bias"'):
        adapterkit.import_peft(tiny_model("bart"), tmp_path / "y")
    _write(tmp_path / "z", {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 2, "num_transformer_submodules": 2},
           {"prompt_embeddings": torch.zeros(4, 32)})
    with pytest.raises(adapterkit.ConfigError, match="num_transformer_submodules"):
        adapterkit.import_peft(tiny_model("llama"), tmp_path / "z")


def test_unknown_tensor_is_never_dropped(tmp_path):
    t = dict(LORA_T)
    t["base_model.model.model.encoder.no_such_module.weight"] = torch.zeros(3)
    _write(tmp_path / "x", {"peft_type": "LORA", "r": 2, "bias": "none"}, t)
    with pytest.raises(adapterkit.CheckpointError, match="no_such_module"):
        adapterkit.import_peft(tiny_model("bart"), tmp_path / "x")


@pytest.mark.parametrize("family", ["bart", "bert", "gpt2"])
def test_peft_ia3_round_trip(tmp_path, family):
    """PEFT's (IA)^3 (output- and input-scaled vectors) -> adapterkit -> PEFT, by outputs and tensors."""
    make = bert_classifier if family == "bert" else (lambda: tiny_model(family))
    config = peft.IA3Config(task_type="SEQ_CLS") if family == "bert" else peft.IA3Config()
    pm = peft.get_peft_model(make(), config)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.copy_(1 + torch.randn(p.shape, generator=g) * 0.3)
    pm.eval()
    pm.save_pretrained(tmp_path / "in")
    inputs = tiny_inputs(family)
    ref = _out(pm, inputs)
    ours = make()
    adapterkit.import_peft(ours, tmp_path / "in")
    torch.testing.assert_close(_out(ours, inputs), ref, atol=1e-5, rtol=1e-5)
    adapterkit.export_peft(ours, tmp_path / "again")
    _assert_same_tensors(_read(tmp_path / "in" / "adapter_model.safetensors"),
                         _read(tmp_path / "again" / "adapter_model.safetensors"))
    torch.testing.assert_close(_peft_out(tmp_path / "again", make(), inputs), ref, atol=1e-5, rtol=1e-5)


def test_adapterhub_style_ia3_exports_to_peft(tmp_path):
    ours = tiny_model("bart")
    adapterkit.add_adapters(ours, {"method": "ia3", "variant": "adapterhub"})
    with torch.no_grad():
        for v in ours.adapterkit.sets["ia3"].vectors.values():
            v.uniform_(0.5, 1.5)
    inputs = tiny_inputs("bart")
    ref = _out(ours, inputs)
    adapterkit.export_peft(ours, tmp_path / "p")
    torch.testing.assert_close(_peft_out(tmp_path / "p", tiny_model("bart"), inputs), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family,task", [("llama", "CAUSAL_LM"), ("bart", "SEQ_2_SEQ_LM")])
def test_peft_prefix_round_trip(tmp_path, family, task):
    make = lambda: tiny_model(family)  # noqa: E731
    pm = peft.get_peft_model(make(), peft.PrefixTuningConfig(num_virtual_tokens=3, task_type=task))
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.normal_(0, 0.5)
    pm.eval()
    pm.save_pretrained(tmp_path / "in")
    inputs = tiny_inputs(family)
    ref = _out(pm, inputs)
    ours = make()
    adapterkit.import_peft(ours, tmp_path / "in")
    torch.testing.assert_close(_out(ours, inputs), ref, atol=1e-5, rtol=1e-5)
    adapterkit.export_peft(ours, tmp_path / "again")
    _assert_same_tensors(load_file(tmp_path / "in" / "adapter_model.safetensors"),
                         load_file(tmp_path / "again" / "adapter_model.safetensors"))
    torch.testing.assert_close(_peft_out(tmp_path / "again", make(), inputs), ref, atol=1e-5, rtol=1e-5)


def test_export_refuses_what_peft_cannot_hold(tmp_path):
    """AdapterHub-placed prompts (after the embedding layer) and per-location prefixes are other functions."""
    bert = tiny_model("bert")
    adapterkit.add_adapters(bert, {"method": "prompt", "num_tokens": 2, "placement": "after_embeddings"})
    with pytest.raises(adapterkit.ConfigError, match="after_embeddings"):
        adapterkit.export_peft(bert, tmp_path / "p")
    bart = tiny_model("bart")
    adapterkit.add_adapters(bart, {"method": "prefix", "style": "adapterhub", "num_tokens": 2, "bottleneck_size": 4})
    with pytest.raises(adapterkit.ConfigError, match="adapterhub"):
        adapterkit.export_peft(bart, tmp_path / "q")
    assert not (tmp_path / "p").exists() and not (tmp_path / "q").exists()
