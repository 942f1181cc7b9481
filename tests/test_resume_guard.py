"""Resume trusts nothing it loads: the checkpoint must come from the same run config
(--allow-changes lets the run grow), and every tensor must have the model's key, shape
and dtype before anything is copied."""

from __future__ import annotations

import json

import pytest
import torch
from reliability_helpers import copy_run, snapshot, tiny_config, write_config

from adapterkit.cli import main
from adapterkit.engine.checkpoint import CheckpointManager
from adapterkit.errors import CheckpointError, ConfigError
from adapterkit.testing.fixtures import make_vl_fixture
from adapterkit.train.config import load_config
from adapterkit.train.trainer import Trainer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_vl_fixture(tmp_path_factory.mktemp("guard") / "data", n_images=20)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A finished 4-step run (checkpoints at steps 2 and 4)."""
    out = tmp_path_factory.mktemp("guard") / "run"
    Trainer(load_config(tiny_config(data, max_steps=4)), out).fit()
    return out


@pytest.mark.parametrize("change, keys", [
    ({"lr": 1.0, "seed": 2}, ["train.lr 0.005 -> 1.0", "train.seed 1 -> 2"]),
    ({"batch_size": 2}, ["train.batch_size 4 -> 2"]),
])
def test_rerun_with_another_config_is_refused_naming_the_keys(data, trained, tmp_path, change, keys):
    out = copy_run(trained, tmp_path / "run")
    before = snapshot(out)
    tr = Trainer(load_config(tiny_config(data, max_steps=4, **change)), out)
    with pytest.raises(ConfigError) as err:
        tr.fit()
    msg = str(err.value)
    for k in keys:
        assert k in msg
    assert msg.count(" -> ") == len(keys), msg  # only the keys that differ
    assert "step-000004" in msg and "--output" in msg
    assert snapshot(out) == before  # nothing was trained, written or overwritten


def test_another_preset_is_refused(data, trained, tmp_path):
    out = copy_run(trained, tmp_path / "run")
    tr = Trainer(load_config(tiny_config(data, preset="single_adapter", max_steps=4)), out)
    with pytest.raises(ConfigError, match=r"preset 'single_lora' -> 'single_adapter'"):
        tr.fit()


def test_more_steps_need_allow_changes(data, trained, tmp_path, capsys):
    out = copy_run(trained, tmp_path / "run")
    cfg = write_config(tmp_path / "cfg.yaml", tiny_config(data, max_steps=6))
    assert main(["train", str(cfg), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "train.max_steps 4 -> 6" in err and "--allow-changes train.max_steps" in err
    assert json.loads((out / "results.json").read_text())["steps"] == 4

    assert main(["train", str(cfg), "--output", str(out), "--allow-changes", "train.max_steps"]) == 0
    printed = capsys.readouterr().out
    assert "resumed from step 4" in printed and "train.max_steps 4 -> 6" in printed
    res = json.loads((out / "results.json").read_text())
    assert res["steps"] == 6 and res["config"]["train"]["max_steps"] == 6
    assert res["resume_changes"] == [{"step": 4, "key": "train.max_steps", "old": 4, "new": 6}]
    # the new checkpoints record the new value: the same command now resumes without the flag
    assert main(["train", str(cfg), "--output", str(out)]) == 0


def test_allow_changes_accepts_only_safe_keys(data, tmp_path):
    with pytest.raises(ConfigError, match=r"train\.lr cannot change on resume.*train\.max_steps"):
        Trainer(load_config(tiny_config(data)), tmp_path / "run", allow_changes=["train.lr"])
    with pytest.raises(ConfigError, match=r'did you mean "train\.max_steps"'):
        Trainer(load_config(tiny_config(data)), tmp_path / "run", allow_changes=["train.max_step"])


def _first(d):
    return sorted(d)[0]


@pytest.mark.parametrize("damage", ["broadcastable_shape", "integer_dtype", "missing_key", "unexpected_key",
                                    "optimizer_moment_shape", "optimizer_param_count", "trainer_step"])
def test_checkpoint_tensors_must_match_the_model(data, trained, tmp_path, damage):
    out = copy_run(trained, tmp_path / "run")
    mgr = CheckpointManager(out)
    state, step = mgr.load_latest()
    adapter = state["adapter"]
    key = _first(adapter)
    if damage == "broadcastable_shape":
        adapter[key] = torch.ones(1)
        expect = rf"{key}: shape \[1\], the model has \[\d+, \d+"
    elif damage == "integer_dtype":
        adapter[key] = adapter[key].to(torch.int32)
        expect = rf"{key}: dtype torch.int32, the model has torch.float32"
    elif damage == "missing_key":
        del adapter[key]
        expect = rf"missing {key}"
    elif damage == "unexpected_key":
        adapter["visual.extra.weight"] = torch.zeros(2)
        expect = r"unexpected visual\.extra\.weight"
    elif damage == "optimizer_moment_shape":
        pid = _first(state["optimizer"]["state"])
        state["optimizer"]["state"][pid]["exp_avg"] = torch.zeros(1)
        expect = r"optimizer state.*exp_avg: shape \[1\]"
    elif damage == "optimizer_param_count":
        state["optimizer"]["param_groups"][0]["params"] = state["optimizer"]["param_groups"][0]["params"][:-1]
        expect = r"optimizer.*group 0 has \d+ parameters, the model has \d+"
    else:
        state["trainer"]["step"] = "abc"
        expect = r"trainer state.*'step'.*'abc'"
    mgr.save(step, state)  # a self-consistent checkpoint (manifest and checksums match)
    tr = Trainer(load_config(tiny_config(data, max_steps=4)), out)
    before = {n: p.detach().clone() for n, p in tr.named_trainable.items()}
    with pytest.raises(CheckpointError, match=expect):
        tr.fit()
    for n, p in tr.named_trainable.items():  # refused before anything was copied in
        assert torch.equal(p, before[n]), n


def test_checkpoint_without_a_recorded_config_resumes_with_a_warning(data, trained, tmp_path):
    out = copy_run(trained, tmp_path / "run")
    mgr = CheckpointManager(out)
    state, step = mgr.load_latest()
    del state["extra"]  # as an adapterkit from before run configs were recorded wrote it
    mgr.save(step, state)
    tr = Trainer(load_config(tiny_config(data, max_steps=4)), out)
    with pytest.warns(RuntimeWarning, match="does not record the run config"):
        tr.fit()
    assert tr.state["step"] == 4


def test_trained_weights_loaded_for_eval_must_match_the_model(data, trained, tmp_path):
    from adapterkit.safeio import load_safetensors_checked, save_safetensors_atomic

    out = copy_run(trained, tmp_path / "run")
    f = out / "final" / "adapter_model.safetensors"  # the adapters (trainable.safetensors: the rest)
    weights = load_safetensors_checked(f)
    key = _first(weights)
    weights[key] = torch.ones(1)  # a consistent file (its checksum matches), of the wrong shape
    save_safetensors_atomic(weights, f)
    tr = Trainer(load_config(tiny_config(data, max_steps=4)), out)
    with pytest.raises(CheckpointError, match=rf"{key}: shape \[1\]"):
        tr._load_best("final")


def test_wall_time_counts_the_processes_before_a_resume(data, trained, tmp_path, capsys):
    """A resumed run's wall_time_s is the time to its checkpoint (kept in the trainer state)
    plus this process's, not this process's alone; a malformed record is refused."""
    out = copy_run(trained, tmp_path / "run")
    mgr = CheckpointManager(out)
    state, step = mgr.load_latest()
    first = json.loads((trained / "results.json").read_text())
    assert 0 < state["trainer"]["train_s"] <= first["wall_time_s"]
    state["trainer"]["train_s"] = 1000.0  # as if the processes before had trained for 1,000 s
    mgr.save(step, state)
    cfg = write_config(tmp_path / "cfg.yaml", tiny_config(data, max_steps=6))
    assert main(["train", str(cfg), "--output", str(out), "--allow-changes", "train.max_steps"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert 0 < res["wall_time_s_this_process"] < 1000
    assert res["wall_time_s"] == pytest.approx(1000.0 + res["wall_time_s_this_process"])
    state, _ = mgr.load_latest()
    assert state["trainer"]["train_s"] > 1000.0  # the new checkpoint carries the total on

    state["trainer"]["train_s"] = -5.0
    mgr.save(6, state)
    with pytest.raises(CheckpointError, match=r"'train_s' must be a non-negative number of seconds, got -5\.0"):
        Trainer(load_config(tiny_config(data, max_steps=6)), out).fit()
