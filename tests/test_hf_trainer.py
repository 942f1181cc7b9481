"""HF ecosystem: save_pretrained / transformers.Trainer write adapter-size folders that load
back exactly; the Trainer's load_best_model_at_end and resume reload the adapters; a new
classification head is trained; print_trainable_parameters; merge_and_unload."""

import copy
import os

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

import adapterkit
from adapterkit.core.hf import is_hf_model

LORA = {"method": "lora", "r": 4, "alpha": 8, "targets": ["q", "v"]}


def bert_cls(seed=0, num_labels=3):
    cfg = tf.BertConfig(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=num_labels,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    return tf.BertForSequenceClassification(cfg).eval()


class Toy(torch.utils.data.Dataset):
    """Label = whether token 5 occurs: learnable in a few steps."""

    def __init__(self, n=32, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(6, 101, (n, 8), generator=g)
        self.labels = torch.randint(0, 3, (n,), generator=g)
        self.ids[self.labels == 1, 2] = 5

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": self.labels[i]}


def _args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=8, per_device_eval_batch_size=8, learning_rate=5e-2,
                max_steps=4, use_cpu=True, report_to=[], logging_strategy="no", save_strategy="no", seed=0,
                dataloader_num_workers=0, disable_tqdm=True)
    base.update(kw)
    return tf.TrainingArguments(**base)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def _adapter_tensors(model):
    from adapterkit.core.io import adapter_state_dict

    return {k: v.clone() for k, v in adapter_state_dict(model).items()}


def test_trainer_save_model_writes_adapters_that_reload_exactly(tmp_path):
    model = adapterkit.add_adapters(bert_cls(), LORA)
    head0 = model.classifier.weight.detach().clone()
    trainer = tf.Trainer(model=model, args=_args(tmp_path / "run"), train_dataset=Toy())
    trainer.train()
    assert not torch.equal(model.classifier.weight, head0), "the new head was not trained"
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    names = sorted(p.name for p in out.iterdir())
    assert "config.json" not in names  # not a full HF model folder
    assert {"adapter_config.json", "adapter_model.safetensors", "model.safetensors"} <= set(names)
    full_bytes = sum(p.numel() * p.element_size() for p in bert_cls().parameters())
    adapter_bytes = os.path.getsize(out / "adapter_model.safetensors")
    assert adapter_bytes < full_bytes / 10, (adapter_bytes, full_bytes)
    weights = sum(os.path.getsize(out / n) for n in names if n.endswith(".safetensors"))
    assert weights < full_bytes / 5
    saved = load_file(out / "adapter_model.safetensors")
    assert "classifier.weight" in saved and "classifier.bias" in saved
    assert not any(k.startswith("bert.") and "adapterkit" not in k for k in saved)
    assert load_file(out / "model.safetensors").keys() == saved.keys()

    ids = Toy(n=5, seed=9).ids
    want = _logits(model.eval(), ids)
    fresh = adapterkit.load_adapters(bert_cls(), out)
    torch.testing.assert_close(_logits(fresh, ids), want, atol=1e-6, rtol=0)
    again = adapterkit.from_pretrained(bert_cls(), out)
    torch.testing.assert_close(_logits(again, ids), want, atol=1e-6, rtol=0)


def test_from_pretrained_loads_the_recorded_base_class_and_head_size(tmp_path):
    base_dir = tmp_path / "base"
    bert_cls(num_labels=5).save_pretrained(base_dir)  # a plain HF folder: no adapters attached
    model = adapterkit.add_adapters(tf.BertForSequenceClassification.from_pretrained(base_dir), LORA)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path / "ad")
    ids = Toy(n=4, seed=3).ids
    want = _logits(model.eval(), ids)
    for base in (None, str(base_dir)):  # None: the name recorded in the folder
        got = adapterkit.from_pretrained(base, tmp_path / "ad")
        assert type(got) is tf.BertForSequenceClassification and got.config.num_labels == 5
        torch.testing.assert_close(_logits(got.eval(), ids), want, atol=1e-6, rtol=0)


def test_from_pretrained_without_a_recorded_base_says_so(tmp_path):
    model = adapterkit.add_adapters(bert_cls(), LORA)
    model.save_pretrained(tmp_path / "ad")
    with pytest.raises(adapterkit.ConfigError, match="base model"):
        adapterkit.from_pretrained(None, tmp_path / "ad")


def test_load_best_model_at_end_restores_the_best_checkpoints_adapters(tmp_path):
    scores = iter([1.0, 0.5, 0.25])  # the first evaluation (step 2) is the best

    def metric(_):
        return {"score": next(scores)}

    model = adapterkit.add_adapters(bert_cls(), LORA)
    args = _args(tmp_path / "run", max_steps=6, eval_strategy="steps", eval_steps=2, save_strategy="steps",
                 save_steps=2, load_best_model_at_end=True, metric_for_best_model="score", greater_is_better=True)
    trainer = tf.Trainer(model=model, args=args, train_dataset=Toy(), eval_dataset=Toy(n=8, seed=1),
                         compute_metrics=metric)
    trainer.train()
    best = tmp_path / "run" / "checkpoint-2"
    assert trainer.state.best_model_checkpoint == str(best)
    ckpt = load_file(best / "adapter_model.safetensors")
    last = load_file(tmp_path / "run" / "checkpoint-6" / "adapter_model.safetensors")
    assert any(not torch.equal(ckpt[k], last[k]) for k in ckpt), "training did not move the adapters"
    now = _adapter_tensors(model)
    assert now.keys() == ckpt.keys()
    for k in ckpt:
        torch.testing.assert_close(now[k], ckpt[k], atol=0, rtol=0, msg=k)
    # the base keys are declared as intentionally absent, so the Trainer does not warn about them
    assert model._keys_to_ignore_on_save == {k for k in model.state_dict() if k not in ckpt}


def test_resume_from_checkpoint_matches_an_uninterrupted_run(tmp_path):
    model = adapterkit.add_adapters(bert_cls(), LORA)
    tf.Trainer(model=model, args=_args(tmp_path / "a", max_steps=4), train_dataset=Toy()).train()
    want = _adapter_tensors(model)

    first = adapterkit.add_adapters(bert_cls(), LORA)
    tf.Trainer(model=first, args=_args(tmp_path / "b", max_steps=4, save_strategy="steps", save_steps=2),
               train_dataset=Toy()).train()
    resumed = adapterkit.add_adapters(bert_cls(), LORA)
    tf.Trainer(model=resumed, args=_args(tmp_path / "b", max_steps=4), train_dataset=Toy()).train(
        resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    got = _adapter_tensors(resumed)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0, msg=k)


def test_new_classification_heads_are_trained_by_default():
    model = adapterkit.add_adapters(bert_cls(), LORA)
    assert model.classifier.weight.requires_grad and model.classifier.bias.requires_grad
    assert "^classifier\\." in model.adapterkit.sets["lora"].config.trainable_modules
    assert not model.bert.embeddings.word_embeddings.weight.requires_grad
    frozen = adapterkit.add_adapters(bert_cls(), LORA, train_head=False)
    assert not frozen.classifier.weight.requires_grad
    gcfg = tf.GPT2Config(vocab_size=101, n_embd=32, n_layer=2, n_head=2, n_positions=32, num_labels=2, pad_token_id=1)
    gpt = adapterkit.add_adapters(tf.GPT2ForSequenceClassification(gcfg), LORA)
    assert gpt.score.weight.requires_grad
    tok = tf.BertForTokenClassification(bert_cls().config)
    adapterkit.add_adapters(tok, LORA)
    assert tok.classifier.weight.requires_grad
    plain = adapterkit.add_adapters(tf.BertModel(bert_cls().config), LORA)  # no head: nothing extra
    assert plain.adapterkit.sets["lora"].config.trainable_modules == []
    with pytest.raises(adapterkit.ConfigError, match="no task head"):
        adapterkit.add_adapters(tf.BertModel(bert_cls().config), LORA, train_head=True)


def test_head_trained_by_default_round_trips_through_save_adapters(tmp_path):
    model = adapterkit.add_adapters(bert_cls(), LORA)
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    adapterkit.save_adapters(model, tmp_path / "ad")
    ids = Toy(n=3).ids
    fresh = adapterkit.load_adapters(bert_cls(), tmp_path / "ad")
    torch.testing.assert_close(_logits(fresh, ids), _logits(model, ids), atol=1e-6, rtol=0)
    assert fresh.classifier.weight.requires_grad


def test_print_trainable_parameters(capsys):
    model = adapterkit.add_adapters(bert_cls(), LORA)
    model.print_trainable_parameters()
    line = capsys.readouterr().out.strip()
    r = adapterkit.trainable_report(model)
    assert line == (f"trainable params: {r['trainable']:,d} || all params: {r['total']:,d} || "
                    f"trainable%: {r['percent']:.4f}")
    head = sum(p.numel() for p in model.classifier.parameters())
    lora = sum(p.numel() for p in model.adapterkit.parameters())
    assert r["trainable"] == head + lora
    adapterkit.print_trainable_parameters(model)
    assert capsys.readouterr().out.strip() == line


def test_remove_adapters_restores_the_models_own_save_pretrained(tmp_path):
    model = bert_cls()
    own_ignore = set(model._keys_to_ignore_on_save)
    adapterkit.add_adapters(model, LORA)
    assert "save_pretrained" in model.__dict__ and is_hf_model(model)
    adapterkit.remove_adapters(model)
    for k in ("save_pretrained", "print_trainable_parameters", "merge_and_unload"):
        assert k not in model.__dict__
    assert set(model._keys_to_ignore_on_save) == own_ignore
    model.save_pretrained(tmp_path / "full")
    assert (tmp_path / "full" / "config.json").exists()
    assert not (tmp_path / "full" / "adapter_config.json").exists()


def test_save_pretrained_refusals(tmp_path):
    model = adapterkit.add_adapters(bert_cls(), LORA)
    with pytest.raises(adapterkit.ConfigError, match="push_to_hub"):
        model.save_pretrained(tmp_path / "x", push_to_hub=True)
    with pytest.raises(adapterkit.ConfigError, match="state_dict"):
        model.save_pretrained(tmp_path / "x", state_dict={"bert.pooler.dense.weight": torch.zeros(1)})
    adapterkit.merge_adapters(model)
    with pytest.raises(adapterkit.ConfigError, match="unmerge"):
        model.save_pretrained(tmp_path / "x")
    adapterkit.unmerge_adapters(model)
    model.save_pretrained(tmp_path / "x", is_main_process=False)  # a non-writer rank writes nothing
    assert not (tmp_path / "x").exists()


def test_save_pretrained_takes_tensors_from_a_given_state_dict(tmp_path):
    model = adapterkit.add_adapters(bert_cls(), LORA)
    sd = {k: v.clone() + 1.0 for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "ad", state_dict=sd)
    saved = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    for k, v in saved.items():
        torch.testing.assert_close(v, sd[k], atol=0, rtol=0)


def test_a_deep_copy_saves_itself(tmp_path):
    model = adapterkit.add_adapters(bert_cls(), LORA)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.classifier.weight.fill_(0.5)
    clone.save_pretrained(tmp_path / "c")
    assert torch.equal(load_file(tmp_path / "c" / "adapter_model.safetensors")["classifier.weight"],
                       clone.classifier.weight.detach())
    assert not torch.equal(model.classifier.weight, clone.classifier.weight)


def test_merge_and_unload_returns_a_plain_hf_model(tmp_path):
    model = adapterkit.add_adapters(bert_cls(), LORA)
    with torch.no_grad():
        for p in model.adapterkit.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        model.classifier.weight.add_(0.3)
    ids = Toy(n=4).ids
    want = _logits(model, ids)
    plain = model.merge_and_unload()
    assert plain is model and not hasattr(plain, "adapterkit")
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in plain.modules())
    assert "save_pretrained" not in plain.__dict__ and all(p.requires_grad for p in plain.parameters())
    assert set(plain.state_dict()) == set(bert_cls().state_dict())
    torch.testing.assert_close(_logits(plain, ids), want, atol=1e-5, rtol=0)
    plain.save_pretrained(tmp_path / "full")  # HF's own: the merged full model
    again = tf.BertForSequenceClassification.from_pretrained(tmp_path / "full").eval()
    torch.testing.assert_close(_logits(again, ids), want, atol=1e-5, rtol=0)


def test_merge_and_unload_refuses_unmergeable_adapters():
    model = adapterkit.add_adapters(bert_cls(), {"method": "houlsby", "reduction_factor": 4})
    with pytest.raises(adapterkit.ConfigError, match="houlsby"):
        adapterkit.merge_and_unload(model)
    assert hasattr(model, "adapterkit") and "save_pretrained" in model.__dict__  # left as it was
    with pytest.raises(adapterkit.ConfigError, match="no adapters"):
        adapterkit.merge_and_unload(bert_cls())
