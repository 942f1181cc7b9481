"""One training run per output directory: a second trainer refuses at once naming the
holder; a lock left by a dead process is reported and cleared; the lock is released on
every exit path."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from reliability_helpers import ENV, tiny_config, train_cmd, write_config

from adapterkit.errors import CheckpointError
from adapterkit.testing.fixtures import make_vl_fixture
from adapterkit.train.config import load_config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_vl_fixture(tmp_path_factory.mktemp("lock") / "data", n_images=20)


def _wait_for(pred, timeout=90.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_second_trainer_on_one_output_refuses_naming_the_holder(data, tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", tiny_config(data, epochs=200, checkpoint_every=1000))
    out = tmp_path / "run"
    first = subprocess.Popen(train_cmd(cfg, out), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert _wait_for(lambda: (out / "train_log.csv").exists() or first.poll() is not None)
        assert first.poll() is None, first.communicate()[1][-2000:]
        t0 = time.time()
        second = subprocess.run(train_cmd(cfg, out), env=ENV, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr[-2000:]
        msg = second.stderr
        assert f"pid {first.pid}" in msg and socket.gethostname() in msg and "started" in msg
        assert "train.lock" in msg
        assert time.time() - t0 < 60
        assert first.poll() is None  # the first run is untouched and still training
    finally:
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=120)
    assert first.returncode == 143, err[-2000:]
    assert "stopped by SIGTERM" in err
    assert not (out / "train.lock").exists()


def _holder_script(out) -> str:
    return (f"import sys, time; from adapterkit.engine.lock import RunLock; lock = RunLock({str(out)!r}).acquire(); "
            "print('locked', flush=True); sys.stdin.read()")


def test_trainer_refuses_a_locked_output_before_any_work(data, tmp_path):
    from adapterkit.train.trainer import Trainer

    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _holder_script(out)], env=ENV, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        tr = Trainer(load_config(tiny_config(data, max_steps=2)), out)
        with pytest.raises(CheckpointError, match=rf"in use by another training run: pid {holder.pid} on "
                                                  rf"{socket.gethostname()}, started .*fuser"):
            tr.fit()
        assert not list((out / "checkpoints").glob("step-*"))
        assert not (out / "train_log.csv").exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    # the holder has exited: the OS released its lock, a run proceeds
    tr.fit()
    assert tr.state["step"] == 2 and not (out / "train.lock").exists()


def test_stale_lock_of_a_dead_process_is_reported_and_cleared(data, tmp_path, capsys):
    from adapterkit.train.trainer import Trainer

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "run"
    out.mkdir()
    (out / "train.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                                "started": "2026-01-01T00:00:00Z", "command": "adapterkit train"}))
    tr = Trainer(load_config(tiny_config(data, max_steps=2)), out)
    tr.fit()
    err = capsys.readouterr().err
    assert f"cleared a stale lock left by pid {dead.pid}" in err and "no longer running" in err
    assert not (out / "train.lock").exists()


def test_lock_is_released_when_training_fails(data, tmp_path, monkeypatch):
    from adapterkit.engine.lock import RunLock
    from adapterkit.train.trainer import Trainer

    out = tmp_path / "run"

    def boom(self, *a, **k):
        raise RuntimeError("boom")

    tr = Trainer(load_config(tiny_config(data, max_steps=2)), out)
    monkeypatch.setattr(Trainer, "train_step", boom)
    with pytest.raises(RuntimeError, match="boom"):
        tr.fit()
    # another process can take it now
    holder = subprocess.Popen([sys.executable, "-c", _holder_script(out)], env=ENV, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(CheckpointError, match=f"pid {holder.pid}"):
            RunLock(out).acquire()
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)


def test_lock_is_reentrant_in_one_process(tmp_path):
    from adapterkit.engine.lock import RunLock

    with RunLock(tmp_path) as a:
        with RunLock(tmp_path) as b:  # the CLI takes it, then Trainer.fit takes it again
            assert b.held and a.held
        assert a.held and (tmp_path / "train.lock").exists()
        info = json.loads((tmp_path / "train.lock").read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
    assert not (tmp_path / "train.lock").exists()


def test_a_run_that_fails_before_writing_leaves_no_empty_output(tmp_path):
    from adapterkit.engine.lock import LOCK_NAME, RunLock

    out = tmp_path / "new" / "run"
    with pytest.raises(RuntimeError):
        with RunLock(out):
            assert out.is_dir() and (out / LOCK_NAME).exists()
            raise RuntimeError("config rejected")
    assert not out.exists() and not (tmp_path / "new").exists()  # both folders it made are gone
    with RunLock(out):
        (out / "log.txt").write_text("step 1\n")
    assert (out / "log.txt").read_text() == "step 1\n"  # anything written stays
    existing = tmp_path / "existing"
    existing.mkdir()
    with RunLock(existing):
        pass
    assert existing.is_dir()  # a folder the user made is never removed
