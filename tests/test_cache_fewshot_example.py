"""examples/cache_clip_fewshot.py: the verdicts and the whole pipeline on tiny random features."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ex():
    spec = importlib.util.spec_from_file_location(
        "cache_clip_fewshot", REPO / "examples" / "cache_clip_fewshot.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_verdict_needs_the_interval_clear_of_zero_not_float_noise(ex):
    assert ex.verdict(0.5, 2.0) == "holds"
    assert ex.verdict(-2.0, -0.5) == "reversed"
    assert ex.verdict(-0.5, 2.0) == "not shown"
    # a tie on every seed: a zero-width interval a rounding step off 0 is a tie, not a gain or a loss
    tie = (100 / 3 + 100 / 7) - 100 / 3 - 100 / 7
    assert ex.verdict(1e-14, 1e-14) == ex.verdict(tie, tie) == ex.verdict(-1e-14, -1e-14) == "not shown"
    assert ex.verdict(None, None) == "not shown"


class _StubText:
    """encode_text: a fixed random unit vector per class word, so class names carry signal."""

    def __init__(self, classes, dim, centres):
        self.classes, self.dim, self.centres = classes, dim, centres

    def encode_text(self, texts):
        out = []
        for t in texts:
            hit = [i for i, c in enumerate(self.classes) if c in t]
            seed = int(hashlib.sha1(t.encode()).hexdigest()[:8], 16)
            noise = torch.randn(self.dim, generator=torch.Generator().manual_seed(seed)) * 0.3
            base = self.centres[hit[0]] if hit else torch.zeros(self.dim)
            out.append(base + noise)
        return F.normalize(torch.stack(out), dim=-1)


def _tiny_data(c=3, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(c, d, generator=g), dim=-1)

    def split(n):
        y = torch.arange(c).repeat_interleave(n)
        return F.normalize(centres[y] + 0.5 * torch.randn(len(y), d, generator=g), dim=-1), y

    classes = ["alpha", "beta", "gamma"][:c]
    tr, va, te = split(6), split(4), split(8)
    data = {
        "name": "tiny",
        "classes": classes,
        "templates": ("{}.", "a picture of {}."),
        "neg_templates": ("no {}.",),
        "train": tr,
        "val": va,
        "test": te,
        "captions": tr[0].clone(),
        "caption_source": "image keys",
        "sus_pool": split(6),
        "sus_pool_note": "tiny pool",
    }
    return _StubText(classes, d, centres), data


def test_pipeline_end_to_end_on_tiny_features(ex, monkeypatch, tmp_path):
    small = {
        "tip": {"beta": (0.5, 5.0, 3), "alpha": (0.5, 2.0, 2)},
        "tip-f": {"beta": (0.5, 5.0, 3), "alpha": (0.5, 2.0, 2)},
        "tipx": {"alpha": (0.5, 5.0, 2), "beta": (1.0, 10.0, 2), "gamma": (0.1, 1.0, 2)},
        "caps": {"alpha": (0.5, 5.0, 2), "beta": (1.0, 10.0, 2), "gamma": (0.1, 1.0, 2), "delta": [0.0, 0.5]},
        "dual": {"beta": (0.0, 2.0, 2), "alpha": (0.0, 2.0, 2), "lam": (0.6, 0.9, 2)},
    }
    monkeypatch.setattr(ex, "GRIDS", small)
    model, data = _tiny_data()
    shots, seeds = [1, 2], [0, 1]
    res = ex.summarise(ex.run_dataset(model, data, shots, seeds), shots)
    zs = res["zero_shot"]
    assert zs["chance_acc"] == pytest.approx(100 / 3)
    lo, hi = zs["test_acc_bootstrap95"]
    assert lo <= zs["test_acc"] <= hi
    methods = {r["method"] for r in res["runs"]}
    assert methods == {
        "linear-probe",
        *ex.CACHE_METHODS,
        *ex.ABLATIONS,
        "sus-x:tipx",
        "sus-x:tip",
        "sus-x:tip-wide",
    }
    assert len(res["runs"]) == len(shots) * len(seeds) * (len(methods))
    for m in methods:
        for k in shots:
            e = res["table"][m][str(k)]
            assert e["n_seeds"] == 2 and e["low"] <= e["mean"] <= e["high"]
            # the "improves on zero-shot" claim is decided on the paired difference by seed
            dz = res["paired"][f"{m} - zero-shot"][str(k)]
            assert dz["mean"] == pytest.approx(e["mean"] - zs["test_acc"])
    claims = ex.claims(res, shots)
    assert any("tip improves on zero-shot" in c for c in claims)
    assert all(("holds at" in c) or ("falls below zero-shot" in c) for c in claims)
    md = ex.markdown(
        {"tiny": res},
        shots,
        {"command": "x", "model": "stub", "heads": "linear", "seeds": seeds, "date": "today"},
    )
    assert "| tip-f |" in md and "tip-f - tip" in md and "tipx - tip-wide" in md
    assert "| majority class |" in md and "| chance |" in md and "test n = 24" in md
    json.dumps(res)  # JSON-ready
    ex.plot({"tiny": res}, shots, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0


def test_claim_on_a_tie_is_not_shown(ex):
    res = {
        "zero_shot": {"test_acc": 50.0},
        "table": {},
        "paired": {"tip - zero-shot": {"1": {"mean": 0.0, "low": 1e-13, "high": 1e-13}}},
    }
    (line,) = ex.claims(res, [1])
    assert "holds at no K" in line and "reversed" not in line
    assert np.isfinite(ex.TIE_TOL)
