"""MiMi structured pruning: scores, schedule, smaller adapters, retraining hook, saved-dir pruning."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

import adapterkit
from adapterkit.errors import ConfigError
from adapterkit.pruning import prune_adapter_dir, prune_model, schedule, select_units, unit_scores
from adapterkit.testing.tiny import main_output, tiny_inputs, tiny_model

CFG = {"method": "houlsby", "bottleneck_dim": 8}


def _model(cfg=CFG, seed=0):
    model = adapterkit.add_adapters(tiny_model("bert"), dict(cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.startswith("adapterkit."):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def _out(model):
    with torch.no_grad():
        return main_output(model(**tiny_inputs("bert")))


def _widths(model, name="houlsby"):
    return {k: ad.down.out_features for k, ad in model.adapterkit.sets[name].adapters.items()}


def test_schedule():
    assert schedule(0.5, 3) == [0.5, 0.75, 0.875]
    assert schedule(0.0, 2) == [0.0, 0.0]
    with pytest.raises(ConfigError):
        schedule(1.0, 1)


def test_scores_follow_the_formula():
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(2, 5, 12, generator=g), torch.randn(2, 12, 5, generator=g)
    s = unit_scores(down, up)
    raw = (down.abs().sum((0, 2)) + up.abs().sum((0, 1))) / 24
    torch.testing.assert_close(s, raw / raw.max())
    sel = select_units({"a": torch.tensor([1.0, 0.2, 0.9]), "b": torch.tensor([0.1, 1.0])}, 3)
    assert sel["a"].tolist() == [0, 2] and sel["b"].tolist() == [1]
    sel = select_units({"a": torch.tensor([1.0, 0.9]), "b": torch.tensor([0.1, 1.0])}, 1)  # min_keep=1 each
    assert sel["a"].tolist() == [0] and sel["b"].tolist() == [1]


def test_pruning_gives_the_scheduled_size_and_retrains_between_rounds(tmp_path):
    model = _model()
    n0 = sum(_widths(model).values())
    calls = []

    def train_fn(m, r):
        calls.append((r, sum(_widths(m).values())))

    log = prune_model(model, amount=0.5, rounds=2, train_fn=train_fn)
    assert [e["units"] for e in log] == [math.floor(n0 * 0.5), math.floor(n0 * 0.25)]
    assert calls == [(0, n0 // 2), (1, n0 // 4)]
    s = model.adapterkit.sets["houlsby"]
    assert s.config.method == "pruned_bottleneck" and s.config.base_method == "houlsby"
    assert s.config.widths == _widths(model)
    for ad in s.adapters.values():  # ordinary (smaller) shapes
        w = ad.down.out_features
        assert ad.down.weight.shape == (1, w, 32) and ad.up.weight.shape == (1, 32, w) and ad.down.bias.shape == (1, w)
    before = _out(model)
    adapterkit.save_adapters(model, tmp_path / "p")
    loaded = adapterkit.load_adapters(tiny_model("bert"), tmp_path / "p").eval()
    assert torch.equal(_out(loaded), before)
    assert _widths(loaded, "houlsby") == _widths(model)


def test_zero_pruning_keeps_outputs_identical():
    model = _model()
    before, w0 = _out(model), _widths(model)
    prune_model(model, amount=0.0, rounds=2)
    assert _widths(model) == w0
    assert torch.equal(_out(model), before)


def test_removing_dead_units_keeps_the_function():
    model = _model(seed=3)
    with torch.no_grad():
        for ad in model.adapterkit.sets["houlsby"].adapters.values():
            ad.down.weight[:, 4:] = 0.0  # units 4..7 are dead: zero rows of W_down, zero columns of W_up
            ad.down.bias[:, 4:] = 0.0
            ad.up.weight[:, :, 4:] = 0.0
    before = _out(model)
    prune_model(model, amount=0.5, rounds=1)
    assert set(_widths(model).values()) == {4}
    torch.testing.assert_close(_out(model), before, rtol=0, atol=1e-6)


def test_parallel_and_per_task_adapters(tmp_path):
    cfg = {"method": "parallel", "bottleneck_dim": 8, "tasks": ["a", "b"], "sharing": "per_task"}
    model = _model(cfg)
    prune_model(model, amount=0.5, rounds=1)
    assert sum(_widths(model, "parallel").values()) == 8
    with adapterkit.route(["a", "b", "a"]):
        before = _out(model)
    adapterkit.save_adapters(model, tmp_path / "p")
    loaded = adapterkit.load_adapters(tiny_model("bert"), tmp_path / "p").eval()
    with adapterkit.route(["a", "b", "a"]):
        assert torch.equal(_out(loaded), before)


def test_prune_saved_dir_matches_in_model_pruning_and_cli(tmp_path):
    from adapterkit.pruning.cli import add_parser, run

    model = _model(seed=5)
    adapterkit.save_adapters(model, tmp_path / "full")
    summary = prune_adapter_dir(tmp_path / "full", tmp_path / "small", amount=0.5, rounds=2)
    assert summary["units"] == summary["initial_units"] // 4
    prune_model(model, amount=0.5, rounds=2)  # no retraining: same selection
    small = adapterkit.load_adapters(tiny_model("bert"), tmp_path / "small").eval()
    assert torch.equal(_out(small), _out(model))

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="cmd"))
    assert run(parser.parse_args(["prune", "--amount", "0.5", "--rounds", "1", str(tmp_path / "full"),
                                  "--out", str(tmp_path / "cli")])) == 0
    cli = adapterkit.load_adapters(tiny_model("bert"), tmp_path / "cli")
    assert sum(_widths(cli, "houlsby").values()) == summary["initial_units"] // 2


def test_prune_rejects_non_bottleneck(tmp_path):
    model = adapterkit.add_adapters(tiny_model("bert"), {"method": "lora"})
    with pytest.raises(ConfigError, match="no bottleneck adapters"):
        prune_model(model)
    adapterkit.save_adapters(model, tmp_path / "l")
    with pytest.raises(ConfigError, match="no bottleneck adapters"):
        prune_adapter_dir(tmp_path / "l", tmp_path / "o")


def test_fresh_pruned_bottleneck_config_builds_per_place_widths():
    model = tiny_model("bert")
    key = "encoder__layer__0__output__dense"
    adapterkit.add_adapters(model, {"method": "pruned_bottleneck", "bottleneck_dim": 8, "positions": ["ffn_out"],
                                    "widths": {key: 3}})
    ws = _widths(model, "pruned_bottleneck")
    assert ws[key] == 3 and ws["encoder__layer__1__output__dense"] == 8
    with pytest.raises(ConfigError, match="does not have"):
        adapterkit.add_adapters(tiny_model("bert"), {"method": "pruned_bottleneck", "widths": {"nowhere": 2}})
