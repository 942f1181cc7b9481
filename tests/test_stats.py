"""Interval code against closed forms: the bootstrap of a Bernoulli mean against the normal
approximation, the t-interval against Student-t quantiles."""

import math

import numpy as np
import pytest

from adapterkit import stats
from adapterkit.errors import ConfigError, DataError


def _bernoulli(n, p, seed):
    return (np.random.default_rng(seed).random(n) < p).astype(float)


def test_bootstrap_of_bernoulli_mean_matches_normal_approximation():
    x = _bernoulli(20_000, 0.3, 1)
    p, n = x.mean(), x.size
    half = 1.96 * math.sqrt(p * (1 - p) / n)  # the normal approximation, about 0.0064
    iv = stats.bootstrap_interval(x, n_resamples=2000, seed=0)
    assert iv.mean == pytest.approx(p)
    assert iv.n == n
    assert iv.low == pytest.approx(p - half, abs=0.1 * half)
    assert iv.high == pytest.approx(p + half, abs=0.1 * half)
    assert iv.half_width == pytest.approx(half, rel=0.08)


def test_bootstrap_interval_shrinks_as_one_over_sqrt_n():
    small = stats.bootstrap_interval(_bernoulli(500, 0.5, 2), seed=0).half_width
    large = stats.bootstrap_interval(_bernoulli(8000, 0.5, 3), seed=0).half_width
    assert small / large == pytest.approx(4.0, rel=0.12)


def test_bootstrap_of_the_average_over_tasks_matches_the_closed_form():
    # two independent test sets: var(average) = (p1 q1 / n1 + p2 q2 / n2) / 4
    a, b = _bernoulli(6000, 0.7, 4), _bernoulli(2000, 0.4, 5)
    out = stats.bootstrap_tasks({"vqa": a, "nlvr": b}, n_resamples=3000, seed=0)
    (p1, n1), (p2, n2) = (a.mean(), a.size), (b.mean(), b.size)
    half = 1.96 * 0.5 * math.sqrt(p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2)
    avg = out["average"]
    assert avg.mean == pytest.approx((p1 + p2) / 2)
    assert avg.half_width == pytest.approx(half, rel=0.08)
    assert avg.n == n1 + n2
    # each task's own interval is the one-task bootstrap with that task's stream
    assert out["vqa"].half_width == pytest.approx(1.96 * math.sqrt(p1 * (1 - p1) / n1), rel=0.08)
    assert out["nlvr"].half_width == pytest.approx(1.96 * math.sqrt(p2 * (1 - p2) / n2), rel=0.08)


def test_paired_difference():
    base = {"vqa": _bernoulli(3000, 0.6, 6), "gqa": _bernoulli(3000, 0.4, 7)}
    # a constant shift: every resample's difference is exactly the shift
    shifted = {t: v + 0.05 for t, v in base.items()}
    iv = stats.bootstrap_difference(shifted, base, seed=0)
    assert iv.mean == pytest.approx(0.05) and iv.low == pytest.approx(0.05) and iv.high == pytest.approx(0.05)
    # independent systems: per-example differences d, var(average of task means) = sum var(d_t)/n_t / 4
    other = {"vqa": _bernoulli(3000, 0.65, 8), "gqa": _bernoulli(3000, 0.4, 9)}
    iv = stats.bootstrap_difference(other, base, n_resamples=3000, seed=0)
    d = {t: other[t] - base[t] for t in base}
    half = 1.96 * 0.5 * math.sqrt(sum(v.var() / v.size for v in d.values()))
    assert iv.mean == pytest.approx(np.mean([v.mean() for v in d.values()]))
    assert iv.half_width == pytest.approx(half, rel=0.08)
    with pytest.raises(DataError, match="same examples"):
        stats.bootstrap_difference({"vqa": [1.0, 0.0]}, {"vqa": [1.0]})
    with pytest.raises(DataError, match="same tasks"):
        stats.bootstrap_difference({"vqa": [1.0]}, {"gqa": [1.0]})


def test_t_interval_against_student_t():
    from scipy.stats import t

    iv = stats.t_interval([70.0, 72.0, 74.0])
    # mean 72, s = 2, t_{0.975, 2} = 4.302653 (the table value)
    assert iv.mean == pytest.approx(72.0)
    assert iv.half_width == pytest.approx(4.302653 * 2 / math.sqrt(3), rel=1e-6)
    lo, hi = t.interval(0.95, 2, loc=72.0, scale=2 / math.sqrt(3))
    assert (iv.low, iv.high) == (pytest.approx(lo), pytest.approx(hi))
    vals = [0.61, 0.64, 0.58, 0.66, 0.63]
    iv = stats.t_interval(vals, level=0.9)
    s = np.std(vals, ddof=1)
    assert iv.half_width == pytest.approx(2.131847 * s / math.sqrt(5), rel=1e-6)  # t_{0.95, 4}
    one = stats.t_interval([71.5])
    assert one.mean == 71.5 and one.low is None and one.half_width is None and one.n == 1


def test_bootstrap_is_seeded_and_chunked(monkeypatch):
    x = _bernoulli(1000, 0.5, 10)
    a, b = stats.bootstrap_interval(x, seed=3), stats.bootstrap_interval(x, seed=3)
    assert a == b
    assert stats.bootstrap_interval(x, seed=4) != a
    monkeypatch.setattr(stats, "_CHUNK_ELEMENTS", 5000)  # 5 resamples per chunk: many chunks, same answer scale
    c = stats.bootstrap_interval(x, seed=3)
    assert c.half_width == pytest.approx(a.half_width, rel=0.12)
    assert len(stats.bootstrap_means(x, 37, 0)) == 37


def test_bad_input_is_one_clear_error():
    with pytest.raises(DataError, match="no scores"):
        stats.bootstrap_interval([])
    with pytest.raises(DataError, match="finite"):
        stats.bootstrap_interval([1.0, float("nan")])
    with pytest.raises(ConfigError, match="level"):
        stats.bootstrap_interval([1.0, 0.0], level=95)
    with pytest.raises(ConfigError, match="resamples"):
        stats.bootstrap_interval([1.0, 0.0], n_resamples=1)
    with pytest.raises(ConfigError, match="average"):
        stats.bootstrap_tasks({"average": [1.0]})
    with pytest.raises(ConfigError, match="level"):
        stats.t_interval([1.0, 2.0], level=1.5)


def test_margin_verdict_reads_an_interval_against_plus_minus_the_margin():
    v = stats.margin_verdict
    assert v(-1.5, 1.9, 2)["equivalence"] == "within" and v(-1.5, 1.9, 2)["non_inferiority"] == "shown"
    assert v(-2.5, 1.0, 2)["equivalence"] == "undetermined" and v(-2.5, 1.0, 2)["non_inferiority"] == "undetermined"
    assert v(-1.0, 3.0, 2) == {"margin": 2.0, "equivalence": "undetermined", "non_inferiority": "shown"}
    assert v(2.5, 4.0, 2)["equivalence"] == "outside" and v(2.5, 4.0, 2)["non_inferiority"] == "shown"
    assert v(-6.0, -2.5, 2) == {"margin": 2.0, "equivalence": "outside", "non_inferiority": "ruled out"}
    assert v(None, None, 2)["equivalence"] == "undetermined"  # one run: no interval
    with pytest.raises(ConfigError, match="margin must be a positive"):
        v(-1, 1, 0)
    with pytest.raises(DataError, match="low end above"):
        v(1, -1, 2)


def test_seeds_for_margin_is_the_first_n_whose_t_half_width_fits():
    from scipy.stats import t

    def half(n, sd):
        return t.ppf(0.975, n - 1) * sd / np.sqrt(n)

    for sd, margin in ((6.0, 2.0), (1.0, 2.0), (3.3, 0.5)):
        n = stats.seeds_for_margin(sd, margin)
        assert half(n, sd) < margin and (n == 2 or half(n - 1, sd) >= margin)
        # large n: the normal approximation (1.96 sd / margin)^2, a little above it from the t's tails
        if n > 30:
            assert (1.96 * sd / margin) ** 2 <= n <= (1.96 * sd / margin) ** 2 + 4
    assert stats.seeds_for_margin(0.0, 2.0) == 2
    assert stats.seeds_for_margin(1e6, 0.01, max_runs=100) is None
    with pytest.raises(DataError, match="spread over seeds"):
        stats.seeds_for_margin(float("nan"), 2.0)
