"""MiMi structured pruning against IemProg/MiMi: scores, global threshold, schedule, smaller (or removed)
adapters, retraining hook, saved-dir pruning."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
import torch.nn.utils.prune as torch_prune
from torch import nn

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
    raw = (down.abs().sum((0, 2)) + up.abs().sum((0, 1))) / 24
    torch.testing.assert_close(unit_scores(down, up), raw)
    torch.testing.assert_close(unit_scores(down, up, normalize=True), raw / raw.max())
    sel = select_units({"a": torch.tensor([1.0, 0.2, 0.9]), "b": torch.tensor([0.1, 1.0])}, 3)
    assert sel["a"].tolist() == [0, 2] and sel["b"].tolist() == [1]
    sel = select_units({"a": torch.tensor([1.0, 0.9]), "b": torch.tensor([0.1, 0.5])}, 2)
    assert sel["a"].tolist() == [0, 1] and sel["b"].tolist() == []  # an adapter may lose every unit
    sel = select_units({"a": torch.tensor([1.0, 0.9]), "b": torch.tensor([0.1, 0.5])}, 1, min_keep=1)
    assert sel["a"].tolist() == [0] and sel["b"].tolist() == [1]
    sel = select_units({"a": torch.tensor([1.0, 0.5]), "b": torch.tensor([0.5, 1.0])}, 3)
    assert sel["a"].tolist() == [0, 1] and sel["b"].tolist() == [0, 1]  # ties at the threshold are kept
    assert all(v.numel() == 0 for v in select_units({"a": torch.tensor([1.0]), "b": torch.tensor([0.5])}, 0).values())


def _reference_kept_rows(pairs, amount, weighted):
    """IemProg/MiMi few_shot_prune.py::structured_magnitude_pruning_layer (scaling=1) on unmasked
    adapters: survivors per adapter from the global threshold, rows chosen by prune.ln_structured."""
    num_surv = int(math.floor(sum(fc1.shape[0] for fc1, _ in pairs) * (1.0 - amount)))
    flattened_scores = []
    for fc1, fc2 in pairs:
        concat = torch.cat((fc1, fc2.T), 1)
        w = torch.sum(torch.abs(concat), 1)
        w /= concat.shape[1]
        flattened_scores.append(w.view(-1))
    if weighted == 1:
        flattened_scores = [torch.Tensor([item / max(score) if item != 0 else item for item in score])
                            for score in flattened_scores]
    flat = torch.cat(flattened_scores, dim=0)
    threshold = torch.tensor(math.inf) if num_surv == 0 else torch.topk(flat, num_surv)[0][-1]
    final_survs = [int(torch.ge(score, threshold).sum()) for score in flattened_scores]
    kept = []
    for (fc1, fc2), surv in zip(pairs, final_survs):
        concat = torch.cat((fc1, fc2.T), 1)
        mod = nn.Linear(concat.shape[1], concat.shape[0], bias=False)
        mod.weight = nn.Parameter(concat.clone())
        torch_prune.ln_structured(mod, name="weight", amount=float(1.0 - surv / concat.shape[0]), n=1, dim=0)
        kept.append(mod.weight_mask.any(1).nonzero().flatten().tolist())
    return kept


@pytest.mark.parametrize("normalize", [False, True])
def test_selection_matches_the_reference_and_may_remove_an_adapter(normalize, tmp_path):
    model = _model(seed=7)
    s = model.adapterkit.sets["houlsby"]
    weak = next(iter(s.adapters))
    with torch.no_grad():  # one adapter with small weights: the reference removes it entirely (weighted=0)
        s.adapters[weak].down.weight.mul_(0.01)
        s.adapters[weak].up.weight.mul_(0.01)
    pairs = [(ad.down.weight[0].detach().clone(), ad.up.weight[0].detach().clone()) for ad in s.adapters.values()]
    ref = _reference_kept_rows(pairs, 0.5, weighted=int(normalize))
    kept_rows = {}
    orig = {k: ad.down.weight[0].detach().clone() for k, ad in s.adapters.items()}
    adapterkit.save_adapters(model, tmp_path / "full")
    prune_model(model, amount=0.5, rounds=1, normalize=normalize)
    for (k, ad), want in zip(s.adapters.items(), ref):
        rows = [int((orig[k] == r).all(1).nonzero()) for r in ad.down.weight[0].detach()]
        kept_rows[k] = rows
        assert rows == want
    assert (len(kept_rows[weak]) == 0) == (not normalize)
    if not normalize:  # a removed adapter adds nothing, saves and reloads
        assert s.config.widths[weak] == 0 and s.adapters[weak].up.bias is None
        before = _out(model)
        adapterkit.save_adapters(model, tmp_path / "p")
        loaded = adapterkit.load_adapters(tiny_model("bert"), tmp_path / "p").eval()
        assert torch.equal(_out(loaded), before) and _widths(loaded)[weak] == 0
        x = torch.randn(2, 3, 32)
        assert torch.equal(s.adapters[weak](x, None), torch.zeros(2, 3, 32))
        prune_adapter_dir(tmp_path / "full", tmp_path / "small", amount=0.5, rounds=1)  # the saved-dir path
        small = adapterkit.load_adapters(tiny_model("bert"), tmp_path / "small").eval()
        assert torch.equal(_out(small), before) and _widths(small) == _widths(model)


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
