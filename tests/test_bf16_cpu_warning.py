"""train.bf16 on a CPU without native bf16 (no AVX-512 BF16, no AMX) warns once at build time:
torch emulates bf16 there, and a run is many times slower than in fp32."""

from __future__ import annotations

import warnings

import pytest
from reliability_helpers import tiny_config

from adapterkit.engine import engine
from adapterkit.errors import AdapterKitWarning
from adapterkit.testing.fixtures import make_vl_fixture
from adapterkit.train.config import load_config
from adapterkit.train.trainer import Trainer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_vl_fixture(tmp_path_factory.mktemp("bf16") / "data", n_images=20)


def test_native_bf16_probe_is_a_bool():
    assert isinstance(engine.cpu_has_native_bf16(), bool)


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_an_emulating_cpu_warns(data, tmp_path, monkeypatch, native):
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: native)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        Trainer(load_config(tiny_config(data, max_steps=1, bf16=True)), tmp_path / "run")
        Trainer(load_config(tiny_config(data, max_steps=1)), tmp_path / "fp32")
    msgs = [str(w.message) for w in seen if issubclass(w.category, AdapterKitWarning) and "bf16" in str(w.message)]
    if native:
        assert msgs == []
    else:
        assert len(msgs) == 1 and "without native bf16" in msgs[0] and "leave bf16 off" in msgs[0]
