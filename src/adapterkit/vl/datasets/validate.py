"""Row checks for vision-and-language splits, run before any training or scoring.

A split whose rows are wrong in a way that would silently change a result is refused
with one :class:`~adapterkit.errors.DataError` naming the file and the line:

* a uid that appears twice (scores are keyed by uid: duplicates collapse, and a
  metric would score 1 of 7 rows without a word);
* an empty target string, or a split that mixes rows with and without targets
  (a training split needs a target on every row);
* a ``target_scores`` value that is not a finite number in [0, 1] (NaN, inf, 7.0);
* the wrong number of images for the task (NLVR2: 2, the other known tasks: 1;
  never more than the model's ``n_images``);
* an image id that is not in the feature store;
* a ``task`` field that is not the split's task.

:func:`iter_jsonl` reads JSON lines the same way for every reader: a line that is not
UTF-8, not JSON, or nested too deeply is one error naming the line.
"""

from __future__ import annotations

import math
import os
from collections.abc import Container, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from adapterkit.errors import DataError
from adapterkit.safeio import loads_json

__all__ = ["IMAGES_PER_TASK", "check_store_index", "iter_jsonl", "read_jsonl_checked", "validate_examples", "examples_by_uid"]

#: images per example of the known tasks (video tasks: one video id); other tasks: 1..n_images
IMAGES_PER_TASK = {"vqa": 1, "gqa": 1, "caption": 1, "nlvr": 2, "tvqa": 1, "how2qa": 1, "tvc": 1, "yc2c": 1}


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """Yield ``(line number, record)`` for every non-blank line of a JSON-lines file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"examples file not found: {path}")
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    with fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not UTF-8 text (byte {exc.start} of the line)") from None
            yield lineno, loads_json(line, what=f"{path}:{lineno}", error=DataError, reject_duplicates=True)


def read_jsonl_checked(path: str | os.PathLike, **checks) -> list:
    """Read ``VLExample`` JSON lines and check the rows (:func:`validate_examples` with
    ``checks``), every error naming the file and line."""
    from adapterkit.vl.datasets.base import VLExample

    out, lines = [], []
    for lineno, record in iter_jsonl(path):
        out.append(VLExample.from_json(record, source=f"{path}:{lineno}"))
        lines.append(lineno)
    validate_examples(out, str(path), lines=lines, **checks)
    return out


def _where(source: str, lines: Sequence[int] | None, i: int) -> str:
    return f"{source}:{lines[i]}" if lines is not None else f"{source} (row {i + 1})"


def validate_examples(
    examples: Sequence[Any],
    source: str,
    *,
    lines: Sequence[int] | None = None,
    task: str | None = None,
    n_images: int | None = None,
    image_ids: Container[str] | None = None,
    require_targets: bool = False,
) -> Sequence[Any]:
    """Check a split's rows (``VLExample``-like objects); returns ``examples``.

    ``source`` names the file (``lines[i]`` is row i's line in it); ``task``: the
    split's task (each row's ``task`` must equal it, and its image count must fit it);
    ``n_images``: the model's images per example; ``image_ids``: the feature store (or
    any container of ids); ``require_targets``: every row needs a target (training).
    """
    first_uid: dict[str, int] = {}
    first_labelled = first_unlabelled = None
    for i, ex in enumerate(examples):
        uid = ex.uid
        if uid in first_uid:
            j = first_uid[uid]
            also = f"line {lines[j]}" if lines is not None else f"row {j + 1}"
            raise DataError(f"{_where(source, lines, i)}: uid {uid!r} appears twice (also on {also}); "
                            "uids must be unique, scores are keyed by them")
        first_uid[uid] = i
        if task is not None and ex.task != task:
            raise DataError(f"{_where(source, lines, i)}: task is {ex.task!r}, but this is a {task!r} split")
        for t in ex.targets:
            if not t.strip():
                raise DataError(f"{_where(source, lines, i)}: uid {uid!r} has an empty target string")
        labelled = bool(ex.targets) or ex.label is not None
        if labelled and first_labelled is None:
            first_labelled = i
        if not labelled:
            if require_targets:
                raise DataError(f"{_where(source, lines, i)}: uid {uid!r} has no target (a training split "
                                "needs one on every row)")
            if first_unlabelled is None:
                first_unlabelled = i
        if ex.target_scores is not None:
            for ans, s in ex.target_scores.items():
                if not isinstance(s, (int, float)) or isinstance(s, bool) or not math.isfinite(s) or not 0 <= s <= 1:
                    raise DataError(f"{_where(source, lines, i)}: target score of {ans!r} is {s!r}; "
                                    "scores must be finite numbers in [0, 1]")
        k = len(ex.image_ids)
        want = IMAGES_PER_TASK.get(ex.task)
        if want is not None and k != want:
            raise DataError(f"{_where(source, lines, i)}: a {ex.task!r} example needs {want} image id(s), "
                            f"uid {uid!r} has {k}")
        if k < 1 or (n_images is not None and k > n_images):
            limit = f" (model.n_images is {n_images})" if n_images is not None else ""
            raise DataError(f"{_where(source, lines, i)}: uid {uid!r} has {k} image ids{limit}")
        if image_ids is not None:
            for img in ex.image_ids:
                if img not in image_ids:
                    raise DataError(f"{_where(source, lines, i)}: image id {img!r} (uid {uid!r}) is not in "
                                    "the feature store")
    if first_labelled is not None and first_unlabelled is not None:
        i = first_unlabelled
        raise DataError(f"{_where(source, lines, i)}: uid {examples[i].uid!r} has no target while other rows "
                        "of the split have one")
    return examples


def examples_by_uid(examples: Mapping[str, Any] | Iterable[Any], what: str = "examples") -> Mapping[str, Any]:
    """``{uid: example}``; a sequence with a repeated uid is a :class:`DataError` instead of
    a silent collapse (a mapping is returned unchanged: its keys are unique already)."""
    if isinstance(examples, Mapping):
        return examples
    out: dict[str, Any] = {}
    for i, ex in enumerate(examples):
        if ex.uid in out:
            raise DataError(f"{what}: uid {ex.uid!r} appears twice (row {i + 1}); uids must be unique")
        out[ex.uid] = ex
    return out


def check_store_index(index: Mapping[str, Any], what: str) -> None:
    """Types of a feature store's ``index.json``: ``complete`` a boolean (the string "false"
    is not), ``ids`` unique strings, ``num_boxes``/``dim`` positive integers, ``dtype`` a string."""
    if not isinstance(index.get("complete"), bool):
        raise DataError(f'{what}: "complete" must be true or false, got {index.get("complete")!r}')
    ids = index.get("ids")
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise DataError(f'{what}: "ids" must be a list of strings')
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = next(i for i in ids if i in seen or seen.add(i))
        raise DataError(f'{what}: image id {dup!r} appears twice in "ids"')
    for key in ("num_boxes", "dim"):
        v = index.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise DataError(f'{what}: "{key}" must be a positive integer, got {v!r}')
    try:
        import numpy as np

        np.dtype(index.get("dtype"))
        if not isinstance(index.get("dtype"), str):
            raise TypeError
    except TypeError:
        raise DataError(f'{what}: "dtype" must name a numpy dtype, got {index.get("dtype")!r}') from None
