"""Validation before work: run configs, method configs, adapter configs and dataset rows each
fail with one error naming the key (or the file and line), before anything is allocated or trained."""

from __future__ import annotations

import json
import math
import re

import pytest
import yaml

import adapterkit
from adapterkit.core.config import config_from_dict
from adapterkit.errors import CheckpointError, ConfigError, DataError
from adapterkit.testing.fixtures import make_vl_fixture
from adapterkit.testing.tiny import tiny_model
from adapterkit.train.config import load_config
from adapterkit.vl.datasets.base import VLExample, read_examples_jsonl, write_examples_jsonl


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_vl_fixture(tmp_path_factory.mktemp("val") / "data", n_images=12)


def _cfg(root=None, **sections):
    cfg = {"model": {"backbone": "tiny-bart", "feat_dim": 16}, "preset": "single_lora",
           "data": {"root": str(root or "/nonexistent"), "features": str(root or "/nonexistent") + "/features"}}
    for k, v in sections.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    return cfg


# --- run configs ------------------------------------------------------------------------------

@pytest.mark.parametrize("sections, match", [
    ({"train": {"task_batch_scale": 5}}, r'train.task_batch_scale" must be a mapping'),
    ({"data": {"sources": True}}, r'data.sources" must be a mapping'),
    ({"adapters": {"method": "lora"}, "preset": None}, r'"adapters" must be a list'),
    ({"adapters": [["lora"]], "preset": None}, r'adapters\[0\]" must be a mapping'),
    ({"name": "a.b"}, r"run name 'a.b' is not a valid name"),
    ({"name": "../../x"}, r"run name '../../x' is not a valid name"),
    ({"data": {"tasks": ["vqa", "../x"]}}, r"task '../x' is not a valid name"),
    ({"data": {"train_split": "../../etc"}}, r"data.train_split '../../etc' is not a valid split"),
    ({"train": {"lr": 3e38}}, r'"lr" must be <= 10'),
    ({"train": {"seed": 2**70}}, r'"seed" must be <= 9223372036854775807'),
    ({"train": {"seed": -1}}, r'"seed" must be >= 0'),
    ({"eval": {"caption_beams": 1e6}}, r'eval.caption_beams" must be an integer'),
    ({"eval": {"caption_beams": 10**6}}, r'"caption_beams" must be <= 64'),
    ({"train": {"epochs": 10**12}}, r'"epochs" must be <= 100000'),
    ({"train": {"adam_eps": 1e30}}, r'"adam_eps" must be <= 1.0'),
    ({"train": {"batch_size": 10**9}}, r'"batch_size" must be <= 65536'),
    ({"train": {"max_text_len": 10**7}}, r'"max_text_len" must be <= 8192'),
    ({"train": {"task_batch_scale": {"vqaa": 2}}}, r'task_batch_scale\["vqaa"\].*not one of data.tasks.*did you mean "vqa"'),
    ({"train": {"task_batch_scale": {"vqa": float("nan")}}}, r'task_batch_scale\["vqa"\] must be a number'),
    ({"data": {"sources": {"gqaa": {"path": "x"}}}}, r'data.sources\["gqaa"\].*not one of data.tasks'),
    ({"data": {"sources": {"vqa": {"path": "x", "fromat": "vqa"}}}}, r'unknown key "fromat"'),
    ({"data": {"sources": {"vqa": {"path": "x", "format": "vqa2"}}}}, r"unknown format 'vqa2'"),
    ({"adapters": [{"method": "lora", "r": 10**9}], "preset": None}, r'adapters\[0\]: "r" must be <= 8192'),
    ({"adapters": [{"method": "lora", "alpha": 1e308}], "preset": None}, r'"alpha" must be between'),
    ({"adapters": [{"method": "lora", "tasks": ["vqa", "vqa2"]}], "preset": None},
     r"adapters\[0\].tasks: 'vqa2' is not one of data.tasks"),
])
def test_bad_run_config_is_one_config_error_naming_the_key(sections, match):
    with pytest.raises(ConfigError, match=match):
        load_config(_cfg(**sections))


def test_default_task_batch_scale_is_fine_with_fewer_tasks():
    assert load_config(_cfg(data={"tasks": ["vqa"]})).data.tasks == ["vqa"]


def test_yaml_duplicate_keys_aliases_and_nesting_are_refused(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: {backbone: tiny-bart}\npreset: single_lora\ntrain: {lr: 0.1}\ntrain: {lr: 1.0}\n")
    with pytest.raises(ConfigError, match=r'line 4: the key "train" is given twice'):
        load_config(p)
    laughs = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        laughs.append(f"{chr(97 + i)}: &{chr(97 + i)} [" + ", ".join([f"*{chr(96 + i)}"] * 10) + "]")
    p.write_text("data:\n  sources:\n" + "".join(f"    {line}\n" for line in laughs))
    with pytest.raises(ConfigError, match="expands to more than 100,000 values"):
        load_config(p)
    p.write_text("[" * 5000 + "]" * 5000)
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config(p)
    p.write_text("train: " + "{a: " * 70 + "1" + "}" * 70)
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config(p)
    p.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(p)
    deep = current = {}
    for _ in range(200):
        current["x"] = {}
        current = current["x"]
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config({"data": deep})


def test_feature_store_index_types_are_checked(data, tmp_path):
    import shutil

    from adapterkit.vl.features import FeatureStore

    store = tmp_path / "features"
    shutil.copytree(data / "features", store)
    index = json.loads((store / "index.json").read_text())
    for key, value, match in [("complete", "false", '"complete" must be true or false'),
                              ("ids", "img0001", '"ids" must be a list of strings'),
                              ("dim", 0, '"dim" must be a positive integer'),
                              ("dtype", "float33", '"dtype" must name a numpy dtype')]:
        (store / "index.json").write_text(json.dumps({**index, key: value}))
        with pytest.raises(DataError, match=match):
            FeatureStore.open(store)
    (store / "index.json").write_text(json.dumps({**index, "ids": index["ids"][:1] * len(index["ids"])}))
    with pytest.raises(DataError, match="appears twice"):
        FeatureStore.open(store)


# --- method configs ---------------------------------------------------------------------------

@pytest.mark.parametrize("d, match", [
    ({"method": "lora", "r": 10**9}, r'"r" must be <= 8192'),
    ({"method": "lora", "alpha": 1e308}, r'"alpha" must be between -1e\+06 and 1e\+06'),
    ({"method": "houlsby", "scale": -1e300}, r'"scale" must be between'),
    ({"method": "pruned_bottleneck", "widths": [1, 2]}, r'"widths" must be a mapping'),
    ({"method": "lora", "tasks": ["a.b"]}, r"task name 'a.b' is not a valid name"),
    ({"method": "lora", "tasks": [f"t{i}" for i in range(2000)]}, r"at most 1024"),
])
def test_bad_method_config_is_one_config_error(d, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(d)


# --- adapter_config.json ------------------------------------------------------------------------

def _saved(tmp_path):
    model = tiny_model("bert")
    adapterkit.add_adapters(model, {"method": "lora", "r": 4, "alpha": 8.0})
    adapterkit.save_adapters(model, tmp_path / "ad")
    return tmp_path / "ad"


def _rewrite(d, edit, recompute=True):
    from adapterkit.core.io import config_checksum

    p = d / "adapter_config.json"
    cfg = json.loads(p.read_text())
    edit(cfg)
    if recompute:
        cfg["config_sha256"] = config_checksum(cfg)
    p.write_text(json.dumps(cfg))


def test_adapter_config_checksum_refuses_an_edited_alpha(tmp_path):
    d = _saved(tmp_path)
    adapterkit.load_adapters(tiny_model("bert"), d)  # intact: loads
    text = (d / "adapter_config.json").read_text()
    assert '"alpha": 8.0' in text
    (d / "adapter_config.json").write_text(text.replace('"alpha": 8.0', '"alpha": 9.0'))
    with pytest.raises(CheckpointError, match="edited or is corrupt.*config_sha256"):
        adapterkit.load_adapters(tiny_model("bert"), d)


def test_adapter_config_without_checksum_still_loads(tmp_path, caplog):
    d = _saved(tmp_path)
    _rewrite(d, lambda c: c.pop("config_sha256"), recompute=False)
    with caplog.at_level("INFO", logger="adapterkit.core.io"):
        adapterkit.load_adapters(tiny_model("bert"), d)
    assert "no config_sha256" in caplog.text


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.update(adapters=[c["adapters"]["lora"]]), "not an adapterkit adapter config"),
    (lambda c: c["adapters"].update({"a.b": c["adapters"].pop("lora")}), "adapter name 'a.b' is not a valid name"),
    (lambda c: c["adapters"].update({"../../x": c["adapters"].pop("lora")}), "adapter name '../../x'"),
    (lambda c: c["adapters"].update(lora=[1, 2]), r'adapters\["lora"\] must be an object'),
    (lambda c: c.update(shapes={"x": [-1]}), '"shapes" must map names to lists of non-negative integers'),
    (lambda c: c.update(base_trainable="all"), '"base_trainable" must be a list'),
])
def test_malformed_adapter_config_is_one_checkpoint_error(tmp_path, edit, match):
    d = _saved(tmp_path)
    _rewrite(d, edit)
    with pytest.raises(CheckpointError, match=match):
        adapterkit.load_adapters(tiny_model("bert"), d)


def test_adapter_config_huge_rank_is_refused_before_allocating(tmp_path):
    d = _saved(tmp_path)
    _rewrite(d, lambda c: c["adapters"]["lora"].update(r=10**6))  # a consistent checksum: only the bound stops it
    with pytest.raises(CheckpointError, match=r'"r" must be <= 8192'):
        adapterkit.load_adapters(tiny_model("bert"), d)


def test_adapter_config_deep_nesting(tmp_path):
    d = _saved(tmp_path)
    (d / "adapter_config.json").write_text('{"format": "adapterkit", "extra": ' + "[" * 100000 + "]" * 100000 + "}")
    with pytest.raises(CheckpointError, match="nested too deeply"):
        adapterkit.load_adapters(tiny_model("bert"), d)


# --- dataset rows -----------------------------------------------------------------------------

def _ex(uid="v1", task="vqa", images=("img0000",), targets=("cat",), scores=None, label=None):
    return VLExample(uid, task, list(images), "what is it?", list(targets), scores, label=label)


def _write(path, rows):
    path.write_text("".join(json.dumps(r.to_json() if isinstance(r, VLExample) else r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("rows, match", [
    ([_ex("a"), _ex("b"), _ex("a")], r":3: uid 'a' appears twice \(also on line 1\)"),
    ([_ex("a"), _ex("b", targets=[""])], r":2: uid 'b' has an empty target string"),
    ([_ex("a"), _ex("b", targets=[])], r":2: uid 'b' has no target while other rows"),
    ([_ex("a", scores={"cat": float("nan")})], r":1: target score of 'cat' is nan"),
    ([_ex("a", scores={"cat": 7.0})], r":1: target score of 'cat' is 7.0"),
    ([_ex("n", task="nlvr", images=["img0000"], targets=["true"])], r":1: a 'nlvr' example needs 2 image"),
    ([_ex("a", images=[])], r":1: a 'vqa' example needs 1 image"),
])
def test_bad_rows_are_one_data_error_naming_file_and_line(tmp_path, rows, match):
    with pytest.raises(DataError, match=r"rows.jsonl" + match):
        read_examples_jsonl(_write(tmp_path / "rows.jsonl", rows))


def test_non_utf8_and_deep_lines_name_the_line(tmp_path):
    p = _write(tmp_path / "rows.jsonl", [_ex("a"), _ex("b")])
    p.write_bytes(p.read_bytes() + b'{"uid": "\xff"}\n')
    with pytest.raises(DataError, match=r"rows.jsonl:3: not UTF-8"):
        read_examples_jsonl(p)
    p.write_text(json.dumps(_ex("a").to_json()) + "\n" + "[" * 50000 + "]" * 50000 + "\n")
    with pytest.raises(DataError, match=r"rows.jsonl:2 is nested too deeply"):
        read_examples_jsonl(p)


def test_unlabelled_split_reads(tmp_path):
    rows = read_examples_jsonl(_write(tmp_path / "test.jsonl", [_ex("a", targets=[]), _ex("b", targets=[])]))
    assert [r.uid for r in rows] == ["a", "b"]


def test_check_paths_checks_every_split_against_the_store_and_task(data, tmp_path):
    import shutil

    root = tmp_path / "d"
    shutil.copytree(data, root)
    cfg = load_config(_cfg(root))
    cfg.check_paths(("train", "val"))  # the fixture is valid
    test = root / "gqa" / "test.jsonl"
    good = test.read_text()
    rows = read_examples_jsonl(test)
    rows[1].image_ids = ["img9999"]
    write_examples_jsonl(test, rows)
    with pytest.raises(DataError, match=r"gqa/test.jsonl:2: image id 'img9999' .* not in the feature store"):
        cfg.check_paths(("train",))
    rows[1].image_ids = rows[0].image_ids
    rows[1].task = "vqa"
    write_examples_jsonl(test, rows)
    with pytest.raises(DataError, match=r"gqa/test.jsonl:2: task is 'vqa', but this is a 'gqa' split"):
        cfg.check_paths(("train",))
    test.write_text(good)
    train = root / "caption" / "train.jsonl"
    rows = read_examples_jsonl(train)
    for r in rows:
        r.targets = []
    write_examples_jsonl(train, rows)
    with pytest.raises(DataError, match=r"caption/train.jsonl:1: uid .* has no target \(a training split"):
        cfg.check_paths(("train",))


def test_metrics_refuse_duplicate_uids_instead_of_collapsing():
    from adapterkit.vl.metrics import TASK_METRICS

    exs = [_ex(f"q{i % 3}", targets=["cat"] * 10) for i in range(7)]
    preds = {e.uid: "cat" for e in exs}
    with pytest.raises(DataError, match="uid 'q0' appears twice"):
        TASK_METRICS["vqa"](preds, exs)
    unique = [_ex(f"q{i}", targets=["cat"] * 10) for i in range(7)]
    assert TASK_METRICS["vqa"]({e.uid: "cat" for e in unique}, unique)["accuracy"] == pytest.approx(100.0)
    assert math.isfinite(TASK_METRICS["gqa"]({e.uid: "cat" for e in unique}, {e.uid: e for e in unique})["accuracy"])


def test_yaml_config_file_round_trip(tmp_path, data):
    p = tmp_path / "ok.yaml"
    p.write_text(yaml.safe_dump(_cfg(data, train={"seed": 2**40, "lr": 1e-3})))
    assert load_config(p).train.seed == 2**40


# --- warnings print once ------------------------------------------------------------------------

def test_checkpoint_fallback_warning_prints_once_without_a_code_line(tmp_path):
    import subprocess
    import sys

    import torch

    from adapterkit.engine.checkpoint import CheckpointManager

    mgr = CheckpointManager(tmp_path, keep_last=None)
    for step in (1, 2):
        mgr.save(step, {"adapter": {"w": torch.full((4,), float(step))}})
    f = mgr.path_for(2) / "adapter_model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-2] ^= 0x01
    f.write_bytes(bytes(raw))
    code = ("from adapterkit.engine.checkpoint import CheckpointManager\n"
            f"print(CheckpointManager({str(tmp_path)!r}).latest_valid()[1])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "1", r.stderr
    assert r.stderr.count("skipping checkpoint") == 1, r.stderr
    assert r.stderr.startswith("adapterkit: warning: skipping checkpoint") and "warn(" not in r.stderr


# --- adapterkit eval verifies what it loads -------------------------------------------------------

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from adapterkit.cli import main

    root = tmp_path_factory.mktemp("evalrun")
    data = make_vl_fixture(root / "data", n_images=12)
    cfg = {"model": {"backbone": "tiny-bart", "feat_dim": 16}, "preset": "single_lora",
           "data": {"root": str(data), "features": str(data / "features")},
           "train": {"epochs": 1, "max_steps": 2, "batch_size": 4, "checkpoint_every": 2, "max_text_len": 12,
                     "max_target_len": 6, "task_batch_scale": {"vqa": 1, "gqa": 1, "nlvr": 1, "caption": 1}},
           "eval": {"batch_size": 16, "max_new_tokens": 2, "caption_max_new_tokens": 3, "caption_beams": 1,
                    "select_on": "last"}}
    p = root / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(p), "--output", str(root / "run")]) == 0
    return p, root / "run"


def _damage(f, how):
    from safetensors.torch import load_file, save_file

    raw = bytearray(f.read_bytes())
    if how == "bit flip":
        raw[-5] ^= 0x40  # the exponent's top bit of a float32 near the end: a weight of ~1e38
        f.write_bytes(bytes(raw))
    elif how == "empty":
        f.write_bytes(b"")
    elif how == "subset":
        t = load_file(f)
        save_file(dict(list(t.items())[: len(t) // 2]), f)


def test_eval_refuses_a_corrupt_weights_file(trained_run, tmp_path, capsys):
    """A bit flip, an empty file and a subset of the keys: each one clear error, exit 2 (they all exited 0)."""
    import shutil

    from adapterkit.cli import main

    cfg, run = trained_run
    capsys.readouterr()
    assert main(["eval", str(cfg), "--checkpoint", str(run)]) == 0  # intact: scores
    for how, match in [("bit flip", "is corrupt: its tensors do not match the checksum"), ("empty", "truncated"),
                       ("subset", "missing")]:
        copy = tmp_path / how.replace(" ", "_")
        shutil.copytree(run, copy, ignore=shutil.ignore_patterns("train.lock"))
        _damage(copy / "final" / "adapter_model.safetensors", how)
        capsys.readouterr()
        assert main(["eval", str(cfg), "--checkpoint", str(copy)]) == 2, how
        err = capsys.readouterr().err
        assert err.startswith("adapterkit eval: error: ") and re.search(match, err), (how, err)
        assert err.count("\n") == 1, err  # one line, no traceback


def test_trainer_probes_for_the_space_a_checkpoint_needs(data, tmp_path, monkeypatch):
    """4 KiB free passed the old probe and failed at the first checkpoint; now the run is refused at once."""
    import collections

    from adapterkit import safeio
    from adapterkit.train.trainer import Trainer

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(safeio.shutil, "disk_usage", lambda p: usage(1 << 30, (1 << 30) - 4096, 4096))
    cfg = _cfg(data, eval={"select_on": "last"},
               train={"max_steps": 1, "batch_size": 4, "max_text_len": 12, "max_target_len": 6})
    with pytest.raises(CheckpointError, match=r"disk full: .* has only 4.0 KiB free, need at least"):
        Trainer(load_config(cfg), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_official_format_json_nesting_is_a_data_error(tmp_path):
    from adapterkit.vl.datasets.base import load_json, load_json_records

    p = tmp_path / "karpathy_train.json"
    p.write_text("[" * 100000 + "]" * 100000)
    for read in (load_json, load_json_records):
        with pytest.raises(DataError, match="karpathy_train.json: nested too deeply"):
            read(p)
    p.write_text('{"a": 1}\n' + "[" * 100000 + "]" * 100000 + "\n")
    with pytest.raises(DataError, match=r"karpathy_train.json:2: nested too deeply"):
        load_json_records(p)
