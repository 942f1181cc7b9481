"""Tests for the training-free CLIP cache adapters (adapterkit.cache)."""

from __future__ import annotations

import argparse
import inspect
import json
import math

import numpy as np
import pytest
import torch

from adapterkit.cache import pipeline
from adapterkit.cache.caps_adapter import caps_affinity, caps_logits, search_caps
from adapterkit.cache.common import (
    accuracy,
    build_cache,
    class_prototypes,
    grid_search,
    l2_normalize,
    resolve_grid,
    sample_few_shot,
)
from adapterkit.cache.dual_adapter import (
    DualAdapter,
    adaptive_reranking_loss,
    default_negative_text_weights,
    negative_cache_keys,
    soft_cache_values,
    train_dual_adapter,
)
from adapterkit.cache.tip_adapter import (
    TipAdapterF,
    search_tip_adapter,
    tip_adapter_logits,
    train_tip_adapter_f,
)
from adapterkit.cache.tipx import kl_affinity, search_tipx, signatures, tipx_logits
from adapterkit.errors import ConfigError, DataError

SMALL_GRIDS = {
    "tip": {"alpha": (0.1, 3.0, 5), "beta": (0.5, 7.0, 6)},
    "tip-f": {"alpha": (0.1, 3.0, 5), "beta": (0.5, 7.0, 6)},
    "tipx": {"alpha": (0.1, 10.0, 4), "beta": (1.0, 20.0, 4), "gamma": (0.1, 5.0, 4)},
    "caps": {
        "alpha": (0.1, 10.0, 3),
        "beta": (1.0, 20.0, 3),
        "gamma": (0.1, 5.0, 3),
        "delta": [0.0, 0.5, 1.0],
    },
    "dual": {"alpha": (0.0, 4.0, 4), "beta": (0.0, 4.0, 4), "lam": (0.6, 0.9, 3)},
}


def synthetic(n_per_class: int, num_classes=4, dim=16, noise=0.6, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(123))
    y = torch.arange(num_classes).repeat_interleave(n_per_class)
    x = centers[y] + noise * torch.randn(len(y), dim, generator=g)
    return x, y


# ------------------------------------------------------------------ common pieces


def test_tip_logits_hand_computation():
    f = torch.tensor([[1.0, 0.0]])
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    values = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    w = torch.eye(2)  # (D, C)
    out = tip_adapter_logits(f, w, keys, values, alpha=2.0, beta=1.0)
    # affinities 1, 0, 0.6 -> exp(-(1-A)) = 1, e^-1, e^-0.4
    expected = torch.tensor([[100.0 + 2.0 * 1.0, 0.0 + 2.0 * (math.exp(-1.0) + math.exp(-0.4))]])
    torch.testing.assert_close(out, expected)


def test_sample_few_shot_is_class_major_exact_and_seeded():
    labels = torch.tensor([2, 0, 1, 0, 2, 1, 0, 1, 2, 2, 0, 1])
    idx = sample_few_shot(labels, 3, 3, seed=4)
    assert labels[idx].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert len(set(idx.tolist())) == 9
    assert torch.equal(idx, sample_few_shot(labels, 3, 3, seed=4))
    assert not torch.equal(idx, sample_few_shot(labels, 3, 3, seed=5))
    with pytest.raises(DataError, match="class 0 has only 4"):
        sample_few_shot(labels, 5, 3)


def test_build_cache_and_prototypes():
    x, y = synthetic(5, num_classes=3, dim=8)
    cache = build_cache(x * 7.0, y, 3, shots=2, seed=0)
    assert cache.keys.shape == (6, 8)
    torch.testing.assert_close(cache.keys.norm(dim=1), torch.ones(6))
    assert cache.values.sum(1).tolist() == [1.0] * 6
    torch.testing.assert_close(cache.keys, l2_normalize(x[cache.index]))
    assert cache.keys_by_class().shape == (3, 2, 8)
    w = class_prototypes(cache.keys, cache.labels, 3)
    assert w.shape == (8, 3)
    torch.testing.assert_close(w[:, 1], l2_normalize(cache.keys[2:4].mean(0)))


def test_grid_search_picks_best_on_given_labels_first_on_ties():
    # logits = base + alpha * term: class 1 wins for alpha > 1.
    base = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    term = torch.tensor([[0.0, 1.0], [0.0, 1.0]])

    def terms(beta):
        return base * beta, {"alpha": term}

    grid = {"alpha": [0.0, 0.5, 2.0, 3.0]}
    params, acc = grid_search(terms, {"beta": [1.0]}, grid, torch.tensor([1, 1]))
    assert params == {"beta": 1.0, "alpha": 2.0} and acc == 100.0
    params, acc = grid_search(terms, {"beta": [1.0]}, grid, torch.tensor([0, 0]))
    assert params["alpha"] == 0.0 and acc == 100.0
    # an exact tie (alpha == beta) counts as an error
    params, acc = grid_search(terms, {"beta": [1.0]}, {"alpha": [1.0]}, torch.tensor([1, 1]))
    assert acc == 0.0


def test_grid_search_has_no_test_inputs():
    for fn in (grid_search, search_tip_adapter, search_tipx, search_caps):
        assert not any("test" in p for p in inspect.signature(fn).parameters)


def test_resolve_grid_errors_and_forms():
    g = resolve_grid({"alpha": [1, 2], "beta": (0.0, 1.0, 4)}, {"alpha": (0, 1, 2), "beta": (0, 1, 2)})
    assert g == {"alpha": [1.0, 2.0], "beta": [0.0, 0.25, 0.5, 0.75]}
    with pytest.raises(ConfigError, match="did you mean"):
        resolve_grid({"alpah": [1]}, {"alpha": (0, 1, 2)})


# ------------------------------------------------------------------ TIP-X / CapS


def _loop_kl_affinity(f, keys, w, t, mode):
    sf = [torch.softmax(f[q] @ w / t, 0) for q in range(f.shape[0])]
    sk = [torch.softmax(keys[i] @ w / t, 0) for i in range(keys.shape[0])]
    kl = torch.zeros(f.shape[0], keys.shape[0])
    for q in range(f.shape[0]):
        for i in range(keys.shape[0]):
            kl[q, i] = sum(float(sf[q][c] * math.log(sf[q][c] / sk[i][c])) for c in range(w.shape[1]))
    aff = f @ keys.T
    out = torch.zeros_like(kl)
    for q in range(f.shape[0]):
        x, tgt = (kl[q], aff[q]) if mode == "row" else (kl, aff)
        lo, hi, tlo, thi = float(x.min()), float(x.max()), float(tgt.min()), float(tgt.max())
        for i in range(keys.shape[0]):
            out[q, i] = -((kl[q, i] - lo) / (hi - lo) * (thi - tlo) + tlo)
    return out


@pytest.mark.parametrize("mode", ["row", "global"])
def test_tipx_kl_term_matches_loop(mode):
    g = torch.Generator().manual_seed(1)
    f = l2_normalize(torch.randn(7, 5, generator=g))  # 7 rows: not a multiple of any batch size
    keys = l2_normalize(torch.randn(6, 5, generator=g))
    w = l2_normalize(torch.randn(5, 3, generator=g), dim=0)
    got = kl_affinity(f, keys, w, temperature=0.5, rescale=mode)
    torch.testing.assert_close(got, _loop_kl_affinity(f, keys, w, 0.5, mode), rtol=1e-4, atol=1e-5)
    assert bool((got != 0).all())  # every row filled (the reference leaves a partial batch at 0)


def _sus_x_reference_logits(test_f, keys, w, values, alpha, beta, gamma, temp=0.5):
    """vishaal27/SuS-X tipx.py: get_kl_divergence_sims (one batch holding every query), scale_, hparam_search's logits."""
    nn = torch.nn
    train_dist = nn.Softmax(dim=-1)(keys @ w / temp)
    test_dist = nn.Softmax(dim=-1)(test_f @ w / temp)
    bs = test_dist.shape[0]
    repeated_batch = torch.repeat_interleave(test_dist, train_dist.shape[0], dim=0)
    q_repeated = torch.cat([train_dist] * bs)
    kl = (repeated_batch * (repeated_batch.log() - q_repeated.log())).sum(dim=-1).view(bs, -1)

    def scale_(x, target):
        y = (x - x.min()) / (x.max() - x.min())
        y *= target.max() - target.min()
        y += target.min()
        return y

    new_knowledge = test_f @ keys.T
    cache = ((-1) * (beta - beta * new_knowledge)).exp() @ values
    clip = 100.0 * test_f @ w
    kl_logits = -scale_(kl, new_knowledge) @ values
    return clip + kl_logits * gamma + cache * alpha


def test_tipx_default_rescale_is_the_references_global_scale():
    g = torch.Generator().manual_seed(5)
    f = l2_normalize(torch.randn(9, 6, generator=g))
    keys = l2_normalize(torch.randn(8, 6, generator=g))
    w = l2_normalize(torch.randn(6, 4, generator=g), dim=0)
    values = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]), 4).float()
    ref = _sus_x_reference_logits(f, keys, w, values, alpha=1.5, beta=3.0, gamma=2.0)
    torch.testing.assert_close(tipx_logits(f, w, keys, values, alpha=1.5, beta=3.0, gamma=2.0), ref,
                               rtol=1e-5, atol=1e-5)
    # the CapS-Adapter path and the cache pipeline default to the same rescale
    from adapterkit.cache.caps_adapter import caps_logits as _caps

    assert inspect.signature(_caps).parameters["rescale"].default == "global"
    assert pipeline._OPTIONS["rescale"] == "global"


def test_tipx_logits_compose_terms():
    g = torch.Generator().manual_seed(2)
    f = l2_normalize(torch.randn(4, 6, generator=g))
    keys = l2_normalize(torch.randn(5, 6, generator=g))
    w = l2_normalize(torch.randn(6, 3, generator=g), dim=0)
    values = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0, 1]), 3).float()
    got = tipx_logits(f, w, keys, values, alpha=1.5, beta=2.0, gamma=0.7)
    expected = tip_adapter_logits(f, w, keys, values, 1.5, 2.0) + 0.7 * kl_affinity(f, keys, w) @ values
    torch.testing.assert_close(got, expected)


def test_caps_delta_zero_equals_tipx_and_affinity_mix():
    g = torch.Generator().manual_seed(3)
    f = l2_normalize(torch.randn(5, 6, generator=g))
    keys = l2_normalize(torch.randn(4, 6, generator=g))
    caps = l2_normalize(torch.randn(4, 6, generator=g))
    w = l2_normalize(torch.randn(6, 2, generator=g), dim=0)
    values = torch.nn.functional.one_hot(torch.tensor([0, 1, 1, 0]), 2).float()
    args = dict(alpha=2.0, beta=3.0, gamma=0.4)
    torch.testing.assert_close(
        caps_logits(f, w, keys, caps, values, delta=0.0, **args), tipx_logits(f, w, keys, values, **args)
    )
    torch.testing.assert_close(caps_affinity(f, keys, caps, 1.0), f @ caps.T)
    torch.testing.assert_close(caps_affinity(f, keys, caps, 0.3), 0.7 * f @ keys.T + 0.3 * f @ caps.T)
    assert not torch.allclose(
        caps_logits(f, w, keys, caps, values, delta=0.5, **args), tipx_logits(f, w, keys, values, **args)
    )


def test_signature_options():
    f = l2_normalize(torch.randn(3, 4))
    w = l2_normalize(torch.randn(4, 2), dim=0)
    assert signatures(f, w).shape == (3, 2)
    torch.testing.assert_close(signatures(f, w, signature="features"), torch.softmax(f / 0.5, -1))
    with pytest.raises(ConfigError, match="did you mean"):
        signatures(f, w, signature="feature")


# ------------------------------------------------------------------ DualAdapter


def test_dual_negative_keys_are_mean_of_other_classes():
    g = torch.Generator().manual_seed(4)
    keys = l2_normalize(torch.randn(3, 2, 5, generator=g))
    neg = negative_cache_keys(keys)
    for i in range(3):
        others = [c for c in range(3) if c != i]
        for j in range(2):
            torch.testing.assert_close(neg[i, j], l2_normalize(keys[others, j].mean(0)))
    one_shot = keys[:, :1]  # with one shot per class: exactly the mean of all other-class keys
    torch.testing.assert_close(negative_cache_keys(one_shot)[0, 0], l2_normalize(one_shot[1:, 0].mean(0)))
    w = l2_normalize(torch.randn(5, 3, generator=g), dim=0)
    torch.testing.assert_close(default_negative_text_weights(w)[:, 0], l2_normalize(w[:, 1:].mean(1), dim=0))


def test_dual_soft_labels():
    keys = l2_normalize(
        torch.tensor([[[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]], [[0.0, 1.0], [0.1, 1.0], [0.2, 1.0]]])
    )
    soft = soft_cache_values(keys, temperature=0.1)
    assert soft.shape == (6, 2)
    assert bool((soft[:3, 1] == 0).all()) and bool((soft[3:, 0] == 0).all())
    torch.testing.assert_close(soft[:3, 0].sum(), torch.tensor(3.0))
    # shot 2 of class 0 is the outlier -> lowest confidence
    assert int(soft[:3, 0].argmin()) == 2
    sims = keys[0] @ keys[0].T
    avg = (sims.sum(1) - 1.0) / 2
    torch.testing.assert_close(soft[:3, 0], 3 * torch.softmax(avg / 0.1, 0))
    torch.testing.assert_close(soft_cache_values(keys[:, :1]), torch.eye(2))


def test_dual_logits_formula_at_zero_residuals():
    x, y = synthetic(3, num_classes=3, dim=6)
    cache = build_cache(x, y, 3, shots=3)
    w_t = class_prototypes(cache.keys, cache.labels, 3)
    w_c = l2_normalize(w_t + 0.1, dim=0)
    model = DualAdapter(cache, w_t, w_c)
    f = l2_normalize(torch.randn(4, 6))
    a, b, lam = 1.3, 2.0, 0.7
    keys = cache.keys
    neg_keys = negative_cache_keys(cache.keys_by_class()).reshape(-1, 6)
    w_pos = 0.45 * w_t + 0.55 * w_c
    pos = 100 * f @ w_pos + a * torch.exp(-b * (1 - f @ keys.T)) @ soft_cache_values(cache.keys_by_class())
    neg = (
        0.15 * 100 * (1 - f @ default_negative_text_weights(w_t))
        + a * torch.exp(-b * f @ neg_keys.T) @ cache.values
    )
    torch.testing.assert_close(model(f, a, b, lam), lam * pos + (1 - lam) * neg)
    assert sum(p.numel() for p in model.parameters()) == 5 * 3 * 6


def test_dual_training_moves_residuals_and_reranking_loss():
    x, y = synthetic(8, num_classes=3, dim=8, seed=1)
    xv, yv = synthetic(6, num_classes=3, dim=8, seed=2)
    cache = build_cache(x, y, 3, shots=4)
    model = DualAdapter(cache, class_prototypes(cache.keys, cache.labels, 3))
    out = train_dual_adapter(model, l2_normalize(x), y, l2_normalize(xv), yv, epochs=3, lr=1e-2, batch_size=8)
    assert len(out["history"]) == 4 and 0 <= out["best_epoch"] <= 3
    assert out["best_val_acc"] == max(h["val_acc"] for h in out["history"])
    assert all(math.isfinite(h["train_loss"]) for h in out["history"][1:])
    model.zero_grad()
    model.loss(l2_normalize(x), y).backward()
    assert all(float(p.grad.abs().sum()) > 0 for p in model.parameters())  # all 5 residuals get gradient
    protos = torch.eye(3)
    feats = torch.tensor([[1.0, 0.0, 0.0]])
    assert float(adaptive_reranking_loss(feats, protos, torch.tensor([0]))) == 0.0
    assert float(adaptive_reranking_loss(feats, protos, torch.tensor([1]))) > 0.0


def test_dual_requires_equal_shots():
    x, y = synthetic(3, num_classes=2, dim=4)
    cache = build_cache(x[:5], y[:5], 2)  # 3 + 2 shots
    with pytest.raises(DataError, match="same number of shots"):
        DualAdapter(cache, class_prototypes(cache.keys, cache.labels, 2))


# ------------------------------------------------------------------ Tip-Adapter-F


def test_tip_f_selects_epoch_on_validation():
    x, y = synthetic(6, num_classes=3, dim=8, seed=3)
    xv, yv = synthetic(10, num_classes=3, dim=8, seed=4)
    cache = build_cache(x, y, 3)
    w = class_prototypes(cache.keys, cache.labels, 3)
    model = TipAdapterF(cache, w, alpha=1.0, beta=2.0)
    xv = l2_normalize(xv)
    out = train_tip_adapter_f(model, cache.keys, cache.labels, xv, yv, epochs=4, batch_size=4)
    assert out["best_val_acc"] == max(h["val_acc"] for h in out["history"])
    with torch.no_grad():
        assert accuracy(model(xv), yv) == out["best_val_acc"]


# ------------------------------------------------------------------ pipeline


@pytest.mark.parametrize("method", pipeline.METHODS)
def test_end_to_end_beats_chance(method):
    tr, va, te = synthetic(10, seed=0), synthetic(8, seed=1), synthetic(8, seed=2)
    kw = {"grid": SMALL_GRIDS[method], "epochs": 2}
    if method == "caps":
        kw["caption_feats"] = tr[0] + 0.1
    res = pipeline.run_cache_adapter(method, *tr, *va, *te, shots=4, seed=0, **kw)
    assert res["mode"] == "image-only" and res["cache_size"] == 16
    assert res["test_acc"] > 50.0  # chance is 25 %
    assert set(res["params"]) == {k for k in SMALL_GRIDS[method]}
    json.dumps(res)


@pytest.mark.parametrize("method", pipeline.METHODS)
def test_selection_never_depends_on_test(method):
    tr, va, te = synthetic(10, seed=0), synthetic(8, seed=1), synthetic(8, seed=2)
    kw = {"grid": SMALL_GRIDS[method], "epochs": 2}
    a = pipeline.run_cache_adapter(method, *tr, *va, *te, shots=4, **kw)
    # a test set whose labels are scrambled would pick different hyperparameters
    te2 = (torch.randn_like(te[0]), te[1].roll(3))
    b = pipeline.run_cache_adapter(method, *tr, *va, *te2, shots=4, **kw)
    assert a["params"] == b["params"] and a["val_acc"] == b["val_acc"]
    assert a.get("train", {}).get("best_epoch") == b.get("train", {}).get("best_epoch")


def test_tip_choice_is_val_choice_not_test_choice():
    # Val rewards the cache (the text weights are wrong there), test does not.
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1])
    w = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # swapped "text" weights
    val_x, val_y = torch.tensor([[0.9, 0.1], [0.1, 0.9]]), torch.tensor([0, 1])
    test_x, test_y = val_x.clone(), torch.tensor([1, 0])
    grid = {"alpha": [0.0, 500.0], "beta": [1.0]}
    res = pipeline.run_cache_adapter(
        "tip", keys, labels, val_x, val_y, test_x, test_y, text_weights=w, shots=1, grid=grid
    )
    assert res["params"]["alpha"] == 500.0 and res["val_acc"] == 100.0
    assert res["test_acc"] == 0.0
    test_choice, _ = search_tip_adapter(l2_normalize(test_x), test_y, w, keys, torch.eye(2), grid)
    assert test_choice["alpha"] == 0.0 != res["params"]["alpha"]


def test_text_weights_and_errors():
    tr, va, te = synthetic(6, seed=0), synthetic(4, seed=1), synthetic(4, seed=2)
    w = torch.randn(4, 16)  # (C, D) is accepted and transposed
    res = pipeline.run_cache_adapter("tip", *tr, *va, *te, text_weights=w, shots=2, grid=SMALL_GRIDS["tip"])
    assert res["mode"] == "text" and res["baseline"] == "zero-shot"
    with pytest.raises(ConfigError, match="did you mean"):
        pipeline.run_cache_adapter("tipp", *tr, *va, *te)
    with pytest.raises(ConfigError, match="expected \\(D, C\\)"):
        pipeline.run_cache_adapter("tip", *tr, *va, *te, text_weights=torch.randn(5, 5))
    with pytest.raises(ConfigError, match="unknown option"):
        pipeline.run_cache_adapter("tip", *tr, *va, *te, epoch=3)
    with pytest.raises(DataError, match="class 0 has only 6"):
        pipeline.run_cache_adapter("tip", *tr, *va, *te, shots=7)


def _write_store(root, n=48, k=3, d=8, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(4, d))
    labels = np.arange(n) % 4
    feats = centers[labels][:, None, :] + 0.3 * rng.normal(size=(n, k, d))
    store = root / "store"
    store.mkdir()
    np.save(store / "features.npy", feats.astype(np.float32))
    ids = [f"img{i:03d}" for i in range(n)]
    (store / "index.json").write_text(json.dumps({"ids": ids, "dim": d}))
    split = ["train"] * 24 + ["val"] * 12 + ["test"] * 12
    table = {i: {"label": int(lab), "split": s} for i, lab, s in zip(ids, labels, split)}
    lp = root / "labels.json"
    lp.write_text(json.dumps(table))
    return store, lp, feats


def test_cli_runs_on_feature_store(tmp_path, capsys):
    store, lp, feats = _write_store(tmp_path)
    data = pipeline.load_split_features(store, lp)
    expected = feats[:24].mean(1)
    np.testing.assert_allclose(
        data["train"][0], expected / np.linalg.norm(expected, axis=1, keepdims=True), rtol=1e-5
    )
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    pipeline.add_parser(sub)
    out = tmp_path / "res" / "results.json"
    args = parser.parse_args(
        [
            "cache",
            "--method",
            "tip",
            "--features",
            str(store),
            "--labels",
            str(lp),
            "--shots",
            "4",
            "--out",
            str(out),
        ]
    )
    assert args.func(args) == 0
    res = json.loads(out.read_text())
    assert res["method"] == "tip" and res["test_acc"] > 50.0
    assert "tip:" in capsys.readouterr().out
    assert [p.name for p in out.parent.iterdir()] == ["results.json"]


def test_feature_store_errors(tmp_path):
    store, lp, _ = _write_store(tmp_path)
    table = json.loads(lp.read_text())
    table["ghost"] = {"label": 0, "split": "train"}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(table))
    with pytest.raises(DataError, match="'ghost' is not in the feature store"):
        pipeline.load_split_features(store, bad)
    with pytest.raises(DataError, match="feature store directory not found"):
        pipeline.load_split_features(tmp_path / "nope", lp)
    table.pop("ghost")
    table["img000"]["split"] = "tset"
    bad.write_text(json.dumps(table))
    with pytest.raises(DataError, match='did you mean "test"'):
        pipeline.load_split_features(store, bad)


def test_raw_memmap_store_with_shape_in_index(tmp_path):
    store = tmp_path / "raw"
    store.mkdir()
    arr = np.arange(2 * 2 * 3, dtype=np.float32).reshape(2, 2, 3)
    arr.tofile(store / "features.npy")
    (store / "index.json").write_text(json.dumps({"ids": ["a", "b"], "shape": [2, 2, 3], "dtype": "float32"}))
    ids, got = pipeline.load_feature_store(store)
    assert ids == ["a", "b"]
    np.testing.assert_array_equal(np.asarray(got), arr)


def test_reads_store_written_by_feature_store_writer(tmp_path):
    features_mod = pytest.importorskip("adapterkit.vl.features")
    _, lp, feats = _write_store(tmp_path)
    ids = [f"img{i:03d}" for i in range(feats.shape[0])]
    writer = features_mod.FeatureStoreWriter(
        tmp_path / "real", ids, feats.shape[1], feats.shape[2], dtype="float32"
    )
    writer.write(feats.astype(np.float32), np.zeros((*feats.shape[:2], 4), np.float32))
    writer.finalize()
    data = pipeline.load_split_features(tmp_path / "real", lp)
    pooled = feats[24:36].mean(1)
    np.testing.assert_allclose(
        data["val"][0], pooled / np.linalg.norm(pooled, axis=1, keepdims=True), rtol=1e-5
    )
    assert data["val"][2] == ids[24:36]


def test_caps_search_at_delta_zero_matches_tipx_search():
    x, y = synthetic(6, seed=5, noise=1.2)
    xv, yv = synthetic(8, seed=6, noise=1.2)
    cache = build_cache(x, y, 4, shots=3)
    w = class_prototypes(cache.keys, cache.labels, 4)
    xv = l2_normalize(xv)
    grid = {"alpha": (0.1, 10.0, 4), "beta": (1.0, 20.0, 4), "gamma": (0.1, 5.0, 4)}
    p_tipx, a_tipx = search_tipx(xv, yv, w, cache.keys, cache.values, grid)
    p_caps, a_caps = search_caps(
        xv, yv, w, cache.keys, cache.keys * 0 + 1, cache.values, {**grid, "delta": [0.0]}
    )
    assert a_caps == a_tipx and p_caps == {**p_tipx, "delta": 0.0}
