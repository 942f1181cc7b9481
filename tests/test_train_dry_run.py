"""``adapterkit train CONFIG --dry-run``: the plan equals what the trainer does, and the
paper configs carry the reference's recipe (batch sizes, learning rates, GQA test-dev)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from adapterkit.cli import main as cli_main
from adapterkit.cli.train import format_plan, training_plan
from adapterkit.train.config import load_config
from adapterkit.vl.features import FeatureStoreWriter

CONFIGS = Path(__file__).resolve().parent.parent / "examples" / "configs"


def _tiny_cfg(tmp_path, **train):
    return {
        "name": "dry",
        "model": {"backbone": "tiny-bart", "feat_dim": 16, "n_images": 2},
        "preset": "single_adapter",
        "data": {"root": str(tmp_path / "fx"), "features": str(tmp_path / "fx" / "features"),
                 "tasks": ["vqa", "gqa", "nlvr", "caption"], "generate": "tiny_fixture"},
        "train": {"epochs": 3, "batch_size": 5, "max_text_len": 16, "max_target_len": 8,
                  "task_batch_scale": {"vqa": 1.0, "gqa": 1.4, "nlvr": 0.5, "caption": 2.0}, **train},
        "eval": {"select_on": "last"},
    }


def test_dry_run_plan_equals_the_trainer(tmp_path, capsys):
    from adapterkit import trainable_report
    from adapterkit.train.trainer import Trainer

    cfg = _tiny_cfg(tmp_path)
    plan = training_plan(load_config(cfg))
    tr = Trainer(load_config(cfg), tmp_path / "run")
    assert {t: r["batch_size"] for t, r in plan["tasks"].items()} == tr.batch_sizes
    assert {t: r["steps_per_epoch"] for t, r in plan["tasks"].items()} == tr.num_batches
    assert {t: r["examples"] for t, r in plan["tasks"].items()} == {t: len(d) for t, d in tr.train_data.items()}
    assert plan["steps_per_epoch"] == tr.steps_per_epoch and plan["total_steps"] == tr.total_steps
    assert plan["lr"] == tr.lr == 1e-3 and plan["lr_from"] == "preset lr"
    assert plan["trainable"] == trainable_report(tr.model)
    assert plan["warmup_steps"] == int(0.1 * tr.total_steps)
    # the CLI prints the same plan and trains nothing
    f = tmp_path / "dry.yaml"
    f.write_text(yaml.safe_dump(cfg))
    assert cli_main(["train", str(f), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == format_plan(plan)
    assert f"= {tr.total_steps:,}" in out and "trainable" in out and "last epoch's weights" in out
    assert not (tmp_path / "out").exists()
    # --preset overrides the config's preset; max_steps caps the schedule
    assert cli_main(["train", str(f), "--dry-run", "--preset", "full_finetune"]) == 0
    assert "preset full_finetune" in capsys.readouterr().out
    capped = training_plan(load_config(_tiny_cfg(tmp_path, max_steps=4)))
    assert capped["total_steps"] == 4
    # without --dry-run, --output is required: one error line, exit status 2
    assert cli_main(["train", str(f)]) == 2
    assert "--output DIR is required" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the paper configs


def _json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _store(path, ids, k, d):
    w = FeatureStoreWriter(path, ids, k, d, "float16", "test")
    w.write(np.zeros((len(ids), k, d), np.float16), np.zeros((len(ids), k, 4), np.float32))
    w.finalize()


def _image_datasets(root: Path) -> None:
    """The reference's datasets/ layout (VL-T5 files), a few records each."""
    coco = [f"COCO_val2014_{i:012d}" for i in range(4)]
    for split, n in (("karpathy_train", 7), ("karpathy_val", 2), ("karpathy_test", 3)):
        _json(root / "vqa" / f"{split}.json", [{"img_id": coco[i % 4], "sent": "what?", "question_id": i,
                                                "label": {"yes": 1.0}} for i in range(n)])
    for split, n in (("train", 5), ("valid", 4), ("testdev", 3)):
        _json(root / "GQA" / f"{split}.json", [{"img_id": "2354786", "sent": "is it?", "question_id": f"{split}{i}",
                                                "label": {"no": 1.0}} for i in range(n)])
    for split, n in (("train", 6), ("valid", 2), ("test", 2)):
        _json(root / "nlvr" / f"{split}.json", [{"identifier": f"dev-{i}-0-0", "img0": "dev-0-0-img0",
                                                 "img1": "dev-0-0-img1", "label": 1, "sent": "two dogs"}
                                                for i in range(n)])
    images = [{"filename": f"{c}.jpg", "split": s, "sentences": [{"raw": "a dog"}, {"raw": "a cat"}, {"raw": "x"}]}
              for c, s in zip(coco, ["train", "restval", "val", "test"])]
    _json(root / "COCO" / "dataset_coco.json", {"images": images})
    _store(root / "features" / "clip_rn101", coco + ["2354786", "dev-0-0-img0", "dev-0-0-img1"], 36, 2048)


def _paper_config(name: str, root: Path) -> dict:
    cfg = yaml.safe_load((CONFIGS / name).read_text())
    cfg["data"]["features"] = cfg["data"]["features"].replace("datasets", str(root), 1)
    for src in cfg["data"]["sources"].values():
        src["path"] = src["path"].replace("datasets", str(root), 1)
    return cfg


@pytest.mark.parametrize("name,batches", [("vl_bart_paper.yaml", {"vqa": 500, "gqa": 833, "nlvr": 166, "caption": 416}),
                                          ("vl_t5_paper.yaml", {"vqa": 300, "gqa": 500, "nlvr": 100, "caption": 250})])
def test_image_paper_configs(tmp_path, name, batches):
    root = tmp_path / "datasets"
    _image_datasets(root)
    cfg = load_config(_paper_config(name, root))
    plan = training_plan(cfg)
    assert {t: r["batch_size"] for t, r in plan["tasks"].items()} == batches  # the reference's int(B * k / 60)
    t = plan["tasks"]
    assert t["vqa"]["examples"] == 7 and t["vqa"]["val"] == 2 and t["vqa"]["test"] == 3
    assert t["gqa"]["examples"] == 5 + 4 and t["gqa"]["val"] == t["gqa"]["test"] == 3  # train+valid / test-dev
    assert t["caption"]["examples"] == 2 * 3 and t["caption"]["test"] == 1  # train + restval, per caption
    assert plan["epochs"] == 20 and plan["steps_per_epoch"] == 4 and plan["total_steps"] == 80
    assert plan["warmup_steps"] == 8 and plan["select_on"] == "last"
    assert plan["lr"] == 1e-3 and plan["optimizer"] == {"adam_eps": 1e-6, "weight_decay": 0.01, "grad_clip": 5.0}
    if name == "vl_bart_paper.yaml":
        assert plan["trainable"]["percent"] == pytest.approx(4.18, abs=0.005)  # the paper's single adapter
        # per-method learning rates come with the presets
        for preset, lr in (("full_finetune", 1e-4), ("multiple_adapters", 3e-4), ("single_lora", 1e-3)):
            cfg.preset = preset
            assert training_plan(cfg)["lr"] == lr


def test_video_paper_config(tmp_path):
    root = tmp_path / "datasets"
    ann = root / "video" / "ann"
    tv, how2, yc = "s03e02_seg02_clip_10", "how2_vid", "yc_vid"
    _jsonl(ann / "tv_subtitles.jsonl", [{"vid_name": tv, "sub": [{"start": 0, "end": 1, "text": "Hi."}]}])
    _jsonl(ann / "how2_subtitles.jsonl", [{"vid_name": how2, "sub": [{"start": 0, "end": 1, "text": "ok"}]}])
    _jsonl(ann / "yc2_subtitles.jsonl", [{"vid_name": yc, "sub": []}])
    qa = {"q": "Why?", "ts": "1.0-2.0", "answer_idx": 1, "show_name": "x"}
    for split, n in (("train", 120), ("val", 3)):
        _jsonl(ann / "tvqa" / f"tvqa_{split}.jsonl",
               [{**qa, "qid": i, "vid_name": tv, **{f"a{k}": f"ans {k}" for k in range(5)}} for i in range(n)])
        _jsonl(ann / "how2qa" / f"how2qa_{split}_release.jsonl",
               [{**qa, "qid": i, "vid_name": how2, **{f"a{k}": f"ans {k}" for k in range(4)}} for i in range(n)])
        _jsonl(ann / "tvc" / f"tvc_{split}_release.jsonl",
               [{"vid_name": tv, "clip_id": i, "ts": [1.0, 2.0], "duration": 5.0, "descs": [{"desc": "a man"}]}
                for i in range(n)])
        _jsonl(ann / "yc2c" / f"yc2c_{split}_release.jsonl",
               [{"vid_name": yc, "clip_id": i, "ts": [1.0, 2.0], "descs": [{"desc": "stir"}]} for i in range(n)])
    _store(root / "video" / "features" / "clip_vit_64", [tv, how2, yc], 64, 512)
    cfg = load_config(_paper_config("vl_bart_video_paper.yaml", root))
    plan = training_plan(cfg)
    assert {t: r["batch_size"] for t, r in plan["tasks"].items()} == dict.fromkeys(cfg.data.tasks, 50)
    assert {t: r["steps_per_epoch"] for t, r in plan["tasks"].items()} == dict.fromkeys(cfg.data.tasks, 3)
    assert plan["epochs"] == 7 and plan["total_steps"] == 7 * 12
    assert plan["lr"] == 3e-4 and plan["lr_from"] == "preset video_lr"
    from adapterkit.vl.build import count_params

    assert plan["trainable"] == count_params("vl-bart", "single_adapter", "video")  # the paper's 3.39% row
    cfg.preset = "full_finetune"
    assert training_plan(cfg)["lr"] == 3e-5
    assert cfg.train.max_text_len == 600


@pytest.mark.slow
def test_video_config_trains_on_value_files(tmp_path):
    """The video recipe end to end on a tiny random-init BART: VALUE files + subtitles -> trainer -> scores."""
    from adapterkit.train.trainer import Trainer

    test_video_paper_config(tmp_path)  # writes the VALUE fixture files under tmp_path/datasets
    cfg = _paper_config("vl_bart_video_paper.yaml", tmp_path / "datasets")
    cfg["model"] = {"backbone": "tiny-bart", "feat_dim": 512, "n_images": 1}
    cfg["data"].update(max_train_examples=4, max_eval_examples=2)
    cfg["train"].update(batch_size=2, epochs=1, max_text_len=64)
    cfg["eval"].update(caption_beams=1, caption_max_new_tokens=3, max_new_tokens=2)
    tr = Trainer(load_config(cfg), tmp_path / "run", max_steps=3)
    ex = tr.train_data["tvqa"].examples[0]
    assert ex.text == "[Subs] Hi. [Q] Why? [TS] (1.0-2.0) [Choices] a0: ans 0. a1: ans 1. a2: ans 2. a3: ans 3. a4: ans 4."
    assert ex.targets == ["a1"]
    res = tr.fit()
    assert set(res["test"]) == {"tvqa", "how2qa", "tvc", "yc2c"}
    assert 0.0 <= res["test"]["tvqa"]["accuracy"] <= 100.0 and "CIDEr" in res["test"]["tvc"]


@pytest.mark.slow
def test_image_config_trains_on_the_reference_files(tmp_path):
    """The image recipe end to end on a tiny random-init BART: VL-T5 files, GQA train+valid /
    test-dev, and VQA scored with the official answers found next to the Karpathy files."""
    import warnings

    from adapterkit.train.trainer import Trainer
    from adapterkit.vl.metrics import vqa as vqa_mod

    root = tmp_path / "datasets"
    _image_datasets(root)
    anns = [{"question_id": i, "image_id": i % 4, "answers": [{"answer": "yes"}] * 10} for i in range(7)]
    _json(root / "vqa" / "v2_mscoco_val2014_annotations.json", {"annotations": anns})
    store = root / "features" / "small"
    ids = [f"COCO_val2014_{i:012d}" for i in range(4)] + ["2354786", "dev-0-0-img0", "dev-0-0-img1"]
    _store(store, ids, 4, 16)
    cfg = _paper_config("vl_bart_paper.yaml", root)
    cfg["model"] = {"backbone": "tiny-bart", "feat_dim": 16, "n_images": 2}
    cfg["data"]["features"] = str(store)
    cfg["train"].update(batch_size=4, epochs=1)
    cfg["eval"].update(caption_beams=1, caption_max_new_tokens=3, max_new_tokens=2)
    tr = Trainer(load_config(cfg), tmp_path / "run", max_steps=2)
    assert len(tr.train_data["gqa"]) == 9  # train + valid
    vqa_test = tr._eval_data("vqa", "test").examples
    assert all(e.extra["raw_answers"] and len(e.targets) == 10 for e in vqa_test)
    vqa_mod._warned_soft = False
    with warnings.catch_warnings():
        warnings.simplefilter("error", vqa_mod.SoftLabelScoreWarning)  # the official accuracy: no fallback
        res = tr.fit()
    assert set(res["test"]) == {"vqa", "gqa", "nlvr", "caption"} and res["checkpoint"] == "last"


def test_dry_run_without_the_data_lists_every_missing_split(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no datasets/ here
    assert cli_main(["train", str(CONFIGS / "vl_bart_paper.yaml"), "--dry-run"]) == 2
    out, err = capsys.readouterr()
    assert out.count("missing training data:") == 4 and "vqa/train: VQA data not found" in out
    assert "unknown until every training split can be read (20 epochs)" in out
    # what does not need the data is still there: the batches, the learning rate, the trainable share
    assert "(4.18%)" in out and "learning rate 1.00e-03 (preset lr)" in out
    assert "4 training split(s) cannot be read" in err
