"""Tests of the V&L metrics: VQA normalisation and leave-one-out score, accuracy,
PTB-style tokenisation, BLEU and CIDEr-D against hand calculations and an
independent direct implementation, and the per-task metric table."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from adapterkit.errors import DataError
from adapterkit.vl.datasets import VLExample
from adapterkit.vl.metrics import (
    TASK_METRICS,
    accuracy,
    bleu,
    caption_scores,
    choice_accuracy,
    cider_d,
    evaluate_task,
    normalize_answer,
    normalize_text,
    ptb_tokenize,
    vqa_accuracy,
    vqa_score,
)
from adapterkit.vl.metrics.vqa import process_punctuation, soft_scores

# ----------------------------------------------------------------------------- VQA


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Two", "2"),
        ("the dog.", "dog"),
        ("A  red, car ", "red car"),
        ("yes!", "yes"),
        ("1,000", "1000"),  # digit-comma-digit: punctuation deleted, not spaced
        ("2.5", "2.5"),  # a period before a digit stays
        ("none", "0"),
        ("dont", "don't"),
        ("isnt it", "isn't it"),
        ("e-mail", "e mail"),  # no space around "-": replaced by a space
        ("left - right", "left right"),  # "-" touches a space: deleted
        ("an apple\tpie\n", "apple pie"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def _loo_direct(pred, answers):
    """Independent leave-one-out average, written from the definition."""
    accs = []
    for i in range(len(answers)):
        others = answers[:i] + answers[i + 1 :]
        accs.append(min(1.0, sum(a == pred for a in others) / 3.0))
    return sum(accs) / len(accs)


@pytest.mark.parametrize("m, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_score_leave_one_out(m, expected):
    answers = ["cat"] * m + ["dog"] * (10 - m)
    # 2 of 10 by hand: 8 subsets keep both matches (2/3), 2 subsets keep one (1/3) -> (8*2/3 + 2/3)/10 = 0.6
    assert vqa_score("cat", answers) == pytest.approx(expected)
    assert vqa_score("Cat.", answers) == pytest.approx(expected)


def test_vqa_score_matches_direct_definition():
    rng = random.Random(3)
    vocab = ["1", "2", "yes", "no", "red"]
    for _ in range(200):
        n = rng.randint(1, 10)
        answers = [rng.choice(vocab) for _ in range(n)]
        pred = rng.choice(vocab)
        assert vqa_score(pred, answers) == pytest.approx(_loo_direct(pred, answers))


def test_vqa_official_reference_handling():
    # prediction normalised ("Two" -> "2") and matched against normalised references
    assert vqa_score("Two", ["2"] * 10) == pytest.approx(1.0)
    # official: unanimous references are used as they are ...
    assert vqa_score("two", ["two"] * 10) == 0.0
    # ... and disagreeing ones only get the punctuation step
    assert process_punctuation("dog!") == "dog "
    assert vqa_score("dog", ["dog."] * 5 + ["cat"] * 5) == pytest.approx(1.0)
    # non-official mode normalises the references fully
    assert vqa_score("two", ["two"] * 10, official=False) == pytest.approx(1.0)
    with pytest.raises(DataError, match="non-empty list of answers"):
        vqa_score("x", [])


def test_vqa_accuracy_and_soft_scores():
    answers = {1: ["yes"] * 10, 2: ["2"] * 2 + ["3"] * 8, "q3": ["red"] * 3 + ["blue"] * 7}
    preds = {1: "Yes", 2: "two", "q3": "green", 99: "ignored"}
    assert vqa_accuracy(preds, answers) == pytest.approx(100 * (1.0 + 0.6 + 0.0) / 3)
    with pytest.raises(DataError, match="1 question"):
        vqa_accuracy({1: "yes"}, {1: ["yes"], 2: ["no"]})
    # 10 annotators: "two"/"2" -> 2 votes (0.6), "3" -> 3 votes (0.9), "no" -> 5 votes (1.0)
    assert soft_scores(["two", "2"] + ["3"] * 3 + ["no"] * 5) == pytest.approx(
        {"2": 0.6, "3": 0.9, "no": 1.0}
    )
    # with 5 answers the leave-one-out average of 2 votes is (3 * 2/3 + 2 * 1/3) / 5
    assert soft_scores(["2", "2", "3", "3", "3"])["2"] == pytest.approx((3 * 2 / 3 + 2 / 3) / 5)


# ----------------------------------------------------------------------------- accuracy


def test_exact_match_accuracy():
    assert normalize_text("  The  Dog. ") == "the dog"
    assert accuracy(
        {"a": "Yes", "b": "no ", "c": "left"}, {"a": ["yes"], "b": ["yes"], "c": ["Left."]}
    ) == pytest.approx(200 / 3)
    with pytest.raises(DataError, match="no prediction"):
        accuracy({}, {"a": ["yes"]})


def test_choice_accuracy_text_or_index():
    choices = {1: ["3.", "4.", "1.", "2."], 2: ["A fork.", "A spoon."], 3: ["Red.", "Blue."]}
    labels = {1: 3, 2: 0, 3: 1}
    # text match wins over reading "3" as an index; "0" is read as index 0; "Green" picks nothing
    assert choice_accuracy({1: "2", 2: "0", 3: "green"}, choices, labels) == pytest.approx(200 / 3)
    assert choice_accuracy({1: "3", 2: "a fork", 3: "1"}, choices, labels) == pytest.approx(200 / 3)


# ----------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("A man's dog, running (fast)!", "a man 's dog running fast"),
        ('He doesn\'t like "quotes".', "he does n't like quotes"),
        ("Two dogs' toys - on a well-known table; ok?", "two dogs toys on a well-known table ok"),
        ("It costs $5, 50% off... at 12:30", "it costs $ 5 50 % off at 12:30"),
        ("A\nbig  CAT.", "a big cat"),
    ],
)
def test_ptb_tokenize(raw, expected):
    assert ptb_tokenize(raw) == expected


# ----------------------------------------------------------------------------- BLEU


def test_bleu_hand_computed():
    # cand "the cat the cat" vs ref "the cat sat on the mat":
    # unigrams 3/4 (the x2 clipped to 2, cat x2 clipped to 1), bigrams 1/3, trigrams 0/2;
    # length 4 vs 6 -> brevity penalty exp(1 - 6/4)
    refs = {0: ["the cat sat on the mat"]}
    cands = {0: "the cat the cat"}
    b1, b2, b3, b4 = bleu(refs, cands)
    bp = math.exp(1 - 6 / 4)
    assert b1 == pytest.approx(0.75 * bp, rel=1e-9)
    assert b2 == pytest.approx(math.sqrt(0.75 / 3) * bp, rel=1e-9)
    assert b3 < 1e-4 and b4 < 1e-3


def test_bleu_closest_reference_length_and_corpus_pooling():
    # closest ref length to 4 among {2, 5} is 5 (shortest would be 2): BP = exp(1 - 5/4)
    assert bleu({0: ["a b", "a b c d e"]}, {0: "a b c d"})[3] == pytest.approx(math.exp(-0.25), rel=1e-9)
    # tie between lengths 3 and 5 picks the shorter: no brevity penalty
    assert bleu({0: ["a b c", "a b c d e"]}, {0: "a b c d"})[3] == pytest.approx(1.0, rel=1e-9)
    # corpus BLEU pools counts: image 0 perfect (4 words), image 1 shares nothing (2 words)
    refs = {0: ["w x y z"], 1: ["p q"]}
    b1, b2, _, _ = bleu(refs, {0: "w x y z", 1: "r s"})
    assert b1 == pytest.approx(4 / 6, rel=1e-9)
    assert b2 == pytest.approx(math.sqrt(4 / 6 * 3 / 4), rel=1e-9)
    with pytest.raises(DataError, match="only in the references"):
        bleu({0: ["a"], 1: ["b"]}, {0: "a"})


# ----------------------------------------------------------------------------- CIDEr-D


def _cider_direct(refs, cands, n=4, sigma=6.0):
    """Independent CIDEr-D, written from the definition with plain dicts."""

    def grams(s):
        w = s.split()
        return Counter(tuple(w[i : i + k]) for k in range(1, n + 1) for i in range(len(w) - k + 1))

    ids = list(cands)
    df = Counter()
    for i in ids:
        seen = set()
        for r in refs[i]:
            seen |= set(grams(r))
        df.update(seen)
    log_n = math.log(len(ids))

    def vec(s):
        g = grams(s)
        v = [{} for _ in range(n)]
        for gram, tf in g.items():
            v[len(gram) - 1][gram] = tf * (log_n - math.log(max(1.0, df[gram])))
        norms = [math.sqrt(sum(x * x for x in d.values())) for d in v]
        return v, norms, max(len(s.split()) - 1, 0)

    total = 0.0
    for i in ids:
        vc, nc, lc = vec(cands[i])
        acc = 0.0
        for r in refs[i]:
            vr, nr, lr = vec(r)
            per = []
            for k in range(n):
                dot = sum(min(x, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, x in vc[k].items())
                s = dot / (nc[k] * nr[k]) if nc[k] and nr[k] else 0.0
                per.append(s * math.exp(-((lc - lr) ** 2) / (2 * sigma**2)))
            acc += sum(per) / n
        total += acc / len(refs[i]) * 10
    return total / len(ids)


def test_cider_candidate_equal_to_reference_by_hand():
    # two images, one 2-word reference each, candidate == reference: unigram and bigram
    # cosine similarities are 1, trigram/4-gram vectors are empty -> mean 0.5, x10 = 5
    refs = {"a": ["a b"], "b": ["c d"]}
    assert cider_d(refs, {"a": "a b", "b": "c d"}) == pytest.approx(5.0)
    # with 4-word captions all four n-gram orders match -> 10
    assert cider_d({1: ["a b c d"], 2: ["e f g h"]}, {1: "a b c d", 2: "e f g h"}) == pytest.approx(10.0)


def test_cider_zero_cases():
    refs = {1: ["a dog runs"], 2: ["a cat sleeps"]}
    assert cider_d(refs, {1: "blue sky here", 2: "green grass there"}) == 0.0
    assert cider_d(refs, {1: "", 2: ""}) == 0.0
    # a one-image corpus has idf log(1) - log(1) = 0 everywhere
    assert cider_d({1: ["a dog"]}, {1: "a dog"}) == 0.0


def test_cider_matches_direct_implementation():
    rng = random.Random(7)
    words = "a man dog cat on the in red sitting running table".split()
    for _ in range(30):
        n_img = rng.randint(2, 6)
        refs = {
            i: [
                " ".join(rng.choice(words) for _ in range(rng.randint(1, 9)))
                for _ in range(rng.randint(1, 4))
            ]
            for i in range(n_img)
        }
        cands = {i: " ".join(rng.choice(words) for _ in range(rng.randint(0, 9))) for i in range(n_img)}
        mean, per_item = cider_d(refs, cands, return_per_item=True)
        assert mean == pytest.approx(_cider_direct(refs, cands), rel=1e-9, abs=1e-12)
        assert mean == pytest.approx(sum(per_item.values()) / n_img)


def test_caption_scores_tokenise_first():
    refs = {1: ["A dog runs.", "The dog is running!"], 2: ["A cat, sleeping."]}
    raw = caption_scores(refs, {1: "A DOG RUNS", 2: "a cat sleeping"})
    tok = caption_scores(
        {1: ["a dog runs", "the dog is running"], 2: ["a cat sleeping"]},
        {1: "a dog runs", 2: "a cat sleeping"},
        tokenize=False,
    )
    assert raw == pytest.approx(tok)
    assert set(raw) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr"}
    assert raw["BLEU-1"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- task table


def _ex(uid, task, targets, **kw):
    return VLExample(uid=uid, task=task, image_ids=["img"], text="q", targets=targets, **kw)


def test_task_metrics_table():
    assert set(TASK_METRICS) == {"vqa", "gqa", "nlvr", "caption", "tvqa", "how2qa", "tvc", "yc2c"}
    vqa = {
        "1": _ex("1", "vqa", ["2"] * 2 + ["3"] * 8, extra={"raw_answers": True}),
        "2": _ex(
            "2", "vqa", ["yes", "no"], target_scores={"yes": 0.9, "no": 0.3}, extra={"raw_answers": False}
        ),
    }
    assert TASK_METRICS["vqa"]({"1": "Two", "2": "no"}, vqa) == {"accuracy": pytest.approx((60 + 30) / 2)}
    nlvr = {"a": _ex("a", "nlvr", ["true"], label=1), "b": _ex("b", "nlvr", ["false"], label=0)}
    assert TASK_METRICS["nlvr"]({"a": "True", "b": "true"}, nlvr) == {"accuracy": 50.0}
    tvqa = {"q": _ex("q", "tvqa", ["B."], choices=["A.", "B."], label=1)}
    assert TASK_METRICS["tvqa"]({"q": "b"}, tvqa) == {"accuracy": 100.0}
    caps = {"x": _ex("x", "caption", ["a b"]), "y": _ex("y", "caption", ["c d"])}
    scores = TASK_METRICS["caption"]({"x": "a b", "y": "c d"}, caps)
    assert scores["CIDEr"] == pytest.approx(500.0)  # percent scale
    assert scores["BLEU-1"] == pytest.approx(100.0)
    assert evaluate_task("tvc", {"x": "a b", "y": "c d"}, caps) == scores


def test_task_metrics_errors():
    caps = {"x": _ex("x", "caption", ["a b"]), "y": _ex("y", "caption", ["c d"])}
    with pytest.raises(DataError, match=r"1 example\(s\) have no prediction, e.g. uid 'y'"):
        TASK_METRICS["caption"]({"x": "a b"}, caps)
    with pytest.raises(DataError, match="have no targets"):
        TASK_METRICS["gqa"]({"t": "x"}, {"t": _ex("t", "gqa", [])})
    with pytest.raises(DataError, match='did you mean "gqa"'):
        evaluate_task("gqaa", {}, {})
    with pytest.raises(DataError, match="no examples"):
        TASK_METRICS["vqa"]({}, {})
