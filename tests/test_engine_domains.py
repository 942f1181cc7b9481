"""Every pipeline runs on the one engine through `adapterkit train CONFIG` (the config's
`domain:`): a run killed with SIGKILL and rerun ends bit-identical to an uninterrupted one,
and 2 processes (torchrun, gloo) train as 1 process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
import wave

import numpy as np
import pytest
import torch
import yaml
from reliability_helpers import kill_after_checkpoints, torchrun

ENV = {**os.environ, "ADAPTERKIT_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
TINY_VIT = {"image_size": 16, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
            "intermediate_size": 64}
TINY_AST = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
            "num_mel_bins": 32, "max_length": 40, "patch_size": 16, "frequency_stride": 16, "time_stride": 16}


def _images(root):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 4)):
        for c, name in enumerate(["dark", "light"]):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                a = rng.integers(0, 80, (12, 12, 3)) + 150 * c
                Image.fromarray(a.astype(np.uint8)).save(d / f"{i}.png")


def _tones(root, sr=16000):
    rng = np.random.default_rng(0)
    for lab, f0 in (("low", 300.0), ("high", 2500.0)):
        (root / lab).mkdir(parents=True)
        for i in range(3):
            t = np.arange(int(0.4 * sr)) / sr
            x = 0.5 * np.sin(2 * np.pi * f0 * t) + 0.01 * rng.standard_normal(len(t))
            with wave.open(str(root / lab / f"{i}.wav"), "wb") as w:
                w.setnchannels(1)
                w.setsampwidth(2)
                w.setframerate(sr)
                w.writeframes((np.clip(x, -1, 1) * 32767).astype(np.int16).tobytes())


def _config(domain, tmp_path, batch_size=8, epochs=3):
    train = {"epochs": epochs, "batch_size": batch_size, "optimizer": "adamw", "lr": 3e-3, "warmup_epochs": 0.0,
             "checkpoint_every": 2, "val_fraction": 0.25, "seed": 3}
    if domain == "vision":
        if not (tmp_path / "img").exists():
            _images(tmp_path / "img")
        return {"domain": "vision", "data": {"source": "image_folder", "train_dir": str(tmp_path / "img/train"),
                                             "test_dir": str(tmp_path / "img/test")},
                "model": {"backbone": "vit", "vit": TINY_VIT}, "method": "lora", "adapter": {"r": 4, "dropout": 0.0},
                "train": train}
    if not (tmp_path / "wav").exists():
        _tones(tmp_path / "wav")
    return {"domain": "audio", "data": {"source": "folder", "root": str(tmp_path / "wav"), "clip_seconds": 0.4,
                                        "train_copies": 4, "test_copies": 1},
            "model": {"backbone": "ast", "ast": TINY_AST}, "method": "lora", "adapter": {"reduction_rate": 8},
            "train": train}


def _cmd(cfg_path, out):
    return [sys.executable, "-m", "adapterkit.cli", "train", str(cfg_path), "--output", str(out)]


@pytest.mark.parametrize("domain", ["vision", "audio"])
def test_sigkill_then_rerun_is_bit_identical(tmp_path, domain):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(_config(domain, tmp_path)))
    r = subprocess.run(_cmd(p, tmp_path / "clean"), env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    scratch = tmp_path / "scratch"  # the killed run's TMPDIR: a run given --output needs no temporary folder
    scratch.mkdir()
    kill_after_checkpoints(_cmd(p, tmp_path / "crash"), tmp_path / "crash" / "checkpoints",
                           {**ENV, "TMPDIR": str(scratch)})
    assert not list(scratch.glob("adapterkit-run-*"))  # a SIGKILL skips cleanup: none may have been made
    done = subprocess.run(_cmd(p, tmp_path / "crash"), env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from step" in done.stdout
    from adapterkit.engine.engine import read_trained

    a = read_trained(tmp_path / "clean" / "final")
    b = read_trained(tmp_path / "crash" / "final")
    assert a.keys() == b.keys() and any("adapterkit" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # validation selection: the tested weights are the best epoch's on the held-out quarter
    import json

    res = json.loads((tmp_path / "crash" / "results.json").read_text())["results"]
    assert res["n_val"] > 0 and res["checkpoint"].startswith(("best", "last"))


# (the vision head's BatchNorm normalises each process's rows, as DDP does without SyncBatchNorm
# (CUDA only), so a vision run on 2 CPU processes is not the 1-process run; its audio twin is)
@pytest.mark.parametrize("domain", ["audio"])
def test_two_processes_match_one(tmp_path, domain):
    one, two = tmp_path / "one.yaml", tmp_path / "two.yaml"
    one.write_text(yaml.safe_dump(_config(domain, tmp_path, batch_size=8, epochs=2)))
    two.write_text(yaml.safe_dump(_config(domain, tmp_path, batch_size=4, epochs=2)))
    r = subprocess.run(_cmd(one, tmp_path / "o1"), env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run(torchrun("-m", "adapterkit.cli", "train", str(two), "--output", str(tmp_path / "o2")),
                       env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]

    def losses(d):
        return [float(r.split(",")[3]) for r in (d / "train_log.csv").read_text().splitlines()[1:]]

    l1, l2 = losses(tmp_path / "o1"), losses(tmp_path / "o2")
    assert len(l1) == len(l2) > 3
    for a, b in zip(l1, l2):
        assert abs(a - b) < 1e-4 * max(1.0, abs(a))


def test_versions_name_the_processor_and_threads(monkeypatch, tmp_path):
    """Runs record what their last bits depend on: the CPU's model name from /proc/cpuinfo (not
    platform.processor(), empty on Linux) with torch's vector ISA, and the thread count."""
    import builtins

    import torch

    from adapterkit.engine import engine as E

    cap = torch.backends.cpu.get_cpu_capability()
    fake = tmp_path / "cpuinfo"
    fake.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Test CPU @ 2.0GHz\n")
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: real_open(fake if f == "/proc/cpuinfo" else f, *a, **k))
    assert E.cpu_name() == f"Intel(R) Xeon(R) Test CPU @ 2.0GHz ({cap})"
    fake.write_text("processor\t: 0\n")  # no model name: the platform's word, never empty
    assert E.cpu_name().endswith(f"({cap})") and len(E.cpu_name()) > len(cap) + 3
    v = E.versions()
    assert v["threads"] == torch.get_num_threads()
    if not torch.cuda.is_available():
        assert v["device"] == E.cpu_name()
