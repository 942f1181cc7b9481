"""Confidence intervals for benchmark scores.

- `bootstrap_interval`: percentile bootstrap of the mean of per-example scores (how much a
  score moves from which test examples happened to be drawn).
- `bootstrap_tasks`: the same for several tasks at once and for their unweighted average,
  resampling the examples of each task within that task (the tasks keep their sizes).
- `bootstrap_difference`: paired bootstrap of the difference of two systems' averages on
  the same examples (one resample of the examples is applied to both).
- `t_interval`: mean and Student-t interval over independent runs (seeds).
- `margin_verdict`: whether an interval of a difference lies within +-margin (equivalence), beyond
  it, or neither; `seeds_for_margin`: how many runs a t-interval of a given spread needs to fit in it.

Resampling is vectorised: one (resamples, n) index array per task, drawn in chunks that
bound memory, never a Python loop over resamples or examples. A fixed `seed` gives the
same interval every time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from adapterkit.errors import ConfigError, DataError

__all__ = [
    "Interval",
    "bootstrap_means",
    "bootstrap_interval",
    "bootstrap_tasks",
    "bootstrap_difference",
    "bootstrap_ratio",
    "t_interval",
    "margin_verdict",
    "seeds_for_margin",
]

#: index elements drawn per chunk (int32 + float64 gathers: about 50 MB at 4M)
_CHUNK_ELEMENTS = 4_000_000


@dataclass(frozen=True)
class Interval:
    """A point estimate with its interval; `low`/`high` are None where none exists (one run)."""

    mean: float
    low: float | None
    high: float | None
    n: int
    level: float = 0.95

    @property
    def half_width(self) -> float | None:
        """Half the interval's width (the "+-" of a table), None without an interval."""
        return None if self.low is None or self.high is None else (self.high - self.low) / 2.0

    def to_dict(self) -> dict:
        return asdict(self)


def _scores(values, what: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise DataError(f"{what}: expected a 1-d list of per-example scores, got shape {arr.shape}")
    if arr.size == 0:
        raise DataError(f"{what}: no scores (an empty task or split?)")
    if not np.all(np.isfinite(arr)):
        raise DataError(f"{what}: scores must be finite numbers")
    return arr


def _check(level: float, n_resamples: int) -> None:
    if not 0.0 < level < 1.0:
        raise ConfigError(f"the interval level must be between 0 and 1 (e.g. 0.95), got {level!r}")
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 10:
        raise ConfigError(f"the number of bootstrap resamples must be an integer >= 10, got {n_resamples!r}")


def _resampled_means(rows: np.ndarray, n_resamples: int, rng: np.random.Generator | int) -> np.ndarray:
    """(k, n_resamples) means of each row of `rows` (k, n) under the same resamples of its n columns."""
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    n = rows.shape[1]
    out = np.empty((rows.shape[0], n_resamples), dtype=np.float64)
    per_chunk = max(1, _CHUNK_ELEMENTS // n)
    for start in range(0, n_resamples, per_chunk):  # a few chunks, each one vectorised gather
        stop = min(n_resamples, start + per_chunk)
        idx = rng.integers(0, n, size=(stop - start, n), dtype=np.int32 if n < 2**31 else np.int64)
        out[:, start:stop] = rows[:, idx].mean(axis=2)
    return out


def bootstrap_means(scores, n_resamples: int = 2000, rng: np.random.Generator | int = 0) -> np.ndarray:
    """(n_resamples,) means of `scores` resampled with replacement (same size as `scores`)."""
    arr = _scores(scores, "bootstrap")
    _check(0.95, n_resamples)
    return _resampled_means(arr[None], n_resamples, rng)[0]


def bootstrap_ratio(numerators, denominators, level: float = 0.95, n_resamples: int = 2000,
                    seed: int = 0) -> Interval:
    """Percentile bootstrap interval of sum(numerators) / sum(denominators), resampling the
    (numerator, denominator) pairs together: a corpus rate such as WER = errors / reference words."""
    _check(level, n_resamples)
    num, den = _scores(numerators, "ratio numerators"), _scores(denominators, "ratio denominators")
    if num.shape != den.shape:
        raise DataError(f"ratio bootstrap: {num.size} numerators but {den.size} denominators")
    means = _resampled_means(np.stack([num, den]), n_resamples, seed)
    boot = means[0] / np.maximum(means[1], np.finfo(np.float64).tiny)
    return _percentile(float(num.sum() / max(den.sum(), np.finfo(np.float64).tiny)), boot, num.size, level)


def _percentile(point: float, boot: np.ndarray, n: int, level: float) -> Interval:
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(boot, [alpha, 1.0 - alpha])
    return Interval(float(point), float(low), float(high), int(n), level)


def bootstrap_interval(scores, level: float = 0.95, n_resamples: int = 2000, seed: int = 0) -> Interval:
    """Percentile bootstrap interval of the mean of per-example `scores`."""
    _check(level, n_resamples)
    arr = _scores(scores, "bootstrap")
    return _percentile(arr.mean(), bootstrap_means(arr, n_resamples, seed), arr.size, level)


def _task_rngs(names: Sequence[str], seed: int) -> list[np.random.Generator]:
    # one independent stream per task position: a task's resamples do not depend on the others' sizes
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(len(names))]


def bootstrap_tasks(task_scores: Mapping[str, Sequence[float]], level: float = 0.95, n_resamples: int = 2000,
                    seed: int = 0, average_key: str = "average") -> dict[str, Interval]:
    """Intervals for each task and for the unweighted average over tasks.

    The examples of each task are resampled within that task; resample b of the average is
    the mean over tasks of each task's resample b, so the average's interval combines the
    tasks' sampling noise (independent test sets) without pooling their examples.
    """
    _check(level, n_resamples)
    if not task_scores:
        raise DataError("bootstrap over tasks: no tasks")
    if average_key in task_scores:
        raise ConfigError(f"a task may not be called {average_key!r} (the key of the average)")
    names = list(task_scores)
    arrays = [_scores(task_scores[t], f"bootstrap of {t!r}") for t in names]
    boots = np.stack([bootstrap_means(a, n_resamples, r) for a, r in zip(arrays, _task_rngs(names, seed))])
    out = {t: _percentile(a.mean(), b, a.size, level) for t, a, b in zip(names, arrays, boots)}
    point = float(np.mean([a.mean() for a in arrays]))
    out[average_key] = _percentile(point, boots.mean(axis=0), sum(a.size for a in arrays), level)
    return out


def bootstrap_difference(a: Mapping[str, Sequence[float]], b: Mapping[str, Sequence[float]], level: float = 0.95,
                         n_resamples: int = 2000, seed: int = 0) -> Interval:
    """Paired bootstrap interval of average(a) - average(b) over the same tasks and examples.

    `a[t][i]` and `b[t][i]` must score the same example; each resample draws one set of
    example indices per task and applies it to both systems, so what the two share (the
    hard examples) cancels.
    """
    _check(level, n_resamples)
    if set(a) != set(b) or not a:
        raise DataError(f"paired bootstrap: both systems need the same tasks, got {sorted(a)} and {sorted(b)}")
    names = list(a)
    diffs = []
    for t in names:
        x, y = _scores(a[t], f"paired bootstrap of {t!r}"), _scores(b[t], f"paired bootstrap of {t!r}")
        if x.size != y.size:
            raise DataError(f"paired bootstrap of {t!r}: {x.size} scores against {y.size}; the same examples "
                            "must be scored by both systems")
        diffs.append(x - y)  # the mean of resampled differences = difference of resampled means
    boots = np.stack([bootstrap_means(d, n_resamples, r) for d, r in zip(diffs, _task_rngs(names, seed))])
    point = float(np.mean([d.mean() for d in diffs]))
    return _percentile(point, boots.mean(axis=0), sum(d.size for d in diffs), level)


def _t_quantile(q: float, df):
    """Student-t quantile: a float for one ``df``, an array for an array of them."""
    from scipy.stats import t

    out = t.ppf(q, df)
    return float(out) if np.ndim(out) == 0 else out


def t_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """Mean and Student-t interval mean +- t_{(1+level)/2, n-1} * s / sqrt(n) over n runs.

    With one run the mean is returned with no interval (low = high = None).
    """
    if not 0.0 < level < 1.0:
        raise ConfigError(f"the interval level must be between 0 and 1 (e.g. 0.95), got {level!r}")
    arr = _scores(values, "t-interval")
    n = arr.size
    mean = float(arr.mean())
    if n < 2:
        return Interval(mean, None, None, 1, level)
    half = _t_quantile((1.0 + level) / 2.0, n - 1) * float(arr.std(ddof=1)) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, level)


def margin_verdict(low: float | None, high: float | None, margin: float) -> dict:
    """Read an interval [low, high] of a difference (system - reference) against +-`margin`.

    - equivalence: "within" when the whole interval lies inside (-margin, +margin) (the two
      one-sided tests at the interval's level), "outside" when it lies wholly beyond one side,
      "undetermined" when it straddles a bound;
    - non_inferiority: "shown" when low > -margin (no worse than the reference by the margin),
      "ruled out" when high < -margin, else "undetermined".

    Without an interval (one run) both are "undetermined".
    """
    if not margin > 0:
        raise ConfigError(f"the margin must be a positive number of points, got {margin!r}")
    if low is None or high is None:
        return {"margin": float(margin), "equivalence": "undetermined", "non_inferiority": "undetermined"}
    if low > high:
        raise DataError(f"interval [{low}, {high}] has its low end above its high end")
    if -margin < low and high < margin:
        eq = "within"
    elif high <= -margin or low >= margin:
        eq = "outside"
    else:
        eq = "undetermined"
    ni = "shown" if low > -margin else ("ruled out" if high < -margin else "undetermined")
    return {"margin": float(margin), "equivalence": eq, "non_inferiority": ni}


def seeds_for_margin(sd: float, margin: float, level: float = 0.95, max_runs: int = 10_000) -> int | None:
    """The fewest runs n >= 2 whose t-interval half-width t_{(1+level)/2, n-1} * sd / sqrt(n) is below
    `margin`: how many seeds an interval of a difference with this seed spread needs to fit inside
    +-margin when the difference itself is zero (a planning figure: a non-zero difference needs more).
    None when even `max_runs` would not do."""
    if not margin > 0:
        raise ConfigError(f"the margin must be a positive number of points, got {margin!r}")
    if not 0.0 < level < 1.0:
        raise ConfigError(f"the interval level must be between 0 and 1 (e.g. 0.95), got {level!r}")
    if not math.isfinite(sd) or sd < 0:
        raise DataError(f"the spread over seeds must be a finite, non-negative number, got {sd!r}")
    n = np.arange(2, max_runs + 1)
    ok = _t_quantile((1.0 + level) / 2.0, n - 1) * sd / np.sqrt(n) < margin
    return int(n[ok][0]) if ok.any() else None
