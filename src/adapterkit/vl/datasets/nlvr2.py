"""NLVR2 reader: the VL-T5 layout and the official JSON-lines files.

VL-T5 layout (train.json / valid.json / test.json): a JSON list of
    {"identifier": "dev-850-0-0", "img0": "dev-850-0-img0", "img1": "dev-850-0-img1",
     "label": 1, "sent": "...", "uid": "nlvr2_dev_0"}
Official layout (train.json / dev.json / test1.json, one JSON object per line):
    {"identifier": "dev-850-0-0", "sentence": "...", "label": "True",
     "left_url": ..., "right_url": ..., "synset": ..., "query": ...}
The image pair of identifier "<split>-<set>-<pair>-<sentence>" is
"<split>-<set>-<pair>-img0" / "-img1". Example uids are the identifiers in both layouts.
"""

from __future__ import annotations

import os
from typing import Any

from adapterkit.errors import DataError
from adapterkit.vl.datasets.base import VLExample, get_field, load_json_records, resolve_split_file

__all__ = ["read_nlvr2", "nlvr2_image_ids"]

_CANDIDATES = ("{split}.json", "{split}.jsonl")


def nlvr2_image_ids(identifier: str) -> list[str]:
    """The two image keys of an NLVR2 identifier ("dev-850-0-0" -> dev-850-0-img0/img1)."""
    parts = str(identifier).split("-")
    if len(parts) != 4:
        raise DataError(f'NLVR2 identifier must look like "<split>-<set>-<pair>-<n>", got {identifier!r}')
    stem = "-".join(parts[:3])
    return [f"{stem}-img0", f"{stem}-img1"]


def _label(value: Any, where: str) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int) and value in (0, 1):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return int(value.strip().lower() == "true")
    raise DataError(f'{where}: "label" must be True/False or 1/0, got {value!r}')


def read_nlvr2(path: str | os.PathLike, split: str | None = None) -> list[VLExample]:
    """Read NLVR2 examples from a file, or a directory plus split ("train", "valid",
    "dev", "test1", ...)."""
    file = resolve_split_file(path, split, _CANDIDATES, "NLVR2")
    data, _ = load_json_records(file)
    if isinstance(data, dict):  # a JSON-lines file with a single line
        data = [data]
    if not isinstance(data, list):
        raise DataError(f"{file}: not an NLVR2 file (expected a list or JSON lines of records)")
    return [_example(rec, f"{file}: record {i}") for i, rec in enumerate(data)]


def _example(rec: Any, where: str) -> VLExample:
    identifier = str(get_field(rec, "identifier", where))
    text = get_field(rec, ("sent", "sentence"), where)
    if not isinstance(text, str):
        raise DataError(f'{where}: "sentence" must be a string, got {text!r}')
    if "img0" in rec and "img1" in rec:
        image_ids = [str(rec["img0"]), str(rec["img1"])]
    else:
        try:
            image_ids = nlvr2_image_ids(identifier)
        except DataError as exc:
            raise DataError(f"{where}: {exc}") from None
    raw_label = get_field(rec, "label", where, default=None)
    label = None if raw_label is None else _label(raw_label, where)
    extra = {k: rec[k] for k in ("uid", "left_url", "right_url", "synset", "query") if k in rec}
    return VLExample(
        uid=identifier,
        task="nlvr",
        image_ids=image_ids,
        text=text,
        targets=[] if label is None else ["true" if label else "false"],
        label=label,
        extra=extra,
    )
