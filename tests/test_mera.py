"""MerA: activation-based alignment of adapter hidden units, aligned merging, the few-shot pipeline."""

from __future__ import annotations

import pytest
import torch

import adapterkit
from adapterkit.errors import ConfigError
from adapterkit.merging import merge_adapter_dirs, read_adapter_dir
from adapterkit.merging.activations import (
    activation_permutations,
    collect_hidden_activations,
    mera_few_shot,
    merge_by_activations,
    unit_similarity,
)
from adapterkit.merging.adapter_dir import write_adapter_dir
from adapterkit.merging.align import hidden_groups, permute_hidden
from adapterkit.testing.tiny import main_output, tiny_model

RELU = {"method": "houlsby", "bottleneck_dim": 8, "activation": "relu"}
LORA = {"method": "lora", "r": 6}


def _batches(n=3, seed=7):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 90, (4, 9), generator=g)
        mask = torch.ones_like(ids)
        mask[0, -3:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _saved(tmp_path, name, cfg, seed, std=0.3):
    model = adapterkit.add_adapters(tiny_model("bert"), dict(cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.startswith("adapterkit."):
                p.copy_(torch.randn(p.shape, generator=g) * std)
                if n.endswith("down.bias"):
                    p.abs_()  # no ReLU unit is dead on every token (a dead unit matches any other)
    adapterkit.save_adapters(model, tmp_path / name)
    return read_adapter_dir(tmp_path / name)


def _scramble(a, seed, scale=False):
    """A function-preserving copy of ``a``: hidden units permuted (and, with ``scale``, each unit's
    down row and bias multiplied by c > 0 and its up column divided by c: exact for ReLU)."""
    g = torch.Generator().manual_seed(seed)
    t = dict(a.tensors)
    perms = {}
    for prefix, (d, u) in hidden_groups(t).items():
        m = t[f"{prefix}.{d}.weight"].shape[1]
        p = torch.randperm(m, generator=g)
        perms[prefix] = p
        t = permute_hidden(t, prefix, p)
        if scale:
            c = torch.exp(torch.empty(m).uniform_(-1.6, 1.6, generator=g))
            t[f"{prefix}.{d}.weight"] = t[f"{prefix}.{d}.weight"] * c[None, :, None]
            if f"{prefix}.{d}.bias" in t:
                t[f"{prefix}.{d}.bias"] = t[f"{prefix}.{d}.bias"] * c[None, :]
            t[f"{prefix}.{u}.weight"] = t[f"{prefix}.{u}.weight"] / c[None, None, :]
    return t, perms


def _write(tmp_path, name, a, tensors):
    write_adapter_dir(tmp_path / name, a.adapters, tensors, base_trainable=a.config["base_trainable"],
                      base_model=a.config.get("base_model"))
    return tmp_path / name


def _out(model, batches):
    model.eval()
    with torch.no_grad():
        return torch.cat([main_output(model(**b)) for b in batches])


@pytest.mark.parametrize("cfg,scale", [(RELU, False), (RELU, True), (LORA, False)])
def test_activation_alignment_recovers_a_known_permutation(tmp_path, cfg, scale):
    a = _saved(tmp_path, "a", cfg, 1)
    t, perms = _scramble(a, 2, scale)
    _write(tmp_path, "b", a, t)
    base = tiny_model("bert")
    batches = _batches()
    # the scrambled copy computes the same function
    fa = _out(adapterkit.load_adapters(tiny_model("bert"), tmp_path / "a"), batches)
    fb = _out(adapterkit.load_adapters(tiny_model("bert"), tmp_path / "b"), batches)
    torch.testing.assert_close(fb, fa, atol=1e-5, rtol=1e-4)
    found = activation_permutations(base, [tmp_path / "a", tmp_path / "b"], batches)
    assert set(found[1]) == set(perms) and len(perms) >= 4
    for prefix, p in perms.items():
        assert torch.equal(found[0][prefix], torch.arange(len(p)))
        assert torch.equal(found[1][prefix], torch.argsort(p)), prefix   # the inverse of the scramble
    if not scale:
        back = dict(t)
        for prefix, p in found[1].items():
            back = permute_hidden(back, prefix, p)
        for k in a.tensors:
            assert torch.equal(back[k], a.tensors[k]), k


def test_merged_with_alignment_equals_the_unmerged_function(tmp_path):
    a = _saved(tmp_path, "a", RELU, 3)
    t, _ = _scramble(a, 4)
    _write(tmp_path, "b", a, t)
    batches = _batches()
    base = tiny_model("bert")
    w0 = {k: v.clone() for k, v in base.state_dict().items()}
    out = merge_by_activations(base, [tmp_path / "a", tmp_path / "b"], tmp_path / "m", batches)
    assert all(torch.equal(v, w0[k]) for k, v in base.state_dict().items())  # the base model is untouched
    assert "activations" in (out / "adapter_config.json").read_text()
    fa = _out(adapterkit.load_adapters(tiny_model("bert"), tmp_path / "a"), batches)
    fm = _out(adapterkit.load_adapters(tiny_model("bert"), tmp_path / "m"), batches)
    torch.testing.assert_close(fm, fa, atol=1e-5, rtol=1e-4)
    merge_adapter_dirs([tmp_path / "a", tmp_path / "b"], tmp_path / "avg", "average")
    favg = _out(adapterkit.load_adapters(tiny_model("bert"), tmp_path / "avg"), batches)
    assert (favg - fa).abs().max() > 1e-3  # without alignment the average is another function


def test_unit_similarity():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(50, 4, generator=g)
    other = torch.cat([z[:, [2, 0]] * torch.tensor([3.0, 0.5]) + 1.0, torch.zeros(50, 1), z[:, 3:] * -1], 1)
    c = unit_similarity(z, other)
    torch.testing.assert_close(c[2, 0], torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(c[0, 1], torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(c[3, 3], torch.tensor(-1.0, dtype=torch.float64))
    assert torch.equal(c[:, 2], torch.zeros(4, dtype=torch.float64))  # a constant unit correlates with nothing
    torch.testing.assert_close(unit_similarity(z, other, "inner"), z.double().T @ other.double())
    with pytest.raises(ConfigError, match="criterion"):
        unit_similarity(z, z, "cosine")


def test_activation_alignment_errors(tmp_path):
    _saved(tmp_path, "a", RELU, 1)
    _saved(tmp_path, "pt", {**RELU, "tasks": ["x", "y"], "sharing": "per_task"}, 1)
    base = tiny_model("bert")
    batches = _batches(2)
    acts = collect_hidden_activations(base, tmp_path / "a", batches)
    real = sum(int(b["attention_mask"].sum()) for b in batches)  # padding tokens are left out
    assert acts and all(z.shape == (real, 8) for z in acts.values())
    with pytest.raises(ConfigError, match="task copies"):
        activation_permutations(base, [tmp_path / "pt", tmp_path / "pt"], _batches(1))
    with pytest.raises(ConfigError, match="at least one batch"):
        activation_permutations(base, [tmp_path / "a", tmp_path / "a"], [])
    with pytest.raises(ConfigError, match="at least two"):
        merge_by_activations(base, [tmp_path / "a"], tmp_path / "m", _batches(1))


def test_mera_few_shot_pipeline(tmp_path):
    _saved(tmp_path, "s1", RELU, 5, std=0.1)
    _saved(tmp_path, "s2", RELU, 6, std=0.1)
    batches = _batches(2, seed=9)
    target = torch.randn(8, generator=torch.Generator().manual_seed(1))

    def loss_fn(model, batch):
        model.eval()  # no dropout: the first step's loss can be checked against the merged adapter
        h = main_output(model(**batch))[:, 0, :8]       # (B, 8): the first token's first 8 features
        return (h - target).pow(2).mean()

    model = tiny_model("bert")
    base_w = {k: v.clone() for k, v in model.state_dict().items()}
    tuned, losses = mera_few_shot(model, [tmp_path / "s1", tmp_path / "s2"], tmp_path / "merged", batches,
                                  batches, epochs=8, lr=5e-3, loss_fn=loss_fn)
    assert len(losses) == 16 and losses[-1] < 0.7 * losses[0]
    # the tuning started from the merged adapter
    start = adapterkit.load_adapters(tiny_model("bert"), tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(loss_fn(start, batches[0]), torch.tensor(losses[0]), atol=1e-5, rtol=1e-4)
    # only the adapter moved: every base weight is as it was
    state = tuned.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base_w.items() if k in state)
    assert read_adapter_dir(tmp_path / "merged").config["extra"]["merge_method"] == "activations"
    # the weight-based merges go through the same pipeline
    _, l2 = mera_few_shot(tiny_model("bert"), [tmp_path / "s1", tmp_path / "s2"], tmp_path / "avg", batches,
                          batches, method="average", epochs=1, loss_fn=loss_fn)
    assert len(l2) == 2
    with pytest.raises(ConfigError, match="epochs"):
        mera_few_shot(tiny_model("bert"), [tmp_path / "s1", tmp_path / "s2"], tmp_path / "x", batches, batches,
                      epochs=0, loss_fn=loss_fn)
