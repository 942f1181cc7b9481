"""Tests of the V&L dataset readers: tiny fixture files in each official / VL-T5
layout written to tmp_path, parsed fields, soft scores and clear DataErrors."""

from __future__ import annotations

import dataclasses
import json

import pytest

from adapterkit.errors import DataError
from adapterkit.vl.datasets import (
    READERS,
    VLExample,
    read_coco_caption,
    read_examples_jsonl,
    read_gqa,
    read_how2qa,
    read_nlvr2,
    read_source,
    read_task,
    read_tvc,
    read_tvqa,
    read_vqa,
    read_yc2c,
    write_examples_jsonl,
)


def _dump(path, obj):
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- base


def test_example_jsonl_roundtrip_is_atomic(tmp_path):
    examples = [
        VLExample("1", "vqa", ["COCO_val2014_000000000001"], "what?", ["a", "b"], {"a": 0.3}),
        VLExample("2", "tvqa", ["vid"], "why?", ["x"], choices=["x", "y"], label=0, extra={"ts": [1.0, 2.0]}),
    ]
    out = tmp_path / "sub" / "ex.examples.jsonl"
    write_examples_jsonl(out, examples)
    assert read_examples_jsonl(out) == examples
    assert read_task("anything", out) == examples
    assert sorted(p.name for p in out.parent.iterdir()) == ["ex.examples.jsonl"]  # no temp file left


def test_example_from_json_errors_name_the_source(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"uid": "1", "task": "vqa", "image_ids": "img", "text": "", "targets": []}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1.*image_ids"):
        read_examples_jsonl(bad)
    with pytest.raises(DataError, match='missing key "targets"'):
        VLExample.from_json({"uid": "1", "task": "t", "image_ids": [], "text": ""})
    with pytest.raises(DataError, match="not found"):
        read_examples_jsonl(tmp_path / "nope.jsonl")


def test_read_task_unknown_task_suggests():
    with pytest.raises(DataError, match=r'unknown V&L task .*did you mean "vqa"'):
        read_task("vqaa", "x.json")
    assert set(READERS) == {"vqa", "gqa", "nlvr", "caption", "tvqa", "how2qa", "tvc", "yc2c"}


# ----------------------------------------------------------------------------- VQA


def _vlt5_vqa_records():
    return [
        {
            "answer_type": "other",
            "img_id": "COCO_val2014_000000000042",
            "label": {"net": 0.9, "mesh": 0.3},
            "question_id": 42000,
            "question_type": "what is this",
            "sent": "What is this photo taken looking through?",
            "answers": [{"answer": "net", "answer_confidence": "yes", "answer_id": i} for i in range(1, 4)]
            + [{"answer": "mesh", "answer_confidence": "maybe", "answer_id": 4}],
        },
        {
            "img_id": "COCO_val2014_000000000043",
            "label": {"yes": 1.0, "no": 0.3},
            "question_id": 43000,
            "sent": "Is it sunny?",
        },
    ]


def test_vqa_vlt5_layout(tmp_path):
    _dump(tmp_path / "karpathy_val.json", _vlt5_vqa_records())
    examples = read_vqa(tmp_path, "val")
    assert read_task("vqa", tmp_path, "karpathy_val") == examples
    first, second = examples
    assert first.uid == "42000" and first.task == "vqa"
    assert first.image_ids == ["COCO_val2014_000000000042"]
    assert first.text == "What is this photo taken looking through?"
    assert first.targets == ["net", "net", "net", "mesh"]
    assert first.target_scores == {"net": 0.9, "mesh": 0.3}
    assert first.extra["raw_answers"] is True and first.extra["answer_type"] == "other"
    # no raw answers: targets are the label's answers, best first
    assert second.targets == ["yes", "no"] and second.extra["raw_answers"] is False


def test_vqa_vlt5_bad_record_names_file_and_record(tmp_path):
    records = _vlt5_vqa_records()
    del records[1]["sent"]
    f = _dump(tmp_path / "karpathy_train.json", records)
    with pytest.raises(DataError, match=r'karpathy_train\.json: record 1: missing key "sent"'):
        read_vqa(f)
    records = _vlt5_vqa_records()
    records[0]["label"] = ["net"]
    _dump(f, records)
    with pytest.raises(DataError, match=r'record 0: "label" must be an object'):
        read_vqa(f)
    records[0]["label"] = {"net": "high"}
    _dump(f, records)
    with pytest.raises(DataError, match=r'record 0: "label" scores must be numbers'):
        read_vqa(f)


def test_gqa_vlt5_bad_label_names_file_and_record(tmp_path):
    rec = {"img_id": "n1", "question_id": "1", "sent": "Is it?"}
    for label, msg in ((["no"], "must be an object"), ({"no": None}, "scores must be numbers")):
        f = _dump(tmp_path / "testdev.json", [{**rec, "label": {"yes": 1.0}}, {**rec, "label": label}])
        with pytest.raises(DataError, match=rf'testdev\.json: record 1: "label" {msg}'):
            read_gqa(f)


def _official_vqa(tmp_path, subtype="val2014", answers=None):
    questions = {
        "data_subtype": subtype,
        "questions": [
            {"image_id": 42, "question": "How many dogs?", "question_id": 420},
            {"image_id": 7, "question": "What color?", "question_id": 70},
        ],
    }
    q = _dump(tmp_path / f"v2_OpenEnded_mscoco_{subtype}_questions.json", questions)
    if answers is not None:
        anns = {
            "annotations": [
                {
                    "question_id": qid,
                    "image_id": img,
                    "answer_type": "number",
                    "question_type": "how many",
                    "multiple_choice_answer": ans[0],
                    "answers": [
                        {"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                        for i, a in enumerate(ans)
                    ],
                }
                for (qid, img), ans in zip([(420, 42), (70, 7)], answers)
            ]
        }
        _dump(tmp_path / f"v2_mscoco_{subtype}_annotations.json", anns)
    return q


def test_vqa_official_layout_soft_scores(tmp_path):
    dogs = ["2"] * 2 + ["3"] * 7 + ["three"]
    color = ["red"] * 10
    q = _official_vqa(tmp_path, answers=[dogs, color])
    examples = read_vqa(q)
    assert read_vqa(tmp_path, "val2014") == examples
    ex = examples[0]
    assert ex.uid == "420" and ex.image_ids == ["COCO_val2014_000000000042"]
    assert ex.text == "How many dogs?"
    assert ex.targets == dogs  # raw answers kept
    # leave-one-out soft scores: "2" matched by 2 of 10 -> 0.6, "three"->"3" by 8 -> 1.0
    assert ex.target_scores == pytest.approx({"2": 0.6, "3": 1.0})
    assert ex.extra["answer_type"] == "number"
    assert examples[1].target_scores == {"red": 1.0}
    # the annotation file alone is accepted too (questions found by name)
    assert read_vqa(tmp_path / "v2_mscoco_val2014_annotations.json") == examples


def test_vqa_official_test_split_and_missing_annotations(tmp_path):
    q = _official_vqa(tmp_path, subtype="test-dev2015")
    examples = read_vqa(q)
    assert examples[0].targets == [] and examples[0].target_scores is None
    assert examples[0].image_ids == ["COCO_test2015_000000000042"]
    q = _official_vqa(tmp_path, subtype="val2014")
    with pytest.raises(DataError, match=r"annotations not found: .*v2_mscoco_val2014_annotations\.json"):
        read_vqa(q)


def test_vqa_official_annotation_gap_and_missing_files(tmp_path):
    _official_vqa(tmp_path, answers=[["1"] * 10, ["2"] * 10])
    anns = json.loads((tmp_path / "v2_mscoco_val2014_annotations.json").read_text())
    anns["annotations"] = anns["annotations"][:1]
    _dump(tmp_path / "v2_mscoco_val2014_annotations.json", anns)
    with pytest.raises(DataError, match="no annotation for question_id 70"):
        read_vqa(tmp_path, "val2014")
    with pytest.raises(DataError, match=r"no file for split 'nosuch'.*karpathy_nosuch\.json"):
        read_vqa(tmp_path, "nosuch")
    with pytest.raises(DataError, match=r"VQA data not found: .*missing\.json"):
        read_vqa(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("[{")
    with pytest.raises(DataError, match=r"broken\.json: invalid JSON"):
        read_vqa(broken)


def test_vqa_karpathy_joins_the_official_answers(tmp_path):
    """VL-T5's Karpathy records carry soft labels only; the official annotations give the 10 answers."""
    import warnings

    from adapterkit.vl.metrics import vqa as vqa_mod
    from adapterkit.vl.metrics import vqa_metric

    records = [
        {"img_id": "COCO_val2014_000000000042", "label": {"2": 0.6, "3": 1.0}, "question_id": 420,
         "sent": "How many dogs?"},
        {"img_id": "COCO_val2014_000000000007", "label": {"red": 1.0}, "question_id": 70, "sent": "What color?"},
    ]  # fmt: skip
    kdir = tmp_path / "vqa"
    kdir.mkdir()
    _dump(kdir / "karpathy_val.json", records)
    soft = read_vqa(kdir, "karpathy_val")
    assert [e.extra["raw_answers"] for e in soft] == [False, False]
    dogs = ["2"] * 2 + ["3"] * 7 + ["three"]
    adir = tmp_path / "official"
    adir.mkdir()
    _official_vqa(adir, answers=[dogs, ["red"] * 10])
    joined = read_vqa(kdir, "karpathy_val", annotations=adir)
    assert joined[0].targets == dogs and joined[0].extra["raw_answers"] is True
    assert joined[0].target_scores == {"2": 0.6, "3": 1.0}  # the training targets stay VL-T5's labels
    assert joined[0].extra["answers_from"] == "v2_mscoco_val2014_annotations.json"
    # the same through a run config's data source, and found next to the Karpathy file without the option
    assert read_source("vqa", {"path": str(kdir), "splits": {"val": "karpathy_val"},
                               "annotations": [str(adir / "v2_mscoco_val2014_annotations.json")]}, "val") == joined
    (adir / "v2_mscoco_val2014_annotations.json").rename(kdir / "v2_mscoco_val2014_annotations.json")
    assert read_vqa(kdir, "karpathy_val") == joined
    # official 10-answer accuracy vs the soft-label fallback, which warns once
    preds = {"420": "2", "70": "red"}
    official = vqa_metric(preds, {e.uid: e for e in joined})
    assert official["accuracy"] == pytest.approx((0.6 + 1.0) / 2 * 100)  # "2": 2 of 10 -> leave-one-out 0.6
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vqa_mod._warned_soft = False
        assert vqa_metric({"420": "three", "70": "blue"}, {e.uid: e for e in soft})["accuracy"] == 50.0
        vqa_metric(preds, {e.uid: e for e in soft})
    msgs = [str(w.message) for w in caught if issubclass(w.category, vqa_mod.SoftLabelScoreWarning)]
    assert len(msgs) == 1 and "2 of 2 questions have soft labels" in msgs[0] and "annotations" in msgs[0]
    # single-answer data soft-scored by design (FashionVL, custom sets): no advice to fetch VQAv2 files
    by_design = {e.uid: dataclasses.replace(e, extra={"raw_answers": False}) for e in soft}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vqa_mod._warned_soft = False
        vqa_metric(preds, by_design)
    assert not [w for w in caught if issubclass(w.category, vqa_mod.SoftLabelScoreWarning)]
    # annotations of another release: the image disagrees -> one clear error
    anns = json.loads((kdir / "v2_mscoco_val2014_annotations.json").read_text())
    anns["annotations"][0]["image_id"] = 999
    _dump(kdir / "v2_mscoco_val2014_annotations.json", anns)
    with pytest.raises(DataError, match="question 420 is about image 999"):
        read_vqa(kdir, "karpathy_val")
    with pytest.raises(DataError, match="VQA annotations not found"):
        read_vqa(kdir, "karpathy_val", annotations=tmp_path / "nope.json")


def test_read_task_joins_comma_separated_splits(tmp_path):
    _dump(tmp_path / "train.json", [{"img_id": "1", "sent": "a?", "question_id": "q1", "label": {"yes": 1.0}}])
    _dump(tmp_path / "valid.json", [{"img_id": "2", "sent": "b?", "question_id": "q2", "label": {"no": 1.0}}])
    exs = read_source("gqa", {"format": "gqa", "path": str(tmp_path), "splits": {"train": "train,valid"}}, "train")
    assert [e.uid for e in exs] == ["q1", "q2"]
    with pytest.raises(DataError, match='needs a "path"'):
        read_source("gqa", {"splits": {}}, "train")


# ----------------------------------------------------------------------------- GQA


def test_gqa_both_layouts(tmp_path):
    vlt5 = _dump(
        tmp_path / "testdev.json",
        [{"img_id": "n161313", "label": {"no": 1.0}, "question_id": "20968379", "sent": "Is the sky dark?"}],
    )
    (ex,) = read_gqa(vlt5)
    assert (ex.uid, ex.task, ex.image_ids, ex.text, ex.targets) == (
        "20968379", "gqa", ["n161313"], "Is the sky dark?", ["no"]
    )  # fmt: skip
    official = _dump(
        tmp_path / "val_balanced_questions.json",
        {
            "05515938": {"imageId": "2354786", "question": "Which side is the car on?", "answer": "left",
                         "fullAnswer": "The car is on the left.", "isBalanced": True},
            "05515939": {"imageId": "2354786", "question": "Is it red?"},
        },
    )  # fmt: skip
    examples = read_task("gqa", tmp_path, "val")
    assert read_gqa(official) == examples
    assert examples[0].uid == "05515938" and examples[0].targets == ["left"]
    assert examples[0].extra["full_answer"] == "The car is on the left."
    assert examples[1].targets == []  # unanswered (test) question
    _dump(official, {"1": {"question": "no image?", "answer": "x"}})
    with pytest.raises(DataError, match=r'val_balanced_questions\.json: question 1: missing key "imageId"'):
        read_gqa(official)


# ----------------------------------------------------------------------------- NLVR2


def test_nlvr2_vlt5_layout(tmp_path):
    f = _dump(
        tmp_path / "valid.json",
        [
            {"identifier": "dev-850-0-0", "img0": "dev-850-0-img0", "img1": "dev-850-0-img1",
             "label": 1, "sent": "There are two dogs.", "uid": "nlvr2_dev_0"},
            {"identifier": "dev-851-1-2", "img0": "dev-851-1-img0", "img1": "dev-851-1-img1",
             "label": 0, "sent": "No cats.", "uid": "nlvr2_dev_1"},
        ],
    )  # fmt: skip
    a, b = read_nlvr2(f)
    assert read_task("nlvr", tmp_path, "valid") == [a, b]
    assert a.uid == "dev-850-0-0" and a.image_ids == ["dev-850-0-img0", "dev-850-0-img1"]
    assert a.targets == ["true"] and a.label == 1 and a.text == "There are two dogs."
    assert b.targets == ["false"] and b.label == 0 and b.extra["uid"] == "nlvr2_dev_1"


def test_nlvr2_official_jsonl(tmp_path):
    f = _jsonl(
        tmp_path / "dev.json",
        [
            {"identifier": "dev-12-3-1", "sentence": "One image has a bird.", "label": "True",
             "left_url": "http://l", "right_url": "http://r", "synset": "bird", "query": "birds"},
            {"identifier": "dev-12-3-2", "sentence": "Both images are dark.", "label": "False"},
        ],
    )  # fmt: skip
    a, b = read_nlvr2(tmp_path, "dev")
    assert a.image_ids == ["dev-12-3-img0", "dev-12-3-img1"] and a.label == 1 and a.targets == ["true"]
    assert b.label == 0 and b.targets == ["false"] and b.text == "Both images are dark."
    _jsonl(f, [{"identifier": "dev-1-1-0", "sentence": "x", "label": "maybe"}])
    with pytest.raises(DataError, match=r'dev\.json: record 0: "label" must be True/False'):
        read_nlvr2(f)
    _jsonl(f, [{"identifier": "weird", "sentence": "x", "label": "True"}])
    with pytest.raises(DataError, match="identifier must look like"):
        read_nlvr2(f)


# ----------------------------------------------------------------------------- COCO captions


def test_coco_karpathy_splits(tmp_path):
    def image(i, split, caps):
        return {"filepath": "val2014", "filename": f"COCO_val2014_{i:012d}.jpg", "split": split, "cocoid": i,
                "imgid": i, "sentences": [{"raw": c + " ", "tokens": c.lower().split()} for c in caps]}  # fmt: skip

    _dump(
        tmp_path / "dataset_coco.json",
        {"images": [image(1, "train", ["A dog."]), image(2, "restval", ["A cat.", "Cat!"]),
                    image(3, "val", ["A bird."]), image(4, "test", ["A car.", "Red car."])],
         "dataset": "coco"},
    )  # fmt: skip
    train = read_coco_caption(tmp_path, "train")
    assert [e.uid for e in train] == ["COCO_val2014_000000000001", "COCO_val2014_000000000002"]
    assert train[1].targets == ["A cat.", "Cat!"] and train[1].text == "" and train[1].task == "caption"
    assert train[1].image_ids == ["COCO_val2014_000000000002"] and train[1].extra["cocoid"] == 2
    test = read_task("caption", tmp_path / "dataset_coco.json", "test")
    assert [e.uid for e in test] == ["COCO_val2014_000000000004"] and test[0].targets == [
        "A car.",
        "Red car.",
    ]
    assert len(read_coco_caption(tmp_path / "dataset_coco.json")) == 4
    with pytest.raises(DataError, match="split must be one of"):
        read_coco_caption(tmp_path, "dev")
    _dump(tmp_path / "dataset_coco.json", {"images": [{"filename": "x.jpg", "split": "val"}]})
    with pytest.raises(DataError, match=r'image 0: missing key "sentences"'):
        read_coco_caption(tmp_path, "val")


# ----------------------------------------------------------------------------- VALUE


def _tvqa_record(qid, n=5, **over):
    rec = {f"a{i}": f"Answer {i}." for i in range(n)}
    rec.update({"answer_idx": 2, "q": "Why is Howard upset?", "qid": qid, "show_name": "The Big Bang Theory",
                "ts": "20.16-25.12", "vid_name": "s03e02_seg02_clip_10"})  # fmt: skip
    rec.update(over)
    return rec


def _subs(path, videos):
    return _jsonl(path, [{"vid_name": v, "sub": [{"start": 0.5 * i, "end": 0.5 * i + 0.4, "text": f" {t} "}
                                                for i, t in enumerate(texts)]} for v, texts in videos.items()])


def test_tvqa_and_how2qa(tmp_path):
    ann = tmp_path / "ann"
    (ann / "tvqa").mkdir(parents=True)
    # the reference's layout: ann/tv_subtitles.jsonl next to ann/tvqa/tvqa_val.jsonl
    _subs(ann / "tv_subtitles.jsonl", {"s03e02_seg02_clip_10": ["Howard: Hi.", "Sheldon: Bazinga!"]})
    _jsonl(ann / "tvqa" / "tvqa_val.jsonl", [_tvqa_record(1), _tvqa_record(2, ts="NaN-NaN")])
    a, b = read_tvqa(ann / "tvqa", "val")
    assert a.uid == "1" and a.task == "tvqa" and a.image_ids == ["s03e02_seg02_clip_10"]
    # subtitles, question, timestamps and the candidates, in the reference's order and format
    assert a.text == (
        "[Subs] Howard: Hi. Sheldon: Bazinga! [Q] Why is Howard upset? [TS] (20.16-25.12) "
        "[Choices] a0: Answer 0. a1: Answer 1. a2: Answer 2. a3: Answer 3. a4: Answer 4."
    )
    # the target is the candidate's label, as the reference generates it
    assert a.choices == ["a0", "a1", "a2", "a3", "a4"] and a.label == 2 and a.targets == ["a2"]
    assert a.extra["answers"] == [f"Answer {i}." for i in range(5)] and a.extra["ts"] == [20.16, 25.12]
    assert a.extra["question"] == "Why is Howard upset?"
    assert "ts" not in b.extra and "[TS] (NaN-NaN)" in b.text
    # no subtitle file: one error saying what to do; subtitles=False reads without them
    (ann / "tv_subtitles.jsonl").unlink()
    with pytest.raises(DataError, match=r"tv_subtitles\.jsonl is neither next to .*subtitles: false"):
        read_tvqa(ann / "tvqa", "val")
    (ex, _) = read_task("tvqa", ann / "tvqa", "val", subtitles=False)
    assert ex.text.startswith("[Q] Why is Howard upset? [TS]")
    with pytest.raises(DataError, match=r"takes no option 'subtitle'.*subtitles"):
        read_task("tvqa", ann / "tvqa", "val", subtitle=False)
    # How2QA: 4 choices, key variants, an explicit subtitle file; answers' trailing periods as the reference
    rec = {"vid_name": "25848", "ts": "36.58-58.52", "q_id": 30351, "question": " What website? ",
           "a0": "A", "a1": "B.", "a2": "C. ", "a3": "D..", "answer_idx": 3}  # fmt: skip
    f = _jsonl(tmp_path / "how2qa_val_release.jsonl", [rec])
    subs = _subs(tmp_path / "my_subs.jsonl", {"25848": ["go to the site"]})
    (ex,) = read_task("how2qa", tmp_path, "val", subtitles=subs)
    assert ex.uid == "30351" and ex.label == 3 and ex.targets == ["a3"] and ex.choices == ["a0", "a1", "a2", "a3"]
    assert ex.text == "[Subs] go to the site [Q] What website? [TS] (36.58-58.52) [Choices] a0: A. a1: B. a2: C. a3: D."
    # test files without answers
    _jsonl(f, [{k: v for k, v in rec.items() if k != "answer_idx"}])
    (ex,) = read_how2qa(f, subtitles=subs)
    assert ex.label is None and ex.targets == []
    _subs(subs, {"other": ["x"]})
    with pytest.raises(DataError, match="video '25848' has no subtitles"):
        read_how2qa(f, subtitles=subs)


def test_value_qa_errors(tmp_path):
    _subs(tmp_path / "tv_subtitles.jsonl", {"s03e02_seg02_clip_10": ["hi"]})
    f = _jsonl(tmp_path / "tvqa_train.jsonl", [_tvqa_record(1, n=4)])
    with pytest.raises(DataError, match=r"tvqa_train\.jsonl: line 1: tvqa needs 5 choices"):
        read_tvqa(f)
    _jsonl(f, [_tvqa_record(1), _tvqa_record(2, answer_idx=7)])
    with pytest.raises(DataError, match=r"line 2: answer index 7 is out of range"):
        read_tvqa(f)
    _jsonl(f, [{k: v for k, v in _tvqa_record(1).items() if k != "vid_name"}])
    with pytest.raises(DataError, match=r'line 1: missing key "vid_name" / "video_id" / "vid"'):
        read_tvqa(f)
    _jsonl(f, [_tvqa_record(1, ts="soon")])
    with pytest.raises(DataError, match=r'"ts" must look like'):
        read_tvqa(f)
    f.write_text(json.dumps(_tvqa_record(1)) + "\n{not json\n")
    with pytest.raises(DataError, match=r"tvqa_train\.jsonl:2: invalid JSON"):
        read_tvqa(f)


def test_tvc_and_yc2c(tmp_path):
    rec = {"vid_name": "grey_s03e12_seg02_clip_17", "duration": 94.03, "ts": [35.73, 40.9], "clip_id": 86602,
           "descs": [{"desc": "Meredith walks in. ", "desc_id": 1, "type": "v"}, {"desc": "She sits.", "desc_id": 2}]}  # fmt: skip
    _jsonl(tmp_path / "tvc_val_release.jsonl", [rec])
    _subs(tmp_path / "tv_subtitles.jsonl", {"grey_s03e12_seg02_clip_17": ["Meredith: Hello.", "Derek: Hi."]})
    (ex,) = read_tvc(tmp_path, "val")
    assert ex.uid == "86602" and ex.task == "tvc" and ex.image_ids == ["grey_s03e12_seg02_clip_17"]
    # the reference's TVC input: subtitles, then the clip's span as Python prints the list
    assert ex.text == "[Subs] Meredith: Hello. Derek: Hi. [TS] ([35.73, 40.9])"
    assert ex.targets == ["Meredith walks in.", "She sits."]
    assert ex.extra == {"ts": [35.73, 40.9], "duration": 94.03}
    yc = {"vid_name": "yc_abc", "ts": [1.0, 5.5], "descs": [{"desc": "Add salt."}]}
    f = _jsonl(tmp_path / "yc2c_test_release.jsonl", [yc, {"vid_name": "yc_def", "ts": [0, 2]}])
    _subs(tmp_path / "yc2_subtitles.jsonl", {"yc_abc": ["now", "the salt"], "yc_def": []})
    a, b = read_task("yc2c", tmp_path, "test")
    assert a.task == "yc2c" and a.uid == "yc_abc_1-5.5" and a.targets == ["Add salt."]
    assert a.text == "[Subs] now the salt" and b.text == "[Subs] "  # YC2C: the subtitles alone
    assert b.targets == []
    _jsonl(f, [{"vid_name": "v", "descs": [{"text": "wrong key"}]}])
    with pytest.raises(DataError, match=r'yc2c_test_release\.jsonl: line 1: descs\[0\] needs a "desc"'):
        read_yc2c(f, subtitles=False)
