"""VL-Adapter flagship end to end on tiny random-init VL-BART / VL-T5 / causal models."""

import json

import numpy as np
import pytest
import torch

import adapterkit
from adapterkit.testing.fixtures import make_vl_fixture
from adapterkit.train.config import load_config
from adapterkit.train.trainer import Trainer
from adapterkit.vl.data import task_schedule
from adapterkit.vl.presets import list_presets


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread (a shared, loaded CPU makes two threads spin, not speed up)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory):
    return make_vl_fixture(tmp_path_factory.mktemp("vlfix") / "data", n_images=24)


def _cfg(root, backbone="tiny-bart", preset="single_adapter", **train):
    t = {"epochs": 1, "batch_size": 4, "task_batch_scale": {"vqa": 1, "gqa": 1, "nlvr": 1, "caption": 1},
         "checkpoint_every": 1000, "max_text_len": 12, "max_target_len": 6, "lr": 1e-2}
    t.update(train)
    return {"model": {"backbone": backbone, "feat_dim": 16}, "preset": preset,
            "data": {"root": str(root), "features": str(root / "features")}, "train": t,
            "eval": {"batch_size": 16, "max_new_tokens": 3, "caption_max_new_tokens": 4, "caption_beams": 2}}


@pytest.mark.parametrize("backbone", ["tiny-bart", "tiny-t5", "tiny-llama"])
@pytest.mark.parametrize("preset", list_presets())
def test_every_preset_trains_evaluates_and_reloads(fixture_dir, tmp_path, backbone, preset):
    if backbone != "tiny-bart" and preset not in ("single_adapter", "multiple_lora", "single_prompt", "hyperformer"):
        pytest.skip("the full preset list runs on VL-BART; VL-T5 and causal run a representative subset")
    tr = Trainer(load_config(_cfg(fixture_dir, backbone, preset, max_steps=3)), tmp_path / "run")
    res = tr.fit()
    assert set(res["test"]) == {"vqa", "gqa", "nlvr", "caption"}
    assert 0 < res["percent"] <= 100
    assert (tmp_path / "run" / "results.json").exists()
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["versions"]["torch"] == torch.__version__ and "config" in saved
    if preset != "full_finetune":
        # the best adapter directory reloads into a fresh model with identical outputs
        fresh = Trainer(load_config(_cfg(fixture_dir, backbone, preset, max_steps=3)), tmp_path / "other")
        batch = tr.train_data["vqa"].eval_batch(np.arange(2))
        batch.pop("uids")
        adapterkit.load_adapters(fresh.model, tmp_path / "run" / "best")
        fresh._load_best()
        tr.model.eval()
        fresh.model.eval()
        with torch.no_grad():
            a = tr.model.first_token_scores(**batch, candidate_ids=[3, 4], task_ids=0)
            b = fresh.model.first_token_scores(**batch, candidate_ids=[3, 4], task_ids=0)
        torch.testing.assert_close(a, b)


def test_loss_goes_down_on_memorisable_fixture(fixture_dir, tmp_path):
    cfg = _cfg(fixture_dir, "tiny-bart", "single_adapter", epochs=15, lr=3e-2)
    cfg["eval"]["select_on"] = "last"
    cfg["train"]["eval_every_epoch"] = False
    tr = Trainer(load_config(cfg), tmp_path / "run")
    tr.fit()
    rows = (tmp_path / "run" / "train_log.csv").read_text().splitlines()[1:]
    losses = [float(r.split(",")[3]) for r in rows]
    k = len(losses) // 4
    assert np.mean(losses[-k:]) < 0.8 * np.mean(losses[:k])


def test_schedule_identical_across_simulated_ranks():
    nb = {"vqa": 7, "gqa": 11, "nlvr": 3, "caption": 5}
    s0 = task_schedule(nb, seed=3, epoch=2)
    s1 = task_schedule(dict(reversed(list(nb.items()))), seed=3, epoch=2)
    assert s0 == s1
    assert sorted(s0) == sorted((t, b) for t, n in nb.items() for b in range(n))
    assert task_schedule(nb, 3, 3) != s0


def test_rank_shards_partition_the_global_batch(fixture_dir, tmp_path):
    tr = Trainer(load_config(_cfg(fixture_dir)), tmp_path / "run")
    d = tr.train_data["gqa"]
    rows = d.epoch_order(0, 0)[:4]
    full = d.train_batch(rows, 5, 0, 1)
    r0, r1 = d.train_batch(rows, 5, 0, 2), d.train_batch(rows, 5, 1, 2)
    torch.testing.assert_close(torch.cat([r0["vis_feats"], r1["vis_feats"]]),
                               full["vis_feats"][[0, 2, 1, 3]])


def test_feature_dim_mismatch_is_clear(fixture_dir, tmp_path):
    cfg = _cfg(fixture_dir)
    cfg["model"]["feat_dim"] = 32
    with pytest.raises(adapterkit.ConfigError, match="16-d features but model.feat_dim is 32"):
        Trainer(load_config(cfg), tmp_path / "run")


def test_missing_dataset_file_is_clear(fixture_dir, tmp_path):
    cfg = _cfg(fixture_dir)
    cfg["data"]["tasks"] = ["vqa", "okvqa"]
    cfg["train"]["task_batch_scale"] = {"vqa": 1, "okvqa": 1}
    with pytest.raises(adapterkit.ConfigError, match=r"unknown task 'okvqa': no directory .*okvqa and no data.sources entry"):
        Trainer(load_config(cfg), tmp_path / "run")


def test_params_cli_matches_the_paper(capsys):
    from adapterkit.cli import main

    assert main(["params", "--model", "vl-bart", "--preset", "single_adapter", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert round(r["percent"], 2) == 4.18  # VL-Adapter: 4.18% for VL-BART, image setting
    assert main(["params", "--model", "vl-bart", "--preset", "single_adapter", "--setting", "video", "--json"]) == 0
    assert round(json.loads(capsys.readouterr().out)["percent"], 2) == 3.39  # 3.39% in the video setting


def test_trains_from_official_style_files(fixture_dir, tmp_path):
    """data.sources reads VL-T5-layout VQA files (karpathy_*.json) instead of converted jsonl."""
    from adapterkit.vl.datasets.base import read_examples_jsonl

    vqa_dir = tmp_path / "vqa"
    vqa_dir.mkdir()
    for split, name in (("train", "karpathy_train"), ("val", "karpathy_val"), ("test", "karpathy_test")):
        recs = [{"img_id": e.image_ids[0], "label": e.target_scores, "question_id": int(e.uid[1:]), "sent": e.text,
                 "answer_type": "other", "question_type": "what"}
                for e in read_examples_jsonl(fixture_dir / "vqa" / f"{split}.jsonl")]
        (vqa_dir / f"{name}.json").write_text(json.dumps(recs))
    cfg = _cfg(fixture_dir, max_steps=2)
    cfg["data"]["sources"] = {"vqa": {"format": "vqa", "path": str(vqa_dir),
                                      "splits": {"train": "karpathy_train", "val": "karpathy_val",
                                                 "test": "karpathy_test"}}}
    tr = Trainer(load_config(cfg), tmp_path / "run")
    assert len(tr.train_data["vqa"]) == len(read_examples_jsonl(fixture_dir / "vqa" / "train.jsonl"))
    res = tr.fit()
    assert "accuracy" in res["test"]["vqa"]
    cfg["data"]["sources"]["vqa"]["path"] = str(tmp_path / "nope")
    with pytest.raises(adapterkit.ConfigError, match="missing dataset file"):
        Trainer(load_config(cfg), tmp_path / "run2")


def test_causal_loss_on_target_positions_equals_full_logits_loss():
    from adapterkit.vl.build import build_vl_model

    torch.manual_seed(0)
    m, _ = build_vl_model({"backbone": "tiny-llama", "feat_dim": 16, "corpus": ["what is this answer : a cat dog"]},
                          "single_adapter", ["vqa"])
    ids = torch.tensor([[5, 6, 7, 8, 9, 2], [5, 6, 7, 10, 2, 0]])
    mask = (ids != 0).long()
    labels = torch.tensor([[-100, -100, -100, 8, 9, 2], [-100, -100, -100, 10, 2, -100]])
    feats, boxes, order = torch.randn(2, 4, 16), torch.zeros(2, 4, 4), torch.zeros(2, 4, dtype=torch.long)
    w = torch.tensor([1.0, 0.5])
    loss = m(ids, mask, feats, boxes, order, labels, task_ids=0, label_weights=w)
    emb, msk, n_prefix = m.build_inputs(ids, mask, feats, boxes, order)
    ref = m._loss(m.lm(inputs_embeds=emb, attention_mask=msk).logits[:, n_prefix:-1], labels[:, 1:], w)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)


def test_causal_first_token_scores_read_the_last_position_of_left_padded_batches():
    from adapterkit.vl.build import build_vl_model

    torch.manual_seed(0)
    m, _ = build_vl_model({"backbone": "tiny-llama", "feat_dim": 16, "corpus": ["is it true answer : a b c"]},
                          "single_adapter", ["nlvr"])
    m.eval()
    feats, boxes, order = torch.randn(2, 4, 16), torch.zeros(2, 4, 4), torch.zeros(2, 4, dtype=torch.long)
    ids = torch.tensor([[0, 0, 5, 6, 7], [5, 6, 7, 8, 9]])  # left-padded
    mask = (ids != 0).long()
    scores = m.first_token_scores(ids, mask, feats, boxes, order, candidate_ids=[3, 4], task_ids=0)
    for i in range(2):  # each row alone, unpadded
        keep = mask[i].bool()
        alone = m.first_token_scores(ids[i:i + 1, keep], mask[i:i + 1, keep], feats[i:i + 1], boxes[i:i + 1],
                                     order[i:i + 1], candidate_ids=[3, 4], task_ids=0)
        torch.testing.assert_close(scores[i:i + 1], alone, atol=1e-4, rtol=1e-4)


def test_frozen_lm_preset_trains_the_visual_projection_only():
    """The frozen-LM baseline: no adapter, every language-model weight frozen, the visual
    projection (and nothing else) trains."""
    from adapterkit.vl.build import build_vl_model

    model, _ = build_vl_model({"backbone": "tiny-llama", "corpus": ["a red shirt"], "feat_dim": 16}, "frozen_lm",
                              ["vqa", "gqa"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("visual.") for n in trainable)
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith("visual.")}


@pytest.mark.parametrize("backbone", ["tiny-bart", "tiny-llama"])
def test_zero_init_adapter_starts_as_the_frozen_model(fixture_dir, tmp_path, backbone):
    """single_adapter_zero_init (up projection zero) gives the frozen model's loss before any
    step, the same seed's single_adapter (up projection N(0, 0.02)) does not."""
    def first_loss(preset):
        tr = Trainer(load_config(_cfg(fixture_dir, backbone, preset, max_steps=1)), tmp_path / preset)
        tr.domain.train_mode()
        rows = tr.domain.epoch_order("vqa", 0, 0)[:4]
        batch = tr._move(tr.domain.train_batch("vqa", rows, 0, 0, 1))
        with torch.no_grad():
            return float(tr.domain.loss(batch, tr.tasks.index("vqa")))

    frozen, zero, bert = (first_loss(p) for p in ("frozen_lm", "single_adapter_zero_init", "single_adapter"))
    assert zero == pytest.approx(frozen, rel=1e-6, abs=1e-6)
    assert bert != pytest.approx(frozen, rel=1e-6, abs=1e-6)
