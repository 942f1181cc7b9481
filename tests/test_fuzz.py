"""Property-based fuzzing of every input the library reads: run configs (dicts and YAML text),
adapter configs, checkpoint manifests and structure files, dataset lines. The property is
always the same: the input is accepted, or it is refused with ONE of the library's errors
(ConfigError / DataError / CheckpointError) carrying a message; never another exception,
a RecursionError or a hang. Fixed budget (derandomized, max_examples, deadline): ~20 s."""

from __future__ import annotations

import copy
import json
import math
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import adapterkit
from adapterkit.errors import CheckpointError, ConfigError, DataError
from adapterkit.train.config import load_config

OURS = (ConfigError, DataError, CheckpointError)
BUDGET = {"derandomize": True, "database": None, "deadline": 2000,
          "suppress_health_check": [HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                    HealthCheck.data_too_large]}


def _ours_or_ok(fn, *args):
    try:
        return fn(*args)
    except OURS as e:
        assert str(e).strip(), f"{type(e).__name__} without a message"
        return None


# --- values: the nasty ones the tester used --------------------------------------------------------

nasty_numbers = st.sampled_from([0, -1, 1, 2**31, 2**63, 2**70, 10**12, 1e6, 1e12, 1e30, 3e38, 1e308,
                                 -1e308, float("nan"), float("inf"), float("-inf"), 0.5, True, False])
nasty_text = st.sampled_from(["", "a.b", "../../x", "abc", "vqa", "gqa", "val", "single_lora", "lora",
                              "false", "true", "1e999", "\u0000", "x" * 300])
leaf = st.one_of(st.none(), nasty_numbers, nasty_text, st.integers(-10, 10), st.floats(allow_nan=True),
                 st.text(max_size=6))


def nested(depth_leaf=leaf):
    return st.recursive(depth_leaf, lambda ch: st.one_of(st.lists(ch, max_size=3),
                                                         st.dictionaries(st.text(max_size=6), ch, max_size=3)),
                        max_leaves=8)


def deep(n):
    v = 1
    for _ in range(n):
        v = [v]
    return v


values = st.one_of(leaf, nested(), st.integers(60, 400).map(deep))


def _paths(obj, prefix=()):
    """Every (path) to a value inside nested dicts/lists."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


NEW_KEYS = st.sampled_from(["lr", "r", "alpha", "tasks", "sources", "epochs", "x", "a.b"])


@st.composite
def mutated(draw, base, keys=NEW_KEYS):
    """``base`` with 1-3 values replaced, deleted or given a new key."""
    obj = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(obj) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = obj
        for k in path[:-1]:
            parent = parent[k]
        op = draw(st.sampled_from(["set", "set", "del", "add"]))
        if op == "del":
            del parent[path[-1]]
        elif op == "add" and isinstance(parent, dict):
            parent[draw(keys)] = draw(values)
        else:
            parent[path[-1]] = draw(values)
    return obj


# --- run configs ---------------------------------------------------------------------------------

RUN = {"model": {"backbone": "tiny-bart", "feat_dim": 16, "n_images": 2},
       "adapters": [{"method": "lora", "r": 4, "alpha": 8.0, "targets": ["q", "v"]}],
       "data": {"root": "/nonexistent", "features": "/nonexistent/f", "tasks": ["vqa", "gqa"],
                "sources": {"vqa": {"format": "vqa", "path": "/x", "splits": {"train": "karpathy_train"}}}},
       "train": {"epochs": 2, "batch_size": 4, "lr": 1e-3, "seed": 1, "task_batch_scale": {"vqa": 1, "gqa": 2},
                 "adam_eps": 1e-6, "max_steps": 10},
       "eval": {"batch_size": 8, "caption_beams": 2, "select_on": "last"}, "name": "run"}


@settings(max_examples=150, **BUDGET)
@given(mutated(RUN))
def test_fuzz_run_configs(cfg):
    got = _ours_or_ok(load_config, cfg)
    if got is not None:  # accepted: every number is in its documented range
        t = got.train
        assert 1 <= t.epochs <= 100_000 and 0 <= t.seed < 2**63 and (t.lr is None or 0 < t.lr <= 10)
        assert 0 < t.adam_eps <= 1 and 1 <= got.eval.caption_beams <= 64
        for a in got.adapters or []:
            assert all(not isinstance(v, float) or math.isfinite(v) for v in a.values())


yaml_lines = st.sampled_from(["model: {backbone: tiny-bart}", "preset: single_lora", "train: {lr: 0.1}",
                              "train: {lr: 0.2}", "a: &a [1, 1, 1, 1, 1, 1, 1, 1]", "b: &b [*a, *a, *a, *a, *a]",
                              "c: [*b, *b, *b, *b, *b, *b]", "data: {sources: *c}", "name: ../../x", "- 1",
                              "  x: [", "train: !!python/object:os.system ls", "epochs: 1e12", "\t", "{",
                              "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[", "eval: {caption_beams: 1000000}"])


@settings(max_examples=80, **BUDGET)
@given(st.lists(yaml_lines, max_size=8), st.binary(max_size=16))
def test_fuzz_run_config_files(tmp_path_factory, lines, junk):
    p = tmp_path_factory.mktemp("yaml") / "c.yaml"
    p.write_bytes("\n".join(lines).encode() + junk)
    _ours_or_ok(load_config, p)


# --- adapter configs (adapter_config.json) ---------------------------------------------------------

@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory):
    from adapterkit.testing.tiny import tiny_model

    model = tiny_model("bert")
    adapterkit.add_adapters(model, {"method": "lora", "r": 2, "alpha": 4.0, "tasks": ["a", "b"]})
    d = tmp_path_factory.mktemp("adapter") / "ad"
    adapterkit.save_adapters(model, d)
    return d


@settings(max_examples=60, **BUDGET)
@given(data=st.data())
def test_fuzz_adapter_configs(saved_adapter, tmp_path_factory, data):
    from adapterkit.core.io import config_checksum
    from adapterkit.testing.tiny import tiny_model

    base = json.loads((saved_adapter / "adapter_config.json").read_text())
    cfg = data.draw(mutated(base))
    d = tmp_path_factory.mktemp("ad") / "ad"
    shutil.copytree(saved_adapter, d)
    if isinstance(cfg, dict) and data.draw(st.booleans()):  # a consistent checksum: reach the deeper checks
        try:
            cfg["config_sha256"] = config_checksum(cfg)
        except (TypeError, ValueError):
            pass
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    _ours_or_ok(adapterkit.load_adapters, tiny_model("bert"), d)


# --- checkpoint manifests and structure files -------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from adapterkit.engine.checkpoint import CheckpointManager, capture_rng_state

    out = tmp_path_factory.mktemp("ckpt")
    w = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.AdamW([w], lr=1e-3)
    w.sum().backward()
    opt.step()
    path = CheckpointManager(out, keep_last=None).save(
        3, {"adapter": {"w": w.detach()}, "optimizer": opt.state_dict(), "rng": capture_rng_state(),
            "trainer": {"epoch": 0, "pos": 3, "step": 3, "history": [{"step": 2, "val": 1.5}]}})
    return out, path


@settings(max_examples=50, **BUDGET)
@given(data=st.data())
def test_fuzz_checkpoint_manifests(checkpoint, tmp_path_factory, data):
    from adapterkit.engine.checkpoint import CheckpointManager
    from adapterkit.safeio import sha256_file

    out, path = checkpoint
    target = data.draw(st.sampled_from(["manifest.json", "trainer.json", "optimizer.json", "rng.json"]))
    doc = json.loads((path / target).read_text())
    new = data.draw(mutated(doc, keys=st.sampled_from(["__tensor__", "__tuple__", "__dict__", "__float__",
                                                        "__ndarray__", "dtype", "step", "files", "x"])))
    root = tmp_path_factory.mktemp("run")
    copy_dir = root / "checkpoints" / path.name
    shutil.copytree(path, copy_dir)
    (copy_dir / target).write_text(json.dumps(new))
    if target != "manifest.json":  # a consistent manifest: reach the structure decoding
        m = json.loads((copy_dir / "manifest.json").read_text())
        m["files"][target] = {"sha256": sha256_file(copy_dir / target), "bytes": (copy_dir / target).stat().st_size}
        (copy_dir / "manifest.json").write_text(json.dumps(m))
    mgr = CheckpointManager(root, keep_last=None)
    _ours_or_ok(mgr.load, copy_dir)


# --- dataset lines --------------------------------------------------------------------------------

GOOD_LINE = {"uid": "q1", "task": "vqa", "image_ids": ["img0"], "text": "what?", "targets": ["cat"],
             "target_scores": {"cat": 1.0}}


@settings(max_examples=150, **BUDGET)
@given(st.lists(st.one_of(mutated(GOOD_LINE).map(json.dumps), st.just(json.dumps(GOOD_LINE)),
                          st.binary(max_size=12).map(lambda b: b.decode("latin-1")),
                          st.integers(60, 3000).map(lambda n: "[" * n + "]" * n)), min_size=1, max_size=4),
       st.booleans())
def test_fuzz_dataset_lines(tmp_path_factory, lines, raw_bytes):
    from adapterkit.vl.datasets.base import read_examples_jsonl

    p = tmp_path_factory.mktemp("lines") / "split.jsonl"
    body = "\n".join(lines) + "\n"
    p.write_bytes(body.encode("latin-1", errors="replace") if raw_bytes else body.encode("utf-8", "surrogatepass"))
    got = _ours_or_ok(read_examples_jsonl, p)
    if got is not None:
        assert len({e.uid for e in got}) == len(got)
        for e in got:
            assert all(math.isfinite(s) and 0 <= s <= 1 for s in (e.target_scores or {}).values())
