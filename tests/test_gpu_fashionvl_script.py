"""scripts/gpu_fashionvl.sh (the FashionVL compare on a lent GPU): valid bash, every compare flag
it passes exists, and its `run` stage, on this CPU at the tiny scale, runs the compare under its
deadline loop and packs every run's record into OUT/runs.tar.gz."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_fashionvl.sh"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")


def test_script_is_valid_bash():
    r = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_every_compare_flag_exists():
    from adapterkit.cli import build_parser

    text = SCRIPT.read_text().replace("\\\n", " ")
    cmds = [m.group(1) for m in re.finditer(r"-m adapterkit compare(.*?)(?=>|$)", text, re.M)]
    assert len(cmds) == 2  # the smoke run and the compare
    helps = build_parser()._subparsers._group_actions[0].choices["compare"].format_help()
    for flag in set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", " ".join(cmds))):
        assert re.search(rf"{re.escape(flag)}\b", helps), f"compare has no {flag}"


def test_run_stage_packs_the_runs(tmp_path):
    from adapterkit.vl.datasets.fashionvl import _source_dir

    if not (_source_dir(None) / "t10k-labels-idx1-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST is not installed")
    env = {**os.environ, "OUT": str(tmp_path / "out"), "SCALE": "tiny", "DATA": str(tmp_path / "fvl"),
           "PRESETS": "full_finetune,single_adapter", "SEEDS": "1", "JOBS": "2", "STEPS": "6",
           "RUNS": str(tmp_path / "runs" / "fv"), "DEADLINE_S": "300", "PY": "python"}
    r = subprocess.run(["bash", str(SCRIPT), "run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "compare rc 0; 2/2 runs" in r.stdout
    with tarfile.open(tmp_path / "out" / "runs.tar.gz") as tf:
        names = set(tf.getnames())
        assert {"fv/full_finetune/seed0/run.json", "fv/single_adapter/seed0/run.json", "fv/compare.json"} <= names
        run = json.load(tf.extractfile("fv/single_adapter/seed0/run.json"))
    assert run["steps"] == 6 and run["preset"] == "single_adapter"
    assert (tmp_path / "out" / "compare.log").exists()
