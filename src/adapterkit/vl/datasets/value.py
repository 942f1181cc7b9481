"""VALUE benchmark video-language tasks (JSON-lines annotation files).

Video QA (TVQA: tvqa_{train,val}.jsonl, tvqa_test_release.jsonl; How2QA:
how2qa_{train,val,test_public}_release.jsonl), one object per line:
    {"vid_name": "s03e02_seg02_clip_10", "qid": 122039, "q": "Why is ...?",
     "a0": ..., "a4": ..., "answer_idx": 2, "ts": "20.16-25.12", "show_name": ...}
TVQA has 5 choices (a0..a4), How2QA 4 (a0..a3). Accepted key variants: question
"q" / "question" / "desc"; id "qid" / "q_id" / "question_id"; video "vid_name" /
"video_id" / "vid"; answer "answer_idx" / "answer" / "label".

Video captioning (TVC: tvc_{split}_release.jsonl; YC2C: yc2c_{split}_release.jsonl):
    {"vid_name": "grey_s03e12_seg02_clip_17", "clip_id": 86602, "ts": [35.73, 40.9],
     "duration": 94.03, "descs": [{"desc": "Meredith walks ...", "desc_id": 62633}, ...]}
One example per clip with every description as a target. Test files without
answers / descriptions give examples with empty targets.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from adapterkit.errors import DataError
from adapterkit.vl.datasets.base import VLExample, get_field, load_json_records, resolve_split_file

__all__ = [
    "read_tvqa",
    "read_how2qa",
    "read_tvc",
    "read_yc2c",
    "read_value_qa",
    "read_value_caption",
    "parse_timestamps",
]

_QID_KEYS = ("qid", "q_id", "question_id")
_QUESTION_KEYS = ("q", "question", "desc")
_VIDEO_KEYS = ("vid_name", "video_id", "vid")
_ANSWER_KEYS = ("answer_idx", "answer", "label")


def _candidates(task: str) -> tuple[str, ...]:
    return (
        f"{task}_{{split}}_release.jsonl",
        f"{task}_{{split}}.jsonl",
        "{split}.jsonl",
        f"{task}_{{split}}_release.json",
        f"{task}_{{split}}.json",
    )


def parse_timestamps(value: Any, where: str) -> list[float] | None:
    """Parse a VALUE timestamp span ("20.16-25.12" or [20.16, 25.12]); None for NaN spans."""
    if value is None:
        return None
    if isinstance(value, str):
        parts = value.split("-")
        if len(parts) != 2:
            raise DataError(f'{where}: "ts" must look like "start-end", got {value!r}')
        raw = parts
    elif isinstance(value, (list, tuple)) and len(value) == 2:
        raw = list(value)
    else:
        raise DataError(f'{where}: "ts" must be "start-end" or [start, end], got {value!r}')
    try:
        span = [float(x) for x in raw]
    except (TypeError, ValueError):
        raise DataError(f'{where}: "ts" has non-numeric bounds: {value!r}') from None
    if any(math.isnan(x) for x in span):
        return None
    return span


def _records(file: Path, what: str) -> list:
    data, _ = load_json_records(file)
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise DataError(f"{file}: not a {what} file (expected JSON lines of objects)")
    return data


def read_value_qa(
    path: str | os.PathLike, split: str | None = None, task: str = "tvqa", n_choices: int | None = None
) -> list[VLExample]:
    """Read a VALUE multiple-choice video QA file (TVQA / How2QA format)."""
    file = resolve_split_file(path, split, _candidates(task), task)
    out = []
    for i, rec in enumerate(_records(file, task)):
        where = f"{file}: line {i + 1}"
        qid = get_field(rec, _QID_KEYS, where)
        question = get_field(rec, _QUESTION_KEYS, where)
        video = get_field(rec, _VIDEO_KEYS, where)
        if not isinstance(question, str):
            raise DataError(f"{where}: the question must be a string, got {question!r}")
        choices = []
        while f"a{len(choices)}" in rec:
            choice = rec[f"a{len(choices)}"]
            if not isinstance(choice, str):
                raise DataError(f'{where}: "a{len(choices)}" must be a string, got {choice!r}')
            choices.append(choice)
        if n_choices is not None and len(choices) != n_choices:
            raise DataError(
                f'{where}: {task} needs {n_choices} choices "a0".."a{n_choices - 1}", found {len(choices)}'
            )
        if len(choices) < 2:
            raise DataError(f'{where}: needs at least 2 answer choices "a0", "a1", ...; found {len(choices)}')
        answer = get_field(rec, _ANSWER_KEYS, where, default=None)
        label = None
        if answer is not None:
            if (
                isinstance(answer, bool)
                or not isinstance(answer, (int, str))
                or not str(answer).strip().isdigit()
            ):
                raise DataError(f"{where}: the answer index must be an integer, got {answer!r}")
            label = int(answer)
            if not 0 <= label < len(choices):
                raise DataError(f"{where}: answer index {label} is out of range for {len(choices)} choices")
        extra: dict[str, Any] = {}
        ts = parse_timestamps(rec.get("ts"), where)
        if ts is not None:
            extra["ts"] = ts
        for key in ("show_name", "duration"):
            if key in rec:
                extra[key] = rec[key]
        out.append(
            VLExample(
                uid=str(qid),
                task=task,
                image_ids=[str(video)],
                text=question,
                targets=[] if label is None else [choices[label]],
                choices=choices,
                label=label,
                extra=extra,
            )
        )
    return out


def read_value_caption(
    path: str | os.PathLike, split: str | None = None, task: str = "tvc"
) -> list[VLExample]:
    """Read a VALUE video captioning file (TVC / YC2C format): one example per clip."""
    file = resolve_split_file(path, split, _candidates(task), task)
    out = []
    for i, rec in enumerate(_records(file, task)):
        where = f"{file}: line {i + 1}"
        video = get_field(rec, _VIDEO_KEYS, where)
        ts = parse_timestamps(rec.get("ts"), where)
        clip_id = get_field(rec, "clip_id", where, default=None)
        if clip_id is None:
            span = "" if ts is None else f"_{ts[0]:g}-{ts[1]:g}"
            clip_id = f"{video}{span}"
        descs = get_field(rec, "descs", where, default=[])
        if not isinstance(descs, list):
            raise DataError(f'{where}: "descs" must be a list, got {type(descs).__name__}')
        targets = []
        for j, d in enumerate(descs):
            text = d.get("desc") if isinstance(d, dict) else d
            if not isinstance(text, str):
                raise DataError(f'{where}: descs[{j}] needs a "desc" string, got {d!r}')
            targets.append(text.strip())
        extra: dict[str, Any] = {}
        if ts is not None:
            extra["ts"] = ts
        if "duration" in rec:
            extra["duration"] = rec["duration"]
        out.append(
            VLExample(
                uid=str(clip_id), task=task, image_ids=[str(video)], text="", targets=targets, extra=extra
            )
        )
    return out


def read_tvqa(path: str | os.PathLike, split: str | None = None) -> list[VLExample]:
    """TVQA (5 choices)."""
    return read_value_qa(path, split, task="tvqa", n_choices=5)


def read_how2qa(path: str | os.PathLike, split: str | None = None) -> list[VLExample]:
    """How2QA (4 choices)."""
    return read_value_qa(path, split, task="how2qa", n_choices=4)


def read_tvc(path: str | os.PathLike, split: str | None = None) -> list[VLExample]:
    """TVC captioning."""
    return read_value_caption(path, split, task="tvc")


def read_yc2c(path: str | os.PathLike, split: str | None = None) -> list[VLExample]:
    """YouCook2 captioning (VALUE YC2C)."""
    return read_value_caption(path, split, task="yc2c")
