"""SIGTERM / SIGINT during training: the current step finishes, a checkpoint is written
atomically, the run stops with a message (exit 143 / 130), and a rerun ends with the
uninterrupted run's weights, bit for bit."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from reliability_helpers import (
    ENV,
    assert_bit_identical,
    latest_weights,
    tiny_config,
    train_cmd,
    write_config,
)

from adapterkit.testing.fixtures import make_vl_fixture
from adapterkit.train.config import load_config
from adapterkit.train.trainer import Trainer, TrainingInterrupted


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_vl_fixture(tmp_path_factory.mktemp("sig") / "data", n_images=20)


CFG = {"checkpoint_every": 4, "keep_last": 2}


@pytest.fixture(scope="module")
def clean(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sig") / "clean"
    Trainer(load_config(tiny_config(data, **CFG)), out).fit()
    return latest_weights(out)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_finishes_the_step_checkpoints_and_resumes_bit_identical(data, clean, tmp_path, monkeypatch,
                                                                        signum):
    out = tmp_path / "run"
    real_step = Trainer.train_step
    before = signal.getsignal(signum)

    def step_then_signal(self, *a, **k):
        loss = real_step(self, *a, **k)
        if self.state["step"] == 2:  # during step 3
            if signal.getsignal(signum) in (signal.SIG_DFL, signal.default_int_handler):
                pytest.fail(f"{signal.Signals(signum).name} is not handled during training")
            os.kill(os.getpid(), signum)
        return loss

    monkeypatch.setattr(Trainer, "train_step", step_then_signal)
    with pytest.raises(TrainingInterrupted) as err:
        Trainer(load_config(tiny_config(data, **CFG)), out).fit()
    name = signal.Signals(signum).name
    assert err.value.exit_code == 128 + signum
    assert f"stopped by {name} after step 3" in str(err.value)
    assert "step-000003" in str(err.value) and "rerun" in str(err.value)
    assert signal.getsignal(signum) == before  # handlers restored
    assert (out / "checkpoints" / "step-000003" / "manifest.json").exists()
    assert not (out / "results.json").exists()
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    monkeypatch.setattr(Trainer, "train_step", real_step)

    again = Trainer(load_config(tiny_config(data, **CFG)), out)
    again.fit()
    name_c, w_clean = clean
    name_r, w_run = latest_weights(out)
    assert name_r == name_c
    assert_bit_identical(w_run, w_clean)
    rows = (out / "train_log.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, again.state["step"] + 1))


@pytest.mark.slow
def test_sigterm_to_the_cli_mid_run_then_rerun_is_bit_identical(data, tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", tiny_config(data, epochs=2, **CFG))
    subprocess.run(train_cmd(cfg, tmp_path / "clean"), check=True, env=ENV, capture_output=True)
    proc = subprocess.Popen(train_cmd(cfg, tmp_path / "run"), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if list((tmp_path / "run" / "checkpoints").glob("step-*")):
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "stopped by SIGTERM after step" in err and "rerun the same command to resume" in err
    assert not (tmp_path / "run" / "results.json").exists()
    done = subprocess.run(train_cmd(cfg, tmp_path / "run"), env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from step" in done.stdout
    n1, w1 = latest_weights(tmp_path / "clean")
    n2, w2 = latest_weights(tmp_path / "run")
    assert n1 == n2
    assert_bit_identical(w2, w1)
