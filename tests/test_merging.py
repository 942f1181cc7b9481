"""Merging saved adapters: average, Hungarian-aligned average, LoRA task arithmetic / TIES / DARE."""

from __future__ import annotations

import argparse

import pytest
import torch

import adapterkit
from adapterkit.errors import ConfigError
from adapterkit.merging import merge_adapter_dirs, read_adapter_dir
from adapterkit.merging.align import align_to, permute_hidden
from adapterkit.merging.lora_merge import combine, svd_factor, trim_magnitude
from adapterkit.testing.tiny import main_output, tiny_inputs, tiny_model

HOULSBY = {"method": "houlsby", "bottleneck_dim": 8, "train_layernorms": True}


def _randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.startswith("adapterkit."):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _saved(tmp_path, name, cfg, seed):
    model = adapterkit.add_adapters(tiny_model("bert"), dict(cfg))
    _randomise(model, seed)
    adapterkit.save_adapters(model, tmp_path / name)
    return model


def _out(model):
    model.eval()
    with torch.no_grad():
        return main_output(model(**tiny_inputs("bert")))


def test_average_merge_loads_and_equals_mean(tmp_path):
    _saved(tmp_path, "a", HOULSBY, 1)
    _saved(tmp_path, "b", HOULSBY, 2)
    merge_adapter_dirs([tmp_path / "a", tmp_path / "b"], tmp_path / "m", "average")
    a, b, m = (read_adapter_dir(tmp_path / x).tensors for x in "abm")
    assert set(m) == set(a)
    for k in a:
        torch.testing.assert_close(m[k], (a[k] + b[k]) / 2)
    model = adapterkit.load_adapters(tiny_model("bert"), tmp_path / "m")
    assert _out(model).isfinite().all()
    assert "extra" in (tmp_path / "m" / "adapter_config.json").read_text()


def test_merging_identical_adapters_gives_the_same_function(tmp_path):
    ref = _saved(tmp_path, "a", HOULSBY, 3)
    merge_adapter_dirs([tmp_path / "a", tmp_path / "a"], tmp_path / "m", "aligned")
    model = adapterkit.load_adapters(tiny_model("bert"), tmp_path / "m")
    torch.testing.assert_close(_out(model), _out(ref))


def test_aligning_a_permuted_copy_recovers_it_exactly(tmp_path):
    _saved(tmp_path, "a", {**HOULSBY, "tasks": ["x", "y"], "sharing": "per_task"}, 4)
    a = read_adapter_dir(tmp_path / "a")
    perm_t = dict(a.tensors)
    g = torch.Generator().manual_seed(0)
    prefixes = {k[: -len(".down.weight")] for k in a.tensors if k.endswith(".down.weight")}
    assert prefixes
    for p in prefixes:
        perm_t = permute_hidden(perm_t, p, torch.randperm(8, generator=g))
    assert any(not torch.equal(perm_t[k], a.tensors[k]) for k in a.tensors)
    back = align_to(a.tensors, perm_t)
    for k in a.tensors:
        assert torch.equal(back[k], a.tensors[k]), k
    # a permuted adapter computes the same function, and aligned merging of it with the original is exact
    from adapterkit.merging.adapter_dir import write_adapter_dir

    write_adapter_dir(tmp_path / "p", a.adapters, perm_t, base_trainable=a.config["base_trainable"])
    m_p = adapterkit.load_adapters(tiny_model("bert"), tmp_path / "p")
    m_a = adapterkit.load_adapters(tiny_model("bert"), tmp_path / "a")
    with adapterkit.route("x"):
        torch.testing.assert_close(_out(m_p), _out(m_a))
    merge_adapter_dirs([tmp_path / "a", tmp_path / "p"], tmp_path / "m", "aligned")
    m = read_adapter_dir(tmp_path / "m").tensors
    for k in a.tensors:
        torch.testing.assert_close(m[k], a.tensors[k], rtol=0, atol=1e-7)
    plain = merge_adapter_dirs([tmp_path / "a", tmp_path / "p"], tmp_path / "avg", "average")
    assert any(not torch.allclose(read_adapter_dir(plain).tensors[k], a.tensors[k]) for k in a.tensors)


def test_merge_rejects_incompatible_adapters(tmp_path):
    _saved(tmp_path, "a", HOULSBY, 1)
    _saved(tmp_path, "b", {**HOULSBY, "bottleneck_dim": 4}, 2)
    _saved(tmp_path, "l", {"method": "lora", "r": 4}, 2)
    with pytest.raises(ConfigError, match="shape mismatch"):
        merge_adapter_dirs([tmp_path / "a", tmp_path / "b"], tmp_path / "m")
    with pytest.raises(ConfigError, match="adapter sets"):
        merge_adapter_dirs([tmp_path / "a", tmp_path / "l"], tmp_path / "m")
    with pytest.raises(ConfigError, match="LoRA adapters only"):
        merge_adapter_dirs([tmp_path / "a", tmp_path / "a"], tmp_path / "m", "ties")
    with pytest.raises(ConfigError, match="unknown merge method"):
        merge_adapter_dirs([tmp_path / "a", tmp_path / "a"], tmp_path / "m", "mean")
    assert not (tmp_path / "m").exists()


def _deltas(d):
    out = {}
    for k, v in d.tensors.items():
        if k.endswith(".A.weight"):
            p = k[: -len(".A.weight")]
            cfg = next(iter(d.adapters.values()))
            out[p] = d.tensors[f"{p}.B.weight"][0] @ v[0] * (cfg["alpha"] / cfg["r"])
    return out


def test_lora_task_arithmetic_cat_is_exact_and_svd_at_full_rank(tmp_path):
    _saved(tmp_path, "a", {"method": "lora", "r": 4}, 5)
    _saved(tmp_path, "b", {"method": "lora", "r": 2, "alpha": 4.0}, 6)
    da, db = _deltas(read_adapter_dir(tmp_path / "a")), _deltas(read_adapter_dir(tmp_path / "b"))
    merge_adapter_dirs([tmp_path / "a", tmp_path / "b"], tmp_path / "cat", "task_arithmetic", [0.7, 0.3],
                       refactor="cat")
    merge_adapter_dirs([tmp_path / "a", tmp_path / "b"], tmp_path / "svd", "task_arithmetic", [0.7, 0.3], rank=6)
    for name in ("cat", "svd"):
        m = read_adapter_dir(tmp_path / name)
        assert next(iter(m.adapters.values()))["r"] == 6
        dm = _deltas(m)
        for p in da:
            torch.testing.assert_close(dm[p], 0.7 * da[p] + 0.3 * db[p], rtol=1e-4, atol=1e-6)
        model = adapterkit.load_adapters(tiny_model("bert"), tmp_path / name)
        assert _out(model).isfinite().all()


def test_ties_and_dare_follow_peft():
    merge_utils = pytest.importorskip("peft.utils.merge_utils")
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(6, 5, generator=g) for _ in range(3)]
    w = [1.0, 0.5, 2.0]
    ours = combine(ts, w, "ties", density=0.4)
    ref = merge_utils.ties(ts, torch.tensor(w), density=0.4)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(combine(ts, w, "task_arithmetic"), merge_utils.task_arithmetic(ts, torch.tensor(w)))
    d = combine(ts, [1.0, 1.0, 1.0], "dare", density=0.5, generator=torch.Generator().manual_seed(1))
    kept = d != 0
    assert 0 < kept.float().mean() < 1
    assert torch.equal(trim_magnitude(ts[0], 1.0), ts[0])
    torch.testing.assert_close(combine([ts[0]], [1.0], "dare", density=1.0), ts[0])


def test_svd_factor_low_rank_is_exact():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(7, 3, generator=g) @ torch.randn(3, 9, generator=g)
    b, a = svd_factor(delta, 3)
    torch.testing.assert_close(b @ a, delta, rtol=1e-5, atol=1e-5)
    b, a = svd_factor(delta, 10)
    assert a.shape == (10, 9) and b.shape == (7, 10)


def test_ties_and_dare_dirs_load(tmp_path):
    _saved(tmp_path, "a", {"method": "lora", "r": 4, "tasks": ["x", "y"], "sharing": "per_task"}, 7)
    _saved(tmp_path, "b", {"method": "lora", "r": 4, "tasks": ["x", "y"], "sharing": "per_task"}, 8)
    for method in ("ties", "dare"):
        merge_adapter_dirs([tmp_path / "a", tmp_path / "b"], tmp_path / method, method, density=0.5, rank=3)
        model = adapterkit.load_adapters(tiny_model("bert"), tmp_path / method)
        with adapterkit.route(["x", "y", "x"]):
            assert _out(model).isfinite().all()
        assert read_adapter_dir(tmp_path / method).adapters["lora"]["r"] == 3


def test_cli_merge(tmp_path):
    from adapterkit.merging.cli import add_parser, run

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="cmd"))
    _saved(tmp_path, "a", HOULSBY, 1)
    _saved(tmp_path, "b", HOULSBY, 2)
    args = parser.parse_args(["merge", "--method", "aligned", str(tmp_path / "a"), str(tmp_path / "b"),
                              "--out", str(tmp_path / "m")])
    assert run(args) == 0
    adapterkit.load_adapters(tiny_model("bert"), tmp_path / "m")
