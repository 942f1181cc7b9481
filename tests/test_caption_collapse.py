"""The compare's caption-collapse flag: a captioner that writes its template whatever the picture
is flagged, one that names the items is not."""

import numpy as np

from adapterkit.vl import benchmark as bm
from adapterkit.vl.datasets.base import VLExample
from adapterkit.vl.datasets.fashionvl import CLASS_NAMES, caption_references


def _examples(n=200, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        labs = rng.integers(0, len(CLASS_NAMES), 4).tolist()
        out.append(VLExample(uid=f"c{i}", task="caption", image_ids=[f"i{i}"], text="",
                             targets=caption_references(labs), extra={"labels": labs}))
    return out


def test_a_constant_caption_is_collapsed_and_the_references_are_not():
    exs = _examples()
    const = {e.uid: exs[0].targets[0] for e in exs}
    right = {e.uid: e.targets[0] for e in exs}
    c, r = bm.caption_check(const, exs), bm.caption_check(right, exs)
    assert c["distinct"] == 1 and bm.caption_collapsed(c) is True
    assert r["item_recall"] == 100.0 and bm.caption_collapsed(r) is False
    assert "COLLAPSED" in bm.caption_line(c) and "COLLAPSED" not in bm.caption_line(r)
    # half the images get the template, half their own caption: item recall well above the template's
    half = {e.uid: (right if k % 2 else const)[e.uid] for k, e in enumerate(exs)}
    assert bm.caption_collapsed(bm.caption_check(half, exs)) is False


def test_the_flag_reads_the_interval_and_needs_item_labels():
    # the recorded FashionVL checks: hyperformer seed 0 (2 distinct captions) and full fine-tuning seed 0
    assert bm.caption_collapsed({"item_recall_interval": [25.9, 28.3], "most_common_item_recall": 26.8})
    assert not bm.caption_collapsed({"item_recall_interval": [39.9, 42.4], "most_common_item_recall": 34.4})
    assert bm.caption_collapsed({"distinct": 3}) is None and bm.caption_collapsed(None) is None
