"""AdapterHub's saved adapter directories load into adapterkit on transformers 5 with output parity.

The directories under tests/fixtures/adapterhub_saved/ were written by AdapterHub itself
(adapters 1.3.0 on transformers 4.57.6; scripts/fixtures/make_adapterhub_saved.py) with
``save_adapter`` / ``save_adapter_setup``, next to the tiny base weights, inputs and AdapterHub's
outputs. CI never runs AdapterHub: it compares against those outputs.
"""

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

import adapterkit
from adapterkit.core.adapterhub_interop import adapterhub_config

FIX = Path(__file__).parent / "fixtures" / "adapterhub_saved"
V, D, FF = 50, 16, 32
ATOL = 2e-5


def bart():
    cfg = tf.BartConfig(vocab_size=V, d_model=D, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=FF, decoder_ffn_dim=FF, max_position_embeddings=32,
                        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
                        forced_eos_token_id=None, dropout=0.1, attention_dropout=0.1, activation_dropout=0.1)
    m = tf.BartModel(cfg)
    m.load_state_dict(load_file(FIX / "bart_base.safetensors"))
    return m.eval()


def _bert_cfg(**kw):
    return tf.BertConfig(vocab_size=V, hidden_size=D, num_hidden_layers=2, num_attention_heads=2, intermediate_size=FF,
                         max_position_embeddings=32, type_vocab_size=2, **kw)


def bert():
    m = tf.BertModel(_bert_cfg())
    m.load_state_dict(load_file(FIX / "bert_base.safetensors"))
    return m.eval()


def bert_classifier(num_labels=3):
    m = tf.BertForSequenceClassification(_bert_cfg(num_labels=num_labels))
    m.bert.load_state_dict(load_file(FIX / "bert_base.safetensors"))
    return m.eval()


def _bart_cfg(**kw):
    return tf.BartConfig(vocab_size=V, d_model=D, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                         decoder_attention_heads=2, encoder_ffn_dim=FF, decoder_ffn_dim=FF, max_position_embeddings=32,
                         pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
                         forced_eos_token_id=None, dropout=0.1, attention_dropout=0.1, activation_dropout=0.1, **kw)


HEADS = {
    "bert_tagging_head": lambda: tf.BertForTokenClassification(_bert_cfg(num_labels=4)),
    "bert_qa_head": lambda: tf.BertForQuestionAnswering(_bert_cfg()),
    "bart_classification_head": lambda: tf.BartForSequenceClassification(_bart_cfg(num_labels=3)),
}


@pytest.mark.parametrize("name", sorted(HEADS))
def test_default_heads_load_into_the_models_own_head(name):
    """AdapterHub's default tagging / QA heads (BERT) and classification head (BART, last <eos>)."""
    inputs, want = _io(name)
    model = HEADS[name]()
    fam = name.split("_")[0]
    missing, unexpected = getattr(model, "bert" if fam == "bert" else "model").load_state_dict(
        load_file(FIX / f"{fam}_base.safetensors"), strict=False)
    assert not missing and all(k.startswith("pooler.") for k in unexpected)  # token / QA classes have no pooler
    model.eval()
    adapterkit.import_adapterhub(model, FIX / name)
    _run(model, inputs, want)


def roberta_classifier():
    cfg = tf.RobertaConfig(vocab_size=V, hidden_size=D, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=FF, max_position_embeddings=40, pad_token_id=1, type_vocab_size=1,
                           num_labels=3)
    m = tf.RobertaForSequenceClassification(cfg)
    missing, unexpected = m.roberta.load_state_dict(load_file(FIX / "roberta_base.safetensors"), strict=False)
    assert not missing and all(k.startswith("pooler.") for k in unexpected)  # this class has no pooler
    return m.eval()


def _io(name):
    t = load_file(FIX / name / "io.safetensors")
    return ({k[6:]: v for k, v in t.items() if k.startswith("input.")},
            {k[7:]: v for k, v in t.items() if k.startswith("output.")})


def _run(model, inputs, want):
    with torch.no_grad():
        out = model(**inputs)
    for k, v in want.items():
        torch.testing.assert_close(getattr(out, k), v, atol=ATOL, rtol=1e-4, msg=k)


EXACT = ["bart_seq_bn", "bart_double_seq_bn", "bart_double_seq_bn_cross", "bart_par_bn", "bart_lora", "bart_lora_ffn",
         "bart_compacter", "bart_compacter++", "bert_double_seq_bn", "bert_lora", "bert_compacter",
         "bart_prefix_tuning", "bart_prefix_tuning_flat", "bart_scaled_par_bn", "bert_seq_bn_leave_out",
         "bart_seq_bn_ln_before", "bart_double_seq_bn_ln_after",
         "bart_ia3"]


@pytest.mark.parametrize("name", EXACT)
def test_adapterhub_directory_matches_adapterhub_outputs(name):
    inputs, want = _io(name)
    model = bart() if name.startswith("bart") else bert()
    with torch.no_grad():
        base = model(**inputs).last_hidden_state
    assert (base - want["last_hidden_state"]).abs().max() > 1e-2  # the adapter matters
    adapterkit.import_adapterhub(model, FIX / name)
    _run(model, inputs, want)


def test_setup_directory_with_classification_head():
    """save_adapter_setup with the default 2-layer tanh head: the head lands in the model's pooler + classifier."""
    inputs, want = _io("bert_seq_bn_head")
    model = adapterkit.import_adapterhub(bert_classifier(), FIX / "bert_seq_bn_head")
    _run(model, inputs, want)
    s = model.adapterkit.sets["b0"]
    assert s.config.method == "pfeiffer" and s.config.adapter_input == "normed_sum"
    trained = set(model.adapterkit.base_trainable)
    assert {"classifier.weight", "classifier.bias", "bert.pooler.dense.weight", "bert.pooler.dense.bias"} <= trained


def test_hub_style_roberta_adapter_with_head():
    """save_adapter(..., with_head=True) on RoBERTa (the hub's usual form): the head is RoBERTa's classifier."""
    inputs, want = _io("roberta_seq_bn_head")
    model = adapterkit.import_adapterhub(roberta_classifier(), FIX / "roberta_seq_bn_head")
    _run(model, inputs, want)
    assert {"classifier.dense.weight", "classifier.out_proj.bias"} <= set(model.adapterkit.base_trainable)


@pytest.mark.parametrize("name", ["bert_setup_stack", "bert_setup_average", "bert_setup_fuse", "bert_setup_parallel"])
def test_composed_setup_matches_adapterhub(name):
    """save_adapter_setup over Stack / Average / Fuse / Parallel of two adapters: one adapterkit set with a
    copy per adapter, composed with adapterkit's block of the same name."""
    inputs, want = _io(name)
    model = adapterkit.import_adapterhub(bert(), FIX / name)
    assert model.adapterkit.sets["x,y"].config.tasks == ["x", "y"]
    _run(model, inputs, want)


def test_imported_adapters_save_and_load_the_adapterkit_way(tmp_path):
    inputs, want = _io("bert_seq_bn_head")
    model = adapterkit.import_adapterhub(bert_classifier(), FIX / "bert_seq_bn_head")
    adapterkit.save_adapters(model, tmp_path / "ak")
    fresh = adapterkit.load_adapters(bert_classifier(), tmp_path / "ak")
    _run(fresh, inputs, want)


def test_bert_prompt_tuning_matches_adapterhub():
    inputs, want = _io("bert_prompt_tuning")
    model = adapterkit.import_adapterhub(bert(), FIX / "bert_prompt_tuning")
    _run(model, inputs, want)


def _edited(tmp_path, name, **changes):
    d = tmp_path / name
    shutil.copytree(FIX / name, d)
    meta = json.loads((d / "adapter_config.json").read_text())
    meta["config"].update(changes)
    (d / "adapter_config.json").write_text(json.dumps(meta))
    return d


def test_each_unmappable_thing_is_named(tmp_path):
    d = _edited(tmp_path, "bart_seq_bn", use_gating=True, inv_adapter="nice", reduction_factor={"0": 8, "default": 16},
                leave_out=[1], residual_before_ln="post_add")
    with pytest.raises(adapterkit.ConfigError) as e:
        adapterkit.import_adapterhub(bart(), d)
    lines = [ln for ln in str(e.value).splitlines() if ln.strip().startswith("- ")]
    for field in ("use_gating", "inv_adapter", "reduction_factor", "leave_out", "residual_before_ln"):
        assert sum(f'"{field}"' in ln for ln in lines) == 1, field
    assert not hasattr(bart(), "adapterkit")
    d = _edited(tmp_path, "bart_lora", use_dora=True, vera_d=0.1)
    with pytest.raises(adapterkit.ConfigError, match="(?s)use_dora.*vera_d"):
        adapterkit.import_adapterhub(bart(), d)


def test_head_needs_a_matching_model():
    with pytest.raises(adapterkit.ConfigError, match="ForSequenceClassification"):
        adapterkit.import_adapterhub(bert(), FIX / "bert_seq_bn_head")
    with pytest.raises(adapterkit.ConfigError, match="num_labels 3"):
        adapterkit.import_adapterhub(bert_classifier(num_labels=2), FIX / "bert_seq_bn_head")


def test_wrong_model_type_is_refused():
    with pytest.raises(adapterkit.ConfigError, match='"model_type" = "bart"'):
        adapterkit.import_adapterhub(bert(), FIX / "bart_seq_bn")


class _Evil:
    def __reduce__(self):
        return (print, ("this would run on load",))


def test_bin_files_are_never_unpickled_freely(tmp_path):
    d = tmp_path / "evil"
    shutil.copytree(FIX / "bart_seq_bn", d)
    with open(d / "pytorch_adapter.bin", "wb") as f:
        pickle.dump({"x": _Evil()}, f)
    with pytest.raises(adapterkit.CheckpointError, match="refusing"):
        adapterkit.import_adapterhub(bart(), d)


def test_prefix_copies_must_agree(tmp_path):
    """AdapterHub stores each location's prefix module again in every attention's pool: they must be equal."""
    d = tmp_path / "p"
    shutil.copytree(FIX / "bart_prefix_tuning", d)
    t = torch.load(d / "pytorch_adapter.bin", weights_only=True)
    k = next(k for k in t if ".pool." in k and k.endswith("wte.weight"))
    t[k] = t[k] + 1
    torch.save(t, d / "pytorch_adapter.bin")
    with pytest.raises(adapterkit.CheckpointError, match="differs"):
        adapterkit.import_adapterhub(bart(), d)


def test_stray_tensor_is_an_error(tmp_path):
    d = tmp_path / "stray"
    shutil.copytree(FIX / "bart_lora", d)
    t = torch.load(d / "pytorch_adapter.bin", weights_only=True)
    t["model.encoder.layers.0.self_attn.k_proj.something.a4.weight"] = torch.zeros(2)
    torch.save(t, d / "pytorch_adapter.bin")
    with pytest.raises(adapterkit.CheckpointError, match="something"):
        adapterkit.import_adapterhub(bart(), d)


def test_config_mapping_of_the_defaults():
    m = bart()
    seq = adapterhub_config(json.loads((FIX / "bart_seq_bn" / "adapter_config.json").read_text())["config"], m)
    assert seq == {"method": "pfeiffer", "activation": "relu", "reduction_factor": 16.0, "adapter_input": "normed_sum",
                   "positions": ["ffn_out"], "scale": 1.0, "dropout": 0.0, "init": "bert"}
    par = adapterhub_config(json.loads((FIX / "bart_par_bn" / "adapter_config.json").read_text())["config"], m)
    assert par["method"] == "parallel" and par["scale"] == 4.0 and par["reduction_factor"] == 2.0
