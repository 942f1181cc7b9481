"""GQA reader: the VL-T5 layout and the official questions file.

VL-T5 layout (train.json / valid.json / testdev.json): a JSON list of
    {"img_id": "2354786", "sent": "Is the sky dark?", "question_id": "02930152",
     "label": {"yes": 1.0}}
Official layout (e.g. testdev_balanced_questions.json): a JSON object
    {"<qid>": {"imageId": "n161313", "question": "...", "answer": "no",
               "fullAnswer": "...", "isBalanced": true, ...}}
(the answer is absent from the challenge test questions).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from adapterkit.errors import DataError
from adapterkit.vl.datasets.base import VLExample, get_field, load_json, read_label_scores, resolve_split_file

__all__ = ["read_gqa"]

_CANDIDATES = (
    "{split}.json",
    "{split}_balanced_questions.json",
    "{split}_all_questions.json",
    "{split}_questions.json",
)


def read_gqa(path: str | os.PathLike, split: str | None = None) -> list[VLExample]:
    """Read GQA examples from a file, or a directory plus split ("train", "valid",
    "testdev", ...)."""
    file = resolve_split_file(path, split, _CANDIDATES, "GQA")
    data = load_json(file)
    if isinstance(data, list):
        return _read_vlt5(file, data)
    if isinstance(data, dict):
        return _read_official(file, data)
    raise DataError(f"{file}: not a GQA file (expected a VL-T5 list or an official qid -> question object)")


def _str(value: Any, where: str, name: str) -> str:
    if not isinstance(value, str):
        raise DataError(f'{where}: "{name}" must be a string, got {value!r}')
    return value


def _read_vlt5(file: Path, records: list) -> list[VLExample]:
    out = []
    for i, rec in enumerate(records):
        where = f"{file}: record {i}"
        img_id = get_field(rec, "img_id", where)
        sent = _str(get_field(rec, ("sent", "question"), where), where, "sent")
        qid = get_field(rec, "question_id", where)
        scores = read_label_scores(rec, where)
        targets = sorted(scores, key=lambda a: -scores[a]) if scores else []
        out.append(
            VLExample(
                uid=str(qid),
                task="gqa",
                image_ids=[str(img_id)],
                text=sent,
                targets=targets,
                target_scores=scores,
            )
        )
    return out


def _read_official(file: Path, data: dict) -> list[VLExample]:
    out = []
    for qid, rec in data.items():
        where = f"{file}: question {qid}"
        image_id = get_field(rec, "imageId", where)
        question = _str(get_field(rec, "question", where), where, "question")
        answer = get_field(rec, "answer", where, default=None)
        targets = [] if answer is None else [_str(answer, where, "answer")]
        extra: dict[str, Any] = {}
        for src, dst in (("fullAnswer", "full_answer"), ("isBalanced", "is_balanced"), ("types", "types")):
            if src in rec:
                extra[dst] = rec[src]
        out.append(
            VLExample(
                uid=str(qid),
                task="gqa",
                image_ids=[str(image_id)],
                text=question,
                targets=targets,
                target_scores={targets[0]: 1.0} if targets else None,
                extra=extra,
            )
        )
    return out
