"""Crash-safe training: SIGKILL + resume is exact, corrupt checkpoints are skipped,
configs are validated (property-based), and 2-process DDP matches 1 process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_helpers import kill_after_checkpoints, torchrun

import adapterkit
from adapterkit.core.config import config_from_dict
from adapterkit.testing.fixtures import make_vl_fixture
from adapterkit.train.config import load_config

ENV = {**os.environ, "ADAPTERKIT_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _write_cfg(tmp, root, **train):
    t = {"epochs": 2, "batch_size": 4, "task_batch_scale": {"vqa": 1, "gqa": 1, "nlvr": 1, "caption": 1},
         "checkpoint_every": 2, "keep_last": 2, "max_text_len": 12, "max_target_len": 6, "lr": 5e-3, "seed": 1}
    t.update(train)
    cfg = {"model": {"backbone": "tiny-bart", "feat_dim": 16}, "preset": "single_lora",
           "data": {"root": str(root), "features": str(root / "features")}, "train": t,
           "eval": {"batch_size": 16, "max_new_tokens": 2, "caption_max_new_tokens": 3, "caption_beams": 1,
                    "select_on": "last"}}
    p = tmp / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _train_cmd(cfg, out):
    return [sys.executable, "-m", "adapterkit.cli", "train", str(cfg), "--output", str(out)]


def _final_weights(out: Path):
    from safetensors.torch import load_file

    ckpts = sorted((out / "checkpoints").glob("step-*"))
    return ckpts[-1].name, load_file(ckpts[-1] / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_vl_fixture(tmp_path_factory.mktemp("rel") / "data", n_images=20)


def test_sigkill_then_resume_matches_uninterrupted_run(data, tmp_path):
    cfg = _write_cfg(tmp_path, data)
    subprocess.run(_train_cmd(cfg, tmp_path / "clean"), check=True, env=ENV, capture_output=True)
    # a second run, killed with SIGKILL after its second checkpoint appears, at whatever step it is then
    kill_after_checkpoints(_train_cmd(cfg, tmp_path / "crash"), tmp_path / "crash" / "checkpoints", ENV)
    assert not (tmp_path / "crash" / "results.json").exists()
    done = subprocess.run(_train_cmd(cfg, tmp_path / "crash"), check=True, env=ENV, capture_output=True, text=True)
    assert "resumed from step" in done.stdout
    n1, w1 = _final_weights(tmp_path / "clean")
    n2, w2 = _final_weights(tmp_path / "crash")
    assert n1 == n2 and w1.keys() == w2.keys()
    for k in w1:  # bit for bit
        assert torch.equal(w2[k], w1[k]), k


def test_corrupt_latest_checkpoint_falls_back(data, tmp_path):
    from adapterkit.engine.checkpoint import CheckpointManager

    cfg = _write_cfg(tmp_path, data, epochs=1)
    subprocess.run(_train_cmd(cfg, tmp_path / "run"), check=True, env=ENV, capture_output=True)
    ckpts = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))
    assert len(ckpts) == 2  # keep_last
    f = ckpts[-1] / "adapter_model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    f.write_bytes(bytes(raw))
    with pytest.warns(RuntimeWarning, match=ckpts[-1].name):
        path, _ = CheckpointManager(tmp_path / "run").latest_valid()
    assert path == ckpts[-2]
    f.write_bytes(bytes(raw[: len(raw) // 3]))  # truncated
    with pytest.warns(RuntimeWarning):
        assert CheckpointManager(tmp_path / "run").latest_valid()[0] == ckpts[-2]


def test_nonfinite_loss_stops_with_step_and_task(data, tmp_path):
    from adapterkit.train.trainer import Trainer, TrainingError

    tr = Trainer(load_config(yaml.safe_load(_write_cfg(tmp_path, data).read_text())), tmp_path / "run")
    with torch.no_grad():
        tr.model.visual.feat_embedding[0].weight.fill_(float("nan"))
    with pytest.raises(TrainingError, match=r"loss is nan at step 1 \(task '(vqa|gqa|nlvr|caption)'\)"):
        tr.fit()


def test_readonly_output_is_refused_before_training(data, tmp_path, monkeypatch):
    import errno

    from adapterkit.train.trainer import Trainer

    real_open = os.open

    def fake_open(path, flags, *a, **k):
        if "probe" in str(path):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", fake_open)
    with pytest.raises(adapterkit.CheckpointError, match="read-only"):
        Trainer(load_config(yaml.safe_load(_write_cfg(tmp_path, data).read_text())), tmp_path / "ro")


def test_two_process_ddp_matches_one_process_with_double_batch(data, tmp_path):
    one = _write_cfg(tmp_path, data, batch_size=4, epochs=1, checkpoint_every=100)
    two_dir = tmp_path / "two"
    two_dir.mkdir()
    two = _write_cfg(two_dir, data, batch_size=2, epochs=1, checkpoint_every=100)
    for p in (one, two):  # no dropout: the ranks' RNG streams must not matter
        c = yaml.safe_load(p.read_text())
        c["preset"] = "single_adapter"
        p.write_text(yaml.safe_dump(c))
    subprocess.run(_train_cmd(one, tmp_path / "out1"), check=True, env=ENV, capture_output=True)
    r = subprocess.run(torchrun("-m", "adapterkit.cli", "train", str(two), "--output", str(tmp_path / "out2")),
                       env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]

    def losses(d):
        rows = (d / "train_log.csv").read_text().splitlines()[1:]
        return [(r.split(",")[2], float(r.split(",")[3])) for r in rows]

    l1, l2 = losses(tmp_path / "out1"), losses(tmp_path / "out2")
    assert [t for t, _ in l1] == [t for t, _ in l2]
    for (_, a), (_, b) in zip(l1, l2):
        assert abs(a - b) < 2e-3 * max(1.0, abs(a))


# --- property-based config validation -------------------------------------------------------

KEYS = ["model", "preset", "adapters", "data", "train", "eval", "name", "trian", "dataa", 3, None]
SUB = ["backbone", "feat_dim", "n_images", "root", "features", "tasks", "epochs", "batch_size", "lr", "seed",
       "warmup_ratio", "grad_clip", "max_steps", "task_batch_scale", "select_on", "caption_beams", "methd",
       "method", "reduction_factor", "sharing", "r", "alpha", "dropout"]
leaf = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True, allow_infinity=True),
                 st.text(max_size=8), st.sampled_from(["single_adapter", "houlsby", "lora", "shared", "per_task",
                                                       "vqa", "val", "tiny-bart"]))
values = st.recursive(leaf, lambda ch: st.one_of(st.lists(ch, max_size=4),
                                                  st.dictionaries(st.sampled_from(SUB), ch, max_size=5)),
                      max_leaves=12)
configs = st.dictionaries(st.sampled_from(KEYS), values, max_size=6)


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(configs)
def test_random_malformed_run_configs_get_our_error(cfg):
    try:
        load_config(cfg)
    except adapterkit.ConfigError as e:
        assert str(e)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.dictionaries(st.sampled_from(SUB + ["tasks", "positions", "targets", "init", "activation"]), values,
                       max_size=6))
def test_random_method_configs_get_our_error(d):
    try:
        config_from_dict(d)
    except adapterkit.ConfigError as e:
        assert str(e)


# --- the log, temp files, divergence, --max-steps ---------------------------------------------

def _tiny(data, **train):
    from reliability_helpers import tiny_config

    return load_config(tiny_config(data, **train))


def _steps_in_log(out: Path) -> list[int]:
    rows = (out / "train_log.csv").read_text().splitlines()
    assert rows[0] == "step,epoch,task,loss,lr"
    return [int(r.split(",")[0]) for r in rows[1:]]


def _crash_at(monkeypatch, step_no: int):
    """Make the step that would become ``step_no`` raise (after the ones before it were logged)."""
    from adapterkit.train.trainer import Trainer

    real = Trainer.train_step

    def step(self, *a, **k):
        if self.state["step"] + 1 == step_no:
            raise RuntimeError("simulated crash")
        return real(self, *a, **k)

    monkeypatch.setattr(Trainer, "train_step", step)
    return real


def test_log_rows_after_the_checkpoint_are_not_duplicated_on_resume(data, tmp_path, monkeypatch):
    from adapterkit.train.trainer import Trainer

    out = tmp_path / "run"
    real = _crash_at(monkeypatch, 6)  # checkpoint at step 4, step 5 logged, crash in step 6
    with pytest.raises(RuntimeError, match="simulated crash"):
        Trainer(_tiny(data, checkpoint_every=4), out).fit()
    assert _steps_in_log(out) == [1, 2, 3, 4, 5]
    monkeypatch.setattr(Trainer, "train_step", real)
    tr = Trainer(_tiny(data, checkpoint_every=4), out)
    tr.fit()
    assert _steps_in_log(out) == list(range(1, tr.state["step"] + 1))


def test_a_symlink_at_train_log_is_not_followed(data, tmp_path):
    from adapterkit.train.trainer import Trainer

    outside = tmp_path / "precious.txt"
    outside.write_text("keep me\n")
    out = tmp_path / "run"
    out.mkdir()
    (out / "train_log.csv").symlink_to(outside)
    tr = Trainer(_tiny(data, max_steps=2), out)
    with pytest.raises(adapterkit.CheckpointError, match=r"train_log\.csv is a symbolic link"):
        tr.fit()
    assert outside.read_text() == "keep me\n"
    assert not list((out / "checkpoints").glob("step-*"))  # refused before training


def test_checkpoint_left_under_old_name_by_a_kill_is_resumed(data, tmp_path, capsys):
    from adapterkit.train.trainer import Trainer

    out = tmp_path / "run"
    Trainer(_tiny(data, max_steps=4, keep_last=1), out).fit()
    ckpt = out / "checkpoints" / "step-000004"
    ckpt.rename(out / "checkpoints" / ".step-000004.old-0123456789ab")  # killed between the two renames
    capsys.readouterr()
    tr = Trainer(_tiny(data, max_steps=4, keep_last=1), out)
    tr.fit()
    assert "resumed from step 4" in capsys.readouterr().out
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000004"]


def test_no_temp_leftovers_after_a_finished_run_and_keep_last(data, tmp_path):
    from adapterkit.train.trainer import Trainer

    out = tmp_path / "run"
    (out / "checkpoints" / ".step-000002.tmp-0123456789ab").mkdir(parents=True)  # a kill mid-save
    (out / ".results.json.0123456789ab.tmp").write_text("{")
    (out / ".best.tmp-0123456789ab").mkdir()
    (out / "final").mkdir()
    (out / "final" / ".trainable.safetensors.0123456789ab.tmp").write_bytes(b"x")
    Trainer(_tiny(data, max_steps=7, checkpoint_every=2, keep_last=2), out).fit()
    left = [str(p.relative_to(out)) for p in out.rglob("*") if ".tmp" in p.name or ".old-" in p.name]
    assert left == []
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000006", "step-000007"]
    assert not (out / "train.lock").exists()


@pytest.mark.parametrize("bad", [-5, 0])
def test_max_steps_must_be_positive(data, tmp_path, capsys, bad):
    from adapterkit.cli import main
    from adapterkit.train.trainer import Trainer

    with pytest.raises(adapterkit.ConfigError, match=rf"max_steps must be a positive integer, got {bad}"):
        Trainer(_tiny(data), tmp_path / "run", max_steps=bad)
    cfg = _write_cfg(tmp_path, data)
    with pytest.raises(SystemExit) as exit_:
        main(["train", str(cfg), "--output", str(tmp_path / "cli"), "--max-steps", str(bad)])
    assert exit_.value.code == 2
    assert f"--max-steps: must be a positive integer, got {bad}" in capsys.readouterr().err
    assert not (tmp_path / "cli").exists()


def _poison(monkeypatch, step_no: int, what: str):
    """Make a trainable weight infinite at the end of step ``step_no`` (the loss stays finite
    until the next forward), or make the frozen-side input NaN before step ``step_no`` (its loss is NaN)."""
    from adapterkit.train.trainer import Trainer

    real = Trainer.train_step

    def step(self, *a, **k):
        now = self.state["step"] + 1 == step_no
        if now and what == "loss":
            with torch.no_grad():
                self.model.visual.feat_embedding[0].weight.fill_(float("nan"))
        loss = real(self, *a, **k)
        if now and what == "weights":
            with torch.no_grad():
                next(iter(self.named_trainable.values())).view(-1)[0] = float("inf")
        return loss

    monkeypatch.setattr(Trainer, "train_step", step)


def test_divergence_message_says_exactly_what_was_kept(data, tmp_path, monkeypatch):
    from adapterkit.train.trainer import Trainer, TrainingError

    _poison(monkeypatch, 5, "loss")  # checkpoints at 2 and 4 hold finite weights, step 5's loss is NaN
    tr = Trainer(_tiny(data, checkpoint_every=2), tmp_path / "run")
    with pytest.raises(TrainingError) as err:
        tr.fit()
    msg = str(err.value)
    assert "loss is nan at step 5 (task" in msg
    assert "kept: checkpoint step 4" in msg and "step-000004" in msg and "largest |weight|" in msg

    tr = Trainer(_tiny(data, checkpoint_every=2), tmp_path / "none")
    with torch.no_grad():
        tr.model.visual.feat_embedding[0].weight.fill_(float("nan"))
    with pytest.raises(TrainingError, match=r"loss is nan at step 1 .*no checkpoint was written"):
        tr.fit()


def test_nonfinite_weights_are_never_checkpointed(data, tmp_path, monkeypatch):
    from adapterkit.train.trainer import Trainer, TrainingError

    _poison(monkeypatch, 4, "weights")  # the step-4 checkpoint would hold an inf weight
    out = tmp_path / "run"
    with pytest.raises(TrainingError) as err:
        Trainer(_tiny(data, checkpoint_every=2), out).fit()
    msg = str(err.value)
    assert "not finite" in msg and "step 4" in msg and "no checkpoint was written for step 4" in msg
    assert "kept: checkpoint step 2" in msg
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]
