"""The flagship demo and compare end to end at the tiny scale (random-init tiny Llama on tiny
FashionVL); the real SmolLM2 run is marked slow."""

import csv
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from adapterkit.vl import benchmark as bm
from adapterkit.vl.plots import pareto

TASKS = ["vqa", "gqa", "nlvr", "caption"]
TINY_TEST = {"vqa": 24, "gqa": 24, "nlvr": 20, "caption": 8}  # fashionvl.TINY_SIZES test column


def _losses(run_dir):
    with open(run_dir / "train_log.csv") as fh:
        return [float(r["loss"]) for r in csv.DictReader(fh)]


EVAL_N = 6  # test examples per task in the compare tests (the demo test uses the whole tiny split)
RUN = dict(scale_name="tiny", steps=4, seeds=2, eval_examples=EVAL_N, curve_every=2, curve_examples=3, command="test")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared CPU: one thread avoids threads waiting for each other."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    os.environ["ADAPTERKIT_NO_PROGRESS"] = "1"
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return bm.prepare(tmp_path_factory.mktemp("fvl") / "fvl", True, 64)


@pytest.fixture(scope="module")
def tiny_compare(tmp_path_factory, tiny_data):
    out = tmp_path_factory.mktemp("compare")
    summary = bm.compare(["single_adapter", "full_finetune"], out_dir=out, data_dir=tiny_data[0], estimate=False,
                         **RUN)
    return out, summary


def test_demo_tiny_mode_end_to_end(tmp_path):
    out = subprocess.run([sys.executable, "-m", "adapterkit", "demo", "--scale", "tiny", "--out", str(tmp_path / "run"),
                          "--data", str(tmp_path / "fvl"), "--steps", "6"], capture_output=True, text=True,
                         env={**os.environ, "ADAPTERKIT_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "majority" in out.stdout and "average" in out.stdout and "95% interval" in out.stdout
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(res["test"]) == set(TASKS)
    assert set(res["majority_baseline"]) == set(TASKS)
    assert res["fashionvl_stats"]["tasks"]["vqa"]["test"]["examples"] > 0
    assert res["test_sizes"] == TINY_TEST  # the tiny scale tests on the whole split
    for t in TASKS:
        lo, hi = res["intervals"][t]
        assert lo <= res["test"][t][bm._main_key(res["test"][t])] <= hi
    lo, hi = res["intervals"]["average"]
    assert lo <= res["test_avg"] <= hi
    assert (tmp_path / "run" / "demo.png").stat().st_size > 1000
    assert (tmp_path / "run" / "single_adapter" / "final" / "adapter_model.safetensors").exists()
    check = res["caption_check"]
    assert check["examples"] == TINY_TEST["caption"] and 1 <= check["distinct"] <= check["examples"]
    assert "caption check:" in out.stdout
    # what decides the last bits (the thread count of the features and of the training) is recorded
    assert res["versions"]["threads"] == 1
    assert [e["threads"] for e in res["features_extracted_with"]] == [1]


def test_compare_json_schema(tiny_compare):
    out, summary = tiny_compare
    on_disk = json.loads((out / "compare.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert [e["threads"] for e in on_disk["protocol"]["features_extracted_with"]] == [1]  # the store's record
    assert on_disk["protocol"]["seeds"] == [0, 1]
    assert on_disk["protocol"]["test_examples_per_task"] == EVAL_N
    assert on_disk["protocol"]["command"] == "test"
    keys = TASKS + ["average"]
    for name, p in on_disk["presets"].items():
        assert p["test_sizes"] == {t: EVAL_N for t in TASKS}
        assert [s["seed"] for s in p["seeds"]] == [0, 1]
        for s in p["seeds"]:
            for k in keys:
                lo, hi = s["intervals"][k]
                assert lo <= s["scores"][k] <= hi
            assert s["scores"]["average"] == pytest.approx(np.mean([s["scores"][t] for t in TASKS]))
            check = s["caption_check"]
            assert check["examples"] == EVAL_N and 1 <= check["distinct"] <= EVAL_N
        for k in keys:
            assert p["mean"][k] == pytest.approx(np.mean([s["scores"][k] for s in p["seeds"]]))
            lo, hi = p["seed_interval"][k]
            assert lo <= p["mean"][k] <= hi
            lo, hi = p["example_interval"][k]
            assert lo - 1e-9 <= p["mean"][k] <= hi + 1e-9
        assert p["test_avg"] == p["mean"]["average"]
        assert p["caption_collapsed_seeds"] == [s["seed"] for s in p["seeds"]
                                                 if bm.caption_collapsed(s["caption_check"])]
        run = json.loads((out / name / "seed0" / "run.json").read_text())
        assert {t: len(run["per_example"][t]["scores"]) for t in TASKS} == {t: EVAL_N for t in TASKS}
        assert [c["step"] for c in run["curve"]] == [0, 2, 4]  # before training, every 2 steps, the end
        assert set(run["curve"][0]) == {"step", *keys}
    vs = on_disk["presets"]["single_adapter"]["vs_reference"]
    assert vs["seeds_paired"] == 2
    assert vs["difference"] == pytest.approx(on_disk["presets"]["single_adapter"]["mean"]["average"]
                                             - on_disk["presets"]["full_finetune"]["mean"]["average"])
    assert "vs_reference" not in on_disk["presets"]["full_finetune"]
    sa, ff = on_disk["presets"]["single_adapter"], on_disk["presets"]["full_finetune"]
    for t in TASKS:  # each task's paired difference is the difference of the seed means
        assert vs["tasks"][t]["difference"] == pytest.approx(sa["mean"][t] - ff["mean"][t])
        lo, hi = vs["tasks"][t]["example_interval"]
        assert lo - 1e-9 <= vs["tasks"][t]["difference"] <= hi + 1e-9
    assert np.mean([vs["tasks"][t]["difference"] for t in TASKS]) == pytest.approx(vs["difference"])
    md = (out / "compare.md").read_text()
    assert "single_adapter" in md and "t-interval over seeds" in md and "majority answer" in md
    c = on_disk["presets"]["single_adapter"]["seeds"][0]["caption_check"]
    assert f"{c['distinct']} / {100 * c['most_common_share']:.0f}% / {c['most_common_alone_cider_d']:.1f}" in md
    for f in ("compare.png", "curves.png", "differences.png"):
        assert (out / f).stat().st_size > 5000
    m = vs["margin"]  # the difference read against the +-2 margin, over the 2 paired seeds
    assert m["margin"] == on_disk["protocol"]["margin_points"] == bm.MARGIN and m["over"] == "seeds"
    assert m["equivalence"] in ("within", "outside", "undetermined") and f"±{bm.MARGIN:g} {m['equivalence']}" in md


def test_same_seed_reproduces_and_another_seed_changes_the_run(tiny_compare, tiny_data, tmp_path):
    out, _ = tiny_compare
    seed0, seed1 = out / "single_adapter" / "seed0", out / "single_adapter" / "seed1"
    assert _losses(seed0) != _losses(seed1)  # other adapter init, other data order
    # the same seed again, in another folder and without the learning curve: the same run, exactly
    scale = {**bm.SCALES["tiny"], "steps": 4, "curve_every": 0, "eval_examples": EVAL_N}
    again = bm.run_one(*tiny_data, "single_adapter", scale, tmp_path / "again", seed=0, curve=False)
    assert _losses(tmp_path / "again") == _losses(seed0)
    first = json.loads((seed0 / "run.json").read_text())
    assert again["per_example"] == first["per_example"]
    assert again["scores"] == first["scores"] and again["intervals"] == first["intervals"]
    # the initial weights' digest: the same seed, the same start; another seed, another start
    other = json.loads((seed1 / "run.json").read_text())
    assert len(first["init_digest"]) == 64 and again["init_digest"] == first["init_digest"]
    assert other["init_digest"] != first["init_digest"]
    assert json.loads((tmp_path / "again" / "predictions.json").read_text()) == \
        json.loads((seed0 / "predictions.json").read_text())


def test_compare_reuses_finished_runs(tiny_compare, tiny_data, capsys):
    out, summary = tiny_compare
    again = bm.compare(["single_adapter", "full_finetune"], out_dir=out, data_dir=tiny_data[0], **RUN)
    assert "cached" in capsys.readouterr().out
    assert again["presets"] == json.loads(json.dumps(summary["presets"]))
    # a record written before the caption check grew its item recall gets it from its predictions file
    rec = out / "single_adapter" / "seed0" / "run.json"
    run = json.loads(rec.read_text())
    old = {k: v for k, v in run["caption_check"].items() if "item_recall" not in k}
    assert set(run["caption_check"]) - set(old) == {"item_recall", "item_recall_interval", "most_common_item_recall"}
    rec.write_text(json.dumps({**run, "caption_check": old}))
    bm.compare(["single_adapter", "full_finetune"], out_dir=out, data_dir=tiny_data[0], **RUN)
    assert json.loads(rec.read_text()) == run
    from adapterkit.errors import ConfigError

    with pytest.raises(ConfigError, match="another --out"):  # a finished run of another budget is not reused
        bm.compare(["single_adapter"], out_dir=out, data_dir=tiny_data[0], estimate=False, **{**RUN, "steps": 5})


def test_per_example_scores_average_to_the_task_metric(tiny_compare, tiny_data):
    from adapterkit.vl.datasets.fashionvl import load_fashionvl_examples
    from adapterkit.vl.metrics import TASK_METRICS

    out, _ = tiny_compare
    preds = json.loads((out / "full_finetune" / "seed1" / "predictions.json").read_text())
    for t in TASKS:
        exs = [e for e in load_fashionvl_examples(tiny_data[0], t, "test") if e.uid in preds[t]]
        if t == "vqa":  # as the trainer marks single-answer VQA data: scored by its soft score
            for e in exs:
                e.extra.setdefault("raw_answers", False)
        # a prediction that is right for half the examples, so the check is not 0 == 0
        p = {e.uid: (e.targets[0] if i % 2 else preds[t][e.uid]) for i, e in enumerate(exs)}
        s = bm.per_example_scores(t, p, exs)
        m = TASK_METRICS[t](p, {e.uid: e for e in exs})
        assert s.mean() == pytest.approx(m["CIDEr" if t == "caption" else "accuracy"])
        assert s.max() > 0


def test_caption_check_tells_a_constant_captioner_from_one_that_reads_the_picture(tiny_data):
    from adapterkit.vl.datasets.fashionvl import load_fashionvl_examples

    exs = load_fashionvl_examples(tiny_data[0], "caption", "test")
    right = {e.uid: e.targets[0] for e in exs}  # a captioner that names what is in each grid
    const = {e.uid: exs[0].targets[0] for e in exs}  # one caption for every picture
    a, b = bm.caption_check(right, exs), bm.caption_check(const, exs)
    assert b["distinct"] == 1 and b["most_common_share"] == 1.0
    assert b["most_common_alone_cider_d"] == pytest.approx(bm.per_example_scores("caption", const, exs).mean())
    assert a["distinct"] == len({e.targets[0] for e in exs}) > 1
    # the picture-reading captioner scores far above its own most common caption given to all
    assert bm.per_example_scores("caption", right, exs).mean() > a["most_common_alone_cider_d"] + 50
    assert "1 distinct captions" in bm.caption_line(b)
    # item recall: the references name every item; one caption for all grids names only what it shares
    assert a["item_recall"] == 100.0 and b["most_common_item_recall"] == b["item_recall"] < 60
    assert a["item_recall_interval"] == [100.0, 100.0]
    lo, hi = b["item_recall_interval"]
    assert lo <= b["item_recall"] <= hi and lo < hi
    assert "of the grids' items" in bm.caption_line(a)


def test_caption_items_parses_every_reference_form():
    from collections import Counter

    from adapterkit.vl.datasets.fashionvl import caption_item_recall, caption_items, caption_references

    rng = np.random.default_rng(0)
    for _ in range(200):
        labels = rng.integers(0, 10, 4).tolist()
        for ref in caption_references(labels):
            assert caption_items(ref) == Counter(labels), ref
    assert caption_items("two t-shirts, a shirt and an ankle boot") == Counter({0: 2, 6: 1, 9: 1})
    assert caption_item_recall("a bag, a bag, a coat and a dress", [8, 4, 4, 1]) == 0.5  # coat once, bag once
    assert caption_item_recall("", [0, 1, 2, 3]) == 0.0


def test_estimate_from_measured_costs(tiny_data, tmp_path, capsys):
    cost = bm.measure_costs(*tiny_data, "single_adapter", {**bm.SCALES["tiny"], "steps": 4}, tmp_path)
    assert set(cost["step_s"]) == set(TASKS) and all(v > 0 for v in cost["step_s"].values())
    assert all(v > 0 for v in cost["eval_s_per_example"].values())
    assert not (tmp_path / "single_adapter").exists()  # the measuring run leaves nothing behind
    # the formula: build + steps x step + checkpoints + test + curve points
    c = {"build_s": 10.0, "mean_step_s": 2.0, "checkpoint_s": 1.0, "eval_s_per_example": {t: 0.1 for t in TASKS}}
    scale = {"steps": 250, "curve_every": 50, "curve_examples": 10}
    sizes = {t: 100 for t in TASKS}
    assert bm.estimate_run_s(c, scale, sizes, curve=False) == pytest.approx(10 + 500 + 4 * 1 + 40)
    assert bm.estimate_run_s(c, scale, sizes, curve=True) == pytest.approx(10 + 500 + 4 + 40 + 6 * 4 * 10 * 0.1)
    # checkpoints every 250 steps (--checkpoint-every): one in the loop + the end + the final weights
    assert bm.estimate_run_s(c, {**scale, "checkpoint_every": 250}, sizes, curve=False) == pytest.approx(
        10 + 500 + 3 * 1 + 40)
    res = bm.compare(["single_adapter"], out_dir=tmp_path / "c", data_dir=tiny_data[0], scale_name="tiny", steps=4,
                     estimate_only=True)
    printed = capsys.readouterr().out
    assert "estimated duration" in printed and res["estimated_s"] > 0
    assert not (tmp_path / "c" / "single_adapter").exists()  # nothing trained
    # the disk: the measured checkpoint holds the trainable weights and Adam's two moments of them
    assert 0 < cost["weights_bytes"] < cost["checkpoint_bytes"]
    assert cost["checkpoint_bytes"] > 2.5 * cost["weights_bytes"]
    assert re.search(r"disk: about [0-9.]+ GB \(.* kept, up to .* at once\); [0-9.]+ GB free", printed)
    assert res["disk"]["needed_bytes"] == res["disk"]["kept_bytes"] + res["disk"]["in_flight_bytes"] > 0


def test_disk_need_counts_the_kept_weights_and_the_checkpoints_in_flight():
    est = {"full_finetune": {"weights_bytes": 500, "checkpoint_bytes": 1500},
           "single_adapter": {"weights_bytes": 10, "checkpoint_bytes": 30}}
    order = [("full_finetune", 0), ("single_adapter", 0), ("full_finetune", 1), ("single_adapter", 1)]
    d = bm.disk_need(est, order, jobs=2)
    assert d["kept_bytes"] == 2 * 500 + 2 * 10  # every run's final/ weights
    assert d["in_flight_bytes"] == 2 * bm.CHECKPOINTS_AT_ONCE * 1500  # two runs at once, the heaviest's
    kept = bm.disk_need(est, order, jobs=2, keep_checkpoints=True)
    assert kept["kept_bytes"] == d["kept_bytes"] + 3 * (2 * 1500 + 2 * 30)
    assert bm.disk_need(est, order[:1], jobs=4)["in_flight_bytes"] == bm.CHECKPOINTS_AT_ONCE * 1500


def test_compare_refuses_to_start_without_the_disk_it_needs(tiny_data, tmp_path, monkeypatch):
    from adapterkit.errors import DataError

    monkeypatch.setattr(bm, "_free_bytes", lambda p: 1000)  # the measuring itself still writes its checkpoint
    with pytest.raises(DataError, match=r"needs about [0-9.]+ GB of disk and 0.0 GB are free"):
        bm.compare(["single_adapter"], out_dir=tmp_path / "c", data_dir=tiny_data[0], scale_name="tiny", steps=4,
                   curve_every=0)
    assert not (tmp_path / "c" / "single_adapter").exists()  # refused before any run


def test_makespan_is_the_pools_wall_time_not_the_total_over_workers():
    assert bm.makespan([3051.0, 2546.0], 2) == 3051.0  # two unequal runs side by side: the longer one
    assert bm.makespan([10.0, 10.0, 10.0], 2) == 20.0  # the third waits for a free worker
    assert bm.makespan([5.0, 1.0, 1.0, 1.0, 1.0], 2) == 5.0  # the short ones share the other worker
    assert bm.makespan([2.0, 3.0], 1) == 5.0 and bm.makespan([4.0], 8) == 4.0 and bm.makespan([], 2) == 0.0


def test_compare_refuses_bad_arguments(tmp_path):
    from adapterkit.errors import ConfigError

    with pytest.raises(ConfigError, match="seeds"):
        bm.compare(["single_adapter"], out_dir=tmp_path, seeds=0)
    with pytest.raises(ConfigError):
        bm.compare(["no_such_preset"], out_dir=tmp_path)
    assert not any(tmp_path.iterdir())


def test_pareto_front():
    pts = [(100.0, 70.0), (4.0, 69.0), (5.0, 60.0), (2.0, 50.0), (10.0, 71.0)]
    # (100, 70) is dominated by (10, 71); (5, 60) by (4, 69)
    assert sorted(pareto(pts)) == [1, 3, 4]


@pytest.mark.slow
def test_parallel_jobs_give_the_same_runs(tiny_compare, tiny_data, tmp_path):
    out, _ = tiny_compare
    par = bm.compare(["single_adapter"], out_dir=tmp_path / "par", data_dir=tiny_data[0], estimate=False, jobs=2,
                     threads=1, **RUN)
    for s in (0, 1):
        a = json.loads((tmp_path / "par" / "single_adapter" / f"seed{s}" / "run.json").read_text())
        b = json.loads((out / "single_adapter" / f"seed{s}" / "run.json").read_text())
        assert a["per_example"] == b["per_example"] and a["curve"] == b["curve"]
    assert par["protocol"]["jobs"] == 2


@pytest.mark.slow
def test_demo_with_smollm2_few_steps(tmp_path):
    out = subprocess.run([sys.executable, "-m", "adapterkit", "demo", "--steps", "4", "--eval-examples", "40",
                          "--out", str(tmp_path / "run")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert 3.5 < res["percent"] < 5.0  # one shared adapter: about 4% of SmolLM2-VL
    assert res["test_sizes"] == {t: 40 for t in TASKS}


def test_parallel_jobs_slowdown_is_measured_and_scales_the_estimate(tiny_data, tmp_path, capsys):
    import json

    res = bm.compare(["single_adapter", "single_lora"], out_dir=tmp_path / "c", data_dir=tiny_data[0],
                     scale_name="tiny", steps=4, jobs=2, threads=1, estimate_only=True)
    est = json.loads((tmp_path / "c" / "estimate.json").read_text())
    c = est["parallel_contention"]
    assert c["jobs"] == 2 and c["step_s_alone"] > 0 and c["step_s_together"] > 0
    assert c["slowdown"] == pytest.approx(c["step_s_together"] / c["step_s_alone"])
    runs = [est["presets"][p]["run_s"] for p in ("single_adapter", "single_lora")]
    assert res["estimated_s"] == pytest.approx(bm.makespan(runs, 2) * c["slowdown"])
    assert "slower beside the others (measured)" in capsys.readouterr().out
    assert not (tmp_path / "c" / ".measure").exists()


def test_a_failed_slowdown_measurement_says_so_and_assumes_none(tmp_path, capsys):
    assert bm.measure_contention(tmp_path / "no_data", tmp_path / "no_feats", "single_adapter", bm.SCALES["tiny"],
                                 tmp_path / "m", jobs=2) is None
    assert "could not measure how parallel jobs slow each other" in capsys.readouterr().out
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("kw, flag", [({"eval_batch_size": 0}, "--eval-batch-size"),
                                      ({"checkpoint_every": -5}, "--checkpoint-every"),
                                      ({"checkpoint_every": True}, "--checkpoint-every"),
                                      ({"seeds": 0}, "--seeds"), ({"jobs": True}, "--jobs"),
                                      ({"threads": -1}, "--threads")])
def test_compare_rejects_bad_batch_and_checkpoint_settings(tmp_path, kw, flag):
    with pytest.raises(bm.ConfigError, match=flag):
        bm.compare(["single_adapter"], out_dir=tmp_path / "c", data_dir=tmp_path / "d", scale_name="tiny", **kw)
    assert not (tmp_path / "d").exists()  # refused before any data is built


def test_compare_passes_eval_batch_and_checkpoint_settings_to_the_runs(tmp_path):
    cfg = bm.run_config(tmp_path, tmp_path / "f", "single_adapter",
                        {**bm.SCALES["tiny"], "eval_batch_size": 7, "checkpoint_every": 33})
    assert cfg["eval"]["batch_size"] == 7 and cfg["train"]["checkpoint_every"] == 33
    assert bm.run_config(tmp_path, tmp_path / "f", "single_adapter", bm.SCALES["tiny"])["train"]["checkpoint_every"] == 100


def test_repeatability_script_same_threads_same_bits(tiny_data, tmp_path):
    """scripts/repeatability.py: at one thread count the features and the first training steps
    come out bitwise the same twice (it would say false otherwise); its JSON has both counts."""
    from pathlib import Path

    script = Path(__file__).parents[1] / "scripts" / "repeatability.py"
    out = subprocess.run([sys.executable, str(script), "--scale", "tiny", "--data", str(tiny_data[0]), "--threads", "1,2",
                          "--images", "8", "--steps", "3", "--out", str(tmp_path / "r.json")],
                         capture_output=True, text=True, env={**os.environ, "ADAPTERKIT_NO_PROGRESS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads((tmp_path / "r.json").read_text())
    assert set(res["per_threads"]) == {"1", "2"}
    for v in res["per_threads"].values():
        assert v["features_repeat_equal"] and v["train_repeat_equal"]
        assert len(v["first_run"]["losses"]) == 3 and all(np.isfinite(v["first_run"]["losses"]))
        assert v["first_run"]["init_digest"] != v["first_run"]["final_digest"]  # the steps trained
    assert res["between_threads"]["same_init"]
    assert 0.0 <= res["between_threads"]["feature_values_differing"] <= 1.0
