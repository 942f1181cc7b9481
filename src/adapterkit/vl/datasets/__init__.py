"""Readers of vision-and-language datasets into `VLExample` lists.

`READERS` maps a task name to its reader `reader(path, split=None, **options)`;
`read_task(task, path, split)` dispatches and names the options on a typo;
`read_source(task, source, split)` reads one split of a run config's data source.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from adapterkit.errors import DataError, did_you_mean
from adapterkit.vl.datasets.base import VLExample, read_examples_jsonl, write_examples_jsonl
from adapterkit.vl.datasets.coco_caption import read_coco_caption
from adapterkit.vl.datasets.gqa import read_gqa
from adapterkit.vl.datasets.nlvr2 import read_nlvr2
from adapterkit.vl.datasets.value import read_how2qa, read_tvc, read_tvqa, read_yc2c
from adapterkit.vl.datasets.vqa import read_vqa

__all__ = [
    "VLExample",
    "READERS",
    "read_task",
    "read_source",
    "READER_OPTIONS",
    "read_examples_jsonl",
    "write_examples_jsonl",
    "read_vqa",
    "read_gqa",
    "read_nlvr2",
    "read_coco_caption",
    "read_tvqa",
    "read_how2qa",
    "read_tvc",
    "read_yc2c",
]

Reader = Callable[..., list[VLExample]]

READERS: dict[str, Reader] = {
    "vqa": read_vqa,
    "gqa": read_gqa,
    "nlvr": read_nlvr2,
    "caption": read_coco_caption,
    "tvqa": read_tvqa,
    "how2qa": read_how2qa,
    "tvc": read_tvc,
    "yc2c": read_yc2c,
}


# reader options a data source may give (data.sources.<task>.<option> in a run config)
READER_OPTIONS: dict[str, tuple[str, ...]] = {
    "vqa": ("annotations",),
    "tvqa": ("subtitles",),
    "how2qa": ("subtitles",),
    "tvc": ("subtitles",),
    "yc2c": ("subtitles",),
}
SOURCE_KEYS = ("format", "path", "splits")


def read_task(task: str, path: str | os.PathLike, split: str | None = None, **options) -> list[VLExample]:
    """Read `task`'s examples from `path` (a file, or a directory plus `split`).

    A path ending in ".examples.jsonl" is read as already-converted examples
    (`write_examples_jsonl` output) whatever the task. A comma-separated split
    ("train,valid", as the reference trains GQA) reads each split in turn and
    concatenates them. `options` go to the reader (`READER_OPTIONS`).
    """
    if str(path).endswith(".examples.jsonl"):
        return read_examples_jsonl(path)
    reader = READERS.get(task)
    if reader is None:
        raise DataError(
            f"unknown V&L task {task!r}{did_you_mean(task, READERS)}; known: {', '.join(sorted(READERS))}"
        )
    allowed = READER_OPTIONS.get(task, ())
    for key in options:
        if key not in allowed:
            raise DataError(
                f"the {task} reader takes no option {key!r}{did_you_mean(key, allowed)}"
                + (f"; it takes: {', '.join(allowed)}" if allowed else "")
            )
    if split is not None and "," in split:
        out: list[VLExample] = []
        for part in split.split(","):
            out.extend(reader(path, part.strip(), **options))
        return out
    return reader(path, split, **options)


def read_source(task: str, source: dict, split: str) -> list[VLExample]:
    """Read one split of a run config's data source
    ``{format: vqa, path: DIR_OR_FILE, splits: {train: karpathy_train, ...}, <reader options>}``;
    the examples get `task` as their task name."""
    if not isinstance(source, dict) or "path" not in source:
        raise DataError(f'the data source of task {task!r} needs a "path" (and optionally "format", "splits")')
    fmt = source.get("format", task)
    splits = source.get("splits") or {}
    if not isinstance(splits, dict):
        raise DataError(f'data source of task {task!r}: "splits" must map split names to file splits')
    options = {k: v for k, v in source.items() if k not in SOURCE_KEYS}
    examples = read_task(fmt, source["path"], splits.get(split, split), **options)
    for ex in examples:
        ex.task = task
    return examples
