"""How much the validation curve still moves at the end of training (`benchmark.curve_tail`): the
rise over the last quarter of the steps, per run and over seeds with the closed-form t-interval,
read as rising / falling / no change shown; and its table in compare.md."""

import math

import pytest
from test_compare_partial import _fake_run

from adapterkit.errors import ConfigError
from adapterkit.vl import benchmark as bm


def _curve(steps, averages):
    return [{"step": s, **{t: a for t in bm.TASKS}, "average": a} for s, a in zip(steps, averages)]


def _run(seed, averages, steps=(0, 65, 130, 195, 260, 325, 390, 455, 520)):
    return {**_fake_run("single_adapter", seed), "curve": _curve(steps, averages)}


def test_the_rise_is_taken_from_the_last_quarter_and_its_interval_is_the_t_interval():
    # 520 steps, a point every 65: the last quarter starts at step 390 (index 6)
    runs = [_run(s, [0, 10, 20, 30, 40, 50, 60 + 0, 70, 60 + r]) for s, r in enumerate((1.0, 2.0, 3.0))]
    c = bm.curve_tail(runs)
    assert (c["from_step"], c["to_step"], c["runs"]) == (390, 520, 3)
    assert c["rise"]["average"] == pytest.approx(2.0)
    half = 4.302652729911275 * 1.0 / math.sqrt(3)  # t_{0.975, 2} * sd / sqrt(n), sd of (1, 2, 3) = 1
    assert c["seed_interval"]["average"] == pytest.approx([2.0 - half, 2.0 + half])
    assert c["reading"] == "no change shown"  # [-0.48, 4.48] straddles 0
    assert all(c["rise"][t] == pytest.approx(2.0) for t in bm.TASKS)


def test_readings_and_point_choice():
    rising = bm.curve_tail([_run(s, [0] * 6 + [50, 55, 60 + s]) for s in range(3)])
    assert rising["reading"] == "rising" and rising["rise"]["average"] == pytest.approx(11.0)
    falling = bm.curve_tail([_run(s, [0] * 6 + [50, 45, 40 - s]) for s in range(3)])
    assert falling["reading"] == "falling"
    # no point exactly at 75%: the latest one before it (step 100 of 0/100/310/400: 310 > 400 * 0.75)
    c = bm.curve_tail([_run(0, [0, 5, 9, 10], steps=(0, 100, 310, 400))])
    assert (c["from_step"], c["rise"]["average"]) == (100, 5.0)
    assert c["seed_interval"]["average"] is None and c["reading"] == "no change shown"  # one seed
    half = bm.curve_tail([_run(0, [0, 5, 9, 10], steps=(0, 100, 310, 400))], frac=0.5)
    assert (half["from_step"], half["rise"]["average"]) == (100, 5.0)  # 200 is the bound: 100 is the latest <=
    exact = bm.curve_tail([_run(0, [0, 5, 9, 10], steps=(0, 100, 300, 400))])
    assert (exact["from_step"], exact["rise"]["average"]) == (300, 1.0)  # a point at 75% itself
    # runs without a curve (or one point) are left out; none at all: None
    assert bm.curve_tail([_fake_run("single_adapter", 0)]) is None
    assert bm.curve_tail([_run(0, [3.0], steps=(0,))]) is None
    mixed = bm.curve_tail([_fake_run("single_adapter", 0), _run(1, [0] * 8 + [4.0])])
    assert mixed["runs"] == 1 and mixed["rise"]["average"] == pytest.approx(4.0)
    with pytest.raises(ConfigError, match="between 0 and 1"):
        bm.curve_tail([_run(0, [0] * 9)], frac=1.0)


def test_the_tail_goes_into_the_aggregate_and_the_table():
    runs = [_run(s, [0] * 6 + [50, 55, 60 + s]) for s in range(3)]
    agg = bm.aggregate(runs, n_resamples=50)
    assert agg["curve_tail"]["reading"] == "rising"
    summary = {"protocol": {"seeds": [0, 1, 2]}, "majority_baseline": {t: {"score": 0.5} for t in bm.TASKS},
               "presets": {"single_adapter": agg}}
    md = bm.compare_table(summary)
    assert "last 25% of the steps (step 390 -> 520)" in md
    row = next(line for line in md.splitlines() if line.startswith("| single_adapter | 3 | +11.0"))
    assert row.endswith("| rising |")
    plain = bm.aggregate([_fake_run("single_adapter", 0)], n_resamples=50)
    assert plain["curve_tail"] is None
    md = bm.compare_table({**summary, "presets": {"single_adapter": plain}})
    assert "Validation curve over" not in md
