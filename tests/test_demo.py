"""The flagship demo end to end: tiny mode in CI; the real SmolLM2 run is marked slow."""

import json
import subprocess
import sys

import pytest

from adapterkit.vl.benchmark import pareto


def test_demo_tiny_mode_end_to_end(tmp_path):
    out = subprocess.run([sys.executable, "-m", "adapterkit", "demo", "--scale", "tiny", "--out", str(tmp_path / "run"),
                          "--data", str(tmp_path / "fvl")], capture_output=True, text=True,
                         env={**__import__("os").environ, "ADAPTERKIT_NO_PROGRESS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "majority" in out.stdout and "average" in out.stdout
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(res["test"]) == {"vqa", "gqa", "nlvr", "caption"}
    assert set(res["majority_baseline"]) == {"vqa", "gqa", "nlvr", "caption"}
    assert res["fashionvl_stats"]["tasks"]["vqa"]["test"]["examples"] > 0
    assert (tmp_path / "run" / "demo.png").stat().st_size > 1000
    assert (tmp_path / "run" / "single_adapter" / "final" / "adapter_model.safetensors").exists()


def test_pareto_front():
    pts = [(100.0, 70.0), (4.0, 69.0), (5.0, 60.0), (2.0, 50.0), (10.0, 71.0)]
    # (100, 70) is dominated by (10, 71); (5, 60) by (4, 69)
    assert sorted(pareto(pts)) == [1, 3, 4]


@pytest.mark.slow
def test_demo_with_smollm2_few_steps(tmp_path):
    out = subprocess.run([sys.executable, "-m", "adapterkit", "demo", "--steps", "4", "--out", str(tmp_path / "run")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert 3.5 < res["percent"] < 5.0  # one shared adapter: about 4% of SmolLM2-VL
