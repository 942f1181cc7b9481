"""The text domain on the engine: classification heads per task, generation (seq2seq and
causal), JSONL/CSV data, clear errors, exact resume after SIGKILL, 2 processes = 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from reliability_helpers import kill_after_checkpoints, torchrun

from adapterkit.errors import ConfigError, DataError
from adapterkit.testing.fixtures import make_text_fixture
from adapterkit.text.config import load_text_config
from adapterkit.text.data import read_split
from adapterkit.text.domain import build_engine, classification_metrics, generation_metrics

ENV = {**os.environ, "ADAPTERKIT_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("ADAPTERKIT_NO_PROGRESS", "1")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    make_text_fixture(root)
    return root


def cfg(root, model="tiny-bert", tasks=("sentiment", "topic"), adapters=None, **train):
    t = {"epochs": 4, "batch_size": 8, "lr": 5e-3, "checkpoint_every": 5, "seed": 0, "warmup_ratio": 0.0}
    t.update(train)
    return {"domain": "text", "model": {"name_or_path": model, "max_length": 16, "max_target_length": 4, "pool": "mean"},
            "adapters": adapters if adapters is not None else [{"method": "lora", "r": 4, "alpha": 8,
                                                                "sharing": "per_task"}],
            "data": {"root": str(root), "tasks": list(tasks)}, "train": t,
            "eval": {"batch_size": 16, "max_new_tokens": 3, "select_on": "last"}}


def test_multitask_classification_heads_train_and_beat_chance(data, tmp_path):
    eng = build_engine(load_text_config(cfg(data, epochs=8, lr=2e-2)), tmp_path / "run")
    heads = eng.model.heads
    assert set(heads) == {"sentiment", "topic"} and heads["topic"].out_features == 3
    assert all(p.requires_grad for p in heads.parameters())  # the new heads train by default
    assert not any(p.requires_grad for n, p in eng.model.encoder.named_parameters() if "adapterkit" not in n)
    before = {n: p.detach().clone() for n, p in heads.named_parameters()}
    res = eng.fit()
    assert any(not torch.equal(before[n], p) for n, p in heads.named_parameters())
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["domain"] == "text" and saved["kinds"] == {"sentiment": "classification", "topic": "classification"}
    assert saved["test_sizes"] == {"sentiment": 32, "topic": 32}
    # a cue word decides the label: a trained model beats always-the-majority-class by a margin
    assert res["test"]["sentiment"]["accuracy"] >= 75.0, res["test"]  # majority class: at most ~60
    assert res["test"]["topic"]["accuracy"] >= 65.0, res["test"]      # majority class: at most ~45
    assert json.loads((tmp_path / "run" / "final" / "labels.json").read_text())["labels"]["topic"] == \
        ["money", "sport", "tech"]


@pytest.mark.parametrize("model", [pytest.param("tiny-bart", marks=pytest.mark.slow), "tiny-llama"])
def test_generation_tasks_text_to_text(data, tmp_path, model):
    c = cfg(data, model=model, tasks=("copy", "sentiment"), epochs=2,
            adapters=[{"method": "lora", "r": 4, "alpha": 8}])
    res = build_engine(load_text_config(c), tmp_path / "run").fit()
    assert set(res["test"]["copy"]) >= {"exact_match", "token_f1"}  # generation
    assert "accuracy" in res["test"]["sentiment"]  # classification as the label's text
    preds = json.loads((tmp_path / "run" / "predictions.json").read_text())
    assert len(preds["copy"]) == 32 and all(isinstance(v, str) for v in preds["copy"].values())


def test_csv_files_read_like_jsonl(tmp_path):
    make_text_fixture(tmp_path / "j")
    make_text_fixture(tmp_path / "c", fmt="csv")
    a = read_split(tmp_path / "j" / "topic" / "train.jsonl")
    b = read_split(tmp_path / "c" / "topic" / "train.csv")
    assert [(e.uid, e.text, e.label) for e in a] == [(e.uid, e.text, e.label) for e in b]


def test_bad_data_and_config_errors_name_the_problem(data, tmp_path):
    bad = tmp_path / "bad" / "t"
    bad.mkdir(parents=True)
    (bad / "train.jsonl").write_text('{"text": "a", "label": "x"}\n{"label": "y"}\n')
    with pytest.raises(DataError, match=r"train.jsonl:2: the field 'text'"):
        read_split(bad / "train.jsonl")
    (bad / "train.jsonl").write_text('{"text": "a", "label": "x"}\nnot json\n')
    with pytest.raises(DataError, match=r"train.jsonl:2: not a JSON object"):
        read_split(bad / "train.jsonl")
    with pytest.raises(ConfigError, match=r"unknown task 'sentimnt'.*did you mean .sentiment"):
        build_engine(load_text_config(cfg(data, tasks=("sentimnt",))), tmp_path / "x")
    with pytest.raises(ConfigError, match="generation task"):
        build_engine(load_text_config(cfg(data, tasks=("copy",))), tmp_path / "y")  # an encoder cannot generate
    with pytest.raises(ConfigError, match="model"):
        load_text_config({**cfg(data), "modle": {}})


def test_metrics_against_hand_computed_values():
    m = classification_metrics(["a", "a", "b", "b"], ["a", "b", "b", "b"])
    assert m["accuracy"] == 75.0
    # F1(a) = 2*1*0.5/1.5 = 2/3, F1(b) = 2*1*(2/3)/(5/3) = 0.8
    assert abs(m["macro_f1"] - 100 * (2 / 3 + 0.8) / 2) < 1e-9
    g = generation_metrics(["Red  ", "blue green"], ["red", "green"])
    assert g["exact_match"] == 50.0 and abs(g["token_f1"] - 100 * (1 + 2 / 3) / 2) < 1e-9


def _cmd(path, out):
    return [sys.executable, "-m", "adapterkit.cli", "train", str(path), "--output", str(out)]


def test_sigkill_then_rerun_is_bit_identical(data, tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg(data, epochs=2, checkpoint_every=4)))
    subprocess.run(_cmd(p, tmp_path / "clean"), check=True, env=ENV, capture_output=True)
    kill_after_checkpoints(_cmd(p, tmp_path / "crash"), tmp_path / "crash" / "checkpoints", ENV)
    done = subprocess.run(_cmd(p, tmp_path / "crash"), check=True, env=ENV, capture_output=True, text=True)
    assert "resumed from step" in done.stdout
    from adapterkit.engine.engine import read_trained

    a = read_trained(tmp_path / "clean" / "final")
    b = read_trained(tmp_path / "crash" / "final")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    log = (tmp_path / "crash" / "train_log.csv").read_text().splitlines()
    steps = [r.split(",")[0] for r in log[1:]]
    assert steps == sorted(set(steps), key=int)  # no row twice after the resume


def test_two_processes_match_one(data, tmp_path):
    one = tmp_path / "one.yaml"
    two = tmp_path / "two.yaml"
    c = cfg(data, epochs=1, checkpoint_every=100, adapters=[{"method": "houlsby", "reduction_factor": 4}])
    c["model"]["head_dropout"] = 0.0
    one.write_text(yaml.safe_dump(c))
    c["train"]["batch_size"] = 4
    two.write_text(yaml.safe_dump(c))
    subprocess.run(_cmd(one, tmp_path / "o1"), check=True, env=ENV, capture_output=True)
    r = subprocess.run(torchrun("-m", "adapterkit.cli", "train", str(two), "--output", str(tmp_path / "o2")),
                       env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]

    def losses(d):
        return [(r.split(",")[2], float(r.split(",")[3])) for r in (d / "train_log.csv").read_text().splitlines()[1:]]

    l1, l2 = losses(tmp_path / "o1"), losses(tmp_path / "o2")
    assert [t for t, _ in l1] == [t for t, _ in l2] and len(l1) > 3
    for (_, a), (_, b) in zip(l1, l2):
        assert abs(a - b) < 1e-4 * max(1.0, abs(a))  # (a head no rank used keeps no gradient, as in one process)


def test_fsdp_two_processes_match_one(data, tmp_path):
    """train.fsdp: the model FSDP2-sharded over 2 CPU processes trains as 1 process; the
    checkpoint and final weights are whole tensors (rank 0 writes the gathered state)."""
    from adapterkit.engine.engine import read_trained

    one, two = tmp_path / "one.yaml", tmp_path / "two.yaml"
    c = cfg(data, epochs=1, checkpoint_every=100, adapters=[{"method": "lora", "r": 4, "alpha": 8}])
    c["model"]["head_dropout"] = 0.0
    one.write_text(yaml.safe_dump(c))
    c["train"].update(batch_size=4, fsdp=True)
    two.write_text(yaml.safe_dump(c))
    subprocess.run(_cmd(one, tmp_path / "o1"), check=True, env=ENV, capture_output=True)
    r = subprocess.run(torchrun("-m", "adapterkit.cli", "train", str(two), "--output", str(tmp_path / "o2")),
                       env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    l1 = [float(x.split(",")[3]) for x in (tmp_path / "o1" / "train_log.csv").read_text().splitlines()[1:]]
    l2 = [float(x.split(",")[3]) for x in (tmp_path / "o2" / "train_log.csv").read_text().splitlines()[1:]]
    assert len(l1) == len(l2) > 3 and max(abs(a - b) for a, b in zip(l1, l2)) < 1e-4
    a, b = read_trained(tmp_path / "o1" / "final"), read_trained(tmp_path / "o2" / "final")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape and torch.allclose(a[k], b[k], atol=1e-5), k


def test_dry_run_plans_a_text_config(data, tmp_path, capsys):
    from adapterkit.cli import main

    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg(data, epochs=2)))
    assert main(["train", str(p), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "plan (text): 2 task(s), 24 steps per epoch, 48 steps" in out and "sentiment" in out and "trainable" in out
