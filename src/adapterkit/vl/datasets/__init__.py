"""Readers of vision-and-language datasets into `VLExample` lists.

`READERS` maps a task name to its reader `reader(path, split=None)`;
`read_task(task, path, split)` dispatches and names the options on a typo.
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


def read_task(task: str, path: str | os.PathLike, split: str | None = None) -> list[VLExample]:
    """Read `task`'s examples from `path` (a file, or a directory plus `split`).

    A path ending in ".examples.jsonl" is read as already-converted examples
    (`write_examples_jsonl` output) whatever the task.
    """
    if str(path).endswith(".examples.jsonl"):
        return read_examples_jsonl(path)
    reader = READERS.get(task)
    if reader is None:
        raise DataError(
            f"unknown V&L task {task!r}{did_you_mean(task, READERS)}; known: {', '.join(sorted(READERS))}"
        )
    return reader(path, split)
