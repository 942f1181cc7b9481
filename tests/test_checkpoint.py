"""Tests for adapterkit.engine.checkpoint: exact resume, pruning, corruption fallback."""

from __future__ import annotations

import json
import math
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from adapterkit.engine.checkpoint import (
    ADAPTER_FILE,
    MANIFEST_FILE,
    CheckpointManager,
    capture_rng_state,
    decode_tree,
    encode_tree,
    optimizer_state_to_tensors,
    restore_rng_state,
    tensors_to_optimizer_state,
)
from adapterkit.errors import CheckpointError, ConfigError


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Dropout(0.3), nn.Linear(16, 3))


def _make_optim(kind: str, model: nn.Module):
    if kind == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=5e-2, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.3 * s))
    return opt, sched


def _train(model, opt, sched, n: int) -> None:
    """Steps whose data and dropout depend on python, numpy and torch RNGs."""
    model.train()
    for _ in range(n):
        x = torch.randn(8, 6) * (0.5 + random.random())
        shift = torch.from_numpy(np.random.standard_normal((8, 6)).astype(np.float32))
        y = torch.randint(0, 3, (8,))
        loss = nn.functional.cross_entropy(model(x + shift), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_resume_is_bit_identical(tmp_path, kind):
    _seed_all(0)
    model = _model(1)
    opt, sched = _make_optim(kind, model)
    _train(model, opt, sched, 3)

    mgr = CheckpointManager(tmp_path / "run", keep_last=3)
    trainer = {"step": 3, "epoch": 0, "task_order_seed": 17, "metrics": {"loss": [1.5, 0.9]}}
    saved_opt = opt.state_dict()
    path = mgr.save(
        3,
        {
            "adapter": model.state_dict(),
            "optimizer": saved_opt,
            "scheduler": sched.state_dict(),
            "rng": capture_rng_state(),
            "trainer": trainer,
        },
    )
    assert path == tmp_path / "run" / "checkpoints" / "step-000003"
    # nothing pickled: every file is JSON or safetensors
    assert sorted(p.name for p in path.iterdir()) == [
        ADAPTER_FILE, MANIFEST_FILE, "optimizer.json", "optimizer.safetensors",
        "rng.json", "rng.safetensors", "scheduler.json", "trainer.json",
    ]

    _train(model, opt, sched, 3)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    expected_lr = sched.get_last_lr()

    # resume into fresh, differently initialised objects with scrambled RNGs
    _seed_all(12345)
    model2 = _model(99)
    opt2, sched2 = _make_optim(kind, model2)
    found = mgr.latest_valid()
    assert found == (path, 3)
    state = mgr.load(found[0])
    assert state["trainer"] == trainer

    # optimizer state comes back in exactly the structure torch produced
    loaded_opt = state["optimizer"]
    assert loaded_opt["param_groups"] == saved_opt["param_groups"]
    for g_new, g_old in zip(loaded_opt["param_groups"], saved_opt["param_groups"]):
        assert {k: type(v) for k, v in g_new.items()} == {k: type(v) for k, v in g_old.items()}
    assert set(loaded_opt["state"]) == set(saved_opt["state"])
    for pid, entry in saved_opt["state"].items():
        for key, val in entry.items():
            got = loaded_opt["state"][pid][key]
            assert type(got) is type(val)
            if isinstance(val, torch.Tensor):
                assert got.dtype == val.dtype and got.shape == val.shape

    model2.load_state_dict(state["adapter"])
    opt2.load_state_dict(state["optimizer"])
    sched2.load_state_dict(state["scheduler"])
    CheckpointManager.restore_rng_state(state["rng"])
    _train(model2, opt2, sched2, 3)

    for k, v in expected.items():
        assert torch.equal(model2.state_dict()[k], v), k
    assert sched2.get_last_lr() == expected_lr


def test_without_rng_restore_runs_diverge(tmp_path):
    """Guards the test above: the RNG state really matters for the training steps."""
    _seed_all(0)
    model = _model(1)
    opt, sched = _make_optim("adamw", model)
    mgr = CheckpointManager(tmp_path, keep_last=1)
    mgr.save(0, {"adapter": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict()})
    _train(model, opt, sched, 2)
    state = mgr.load(mgr.path_for(0))
    model2 = _model(5)
    opt2, sched2 = _make_optim("adamw", model2)
    model2.load_state_dict(state["adapter"])
    opt2.load_state_dict(state["optimizer"])
    sched2.load_state_dict(state["scheduler"])
    _train(model2, opt2, sched2, 2)
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


def test_rng_restore_gives_identical_draws(tmp_path):
    _seed_all(7)
    random.random()
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    rng = capture_rng_state()
    first = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(4))

    mgr = CheckpointManager(tmp_path)
    mgr.save(1, {"adapter": {"w": torch.zeros(1)}, "rng": rng})
    _seed_all(999)
    loaded = mgr.load(mgr.path_for(1))["rng"]
    restore_rng_state(loaded)
    second = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(4))
    assert first[0] == second[0] and first[1] == second[1] and torch.equal(first[2], second[2])


def test_optimizer_state_helpers_roundtrip():
    model = _model(0)
    opt, _ = _make_optim("adamw", model)
    _train(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), 2)
    sd = opt.state_dict()
    tensors, structure = optimizer_state_to_tensors(sd)
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())
    json.dumps(structure, allow_nan=False)  # pure strict JSON
    back = tensors_to_optimizer_state(tensors, json.loads(json.dumps(structure)))
    assert back["param_groups"] == sd["param_groups"]
    assert isinstance(back["param_groups"][0]["betas"], tuple)
    for pid in sd["state"]:
        for k, v in sd["state"][pid].items():
            assert torch.equal(back["state"][pid][k], v)
    with pytest.raises(CheckpointError, match="param_groups"):
        optimizer_state_to_tensors({"state": {}})


def test_tree_codec_edge_cases():
    tree = {
        "nan": float("nan"),
        "inf": float("-inf"),
        "tuple": (1, (2.5, "x"), None),
        3: "int key",
        "__dunder": True,
        "arr64": np.arange(5, dtype=np.uint64) * np.uint64(2**62),
        "arr32": np.arange(3, dtype=np.uint32),
        "npscalar": np.float32(1.5),
        "t": torch.tensor([1, 2], dtype=torch.int16),
    }
    tensors: dict = {}
    enc = json.loads(json.dumps(encode_tree(tree, tensors), allow_nan=False))
    dec = decode_tree(enc, tensors)
    assert math.isnan(dec["nan"]) and dec["inf"] == float("-inf")
    assert dec["tuple"] == (1, (2.5, "x"), None) and dec[3] == "int key" and dec["__dunder"] is True
    assert dec["arr64"].dtype == np.uint64 and np.array_equal(dec["arr64"], tree["arr64"])
    assert dec["arr32"].dtype == np.uint32 and np.array_equal(dec["arr32"], tree["arr32"])
    assert dec["npscalar"] == 1.5 and torch.equal(dec["t"], tree["t"])
    with pytest.raises(CheckpointError, match="/bad/0 has type object"):
        encode_tree({"bad": [object()]}, {})


def test_keep_last(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for step in (10, 20, 30, 40, 50):
        mgr.save(step, {"adapter": {"w": torch.full((2,), float(step))}, "trainer": {"step": step}})
    assert [s for s, _ in mgr.list_checkpoints()] == [40, 50]
    assert mgr.load_latest()[1] == 50
    assert mgr.load(mgr.path_for(40))["adapter"]["w"][0].item() == 40.0

    keep_all = CheckpointManager(tmp_path / "all", keep_last=None)
    for step in range(4):
        keep_all.save(step, {"adapter": {"w": torch.zeros(1)}})
    assert len(keep_all.list_checkpoints()) == 4
    with pytest.raises(ConfigError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=0)


def _three_checkpoints(tmp_path: Path) -> CheckpointManager:
    mgr = CheckpointManager(tmp_path, keep_last=5)
    for step in (1, 2, 3):
        mgr.save(step, {"adapter": {"w": torch.randn(64, 64), "b": torch.full((4,), float(step))},
                        "trainer": {"step": step}})
    return mgr


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "no_manifest", "missing_file"])
def test_corrupt_latest_falls_back_with_warning(tmp_path, damage):
    mgr = _three_checkpoints(tmp_path)
    bad = mgr.path_for(3)
    target = bad / ADAPTER_FILE
    data = bytearray(target.read_bytes())
    if damage == "truncate":
        target.write_bytes(bytes(data[: len(data) - 100]))
        reason = "truncated"
    elif damage == "bitflip":
        data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
        reason = "sha256 mismatch"
    elif damage == "no_manifest":
        (bad / MANIFEST_FILE).unlink()
        reason = "no manifest.json"
    else:
        target.unlink()
        reason = "missing"

    with pytest.warns(RuntimeWarning, match=rf"skipping checkpoint .*step-000003.*{reason}"):
        found = mgr.latest_valid()
    assert found == (mgr.path_for(2), 2)
    state = mgr.load(found[0])
    assert state["trainer"] == {"step": 2} and state["adapter"]["b"][0].item() == 2.0
    with pytest.raises(CheckpointError, match="step-000003"):
        mgr.load(bad)


def test_all_corrupt_returns_none_and_save_recovers(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    assert mgr.latest_valid() is None and mgr.load_latest() is None
    mgr.save(5, {"adapter": {"w": torch.ones(3)}})
    (mgr.path_for(5) / MANIFEST_FILE).write_text("{broken")
    with pytest.warns(RuntimeWarning, match="unreadable or corrupt"):
        assert mgr.latest_valid() is None
    # re-saving the same step replaces the broken directory atomically
    mgr.save(5, {"adapter": {"w": torch.ones(3)}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mgr.latest_valid() == (mgr.path_for(5), 5)


def test_save_validation_and_stale_temp_cleanup(tmp_path):
    mgr = CheckpointManager(tmp_path)
    with pytest.raises(CheckpointError, match='"optimizer"'):
        mgr.save(1, {"adapter": {"w": torch.ones(1)}, "optimiser": {}})
    with pytest.raises(CheckpointError, match="non-negative integer"):
        mgr.save(-1, {"adapter": {"w": torch.ones(1)}})
    with pytest.raises(CheckpointError, match="'adapter'"):
        mgr.save(1, {"trainer": {}})
    with pytest.raises(CheckpointError, match="type object"):
        mgr.save(1, {"adapter": {"w": torch.ones(1)}, "trainer": {"fn": object()}})
    # failed saves leave no partial checkpoint behind
    assert mgr.list_checkpoints() == []
    assert [p.name for p in mgr.root.iterdir()] == []

    stale = mgr.root / ".step-000009.tmp-abc"
    stale.mkdir()
    (stale / ADAPTER_FILE).write_bytes(b"partial")
    mgr.save(1, {"adapter": {"w": torch.ones(1)}, "scheduler": None})
    assert not stale.exists()
    assert mgr.load(mgr.path_for(1))["scheduler"] is None


def test_manager_probe_fails_early_for_file_path(tmp_path):
    f = tmp_path / "out"
    f.write_text("not a dir")
    with pytest.raises(CheckpointError, match="out"):
        CheckpointManager(f)


def test_checkpoint_moved_aside_by_an_interrupted_replace_is_recovered(tmp_path):
    """A kill between atomic_dir's two renames leaves the only copy under .step-N.old-*."""
    mgr = CheckpointManager(tmp_path, keep_last=1)
    mgr.save(2, {"adapter": {"w": torch.full((3,), 2.0)}, "trainer": {"step": 2}})
    aside = mgr.root / ".step-000002.old-0123456789ab"
    mgr.path_for(2).rename(aside)
    (mgr.root / ".step-000002.tmp-ba9876543210").mkdir()  # the new copy, never moved in
    state, step = mgr.load_latest()
    assert step == 2 and state["trainer"] == {"step": 2}
    assert mgr.path_for(2).is_dir() and not aside.exists()


def test_check_tensors_refuses_shape_dtype_and_key_mismatches():
    from adapterkit.engine.checkpoint import check_tensors

    model = {"a.weight": torch.zeros(3, 4), "b.bias": torch.zeros(4), "c.weight": torch.zeros(2, 2)}
    check_tensors({k: v.clone() for k, v in model.items()}, model, "ckpt")  # a match passes
    bad = {"a.weight": torch.ones(1), "b.bias": torch.zeros(4, dtype=torch.int64), "d": torch.zeros(1)}
    with pytest.raises(CheckpointError) as err:
        check_tensors(bad, model, "ckpt")
    msg = str(err.value)
    assert msg.startswith("ckpt does not match this model:")
    assert "missing c.weight" in msg and "unexpected d" in msg
    assert "a.weight: shape [1], the model has [3, 4]" in msg
    assert "b.bias: dtype torch.int64, the model has torch.float32" in msg


def test_config_differences_name_dotted_keys():
    from adapterkit.engine.checkpoint import ABSENT, config_differences

    old = {"train": {"lr": 0.005, "seed": 1, "scale": {"vqa": 1.0}}, "adapters": [{"method": "lora", "r": 8}],
           "data": {"tasks": ["vqa", "gqa"]}}
    new = {"train": {"lr": 0.005, "seed": 2, "scale": {"vqa": 1.0, "gqa": 2.0}},
           "adapters": [{"method": "lora", "r": 4}], "data": {"tasks": ["vqa"]}}
    assert config_differences(old, json.loads(json.dumps(old))) == {}
    assert config_differences(old, new) == {
        "train.seed": (1, 2), "train.scale.gqa": (ABSENT, 2.0), "adapters[0].r": (8, 4),
        "data.tasks": (["vqa", "gqa"], ["vqa"]),
    }
    # tuples and lists, ints and floats compare by value
    assert config_differences({"a": (1, 2), "b": 1}, {"a": [1, 2], "b": 1.0}) == {}
