"""MetaAdapter's first-order meta update: on a toy quadratic the update equals the formula
(Adam with betas (0, 0.999) written out by hand); on the tiny ASR fixture it runs, is
deterministic and its output loads into a target run through init_from."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from test_asr import _cfg, _folder  # noqa: E402

from adapterkit.audio.asr import ASRDomain, load_config  # noqa: E402
from adapterkit.audio.meta_adapter import MetaConfig, meta_step, meta_train  # noqa: E402
from adapterkit.errors import ConfigError  # noqa: E402


def test_meta_step_is_the_formula():
    torch.manual_seed(0)
    theta = torch.nn.Parameter(torch.randn(5))
    targets = [torch.randn(5) for _ in range(4)]  # language l: halves with targets 2l, 2l+1
    lr, b2, adam_eps, eps = 1e-2, 0.999, 1e-8, 0.7

    def loss(t):
        return lambda: 0.5 * ((theta - t) ** 2).sum()

    halves = [(loss(targets[0]), loss(targets[1])), (loss(targets[2]), loss(targets[3]))]
    opt = torch.optim.Adam([theta], lr=lr, betas=(0.0, b2), eps=adam_eps)
    th0 = theta.detach().clone()
    meta_step([theta], opt, halves, eps)
    # by hand: the Adam state (v, step count) carries across languages; theta is restored
    v, t, deltas = torch.zeros(5), 0, []
    for lang in range(2):
        th = th0.clone()
        for k in range(2):
            g = th - targets[2 * lang + k]
            t += 1
            v = b2 * v + (1 - b2) * g * g
            step = lr * g / ((v / (1 - b2 ** t)).sqrt() + adam_eps)
            if k == 1:
                deltas.append(-step)
            th = th - step
    want = th0 + eps * (deltas[0] + deltas[1]) / 2
    torch.testing.assert_close(theta.detach(), want, rtol=1e-5, atol=1e-7)
    assert not math.isclose(float((theta.detach() - th0).abs().sum()), 0.0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("asr_meta")
    _folder(root)
    return root


def _meta_cfg(root):
    c = _cfg(root)
    c["adapters"] = [{"method": "pfeiffer", "bottleneck_dim": 4, "sharing": "shared"}]
    return load_config(c)


def test_meta_train_runs_deterministic_and_loads(data, tmp_path):
    meta = MetaConfig(epochs=2, batch_size=4, inner_lr=1e-2, seed=3)
    s = meta_train(_meta_cfg(data), tmp_path / "a", meta)
    assert s["meta_batches"] == 4 and s["sources"] == ["en", "es"]  # 8 rows per source // 4, two epochs
    meta_train(_meta_cfg(data), tmp_path / "b", meta)
    a, b = load_file(tmp_path / "a" / "trainable.safetensors"), load_file(tmp_path / "b" / "trainable.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fresh = ASRDomain(_meta_cfg(data))
    init = {n: p for n, p in fresh.model.named_parameters() if n in a}
    assert init.keys() == a.keys() and any(not torch.equal(init[k], a[k]) for k in a)  # it moved
    rows = (tmp_path / "a" / "meta_log.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 * 2
    # a one-language target run starts from it
    c = _cfg(data)
    c["data"]["tasks"] = ["es"]
    c["adapters"] = [{"method": "pfeiffer", "bottleneck_dim": 4, "sharing": "shared"}]
    c["init_from"] = str(tmp_path / "a")
    tgt = ASRDomain(load_config(c))
    own = dict(tgt.model.named_parameters())
    assert all(torch.equal(own[k], a[k]) for k in a)


def test_meta_train_refuses_full_fine_tuning_and_large_batches(data, tmp_path):
    c = _cfg(data)
    c["adapters"] = []
    with pytest.raises(ConfigError, match="needs adapters"):
        meta_train(load_config(c), tmp_path / "x")
    with pytest.raises(ConfigError, match="batch_size 16 exceeds"):
        meta_train(_meta_cfg(data), tmp_path / "y", MetaConfig(batch_size=16))
