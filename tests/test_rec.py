"""Adapter4Rec: ranking metrics, readers, SASRec, adapter placement, K-Adapter, end-to-end."""

from __future__ import annotations

import json
import math

import pytest
import torch

import adapterkit
from adapterkit.core.base import get_container
from adapterkit.errors import ConfigError, DataError
from adapterkit.rec.data import bbc_interactions, read_amazon, read_mind
from adapterkit.rec.metrics import history_mask, rank_metrics, target_ranks
from adapterkit.rec.model import Adapter4Rec, ItemEncoder, SASRecEncoder, attach_rec_method, sample_negatives
from adapterkit.rec.pipeline import left_pad, run_rec, tokenize
from adapterkit.testing.tiny import tiny_inputs, tiny_model


def test_hr_ndcg_against_hand_computed_ranks_with_history_masking():
    # item rows 0..5 (0 = padding)
    scores = torch.tensor([[9.0, 0.5, 0.9, 0.1, 0.8, 0.7],
                           [9.0, 0.9, 0.8, 0.7, 0.6, 0.5],
                           [9.0, 0.1, 0.2, 0.3, 0.4, 0.5]])
    targets = torch.tensor([4, 5, 1])
    hist = torch.tensor([[0, 2], [1, 2], [0, 0]])  # user 0 saw item 2, user 1 saw 1 and 2
    seen = history_mask(hist, 5)
    ranks = target_ranks(scores, targets, seen)
    # user 0: item 2 (0.9) masked -> only item 4 (0.8) ... above it nothing -> rank 1
    # user 1: items 1, 2 masked -> 3 (0.7), 4 (0.6) above 5 (0.5) -> rank 3
    # user 2: nothing masked -> 2,3,4,5 above 1 -> rank 5
    assert ranks.tolist() == [1, 3, 5]
    m = rank_metrics(ranks, k=3)
    assert m["HR@3"] == pytest.approx(2 / 3)
    assert m["NDCG@3"] == pytest.approx((1.0 + 1.0 / math.log2(4)) / 3)
    assert rank_metrics(ranks, k=10)["NDCG@10"] == pytest.approx((1 + 1 / 2 + 1 / math.log2(6)) / 3)
    # without masking user 0's target drops behind item 2
    assert target_ranks(scores, targets)[0] == 2
    # the target itself is never masked even when it appears in the history
    assert target_ranks(scores, torch.tensor([2, 5, 1]), seen)[0] == 1


def test_read_mind(tmp_path):
    (tmp_path / "news.tsv").write_text(
        "N1\tsports\tnfl\tTeam wins\ta\tu\t[]\t[]\nN2\tnews\tus\tVote today\ta\tu\t[]\t[]\n"
        "N3\tnews\tus\tRain again\ta\tu\t[]\t[]\nN4\tfood\tx\t\ta\tu\t[]\t[]\n")
    (tmp_path / "behaviors.tsv").write_text(
        "2\tU1\t11/15/2019 10:00:00 AM\tN1 N2\tN3-1 N4-1 N1-0\n"
        "1\tU1\t11/15/2019 9:00:00 AM\tN1 N2\tN2-1 N3-0\n"
        "3\tU2\t11/15/2019 9:00:00 AM\tN3\tN1-0\n")
    d = read_mind(tmp_path / "behaviors.tsv", tmp_path / "news.tsv", min_len=3)
    assert d.users == ["U1"]  # U2 has one item; N4 has no title
    assert [d.item_ids[i] for i in d.sequences[0]] == ["N1", "N2", "N3"]
    assert d.titles[d.sequences[0][2]] == "Rain again" and d.item_groups[d.sequences[0][0]] == "sports"
    (tmp_path / "bad.tsv").write_text("1\tU1\tyesterday\tN1\tN2-1\n")
    with pytest.raises(DataError, match="bad time"):
        read_mind(tmp_path / "bad.tsv", tmp_path / "news.tsv")


def test_read_amazon(tmp_path):
    rev = [{"reviewerID": "A", "asin": "x", "unixReviewTime": 30}, {"reviewerID": "A", "asin": "y", "unixReviewTime": 10},
           {"reviewerID": "A", "asin": "z", "unixReviewTime": 20}, {"reviewerID": "A", "asin": "y", "unixReviewTime": 40},
           {"reviewerID": "B", "asin": "x", "unixReviewTime": 1}]
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r) for r in rev))
    (tmp_path / "m.jsonl").write_text('{"asin": "x", "title": "Red  shoe"}\n{"asin": "y", "title": "Blue hat"}\n'
                                      '{"asin": "z", "title": "Scarf"}\n')
    d = read_amazon(tmp_path / "r.jsonl", tmp_path / "m.jsonl", min_len=3)
    assert [d.titles[i] for i in d.sequences[0]] == ["Blue hat", "Scarf", "Red shoe"] and d.num_items == 3
    (tmp_path / "m2.jsonl").write_text("{'asin': 'x'}\n")
    with pytest.raises(DataError, match="m2.jsonl:1"):
        read_amazon(tmp_path / "r.jsonl", tmp_path / "m2.jsonl")


def test_bbc_user_model_is_seeded_and_repeat_free():
    a = bbc_interactions(("tech",), 15, seed=3, min_len=5, max_len=8)
    b = bbc_interactions(("tech",), 15, seed=3, min_len=5, max_len=8)
    assert a.sequences == b.sequences and a.titles == b.titles
    assert all(5 <= len(s) <= 8 and len(set(s)) == len(s) for s in a.sequences)
    assert set(a.item_groups[1:]) == {"tech"}


def test_sasrec_is_causal_and_respects_padding():
    torch.manual_seed(0)
    enc = SASRecEncoder(d=16, heads=2, blocks=2, max_len=6, dropout=0.0).eval()
    x = torch.randn(2, 6, 16)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    out = enc(x, attention_mask=mask)
    x2 = x.clone()
    x2[:, 4:] = torch.randn(2, 2, 16)   # change the future
    x2[0, :2] = torch.randn(2, 16)      # change padding
    out2 = enc(x2, attention_mask=mask)
    torch.testing.assert_close(out[0, 2:4], out2[0, 2:4])
    torch.testing.assert_close(out[1, :4], out2[1, :4])
    assert torch.isfinite(out).all()


def _tiny_rec(n_items=12):
    text = tiny_model("bert")
    titles = [""] + [f"item number {i} title" for i in range(1, n_items + 1)]
    ids, mask = tokenize(titles, None, 8, 101)
    torch.manual_seed(0)
    return Adapter4Rec(ItemEncoder(text, 16, "cls"), SASRecEncoder(16, 2, 2, 5, 0.0), ids, mask)


def test_user_encoder_adapter_places_and_lora_targets():
    model = _tiny_rec()
    attach_rec_method(model, "houlsby", {"item": {"bottleneck_dim": 4}, "user": {"bottleneck_dim": 2}})
    user = get_container(model.user_encoder).sets["user"]
    assert sorted(user.adapters) == [f"blocks__{i}__{p}" for i in (0, 1) for p in ("attention__out", "ffn__fc2")]
    item = get_container(model.item_encoder.text).sets["item"]
    assert sorted(item.adapters) == sorted(f"encoder__layer__{i}__{p}" for i in (0, 1)
                                           for p in ("attention__output__dense", "output__dense"))
    assert abs(float(user.adapters["blocks__0__attention__out"].down.weight.detach().std()) - 0.01) < 0.005  # N(0, 1e-2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and "adapterkit" not in n}
    assert "item_encoder.proj.weight" in trainable and "user_encoder.blocks.0.attn_norm.weight" in trainable
    assert "user_encoder.blocks.0.attention.query.weight" not in trainable
    # the adapter sits on the attention output projection: its input is that projection's raw output
    seen = {}
    out_proj = model.user_encoder.blocks[0].attention.out
    out_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("in", a[0]))
    user.adapters["blocks__0__attention__out"].register_forward_pre_hook(lambda m, a: seen.__setitem__("ad", a[0]))
    model.eval()
    model.user_encoder(torch.randn(2, 5, 16), attention_mask=torch.ones(2, 5))
    torch.testing.assert_close(seen["ad"], torch.nn.functional.linear(seen["in"], out_proj.weight, out_proj.bias))
    lora = _tiny_rec()
    attach_rec_method(lora, "lora", None)
    assert sorted(get_container(lora.user_encoder).sets["user"].paths) == [
        f"blocks.{i}.attention.{p}" for i in (0, 1) for p in ("query", "value")]
    with pytest.raises(ConfigError, match="future"):
        attach_rec_method(_tiny_rec(), "houlsby", {"user": {"method": "k_adapter"}})
    with pytest.raises(ConfigError, match="unknown rec method"):
        attach_rec_method(_tiny_rec(), "houlsbi", None)


def test_k_adapter_adds_to_final_hidden_state():
    model = tiny_model("bert")
    x = tiny_inputs("bert")
    base = model(**x).last_hidden_state
    adapterkit.add_adapters(model, {"method": "k_adapter", "adapter_dim": 8, "num_heads": 2, "init_std": 0.0})
    torch.testing.assert_close(model(**x).last_hidden_state, base)  # zero init: unchanged
    s = get_container(model).sets["k_adapter"]
    assert s.tap_layers == [0, 1] and len(s.adapters) == 2
    with torch.no_grad():
        for p in s.parameters():
            p.normal_(0, 0.2)
    taps = {}
    model.encoder.layer[0].register_forward_hook(lambda m, a, o: taps.__setitem__(0, o[0] if isinstance(o, tuple) else o))
    out = model(**x).last_hidden_state
    with torch.no_grad():
        a0 = s.adapters[0](taps[0], None, None)
        # the last layer is also a tap: a1 = K1(h_last + a0), final = h_last + a1; recover h_last from out
    delta = out - base
    assert delta.abs().max() > 1e-3 and torch.isfinite(out).all()
    with torch.no_grad():
        a1 = s.adapters[1](base + a0, None, None)
    torch.testing.assert_close(out, base + a1, rtol=1e-4, atol=1e-4)
    report = adapterkit.trainable_report(model)
    assert report["trainable"] == sum(p.numel() for p in s.parameters())


def test_loss_negatives_and_gradients():
    model = _tiny_rec()
    attach_rec_method(model, "houlsby", {"item": {"bottleneck_dim": 4}, "user": {"bottleneck_dim": 2}})
    seq = left_pad([[1, 2, 3, 4], [5, 6, 7, 8, 9, 10]], 6)
    neg = sample_negatives(seq, 12, torch.Generator().manual_seed(0))
    assert not (neg.unsqueeze(-1) == seq.unsqueeze(1)).any()
    loss = model.loss(seq, torch.Generator().manual_seed(0))
    loss.backward()
    ad = get_container(model.item_encoder.text).sets["item"].adapters["encoder__layer__0__output__dense"]
    assert ad.down.weight.grad.abs().sum() > 0 and ad.up.weight.grad.abs().sum() > 0


def _fixtures(tmp_path):
    import random

    rnd = random.Random(0)
    news = [f"N{i}\tcat{i % 3}\tsub\tstory {i} about topic {i % 3}\ta\tu\t[]\t[]" for i in range(30)]
    (tmp_path / "news.tsv").write_text("\n".join(news))
    rows = []
    for u in range(12):
        items = rnd.sample(range(30), 8)
        rows.append(f"{u}\tU{u}\t11/15/2019 9:00:00 AM\t{' '.join(f'N{i}' for i in items[:5])}\t"
                    + " ".join(f"N{i}-1" for i in items[5:]))
    (tmp_path / "behaviors.tsv").write_text("\n".join(rows))
    rev, meta = [], []
    for i in range(20):
        meta.append(json.dumps({"asin": f"P{i}", "title": f"product {i} kind {i % 4}"}))
    for u in range(10):
        for k, i in enumerate(rnd.sample(range(20), 7)):
            rev.append(json.dumps({"reviewerID": f"R{u}", "asin": f"P{i}", "unixReviewTime": 100 + k}))
    (tmp_path / "r.jsonl").write_text("\n".join(rev))
    (tmp_path / "m.jsonl").write_text("\n".join(meta))


@pytest.mark.parametrize("method", ["houlsby", "k_adapter"])
def test_end_to_end_mind_source_amazon_target(tmp_path, method):
    _fixtures(tmp_path)
    cfg = {"source": {"source": "mind", "behaviors": str(tmp_path / "behaviors.tsv"), "news": str(tmp_path / "news.tsv")},
           "target": {"source": "amazon", "reviews": str(tmp_path / "r.jsonl"), "meta": str(tmp_path / "m.jsonl")},
           "model": {"bert": {"vocab_size": 101, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                              "intermediate_size": 64, "max_position_embeddings": 32}, "d": 16, "max_len": 5},
           "source_train": {"epochs": 1, "batch_size": 8}, "target_train": {"epochs": 2, "batch_size": 8},
           "method": method,
           "adapter": {"item": {"adapter_dim": 8, "num_heads": 2}} if method == "k_adapter" else None,
           "output_dir": str(tmp_path / "out")}
    res = run_rec(cfg, log=lambda s: None)
    assert "source" in res and 0.0 <= res["source"]["test"]["HR@10"] <= 1.0
    t = res["target"]["test"]
    assert 0.0 <= t["NDCG@10"] <= t["HR@10"] <= 1.0 and len(res["target"]["history"]) == 2
    assert res["target_data"]["items"] == 20 and (tmp_path / "out/results.json").is_file()
    assert res["trainable_percent"] < 100
    scratch = run_rec({**cfg, "method": "scratch", "output_dir": None}, log=lambda s: None)
    assert "source" not in scratch and scratch["trainable_percent"] == 100
