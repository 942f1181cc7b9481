"""Exact-match accuracy (GQA, NLVR2, multiple-choice video QA) with light
normalisation: lower-case, collapse whitespace, drop one trailing period."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from adapterkit.errors import DataError

__all__ = ["normalize_text", "exact_match", "accuracy", "choice_accuracy"]


def normalize_text(text: str) -> str:
    """Lower-case, collapse whitespace, strip, drop one trailing period ("Yes." -> "yes")."""
    text = " ".join(str(text).lower().split())
    if text.endswith("."):
        text = text[:-1].rstrip()
    return text


def exact_match(pred: str, targets: Sequence[str]) -> bool:
    """Whether the normalised prediction equals any normalised target."""
    p = normalize_text(pred)
    return any(p == normalize_text(t) for t in targets)


def _check_keys(preds: Mapping, gold: Mapping, what: str) -> list:
    if not gold:
        raise DataError(f"{what}: no examples to evaluate")
    missing = [k for k in gold if k not in preds]
    if missing:
        raise DataError(f"{what}: {len(missing)} example(s) have no prediction, e.g. {missing[0]!r}")
    return list(gold)


def accuracy(preds: Mapping[object, str], targets: Mapping[object, Sequence[str]]) -> float:
    """Percent of examples whose prediction matches one of its targets."""
    keys = _check_keys(preds, targets, "accuracy")
    hits = np.fromiter((exact_match(preds[k], targets[k]) for k in keys), dtype=bool, count=len(keys))
    return float(hits.mean() * 100.0)


def _choice_index(pred: str, choices: Sequence[str]) -> int:
    """Index of the chosen answer: the choice whose text matches the prediction,
    else the prediction read as an index ("2"), else -1."""
    p = normalize_text(pred)
    for i, c in enumerate(choices):
        if p == normalize_text(c):
            return i
    if p.isdigit() and int(p) < len(choices):
        return int(p)
    return -1


def choice_accuracy(
    preds: Mapping[object, str], choices: Mapping[object, Sequence[str]], labels: Mapping[object, int]
) -> float:
    """Multiple-choice accuracy in percent: a prediction (choice text or index)
    is right when it picks the labelled choice."""
    keys = _check_keys(preds, labels, "choice accuracy")
    picked = np.fromiter((_choice_index(preds[k], choices[k]) for k in keys), dtype=np.int64, count=len(keys))
    gold = np.fromiter((int(labels[k]) for k in keys), dtype=np.int64, count=len(keys))
    return float((picked == gold).mean() * 100.0)
