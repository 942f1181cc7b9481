"""VQAv2 reader: the VL-T5 preprocessing layout (karpathy_{train,val,test}.json)
and the official layout (v2_OpenEnded_mscoco_<subtype>_questions.json plus
v2_mscoco_<subtype>_annotations.json).

VL-T5 layout: a JSON list of
    {"img_id": "COCO_train2014_000000458752", "sent": "What is ...?",
     "question_id": 458752000, "label": {"net": 1.0}, "answer_type": "other",
     "question_type": "what is this", "answers": [{"answer": "net", ...}] (optional),
     "is_topk_optimal": true (optional)}
Official layout: {"data_subtype": "val2014", "questions": [{"image_id", "question",
"question_id"}]} and {"annotations": [{"question_id", "image_id", "answers": [{"answer",
"answer_confidence", "answer_id"}] x10, "multiple_choice_answer", "answer_type",
"question_type"}]}. Image ids become "COCO_<subtype>_<12-digit id>", the key VL-T5
feature files use.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from adapterkit.errors import DataError
from adapterkit.vl.datasets.base import (
    VLExample,
    get_field,
    load_json,
    read_label_scores,
    require_list,
    resolve_split_file,
)
from adapterkit.vl.metrics.vqa import soft_scores

__all__ = ["read_vqa", "coco_image_key", "join_official_answers"]

_CANDIDATES = (
    "{split}.json",
    "karpathy_{split}.json",
    "v2_OpenEnded_mscoco_{split}_questions.json",
    "OpenEnded_mscoco_{split}_questions.json",
)
_QUESTIONS_RE = re.compile(r"^(?P<pre>(?:v2_)?)OpenEnded_mscoco_(?P<sub>.+)_questions\.json$")
_ANNOTATIONS_RE = re.compile(r"^(?P<pre>(?:v2_)?)mscoco_(?P<sub>.+)_annotations\.json$")
_SUBTYPE_RE = re.compile(r"(train2014|val2014|test-dev2015|test2015)")


def coco_image_key(subtype: str, image_id: int | str) -> str:
    """Feature-store key of a COCO image, e.g. ("val2014", 42) -> "COCO_val2014_000000000042".

    test-dev2015 questions use test2015 images.
    """
    if subtype == "test-dev2015":
        subtype = "test2015"
    try:
        number = int(image_id)
    except (TypeError, ValueError):
        raise DataError(f"COCO image id must be an integer, got {image_id!r}") from None
    return f"COCO_{subtype}_{number:012d}"


def read_vqa(
    path: str | os.PathLike,
    split: str | None = None,
    *,
    annotations: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
) -> list[VLExample]:
    """Read VQAv2 examples from a file, or from a directory plus a split name
    ("karpathy_train" / "train" for the VL-T5 files, "val2014" for the official ones).

    For the official layout the annotation file is found next to the questions
    file by its standard name unless `annotations` is given; test questions
    (no annotations) give examples with empty targets.

    VL-T5's Karpathy files carry only soft labels ("label"), not the 10 human
    answers the official accuracy needs. `annotations` (official
    v2_mscoco_<subtype>_annotations.json files, or folders holding them) joins
    those answers in by question id, so the official 10-answer accuracy is
    used; without it, the v2_mscoco_*_annotations.json files in the Karpathy
    file's own folder are joined when there are any. The soft labels stay the
    training targets, as in the reference. Records that no annotation covers
    keep soft labels only, and scoring them says so (`vqa_example_scores`).
    """
    file = resolve_split_file(path, split, _CANDIDATES, "VQA")
    data = load_json(file)
    if isinstance(data, list):
        examples = _read_vlt5(file, data)
        if any(not ex.extra["raw_answers"] for ex in examples):
            files = _annotation_files(file, annotations)
            if files:
                join_official_answers(examples, files)
        return examples
    if isinstance(data, dict) and "questions" in data:
        return _read_official(file, data, Path(annotations) if annotations is not None else None)
    if isinstance(data, dict) and "annotations" in data:
        questions = _partner(file, _ANNOTATIONS_RE, "OpenEnded_mscoco_{sub}_questions.json")
        if questions is None or not questions.is_file():
            raise DataError(
                f"{file} is a VQA annotation file; pass the questions file "
                f"({questions.name if questions else 'v2_OpenEnded_mscoco_<subtype>_questions.json'}) instead"
            )
        return _read_official(questions, load_json(questions), file)
    raise DataError(
        f"{file}: not a VQA file (expected a VL-T5 list of records or an official "
        f'dict with "questions" / "annotations")'
    )


def _annotation_files(
    karpathy_file: Path, annotations: str | os.PathLike | Sequence[str | os.PathLike] | None
) -> list[Path]:
    if annotations is None:  # the official files next to the Karpathy file, if any
        return sorted(karpathy_file.parent.glob("v2_mscoco_*_annotations.json"))
    items = [annotations] if isinstance(annotations, (str, os.PathLike)) else list(annotations)
    files: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(p.glob("v2_mscoco_*_annotations.json"))
            if not found:
                raise DataError(f"VQA annotations: no v2_mscoco_*_annotations.json in {p}")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"VQA annotations not found: {p}")
    return files


def join_official_answers(examples: list[VLExample], annotation_files: Sequence[str | os.PathLike]) -> int:
    """Give VQA examples without raw answers the 10 human answers of the official
    annotation files (matched by question id; the image must agree). Returns how
    many examples were joined; the others are left as they were."""
    want = {ex.uid: ex for ex in examples if not ex.extra.get("raw_answers", False)}
    joined = 0
    for afile in annotation_files:
        afile = Path(afile)
        adata = load_json(afile)
        if not isinstance(adata, dict) or "annotations" not in adata:
            raise DataError(f'{afile}: not a VQA annotation file (no "annotations" list)')
        for i, ann in enumerate(require_list(adata["annotations"], str(afile), "annotations")):
            where = f"{afile}: annotation {i}"
            ex = want.pop(str(get_field(ann, "question_id", where)), None)
            if ex is None:
                continue
            image_id = get_field(ann, "image_id", where)
            m = re.search(r"(\d+)$", ex.image_ids[0])
            if m is None or int(m.group(1)) != int(image_id):
                raise DataError(
                    f"{where}: question {ex.uid} is about image {image_id}, but the VQA record says "
                    f"{ex.image_ids[0]!r}; are these the VQAv2 annotations of the same release?"
                )
            # interned: 10 answers for each of ~600k training questions share a small vocabulary
            ex.targets = [sys.intern(a) for a in _raw_answers(get_field(ann, "answers", where), where)]
            ex.extra["raw_answers"] = True
            ex.extra.pop("official_answers_missing", None)
            ex.extra["answers_from"] = afile.name
            for key in ("answer_type", "question_type"):
                if key in ann:
                    ex.extra.setdefault(key, ann[key])
            joined += 1
        if not want:
            break
    return joined


def _partner(file: Path, pattern: re.Pattern, template: str) -> Path | None:
    m = pattern.match(file.name)
    if m is None:
        return None
    return file.with_name(m.group("pre") + template.format(sub=m.group("sub")))


def _raw_answers(value: Any, where: str) -> list[str]:
    answers = require_list(value, where, "answers")
    out = []
    for j, a in enumerate(answers):
        text = a.get("answer") if isinstance(a, dict) else a
        if not isinstance(text, str):
            raise DataError(f'{where}: answers[{j}] must be a string or {{"answer": str}}, got {a!r}')
        out.append(text)
    return out


def _read_vlt5(file: Path, records: list) -> list[VLExample]:
    out = []
    for i, rec in enumerate(records):
        where = f"{file}: record {i}"
        img_id = get_field(rec, "img_id", where)
        sent = get_field(rec, ("sent", "question"), where)
        qid = get_field(rec, "question_id", where)
        if not isinstance(sent, str):
            raise DataError(f'{where}: "sent" must be a string, got {sent!r}')
        scores = read_label_scores(rec, where)
        extra: dict[str, Any] = {}
        if "answers" in rec:
            targets = _raw_answers(rec["answers"], where)
            extra["raw_answers"] = True
        else:
            targets = sorted(scores, key=lambda a: -scores[a]) if scores else []
            extra["raw_answers"] = False
            extra["official_answers_missing"] = True  # VQAv2 has 10 answers per question: join them
        for key in ("answer_type", "question_type", "is_topk_optimal"):
            if key in rec:
                extra[key] = rec[key]
        out.append(
            VLExample(
                uid=str(qid),
                task="vqa",
                image_ids=[str(img_id)],
                text=sent,
                targets=targets,
                target_scores=scores,
                extra=extra,
            )
        )
    return out


def _subtype(file: Path, data: dict) -> str:
    sub = data.get("data_subtype")
    if isinstance(sub, str) and sub:
        return sub
    m = _SUBTYPE_RE.search(file.name)
    if m is None:
        raise DataError(f'{file}: no "data_subtype" and none in the file name; cannot build COCO image ids')
    return m.group(1)


def _read_official(qfile: Path, qdata: Any, afile: Path | None) -> list[VLExample]:
    if not isinstance(qdata, dict) or "questions" not in qdata:
        raise DataError(f'{qfile}: not a VQA questions file (no "questions" list)')
    questions = require_list(qdata["questions"], str(qfile), "questions")
    subtype = _subtype(qfile, qdata)
    if afile is None:
        afile = _partner(qfile, _QUESTIONS_RE, "mscoco_{sub}_annotations.json")
        if afile is not None and not afile.is_file():
            if "test" not in subtype:
                raise DataError(f"VQA annotations not found: {afile} (needed for the {subtype} questions)")
            afile = None
    annotations: dict[Any, dict] = {}
    if afile is not None:
        adata = load_json(afile)
        if not isinstance(adata, dict) or "annotations" not in adata:
            raise DataError(f'{afile}: not a VQA annotation file (no "annotations" list)')
        for i, ann in enumerate(require_list(adata["annotations"], str(afile), "annotations")):
            qid = get_field(ann, "question_id", f"{afile}: annotation {i}")
            annotations[qid] = ann
    out = []
    for i, q in enumerate(questions):
        where = f"{qfile}: question {i}"
        qid = get_field(q, "question_id", where)
        image_id = get_field(q, "image_id", where)
        text = get_field(q, "question", where)
        if not isinstance(text, str):
            raise DataError(f'{where}: "question" must be a string, got {text!r}')
        extra: dict[str, Any] = {"raw_answers": True}
        targets: list[str] = []
        scores = None
        if afile is not None:
            ann = annotations.get(qid)
            if ann is None:
                raise DataError(f"{afile}: no annotation for question_id {qid} (from {qfile})")
            awhere = f"{afile}: annotation of question {qid}"
            targets = _raw_answers(get_field(ann, "answers", awhere), awhere)
            scores = soft_scores(targets)
            for key in ("answer_type", "question_type", "multiple_choice_answer"):
                if key in ann:
                    extra[key] = ann[key]
        try:
            image_key = coco_image_key(subtype, image_id)
        except DataError as exc:
            raise DataError(f"{where}: {exc}") from None
        out.append(
            VLExample(
                uid=str(qid),
                task="vqa",
                image_ids=[image_key],
                text=text,
                targets=targets,
                target_scores=scores,
                extra=extra,
            )
        )
    return out
