"""Task metrics for vision-and-language evaluation.

`TASK_METRICS[task](preds, examples)` scores predictions `{uid: text}` against
examples `{uid: VLExample}` and returns percent-scale numbers, e.g.
{"accuracy": 71.2} or {"CIDEr": 110.3, "BLEU-4": 35.1, ...}. Every example
needs a prediction; predictions for other uids are ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from adapterkit.errors import DataError, did_you_mean
from adapterkit.vl.metrics.accuracy import accuracy, choice_accuracy, exact_match, normalize_text
from adapterkit.vl.metrics.captions import bleu, caption_scores, cider_d, ptb_tokenize
from adapterkit.vl.metrics.vqa import (
    normalize_answer,
    vqa_accuracy,
    vqa_example_scores,
    vqa_score,
    vqa_scores,
)

if TYPE_CHECKING:
    from adapterkit.vl.datasets.base import VLExample

__all__ = [
    "TASK_METRICS",
    "evaluate_task",
    "vqa_metric",
    "accuracy_metric",
    "choice_metric",
    "caption_metric",
    "normalize_answer",
    "vqa_score",
    "vqa_scores",
    "vqa_accuracy",
    "normalize_text",
    "exact_match",
    "accuracy",
    "choice_accuracy",
    "ptb_tokenize",
    "bleu",
    "cider_d",
    "caption_scores",
]

Metric = Callable[[Mapping[str, str], Mapping[str, "VLExample"]], dict[str, float]]


def _keyed(metric):
    """Let a metric take a list of examples too: a repeated uid is a DataError, never a silent collapse."""
    import functools

    @functools.wraps(metric)
    def wrapper(preds, examples):
        from adapterkit.vl.datasets.validate import examples_by_uid

        return metric(preds, examples_by_uid(examples, f"{metric.__name__} examples"))

    return wrapper


def _aligned(preds: Mapping[str, str], examples: Mapping[str, VLExample], task: str) -> list[str]:
    if not examples:
        raise DataError(f"{task} metric: no examples to evaluate")
    missing = [uid for uid in examples if uid not in preds]
    if missing:
        raise DataError(
            f"{task} metric: {len(missing)} example(s) have no prediction, e.g. uid {missing[0]!r}"
        )
    unlabelled = [uid for uid, ex in examples.items() if not ex.targets and ex.label is None]
    if unlabelled:
        raise DataError(
            f"{task} metric: {len(unlabelled)} example(s) have no targets (test split?), e.g. uid {unlabelled[0]!r}"
        )
    return list(examples)


@_keyed
def vqa_metric(preds: Mapping[str, str], examples: Mapping[str, VLExample]) -> dict[str, float]:
    """VQA accuracy (official normalisation, leave-one-out min(#matches/3, 1)), percent.

    Examples whose targets are not the raw human answers (VL-T5 files without
    "answers") are scored by their soft score of the normalised prediction, with
    one warning (`vqa_example_scores`).
    """
    uids = _aligned(preds, examples, "vqa")
    scores = vqa_example_scores(preds, {u: examples[u] for u in uids})
    return {"accuracy": float(scores.mean() * 100.0)}


@_keyed
def accuracy_metric(preds: Mapping[str, str], examples: Mapping[str, VLExample]) -> dict[str, float]:
    """Exact-match accuracy against the targets (GQA, NLVR2), percent."""
    uids = _aligned(preds, examples, "accuracy")
    return {"accuracy": accuracy({u: preds[u] for u in uids}, {u: examples[u].targets for u in uids})}


@_keyed
def choice_metric(preds: Mapping[str, str], examples: Mapping[str, VLExample]) -> dict[str, float]:
    """Multiple-choice video QA accuracy (prediction = choice text or index), percent."""
    uids = _aligned(preds, examples, "video QA")
    bad = [u for u in uids if examples[u].choices is None or examples[u].label is None]
    if bad:
        raise DataError(f"video QA metric: example {bad[0]!r} has no choices/label")
    return {
        "accuracy": choice_accuracy(
            {u: preds[u] for u in uids},
            {u: examples[u].choices for u in uids},
            {u: examples[u].label for u in uids},
        )
    }


@_keyed
def caption_metric(preds: Mapping[str, str], examples: Mapping[str, VLExample]) -> dict[str, float]:
    """CIDEr (CIDEr-D) and BLEU-1..4 after PTB-style tokenisation, x100."""
    uids = _aligned(preds, examples, "caption")
    scores = caption_scores({u: examples[u].targets for u in uids}, {u: preds[u] for u in uids})
    return {k: v * 100.0 for k, v in scores.items()}


TASK_METRICS: dict[str, Metric] = {
    "vqa": vqa_metric,
    "gqa": accuracy_metric,
    "nlvr": accuracy_metric,
    "caption": caption_metric,
    "tvqa": choice_metric,
    "how2qa": choice_metric,
    "tvc": caption_metric,
    "yc2c": caption_metric,
}


def evaluate_task(task: str, preds: Mapping[str, str], examples: Mapping[str, VLExample]) -> dict[str, float]:
    """Score `preds` with `task`'s metric (DataError naming the options on an unknown task)."""
    metric = TASK_METRICS.get(task)
    if metric is None:
        raise DataError(
            f"no metric for task {task!r}{did_you_mean(task, TASK_METRICS)}; known: {', '.join(sorted(TASK_METRICS))}"
        )
    return metric(preds, examples)
