"""Adapter4Rec on the training engine: source pre-training and target adaptation as two
engine runs; SIGKILL during the target stage then rerun ends bit-identical; 2 processes
equal 1; validation selection tests the best epoch's weights; a target run refuses to
resume from other source weights."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch
import yaml
from reliability_helpers import kill_after_checkpoints, torchrun

from adapterkit.engine.engine import read_trained
from adapterkit.errors import ConfigError
from adapterkit.rec.domain import RecRun, build_engine, load_config
from adapterkit.rec.pipeline import evaluate, load_domain, split_leave_one_out

ENV = {**os.environ, "ADAPTERKIT_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
BERT = {"vocab_size": 101, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 64, "max_position_embeddings": 32}


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("ADAPTERKIT_NO_PROGRESS", "1")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """MIND-style source (20 users, 40 news) and Amazon-style target (33 users, 30 products:
    33 training rows, so a batch of 8 leaves a last batch of 1)."""
    root = tmp_path_factory.mktemp("recdata")
    rnd = random.Random(0)
    news = [f"N{i}\tcat{i % 4}\tsub\tstory {i} about topic {i % 4}\ta\tu\t[]\t[]" for i in range(40)]
    (root / "news.tsv").write_text("\n".join(news))
    rows = []
    for u in range(20):
        items = rnd.sample(range(40), 8)
        rows.append(f"{u}\tU{u}\t11/15/2019 9:00:00 AM\t{' '.join(f'N{i}' for i in items[:5])}\t"
                    + " ".join(f"N{i}-1" for i in items[5:]))
    (root / "behaviors.tsv").write_text("\n".join(rows))
    meta = [json.dumps({"asin": f"P{i}", "title": f"product {i} kind {i % 5}"}) for i in range(30)]
    rev = []
    for u in range(33):
        start = rnd.randrange(30)
        for k in range(7):  # users walk the catalogue in kind-correlated steps: learnable
            rev.append(json.dumps({"reviewerID": f"R{u}", "asin": f"P{(start + 5 * k + rnd.randrange(2)) % 30}",
                                   "unixReviewTime": 100 + k}))
    (root / "r.jsonl").write_text("\n".join(rev))
    (root / "m.jsonl").write_text("\n".join(meta))
    return root


def cfg(root, method="houlsby", source_epochs=1, target_epochs=3, batch_size=8, dropout=0.1, **target_train):
    bert = dict(BERT)
    if dropout == 0.0:
        bert.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return {"domain": "rec", "name": "rec-test",
            "source": {"source": "mind", "behaviors": str(root / "behaviors.tsv"), "news": str(root / "news.tsv")},
            "target": {"source": "amazon", "reviews": str(root / "r.jsonl"), "meta": str(root / "m.jsonl")},
            "model": {"bert": bert, "d": 16, "max_len": 5, "dropout": dropout},
            "source_train": {"epochs": source_epochs, "batch_size": batch_size, "checkpoint_every": 2},
            "target_train": {"epochs": target_epochs, "batch_size": batch_size, "checkpoint_every": 2,
                             **target_train},
            "method": method, "adapter": {"item": {"bottleneck_dim": 8}, "user": {"bottleneck_dim": 4}}}


def _cmd(path, out):
    return [sys.executable, "-m", "adapterkit.cli", "train", str(path), "--output", str(out)]


def _weights(run_dir):
    return {s: read_trained(run_dir / s / "final") for s in ("source", "target")}


def test_sigkill_during_target_stage_then_rerun_is_bit_identical(data, tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg(data, target_epochs=4)))
    subprocess.run(_cmd(p, tmp_path / "clean"), check=True, env=ENV, capture_output=True)
    kill_after_checkpoints(_cmd(p, tmp_path / "crash"), tmp_path / "crash" / "target" / "checkpoints", ENV)
    assert not (tmp_path / "crash" / "target" / "results.json").exists()
    done = subprocess.run(_cmd(p, tmp_path / "crash"), check=True, env=ENV, capture_output=True, text=True)
    assert done.stdout.count("resumed from step") == 2, done.stdout  # the finished source run, then the target
    a, b = _weights(tmp_path / "clean"), _weights(tmp_path / "crash")
    for stage in a:
        assert a[stage].keys() == b[stage].keys() and a[stage]
        for k in a[stage]:
            assert torch.equal(a[stage][k], b[stage][k]), (stage, k)
    ra = json.loads((tmp_path / "clean" / "results.json").read_text())
    rb = json.loads((tmp_path / "crash" / "results.json").read_text())
    assert ra["test"] == rb["test"] and ra["target"]["history"] == rb["target"]["history"]
    assert len(rb["target"]["history"]) == 4 and rb["target"]["steps"] == 4 * 5  # 33 rows: 5 batches of 8
    log = (tmp_path / "crash" / "target" / "train_log.csv").read_text().splitlines()
    steps = [r.split(",")[0] for r in log[1:]]
    assert steps == [str(i) for i in range(1, 21)]  # every step once after the resume



def test_two_processes_match_one(data, tmp_path):
    one, two = tmp_path / "one.yaml", tmp_path / "two.yaml"
    one.write_text(yaml.safe_dump(cfg(data, target_epochs=2, dropout=0.0)))
    two.write_text(yaml.safe_dump(cfg(data, target_epochs=2, dropout=0.0, batch_size=4)))  # x 2 processes
    subprocess.run(_cmd(one, tmp_path / "o1"), check=True, env=ENV, capture_output=True)
    r = subprocess.run(torchrun("-m", "adapterkit.cli", "train", str(two), "--output", str(tmp_path / "o2")),
                       env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]

    def losses(d):
        return [float(r.split(",")[3]) for r in (d / "train_log.csv").read_text().splitlines()[1:]]

    for stage, n in (("source", 3), ("target", 10)):  # 20 / 33 training rows in global batches of 8
        l1, l2 = losses(tmp_path / "o1" / stage), losses(tmp_path / "o2" / stage)
        assert len(l1) == len(l2) == n, stage
        for a, b in zip(l1, l2):
            assert abs(a - b) < 1e-4 * max(1.0, abs(a)), (stage, l1, l2)
    r1 = json.loads((tmp_path / "o1" / "results.json").read_text())
    r2 = json.loads((tmp_path / "o2" / "results.json").read_text())
    assert r1["checkpoint"] == r2["checkpoint"]
    for k, v in r1["test"]["target"].items():
        assert abs(v - r2["test"]["target"][k]) < 1e-6, k


@pytest.mark.slow
def test_validation_selection_tests_the_best_epoch(data, tmp_path):
    c = cfg(data, source_epochs=2, target_epochs=6, lr=0.02, checkpoint_every=100)
    c["output_dir"] = str(tmp_path / "out")
    run = RecRun(c, log=lambda s: None)
    res = run.fit()
    hist = res["target"]["history"]
    scores = [h["valid_NDCG@10"] for h in hist]
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))  # the first epoch with the best score
    assert len(hist) == 6 and best != len(hist) - 1, scores  # (this config peaks before its last epoch)
    assert res["target"]["best_valid_NDCG@10"] == scores[best]
    assert res["checkpoint"].startswith(f"best (step {hist[best]['step']},")
    # the weights tested are the best epoch's: their validation score is the best one
    _, valid, _ = split_leave_one_out(load_domain(load_config(c).target).sequences)
    got = evaluate(run.model, valid[0], valid[1], c["model"]["max_len"])
    assert abs(got["NDCG@10"] - scores[best]) < 1e-6 and abs(got["NDCG@10"] - scores[-1]) > 1e-6
    best_w = read_trained(tmp_path / "out" / "target" / "best")
    final_w = read_trained(tmp_path / "out" / "target" / "final")
    assert any(not torch.equal(best_w[k], final_w[k]) for k in best_w)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["domain"] == "rec" and saved["test"] == res["test"] and saved["config"]["method"] == "houlsby"
    assert [e["step"] for e in json.loads((tmp_path / "out" / "target" / "results.json").read_text())[
        "val_history"]] == [h["step"] for h in hist]
    # eval.select_on: last tests the last epoch's weights
    c = cfg(data, target_epochs=2)
    last = RecRun({**c, "eval": {"select_on": "last"}, "output_dir": str(tmp_path / "last")}, log=lambda s: None).fit()
    assert last["checkpoint"] == "last" and last["target"]["steps"] == 10
    assert [sorted(h) for h in last["target"]["history"]] == [["epoch", "loss", "step"]] * 2  # not validated


def test_target_refuses_to_resume_from_other_source_weights(data, tmp_path):
    c = cfg(data, target_epochs=1)
    build_engine(c, tmp_path / "out").fit()
    longer = cfg(data, source_epochs=2, target_epochs=1)
    with pytest.raises(ConfigError, match="start_sha256"):  # the source run continues, the target cannot
        build_engine(longer, tmp_path / "out", allow_changes="train.epochs").fit()
    with pytest.raises(ConfigError, match="source_train.*epochs"):
        load_config({**c, "source_train": {"epochs": 0}})
    with pytest.raises(ConfigError, match="unknown rec method"):
        load_config({**c, "method": "houlsbi"})
    with pytest.raises(ConfigError, match="no presets"):
        cfgo = load_config(c)
        cfgo.preset = "single_lora"
        cfgo.validate()


def test_parallel_adapters_in_the_user_encoder_read_the_block_input():
    from adapterkit.core.base import get_container
    from adapterkit.rec.model import Adapter4Rec, ItemEncoder, SASRecEncoder, attach_rec_method
    from adapterkit.rec.pipeline import tokenize
    from adapterkit.testing.tiny import tiny_model

    ids, mask = tokenize([""] + [f"item {i}" for i in range(1, 9)], None, 6, 101)
    torch.manual_seed(0)
    model = Adapter4Rec(ItemEncoder(tiny_model("bert"), 16), SASRecEncoder(16, 2, 2, 5, 0.0), ids, mask)
    attach_rec_method(model, "parallel", {"item": {"bottleneck_dim": 4}, "user": {"bottleneck_dim": 2}})
    user = get_container(model.user_encoder).sets["user"]
    assert sorted(user.adapters) == [f"blocks__{i}__{p}" for i in (0, 1) for p in ("attention__out", "ffn__fc2")]
    seen = {}
    model.user_encoder.blocks[1].register_forward_pre_hook(lambda m, a: seen.__setitem__("block", a[0]))
    user.adapters["blocks__1__attention__out"].register_forward_pre_hook(lambda m, a: seen.__setitem__("ad", a[0]))
    model.eval()
    model.user_encoder(torch.randn(2, 5, 16), attention_mask=torch.ones(2, 5))
    torch.testing.assert_close(seen["ad"], seen["block"])  # parallel to the attention, from the residual stream
