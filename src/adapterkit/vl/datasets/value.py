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

Inputs are built as the reference (VL_adapter ``src/video/*_data.py``) builds
them, from the VALUE subtitle files ({"vid_name": ..., "sub": [{"start", "end",
"text"}, ...]} per line: ``tv_subtitles.jsonl`` for TVQA / TVC,
``how2_subtitles.jsonl`` for How2QA, ``yc2_subtitles.jsonl`` for YC2C):

    TVQA / How2QA  "[Subs] <subtitle texts> [Q] <question> [TS] (<ts>) [Choices] a0: <a0>. a1: <a1>. ..."
    TVC            "[Subs] <subtitle texts> [TS] (<ts>)"
    YC2C           "[Subs] <subtitle texts>"

(the task prompt, when used, goes after this text; the reference truncates the
whole input to 600 tokens). The QA target is the candidate's label "a<k>"
(the reference generates it and compares it with "a<answer_idx>"), so an
example's `choices` are the labels "a0".."a<n-1>" and its `extra["answers"]`
the candidate texts. The subtitle file is found next to the annotation file
or in its parent folder (the reference's ``ann/`` layout) unless `subtitles`
names it; `subtitles=False` reads without subtitles (no "[Subs]" part).
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
    "read_subtitles",
    "SUBTITLE_FILES",
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


SUBTITLE_FILES = {
    "tvqa": "tv_subtitles.jsonl",
    "tvc": "tv_subtitles.jsonl",
    "how2qa": "how2_subtitles.jsonl",
    "yc2c": "yc2_subtitles.jsonl",
}
_SUBTITLE_CACHE: dict[tuple[str, int, int], dict[str, str]] = {}


def read_subtitles(path: str | os.PathLike) -> dict[str, str]:
    """video id -> its subtitle texts joined by spaces, as the reference joins them."""
    path = Path(path)
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise DataError(f"subtitle file not found: {path}") from None
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key in _SUBTITLE_CACHE:
        return _SUBTITLE_CACHE[key]
    out: dict[str, str] = {}
    for i, rec in enumerate(_records(path, "subtitle")):
        where = f"{path}: line {i + 1}"
        video = get_field(rec, _VIDEO_KEYS, where)
        subs = get_field(rec, "sub", where)
        if not isinstance(subs, list):
            raise DataError(f'{where}: "sub" must be a list of {{"start", "end", "text"}}, got {subs!r}')
        texts = []
        for j, t in enumerate(subs):
            text = t.get("text") if isinstance(t, dict) else None
            if not isinstance(text, str):
                raise DataError(f'{where}: sub[{j}] needs a "text" string, got {t!r}')
            texts.append(text.strip())
        out[str(video)] = " ".join(texts)
    _SUBTITLE_CACHE.clear()  # one file at a time: the TV subtitles are large
    _SUBTITLE_CACHE[key] = out
    return out


def _subtitles_for(file: Path, task: str, subtitles: str | os.PathLike | bool | None) -> dict[str, str] | None:
    if subtitles is False:
        return None
    if subtitles is None or subtitles is True:
        name = SUBTITLE_FILES[task]
        for folder in (file.parent, file.parent.parent):
            if (folder / name).is_file():
                return read_subtitles(folder / name)
        raise DataError(
            f"{task}: the reference's inputs hold the subtitles, but {name} is neither next to {file} nor in "
            f"{file.parent.parent}; give its path (data source option `subtitles: PATH`), or "
            "`subtitles: false` to read without subtitles"
        )
    return read_subtitles(subtitles)


def _subs_part(subs: dict[str, str] | None, video: str, where: str) -> list[str]:
    if subs is None:
        return []
    if video not in subs:
        raise DataError(f"{where}: video {video!r} has no subtitles in the subtitle file")
    return [f"[Subs] {subs[video]}"]


def _records(file: Path, what: str) -> list:
    data, _ = load_json_records(file)
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise DataError(f"{file}: not a {what} file (expected JSON lines of objects)")
    return data


def read_value_qa(
    path: str | os.PathLike,
    split: str | None = None,
    task: str = "tvqa",
    n_choices: int | None = None,
    subtitles: str | os.PathLike | bool | None = None,
) -> list[VLExample]:
    """Read a VALUE multiple-choice video QA file (TVQA / How2QA format); inputs
    as the reference builds them (module docstring)."""
    file = resolve_split_file(path, split, _candidates(task), task)
    subs = _subtitles_for(file, task, subtitles)
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
        extra: dict[str, Any] = {"answers": choices, "question": question}
        ts = parse_timestamps(rec.get("ts"), where)
        if ts is not None:
            extra["ts"] = ts
        for key in ("show_name", "duration"):
            if key in rec:
                extra[key] = rec[key]
        parts = _subs_part(subs, str(video), where) + [f"[Q] {question.strip()}"]
        if "ts" in rec:
            parts.append(f"[TS] ({rec['ts']})")
        parts.append("[Choices] " + " ".join(f"a{k}: {c.strip('. ')}." for k, c in enumerate(choices)))
        labels = [f"a{k}" for k in range(len(choices))]
        out.append(
            VLExample(
                uid=str(qid),
                task=task,
                image_ids=[str(video)],
                text=" ".join(parts),
                targets=[] if label is None else [labels[label]],
                choices=labels,
                label=label,
                extra=extra,
            )
        )
    return out


def read_value_caption(
    path: str | os.PathLike,
    split: str | None = None,
    task: str = "tvc",
    subtitles: str | os.PathLike | bool | None = None,
) -> list[VLExample]:
    """Read a VALUE video captioning file (TVC / YC2C format): one example per
    clip; inputs as the reference builds them (module docstring)."""
    file = resolve_split_file(path, split, _candidates(task), task)
    subs = _subtitles_for(file, task, subtitles)
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
        parts = _subs_part(subs, str(video), where)
        if task != "yc2c" and "ts" in rec:  # the reference's YC2C input is the subtitles alone
            parts.append(f"[TS] ({rec['ts']})")
        out.append(
            VLExample(
                uid=str(clip_id), task=task, image_ids=[str(video)], text=" ".join(parts), targets=targets,
                extra=extra,
            )
        )
    return out


def read_tvqa(path: str | os.PathLike, split: str | None = None, subtitles=None) -> list[VLExample]:
    """TVQA (5 choices)."""
    return read_value_qa(path, split, task="tvqa", n_choices=5, subtitles=subtitles)


def read_how2qa(path: str | os.PathLike, split: str | None = None, subtitles=None) -> list[VLExample]:
    """How2QA (4 choices)."""
    return read_value_qa(path, split, task="how2qa", n_choices=4, subtitles=subtitles)


def read_tvc(path: str | os.PathLike, split: str | None = None, subtitles=None) -> list[VLExample]:
    """TVC captioning."""
    return read_value_caption(path, split, task="tvc", subtitles=subtitles)


def read_yc2c(path: str | os.PathLike, split: str | None = None, subtitles=None) -> list[VLExample]:
    """YouCook2 captioning (VALUE YC2C)."""
    return read_value_caption(path, split, task="yc2c", subtitles=subtitles)
