"""Language SFT (masked-LM LT-SFT): BERT 80/10/10 masking, exactly K entries, composition
with a task SFT by addition, lower MLM loss on the training text, bare encoders, CLI."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
import transformers as tf

from adapterkit.errors import ConfigError
from adapterkit.sft import SparseDiff, apply_sft, compose, language_sft, load_mlm_model, mask_tokens, mlm_loss
from adapterkit.sft.language import chunk_corpus, with_base_prefix

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(20)]


def _tokenizer(tmp_path):
    tok = tf.BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)})  # word-level: every word is in the vocabulary
    assert tok.tokenize("w1 w19") == ["w1", "w19"]
    return tok


def _config():
    return tf.BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)


def _mlm(seed=0):
    torch.manual_seed(seed)
    return tf.BertForMaskedLM(_config()).eval()


def _corpus():
    # a learnable language: four five-word sentences over disjoint words, each ten times
    return [" ".join(f"w{5 * i + j}" for j in range(5)) for i in range(4)] * 10


def test_mask_tokens_follows_bert_80_10_10():
    V, mask_id = 50, 4
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, V, (400, 500), generator=g)
    special = torch.zeros_like(ids)
    special[:, 0] = 1
    special[:, -3:] = 1
    inputs, labels = mask_tokens(ids, mask_token_id=mask_id, vocab_size=V, special_tokens_mask=special,
                                 generator=torch.Generator().manual_seed(1))
    chosen = labels != -100
    assert not chosen[special.bool()].any()  # special tokens never chosen
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(inputs[~chosen], ids[~chosen])  # only chosen entries change
    n_eligible = int((special == 0).sum())
    frac = chosen.sum().item() / n_eligible
    assert abs(frac - 0.15) < 0.004, frac  # ~10 standard errors below 0.15's noise at this size
    c_in, c_id = inputs[chosen], ids[chosen]
    n = c_in.numel()
    to_mask = (c_in == mask_id).float().mean().item()
    random_changed = ((c_in != mask_id) & (c_in != c_id)).float().mean().item()
    kept = (c_in == c_id).float().mean().item()
    assert abs(to_mask - 0.8) < 0.01, to_mask
    # 10% random tokens from the whole vocabulary: a fraction 1/V of them hit the original (or [MASK])
    assert abs(random_changed - 0.1 * (1 - 2 / V)) < 0.006, random_changed
    assert abs(kept - (0.1 + 0.1 / V)) < 0.006, kept
    assert n > 20000
    other = mask_tokens(ids, mask_token_id=mask_id, vocab_size=V, mlm_probability=0.4,
                        generator=torch.Generator().manual_seed(2))[1]
    assert abs((other != -100).float().mean().item() - 0.4) < 0.005
    with pytest.raises(ConfigError, match="mlm_probability"):
        mask_tokens(ids, mask_token_id=mask_id, vocab_size=V, mlm_probability=1.5)


def test_chunk_corpus_concatenates_and_cuts(tmp_path):
    tok = _tokenizer(tmp_path)
    texts = ["w1 w2 w3", "w4 w5", "", "w6 w7 w8 w9"]
    c = chunk_corpus(tok, texts, 4)
    flat = [2, 6, 7, 8, 3, 2, 9, 10, 3, 2, 11, 12, 13, 14, 3]  # [CLS] .. [SEP] per text, concatenated
    assert c["input_ids"].tolist() == [flat[0:4], flat[4:8], flat[8:12]]  # the remainder (3 ids) dropped
    assert c["special_tokens_mask"].tolist()[1] == [1, 1, 0, 0]
    one = chunk_corpus(tok, ["w1 w2"], 64)  # shorter than one chunk: one chunk
    assert one["input_ids"].tolist() == [[2, 6, 7, 3]]
    lbl = chunk_corpus(tok, texts, 6, line_by_line=True)
    assert lbl["input_ids"].shape == (3, 6) and lbl["special_tokens_mask"][1].tolist() == [1, 0, 0, 1, 1, 1]


def test_language_sft_has_k_entries_keyed_like_the_encoder_and_lowers_mlm_loss(tmp_path):
    tok = _tokenizer(tmp_path)
    model = _mlm()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    texts = _corpus()
    chunks = chunk_corpus(tok, texts, 14)
    kw = dict(mask_token_id=tok.mask_token_id, vocab_size=len(VOCAB), seed=5)
    before = mlm_loss(model, chunks, **kw)
    k = 3000
    diff = language_sft(model, tok, texts, k, full_steps=40, sparse_steps=40, batch_size=8, lr=1e-2, l1=0.1,
                        max_length=14, seed=0)
    after = mlm_loss(model, chunks, **kw)
    assert diff.meta["mask_entries"] == k and diff.nnz == k  # the ticket, and the stored entries (none below 1e-7)
    assert after < before - 0.3, (before, after)  # measured 3.22 -> 2.79
    encoder_only = _mlm()  # the sparse difference alone, with the initial head, also helps (measured 3.02)
    apply_sft(encoder_only, with_base_prefix(diff.sparse_only(), "bert"))
    assert mlm_loss(encoder_only, chunks, **kw) < before - 0.1
    encoder_names = dict(tf.BertModel(_config(), add_pooling_layer=False).named_parameters())
    assert set(diff.indices) <= set(encoder_names)  # "bert." stripped: fits the bare encoder
    assert "embeddings.word_embeddings.weight" in diff.indices  # embeddings stay maskable
    assert not any("LayerNorm" in n for n in diff.indices)
    assert set(diff.dense) == {"cls.predictions.bias", "cls.predictions.transform.dense.weight",
                               "cls.predictions.transform.dense.bias"}
    # the decoder was untied and frozen: it still holds the original embeddings
    assert torch.equal(model.cls.predictions.decoder.weight, base["bert.embeddings.word_embeddings.weight"])
    # the model holds theta_0 + phi exactly on the encoder
    fresh = _mlm()
    apply_sft(fresh, with_base_prefix(diff, "bert"))
    assert torch.equal(fresh.cls.predictions.bias, model.cls.predictions.bias)  # the head travels dense
    for n, p in model.named_parameters():
        if n.startswith("bert."):
            torch.testing.assert_close(p, dict(fresh.named_parameters())[n], rtol=0, atol=1e-6)


def test_language_and_task_sfts_compose_by_adding_both_deltas(tmp_path):
    tok = _tokenizer(tmp_path)
    lang = language_sft(_mlm(), tok, _corpus(), 800, full_steps=5, batch_size=8, lr=1e-2, max_length=14)
    encoder = tf.BertModel(_config(), add_pooling_layer=False)
    base = {n: p.detach().clone() for n, p in encoder.named_parameters()}
    g = torch.Generator().manual_seed(3)
    task = SparseDiff.from_states(base, {n: t + torch.randn(t.shape, generator=g) for n, t in base.items()}, k=800)
    task.dense["head.weight"] = torch.ones(2, 32)
    task.shapes["head.weight"] = (2, 32)
    overlap = sum(len(set(lang.indices[n].tolist()) & set(task.indices.get(n, torch.empty(0)).tolist()))
                  for n in lang.indices)
    both = compose([lang.sparse_only(), task.sparse_only()])
    assert both.nnz == lang.nnz + task.nnz - overlap
    apply_sft(encoder, both)
    for n, p in encoder.named_parameters():
        expected = base[n].clone()
        if n in lang.indices:
            expected += lang.to_dense(n)
        if n in task.indices:
            expected += task.to_dense(n)
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="cls.predictions"):  # the MLM head is not the encoder's
        apply_sft(tf.BertModel(_config(), add_pooling_layer=False), compose([lang, task.sparse_only()]))


def test_bare_encoder_gets_a_new_head_warmed_up_and_the_cli_trains_and_applies(tmp_path):
    from adapterkit.sft.cli import add_parser, run

    torch.manual_seed(0)
    tf.BertModel(_config()).save_pretrained(tmp_path / "enc")  # like a sentence-transformers checkpoint
    _tokenizer(tmp_path).save_pretrained(tmp_path / "enc")
    model, new_head = load_mlm_model(str(tmp_path / "enc"))
    assert new_head
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied at load
    _mlm().save_pretrained(tmp_path / "mlm")
    assert load_mlm_model(str(tmp_path / "mlm"))[1] is False
    (tmp_path / "lang.txt").write_text("\n".join(_corpus()) + "\n")
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="cmd"))
    rc = run(parser.parse_args(["sft", "train-mlm", "--model", str(tmp_path / "enc"), "--data",
                                str(tmp_path / "lang.txt"), "--k", "500", "--steps", "20", "--head-warmup-steps",
                                "20", "--lr", "1e-2", "--max-length", "14", "--out", str(tmp_path / "sft")]))
    assert rc == 0
    d = SparseDiff.load(tmp_path / "sft")
    assert d.nnz == 500 and d.meta["new_head"] is True and d.meta["head_warmup_steps"] == 20
    assert d.meta["mlm_loss_after"] < d.meta["mlm_loss_before"]
    assert json.loads((tmp_path / "sft" / "sft_config.json").read_text())["meta"]["method"] == "lt-sft-language"
    assert run(parser.parse_args(["sft", "apply", "--model", str(tmp_path / "enc"), "--sft", str(tmp_path / "sft"),
                                  "--out", str(tmp_path / "patched")])) == 0
    base = dict(tf.BertModel.from_pretrained(tmp_path / "enc").named_parameters())
    patched = tf.BertModel.from_pretrained(tmp_path / "patched")
    moved = sum(int((p != base[n]).sum()) for n, p in patched.named_parameters())
    assert 0 < moved <= 500
