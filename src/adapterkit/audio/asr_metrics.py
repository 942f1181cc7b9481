"""Speech-recognition metrics: word and character error rates over a corpus.

WER = (substitutions + deletions + insertions) / reference words, summed over the corpus
(not averaged per utterance), after a light normalisation (lower case, punctuation and
repeated spaces removed) so that "Logged on." and "logged on" match.
"""

from __future__ import annotations

import re
import unicodedata

import numpy as np

_PUNCT = re.compile(r"[^\w\s']|_", re.UNICODE)


def normalize(text: str) -> str:
    t = unicodedata.normalize("NFKC", text).lower().replace("-", " ")
    return " ".join(_PUNCT.sub(" ", t).split())


def edit_distance(ref: list, hyp: list) -> int:
    """Levenshtein distance between two token lists (one numpy row per reference token)."""
    if not ref:
        return len(hyp)
    if not hyp:
        return len(ref)
    h = np.asarray([hash(x) for x in hyp])
    prev = np.arange(len(hyp) + 1)
    for i, r in enumerate(ref, 1):
        sub = prev[:-1] + (h != hash(r))
        cur = np.empty_like(prev)
        cur[0] = i
        cur[1:] = np.minimum(sub, prev[1:] + 1)
        # insertions chain left to right: cur[j] = min(cur[j], cur[j-1] + 1) as a running minimum
        cur = np.minimum.accumulate(cur - np.arange(len(cur))) + np.arange(len(cur))
        prev = cur
    return int(prev[-1])


def error_counts(refs: list[str], hyps: list[str], unit: str = "word") -> tuple[np.ndarray, np.ndarray]:
    """Per-utterance (errors, reference length) in words or characters, after normalisation."""
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    errs, lens = [], []
    for r, h in zip(refs, hyps):
        r, h = normalize(r), normalize(h)
        rt, ht = (r.split(), h.split()) if unit == "word" else (list(r.replace(" ", "")), list(h.replace(" ", "")))
        errs.append(edit_distance(rt, ht))
        lens.append(len(rt))
    return np.asarray(errs, dtype=np.int64), np.asarray(lens, dtype=np.int64)


def wer(refs: list[str], hyps: list[str]) -> float:
    e, n = error_counts(refs, hyps, "word")
    return float(e.sum() / max(int(n.sum()), 1))


def cer(refs: list[str], hyps: list[str]) -> float:
    e, n = error_counts(refs, hyps, "char")
    return float(e.sum() / max(int(n.sum()), 1))


def corpus_rate_interval(errors: np.ndarray, lengths: np.ndarray, level: float = 0.95, n_resamples: int = 2000,
                         seed: int = 0):
    """A corpus error rate sum(errors) / sum(lengths) with its percentile-bootstrap interval
    over utterances (errors and lengths resampled together): :func:`adapterkit.stats.bootstrap_ratio`."""
    from adapterkit.stats import bootstrap_ratio

    return bootstrap_ratio(errors, lengths, level, n_resamples, seed)
