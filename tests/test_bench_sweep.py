"""``adapterkit bench --sweep``: axes, records, ratios against full FT, growth fits, guards, errors.

Tiny Llama shapes (width 32-64, one layer, vocabulary 64), one timed step per case.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from adapterkit.bench.cli import main as bench_main
from adapterkit.bench.shapes import Shape, build_model
from adapterkit.bench.sweep import (
    AXES,
    SweepSettings,
    estimate_bytes,
    growth_words,
    loglog_fit,
    param_count,
    parse_int_list,
    run_sweep,
    write_sweep,
)
from adapterkit.errors import ConfigError

SHAPES = {
    "s1": Shape("s1", "llama", 32, 0, 1, 64, 2, 64, 1),
    "s2": Shape("s2", "llama", 64, 0, 1, 128, 2, 64, 1),
}


def _settings(**kw) -> SweepSettings:
    base = dict(axes=list(AXES), sizes=["s1", "s2"], shape="s1", batches=[1, 2], seqs=[4, 8], tasks=[1, 2],
                batch=2, seq=8, size_batch=1, tasks_batch=2, steps=1, warmup=0)
    base.update(kw)
    return SweepSettings(**base)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # a busy 2-core machine: OpenMP's spinning threads cost more than they give
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def report():
    return run_sweep(_settings(), shapes=SHAPES)


def test_every_axis_point_and_case_has_a_record(report):
    recs = report["records"]
    expect_values = {"size": [param_count(SHAPES["s1"]), param_count(SHAPES["s2"])], "batch": [1, 2], "seq": [4, 8],
                     "tasks": [1, 2]}
    for axis in AXES:
        rs = [r for r in recs if r["axis"] == axis]
        assert sorted({r["value"] for r in rs}) == expect_values[axis]
        cases = {r["case"] for r in rs}
        if axis == "tasks":
            assert cases == {"full_ft", "frozen_bound", "lora_mixed", "adapter_mixed", "peft_lora_mixed"}
        else:
            assert cases == {"full_ft", "frozen_bound", "lora", "adapter", "peft_lora", "infer_base"}
        for r in rs:
            assert r["status"] == "ok", r
            assert r["median_ms"] > 0 and r["steps"] == 1
            assert r["peak_mib"] is not None
    # the point's own quantities are what was run
    for r in recs:
        if r["axis"] == "batch":
            assert r["batch"] == r["value"] and r["seq"] == 8
        if r["axis"] == "seq":
            assert r["seq"] == r["value"] and r["batch"] == 2
        if r["axis"] == "tasks":
            assert r["tasks"] == r["value"] and r["batch"] == 2


def test_an_axis_is_timed_round_robin_when_it_fits(report):
    # tiny shapes: every point of an axis fits in memory at once, so all its cases share one pool
    assert {r["timing"] for r in report["records"]} == {"interleaved"}
    one = run_sweep(_settings(axes=["batch"], peers=False, infer=False, interleave=False), shapes=SHAPES)
    assert {r["timing"] for r in one["records"]} == {"sequential"}
    assert all(r["status"] == "ok" and r["steps"] == 1 for r in one["records"])


def test_ratios_are_against_full_ft_of_the_same_point(report):
    recs = report["records"]
    for r in recs:
        if r["kind"] != "train":
            assert "time_vs_full_ft" not in r
            continue
        full = [f for f in recs if f["axis"] == r["axis"] and f["value"] == r["value"] and f["case"] == "full_ft"]
        assert len(full) == 1
        assert r["time_vs_full_ft"] == pytest.approx(r["median_ms"] / full[0]["median_ms"])
        assert r["mem_vs_full_ft"] == pytest.approx(r["peak_mib"] / full[0]["peak_mib"])
    assert all(r["time_vs_full_ft"] == 1.0 for r in recs if r["case"] == "full_ft")


def test_fits_and_outputs(report, tmp_path):
    fits = {(f["axis"], f["case"]): f for f in report["fits"]}
    assert ("seq", "lora") in fits and ("tasks", "peft_lora_mixed") in fits
    assert fits[("seq", "lora")]["points"] == 2 and fits[("seq", "lora")]["time"]["slope"] is not None
    res = write_sweep(report, tmp_path, "adapterkit bench --sweep")
    assert set(res["plots"]) == set(AXES)
    for axis in AXES:
        assert (tmp_path / f"sweep_{axis}.png").stat().st_size > 1000
    md = (tmp_path / "sweep.md").read_text()
    assert "adapterkit bench --sweep" in md and "## sequence length" in md and "x 1 task" in md
    assert json.loads((tmp_path / "sweep.json").read_text())["records"][0]["axis"] == "size"


def test_loglog_fit_recovers_a_power_law():
    xs = [1, 2, 4, 8, 16]
    f = loglog_fit(xs, [3.0 * x**2 * (1 + 0.01 * (-1) ** i) for i, x in enumerate(xs)])
    assert f["slope"] == pytest.approx(2.0, abs=0.02) and f["lo"] < 2.0 < f["hi"]
    assert growth_words(1.05) == "~linearly" and growth_words(0.02) == "about flat"
    assert growth_words(2.1) == "~quadratically" and "sub-linearly" in growth_words(0.7)
    assert loglog_fit([4], [1.0]) is None


def test_memory_guard_skips_before_building():
    s1 = SHAPES["s1"]
    full, lora = estimate_bytes(s1, "full_ft", 1, 8), estimate_bytes(s1, "lora", 1, 8)
    assert full > lora
    rep = run_sweep(_settings(axes=["size"], sizes=["s1"], peers=False, infer=False,
                              max_gib=(full + lora) / 2 / 2**30), shapes=SHAPES)
    by = {r["case"]: r for r in rep["records"]}
    assert by["full_ft"]["status"] == "skipped" and "estimated" in by["full_ft"]["note"]
    assert "median_ms" not in by["full_ft"]
    assert by["lora"]["status"] == "ok" and by["lora"]["time_vs_full_ft"] is None
    assert by["lora"]["time_vs_floor"] == pytest.approx(by["lora"]["median_ms"] / by["frozen_bound"]["median_ms"])


def test_param_count_matches_the_built_model():
    for s in SHAPES.values():
        m = build_model(s, 0, "cpu")
        assert param_count(s) == sum(p.numel() for p in m.parameters())


def test_bad_input_is_one_clear_error(capsys):
    with pytest.raises(ConfigError, match=r"--sweep-batch must be a comma list of positive integers, got '1,x'"):
        parse_int_list("1,x", "--sweep-batch")
    with pytest.raises(ConfigError, match="positive integers"):
        parse_int_list("4,0", "--sweep-seq")
    with pytest.raises(ConfigError, match=r'unknown axis "sise".*size'):
        _settings(axes=["sise"]).validate(SHAPES)
    with pytest.raises(ConfigError, match="unknown backbone"):
        _settings(sizes=["s9"]).validate(SHAPES)
    assert bench_main(["--sweep", "--device", "cpu", "--sweep-axes", "batch,width"]) == 2
    err = capsys.readouterr().err
    assert 'unknown axis "width"' in err and "Traceback" not in err
    assert bench_main(["--sweep", "--device", "cpu", "--sweep-seq", "16,3.5"]) == 2
    assert "--sweep-seq must be a comma list of positive integers" in capsys.readouterr().err


def test_mixed_cases_route_rows_over_the_tasks(report):
    # one mixed training point per task count ran to a finite loss with every case alive
    for r in report["records"]:
        if r["axis"] == "tasks" and r["kind"] == "train":
            assert math.isfinite(r["loss"])
