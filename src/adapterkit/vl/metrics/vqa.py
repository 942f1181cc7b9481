"""VQA accuracy with the official evaluation's answer normalisation.

Follows the rules of the official VQA evaluation script (GT-Vision-Lab
`vqaEval.py`): a prediction is stripped, its punctuation processed, numbers
written as words mapped to digits, articles dropped and apostrophe-less
contractions restored; ground-truth answers get only the punctuation step, and
only when the annotators disagree. The score of a prediction is the mean, over
the leave-one-out subsets of the (usually 10) human answers, of
min(#matches / 3, 1).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from adapterkit.errors import DataError

__all__ = [
    "normalize_answer",
    "process_punctuation",
    "process_digit_article",
    "vqa_score",
    "vqa_scores",
    "vqa_accuracy",
    "soft_scores",
    "vqa_example_scores",
    "SoftLabelScoreWarning",
]

# Number words the official evaluation maps to digits ("none" counts as 0).
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip

_ARTICLES = frozenset({"a", "an", "the"})

# Contraction table of the official evaluation: apostrophe-less (or partly
# apostrophised) spellings -> restored form, as "key=value" pairs. Kept as in
# the official table, including its oddities ("somebody'd" -> "somebodyd",
# capitalised keys that never match lower-cased text).
_CONTRACTION_PAIRS = """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't
couldn'tve=couldn't've couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't
hadnt=hadn't hadnt've=hadn't've hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd
hed've=he'd've he'dve=he'd've hes=he's howd=how'd howll=how'll hows=how's Id've=I'd've
I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd itd've=it'd've it'dve=it'd've itll=it'll
let's=let's maam=ma'am mightnt=mightn't mightnt've=mightn't've mightn'tve=mightn't've
mightve=might've mustnt=mustn't mustve=must've neednt=needn't notve=not've oclock=o'clock
oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't
shed've=she'd've she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't
shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd
somebodyd've=somebody'd've somebody'dve=somebody'd've somebodyll=somebody'll
somebodys=somebody's someoned=someone'd someoned've=someone'd've
someone'dve=someone'd've someonell=someone'll someones=someone's somethingd=something'd
somethingd've=something'd've something'dve=something'd've somethingll=something'll
thats=that's thered=there'd thered've=there'd've there'dve=there'd've therere=there're
theres=there's theyd=they'd theyd've=they'd've they'dve=they'd've theyll=they'll
theyre=they're theyve=they've twas='twas wasnt=wasn't wed've=we'd've we'dve=we'd've
weve=we've werent=weren't whatll=what'll whatre=what're whats=what's whatve=what've
whens=when's whered=where'd wheres=where's whereve=where've whod=who'd whod've=who'd've
who'dve=who'd've wholl=who'll whos=who's whove=who've whyll=why'll whyre=why're whys=why's
wont=won't wouldve=would've wouldnt=wouldn't wouldnt've=wouldn't've
wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll yall'd've=y'all'd've
y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've you'dve=you'd've
youll=you'll youre=you're youve=you've
"""
CONTRACTIONS: dict[str, str] = dict(pair.split("=", 1) for pair in _CONTRACTION_PAIRS.split())

# Characters the official evaluation removes (or turns into spaces).
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
          ">", "<", "@", "`", ",", "?", "!")  # fmt: skip
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# The official pattern is "(?!<=\d)(\.)(?!\d)": its first group is a (mistyped)
# look-ahead that always succeeds, so in effect it removes every period that is
# not followed by a digit ("2.5" keeps its period, "dog." loses it).
_PERIOD = re.compile(r"\.(?!\d)")


def process_punctuation(text: str) -> str:
    """The official punctuation step.

    Each punctuation character is deleted when it touches a space somewhere in
    the text (or when the text has a digit-comma-digit group), and is replaced
    by a space otherwise; then periods not followed by a digit are removed.
    """
    out = text
    has_digit_comma = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for p in _PUNCT:
        if p not in out:
            continue
        if has_digit_comma or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out)


def process_digit_article(text: str) -> str:
    """Lower-case, map number words to digits, drop articles, restore contractions."""
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    """Normalise an answer the way the official evaluation treats predictions.

    >>> normalize_answer("Two")
    '2'
    >>> normalize_answer("the dog.")
    'dog'
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def _prepare_refs(answers: Sequence[str], official: bool) -> list[str]:
    if official:
        # official: references only get the punctuation step, and only when they disagree
        if len(set(answers)) > 1:
            return [process_punctuation(a) for a in answers]
        return list(answers)
    return [normalize_answer(a) for a in answers]


def _loo_score(matches: np.ndarray, n_answers: np.ndarray) -> np.ndarray:
    """Leave-one-out accuracy given #matching answers m out of n per question.

    Leaving out a matching answer leaves m-1 matches, a non-matching one m:
    score = ((n - m) * min(1, m/3) + m * min(1, (m-1)/3)) / n.
    """
    m = matches.astype(np.float64)
    n = n_answers.astype(np.float64)
    keep = np.minimum(1.0, m / 3.0)
    drop = np.minimum(1.0, np.maximum(m - 1.0, 0.0) / 3.0)
    return ((n - m) * keep + m * drop) / n


def vqa_score(pred: str, answers: Sequence[str], official: bool = True) -> float:
    """VQA accuracy of one prediction against the human answers, in [0, 1].

    With `official=True` (default) this reproduces the official evaluation
    exactly (references are assumed to be the already-normalised VQAv2
    answers); `official=False` fully normalises the references as well, which
    suits answer lists that were not normalised at collection time.
    """
    return float(vqa_scores([pred], [answers], official=official)[0])


def vqa_scores(preds: Sequence[str], answers: Sequence[Sequence[str]], official: bool = True) -> np.ndarray:
    """Per-question VQA accuracies (array in [0, 1]) for aligned preds / answer lists."""
    if len(preds) != len(answers):
        raise DataError(f"vqa_scores: {len(preds)} predictions but {len(answers)} answer lists")
    matches = np.zeros(len(preds), dtype=np.int64)
    counts = np.zeros(len(preds), dtype=np.int64)
    for i, (pred, refs) in enumerate(zip(preds, answers)):
        if isinstance(refs, str) or len(refs) == 0:
            raise DataError(f"vqa_scores: question #{i} needs a non-empty list of answers, got {refs!r}")
        p = normalize_answer(pred)
        prepared = _prepare_refs(refs, official)
        matches[i] = sum(1 for r in prepared if r == p)
        counts[i] = len(prepared)
    return _loo_score(matches, counts)


def vqa_accuracy(
    preds: Mapping[object, str], answers: Mapping[object, Sequence[str]], official: bool = True
) -> float:
    """Mean VQA accuracy in percent over the questions of `answers`.

    Every question in `answers` needs a prediction.
    """
    if not answers:
        raise DataError("vqa_accuracy: no questions to evaluate")
    missing = [k for k in answers if k not in preds]
    if missing:
        raise DataError(f"vqa_accuracy: {len(missing)} question(s) have no prediction, e.g. {missing[0]!r}")
    keys = list(answers)
    scores = vqa_scores([preds[k] for k in keys], [answers[k] for k in keys], official=official)
    return float(scores.mean() * 100.0)


def soft_scores(answers: Sequence[str]) -> dict[str, float]:
    """Soft target scores from raw human answers: normalised answer -> the VQA
    accuracy a model predicting it would get (the leave-one-out scheme, which
    gives 0.3 / 0.6 / 0.9 / 1.0 for 1 / 2 / 3 / 4+ of 10 annotators)."""
    if not answers:
        return {}
    candidates = []
    for a in answers:
        key = normalize_answer(a)
        if key and key not in candidates:
            candidates.append(key)
    scores = vqa_scores(candidates, [answers] * len(candidates), official=False)
    return {c: float(s) for c, s in zip(candidates, scores) if s > 0}


class SoftLabelScoreWarning(UserWarning):
    """Some VQA questions were scored against soft labels, not the 10 human answers."""


_warned_soft = False


def soft_scored(example) -> bool:
    """Single-answer VQA-style data (soft labels, fewer than the 10 human answers): scored by its
    soft score rather than the official leave-one-out accuracy, unless it says otherwise
    (``extra["raw_answers"]``)."""
    return bool(example.target_scores) and len(example.targets) < 10


def vqa_example_scores(preds: Mapping[str, str], examples: Mapping[str, Any]) -> np.ndarray:
    """Per-question VQA accuracies in [0, 1] of `preds` {uid: answer} for
    `examples` {uid: VLExample}, in the order of `examples`.

    Examples with the raw human answers (``extra["raw_answers"]``, the default)
    get the official leave-one-out accuracy. Examples with soft labels only
    (VL-T5's Karpathy files read without the official annotations) are scored
    by the soft score of the normalised prediction, which is close to but not
    the official number; the first time that happens in a process, one
    `SoftLabelScoreWarning` says how many questions it concerns and how to get
    the official accuracy.
    """
    global _warned_soft
    uids = list(examples)
    scores = np.zeros(len(uids))
    raw = [i for i, u in enumerate(uids) if examples[u].extra.get("raw_answers", True)]
    soft = [i for i, u in enumerate(uids) if not examples[u].extra.get("raw_answers", True)]
    if raw:
        scores[raw] = vqa_scores([preds[uids[i]] for i in raw], [examples[uids[i]].targets for i in raw])
    for i in soft:
        table = examples[uids[i]].target_scores or {}
        p = normalize_answer(preds[uids[i]])
        scores[i] = max((s for a, s in table.items() if a == p or normalize_answer(a) == p), default=0.0)
    # single-answer data (FashionVL, custom sets) is soft-scored by design; only VQAv2 records that lost
    # their 10 official answers (VL-T5's Karpathy files) deserve the warning
    missing = sum(1 for i in soft if examples[uids[i]].extra.get("official_answers_missing"))
    if missing and not _warned_soft:
        _warned_soft = True
        warnings.warn(
            f"VQA: {missing} of {len(uids)} questions have soft labels but not the 10 human answers, so "
            "their accuracy is the soft score of the prediction, not the official VQA accuracy. Join the "
            "official answers: put v2_mscoco_train2014_annotations.json and v2_mscoco_val2014_annotations.json "
            "next to the Karpathy files (read_vqa(..., annotations=PATHS) names them elsewhere).",
            SoftLabelScoreWarning,
            stacklevel=2,
        )
    return scores
