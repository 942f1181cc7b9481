"""Two compare folders paired run by run (`benchmark.paired_folders`): the differences are the
runs' own, per seed and pooled; folders without a common run, or tested on other examples, fail
with one clear error."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_compare_partial import _fake_run

from adapterkit.errors import ConfigError, DataError
from adapterkit.vl import benchmark as bm


def _folder(root: Path, runs):
    for r in runs:
        d = root / r["preset"] / f"seed{r['seed']}"
        d.mkdir(parents=True)
        (d / "run.json").write_text(json.dumps(r))
    return root


def test_paired_folders_differences_and_intervals(tmp_path):
    a = _folder(tmp_path / "a", [_fake_run("single_adapter", s, n=40) for s in (0, 1)])
    b_runs = [_fake_run("single_adapter", s + 10, n=40) for s in (0, 1)]
    for s, r in enumerate(b_runs):
        r["seed"] = s  # other scores under the same seed numbers
    b = _folder(tmp_path / "b", b_runs + [_fake_run("full_finetune", 0, n=40)])
    res = bm.paired_folders(a, b, n_resamples=500)
    assert list(res["presets"]) == ["single_adapter"]  # only presets both folders have
    r = res["presets"]["single_adapter"]
    assert [row["seed"] for row in r["seeds"]] == [0, 1]
    ra = _fake_run("single_adapter", 0, n=40)
    for t in bm.TASKS:
        want = np.mean(ra["per_example"][t]["scores"]) - np.mean(b_runs[0]["per_example"][t]["scores"])
        got = r["seeds"][0]["tasks"][t]
        assert got["difference"] == pytest.approx(want)
        assert got["interval"][0] <= want <= got["interval"][1]
    avg = r["seeds"][0]["tasks"]["average"]["difference"]
    assert avg == pytest.approx(ra["scores"]["average"] - b_runs[0]["scores"]["average"])
    assert r["pooled"]["seeds_paired"] == 2 and r["pooled"]["seed_interval"] is not None
    # a folder against itself: every difference 0, intervals [0, 0]
    same = bm.paired_folders(a, a, n_resamples=200)
    for row in same["presets"]["single_adapter"]["seeds"]:
        assert all(v["difference"] == 0 and v["interval"] == [0, 0] for v in row["tasks"].values())
    md = bm.paired_table(res)
    assert "| single_adapter | 0 |" in md and "all 2" in md
    assert [row["same_start"] for row in r["seeds"]] == [None, None]  # records without digests


def test_paired_folders_mark_runs_that_started_from_other_weights(tmp_path):
    ra = [{**_fake_run("single_adapter", s, n=20), "init_digest": f"d{s}"} for s in (0, 1)]
    rb = [{**_fake_run("single_adapter", s, n=20), "init_digest": d} for s, d in ((0, "d0"), (1, "other"))]
    res = bm.paired_folders(_folder(tmp_path / "a", ra), _folder(tmp_path / "b", rb), n_resamples=100)
    assert [row["same_start"] for row in res["presets"]["single_adapter"]["seeds"]] == [True, False]
    md = bm.paired_table(res)
    assert "| single_adapter | 0 |" in md and "| single_adapter | 1 (other start) |" in md
    assert "two independent runs" in md


def test_paired_folders_bad_input(tmp_path):
    a = _folder(tmp_path / "a", [_fake_run("single_adapter", 0)])
    b = _folder(tmp_path / "b", [_fake_run("full_finetune", 0)])
    with pytest.raises(DataError, match="no \\(preset, seed\\) run in common"):
        bm.paired_folders(a, b)
    with pytest.raises(DataError, match="no such compare folder"):
        bm.paired_folders(a, tmp_path / "missing")
    other = _fake_run("single_adapter", 0)
    other["per_example"]["vqa"]["uids"] = [f"x{i}" for i in range(5)]
    c = _folder(tmp_path / "c", [other])
    with pytest.raises(DataError, match="vqa was tested on different examples"):
        bm.paired_folders(a, c)
    (tmp_path / "d" / "single_adapter" / "seed0").mkdir(parents=True)
    (tmp_path / "d" / "single_adapter" / "seed0" / "run.json").write_text("{trunc")
    with pytest.raises(DataError, match="not a readable run record"):
        bm.paired_folders(a, tmp_path / "d")
    (tmp_path / "d" / "single_adapter" / "seed0" / "run.json").write_text('{"seed": 0}')
    with pytest.raises(DataError, match="not a run record of adapterkit compare \\(no preset, scores"):
        bm.paired_folders(a, tmp_path / "d")
    script = Path(__file__).parents[1] / "scripts" / "fashionvl_paired.py"
    p = subprocess.run([sys.executable, str(script), str(a), str(b)], capture_output=True, text=True)
    assert p.returncode != 0 and p.stderr.strip().endswith("run in common") and "Traceback" not in p.stderr


def _shifted(run, by):
    """`run` with every example's score moved by `by` points (the average moves by `by`)."""
    r = json.loads(json.dumps(run))
    for t in bm.TASKS:
        r["per_example"][t]["scores"] = [x + by for x in r["per_example"][t]["scores"]]
        r["scores"][t] += by
    r["scores"]["average"] += by
    return r


def test_vs_reference_reads_the_seed_interval_against_the_margin():
    ref = [_fake_run("full_finetune", s, n=30) for s in range(4)]
    # per-seed differences -0.5 +- 0.2: the t-interval lies inside +-2 -> within, no worse
    near = [_shifted({**r, "preset": "single_adapter"}, d) for r, d in zip(ref, (-0.3, -0.7, -0.5, -0.5))]
    m = bm.paired_vs(near, ref, n_resamples=200)["margin"]
    assert m["equivalence"] == "within" and m["non_inferiority"] == "shown" and m["over"] == "seeds"
    sd = np.std([-0.3, -0.7, -0.5, -0.5], ddof=1)
    assert m["seed_sd"] == pytest.approx(sd) and m["seeds_needed_if_equal"] == 2
    # differences -5 +- 0.2: wholly below -2 -> outside, ruled out
    far = [_shifted({**r, "preset": "single_adapter"}, d) for r, d in zip(ref, (-4.8, -5.2, -5.0, -5.0))]
    m = bm.paired_vs(far, ref, n_resamples=200)["margin"]
    assert m["equivalence"] == "outside" and m["non_inferiority"] == "ruled out"
    # differences spread +-6: the interval straddles both bounds; the seeds needed is the planning figure
    wide = [_shifted({**r, "preset": "single_adapter"}, d) for r, d in zip(ref, (-6.0, 6.0, -3.0, 3.0))]
    m = bm.paired_vs(wide, ref, n_resamples=200)["margin"]
    assert m["equivalence"] == "undetermined" and m["non_inferiority"] == "undetermined"
    from adapterkit.stats import seeds_for_margin

    assert m["seeds_needed_if_equal"] == seeds_for_margin(np.std([-6.0, 6.0, -3.0, 3.0], ddof=1), 2.0) > 4
    # one seed: read over the test examples only, and said so
    one = bm.paired_vs(near[:1], ref[:1], n_resamples=200)["margin"]
    assert one["over"].startswith("test examples only") and "seed_sd" not in one
    cell = bm._margin_cell({"margin": m})
    assert cell.startswith("; ±2 undetermined") and f"(n≈{m['seeds_needed_if_equal']})" in cell


def test_each_task_is_read_against_the_margin_on_its_own():
    ref = [_fake_run("full_finetune", s, n=30) for s in range(4)]
    moved = []
    for r, d in zip(ref, (-5.8, -6.2, -6.0, -6.0)):  # vqa alone 6 points lower on every seed
        x = json.loads(json.dumps({**r, "preset": "single_adapter"}))
        x["per_example"]["vqa"]["scores"] = [v + d for v in x["per_example"]["vqa"]["scores"]]
        x["scores"]["vqa"] += d
        x["scores"]["average"] += d / len(bm.TASKS)
        moved.append(x)
    vs = bm.paired_vs(moved, ref, n_resamples=200)
    assert vs["tasks"]["vqa"]["margin"]["equivalence"] == "outside"
    assert vs["tasks"]["vqa"]["margin"]["non_inferiority"] == "ruled out"
    for t in bm.TASKS[1:]:  # the others did not move: zero difference on every seed
        assert vs["tasks"][t]["margin"]["equivalence"] == "within", t
    assert vs["margin"]["equivalence"] == "within"  # -1.5 +- 0.05 on the average
    assert bm._margin_cell(vs["tasks"]["vqa"]).startswith("; ±2 outside")


def _task_shifted(run, by: dict):
    """`run` with each task's example scores moved by by[task] points (its score and average follow)."""
    r = json.loads(json.dumps(run))
    for t, d in by.items():
        r["per_example"][t]["scores"] = [x + d for x in r["per_example"][t]["scores"]]
        r["scores"][t] += d
    r["scores"]["average"] = float(np.mean([r["scores"][t] for t in bm.TASKS]))
    return r


def test_paired_vs_over_a_subset_of_tasks(tmp_path):
    """Averaged over vqa, gqa, nlvr only, a preset that differs by -0.6/0/+0.3 on those tasks and by
    +-40 CIDEr-D on captions reads within +-2 over seeds; over all four tasks it does not."""
    ref = [_fake_run("full_finetune", s, n=30) for s in range(4)]
    caption = (40.0, -40.0, 30.0, -30.0)
    vqa = (-0.6, -0.2, -1.0, -0.6)
    runs = [_task_shifted({**r, "preset": "single_adapter"}, {"vqa": v, "nlvr": 0.3, "caption": c})
            for r, v, c in zip(ref, vqa, caption)]
    three = ["vqa", "gqa", "nlvr"]
    sub = bm.paired_vs(runs, ref, n_resamples=300, tasks=three)
    per_seed = [(v + 0.0 + 0.3) / 3 for v in vqa]  # the closed form of each seed's 3-task difference
    assert sub["difference"] == pytest.approx(np.mean(per_seed))
    from adapterkit.stats import t_interval

    want = t_interval(per_seed)
    assert sub["seed_interval"] == pytest.approx([want.low, want.high])
    assert sub["margin"]["equivalence"] == "within" and list(sub["tasks"]) == three
    full = bm.paired_vs(runs, ref, n_resamples=300)
    assert full["margin"]["equivalence"] == "undetermined" and list(full["tasks"]) == bm.TASKS
    assert bm.paired_vs(runs, ref, n_resamples=300, tasks=bm.TASKS) == full  # the default is all four
    for bad in (["vqa", "foo"], [], ["vqa", "vqa"]):
        with pytest.raises(ConfigError, match="choose distinct tasks among vqa, gqa, nlvr, caption"):
            bm.paired_vs(runs, ref, tasks=bad)
    # the script over a folder: the same reading, a table, and one clear error for a bad reference
    # (the reference has a fifth seed the preset lacks: only the four seeds both have are paired)
    folder = _folder(tmp_path / "c", ref + [_fake_run("full_finetune", 4, n=30)] + runs)
    script = Path(__file__).parents[1] / "scripts" / "fashionvl_task_subset.py"
    p = subprocess.run([sys.executable, str(script), str(folder), "--tasks", "vqa,gqa,nlvr", "--out",
                        str(tmp_path / "out")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    res = json.loads((tmp_path / "out" / "task_subset.json").read_text())
    assert res["presets"]["single_adapter"]["vs_reference"]["difference"] == pytest.approx(np.mean(per_seed))
    assert "| single_adapter | 4 |" in p.stdout and "within (no worse)" in p.stdout
    p = subprocess.run([sys.executable, str(script), str(folder), "--tasks", "vqa", "--reference", "nope"],
                       capture_output=True, text=True)
    assert p.returncode != 0 and "no finished run of the reference preset 'nope'" in p.stderr
    assert "Traceback" not in p.stderr
