"""Shared pieces of the reliability tests: a tiny 4-task run config and the CLI command."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import torch
import yaml

ENV = {**os.environ, "ADAPTERKIT_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def tiny_config(root: Path, preset: str = "single_lora", **train) -> dict:
    """A run on the tiny VL fixture: tiny-bart, 4 tasks, batches of 4 (a few seconds per epoch)."""
    t = {"epochs": 1, "batch_size": 4, "task_batch_scale": {"vqa": 1, "gqa": 1, "nlvr": 1, "caption": 1},
         "checkpoint_every": 2, "keep_last": 2, "max_text_len": 12, "max_target_len": 6, "lr": 5e-3, "seed": 1}
    t.update(train)
    return {"model": {"backbone": "tiny-bart", "feat_dim": 16}, "preset": preset,
            "data": {"root": str(root), "features": str(Path(root) / "features")}, "train": t,
            "eval": {"batch_size": 16, "max_new_tokens": 2, "caption_max_new_tokens": 3, "caption_beams": 1,
                     "select_on": "last"}}


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def train_cmd(cfg_path: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "adapterkit.cli", "train", str(cfg_path), "--output", str(out), *extra]


def latest_weights(out: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """(name, adapter tensors) of the newest checkpoint directory of a run."""
    from safetensors.torch import load_file

    ckpts = sorted((Path(out) / "checkpoints").glob("step-*"))
    return ckpts[-1].name, load_file(ckpts[-1] / "adapter_model.safetensors")


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def snapshot(out: Path) -> dict[str, tuple[int, int]]:
    """Every file under a run directory with its size and mtime (the run lock excluded)."""
    return {str(p.relative_to(out)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(Path(out).rglob("*")) if p.is_file() and p.name != "train.lock"}


def kill_after_checkpoints(cmd: list[str], ckpt_dir: Path, env: dict, n: int = 2, timeout: float = 120.0) -> None:
    """Start ``cmd`` and SIGKILL it as soon as ``ckpt_dir`` holds ``n`` step-* checkpoints, at
    whatever step it is then; fails if the run finished (or the timeout passed) first."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if len(list(Path(ckpt_dir).glob("step-*"))) >= n:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    if proc.poll() is None and time.time() >= deadline:
        proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"


def free_port() -> int:
    """A TCP port nobody listens on now (for a torchrun rendezvous; a fixed one can be taken)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, nproc: int = 2) -> list[str]:
    """``python -m torch.distributed.run --nproc_per_node N --master_port FREE ARGS...``"""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(free_port()), *args]
