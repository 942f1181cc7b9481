"""The common example record of every vision-and-language task, its JSON form,
and small helpers the dataset readers share (file lookup, JSON / JSON-lines
loading, record field access) so that every reader fails the same way: one
`DataError` naming the file and the record."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterkit.errors import DataError
from adapterkit.safeio import atomic_write_text  # re-exported: the one atomic writer of the project

__all__ = [
    "VLExample",
    "read_examples_jsonl",
    "write_examples_jsonl",
    "load_json",
    "load_json_records",
    "resolve_split_file",
    "get_field",
    "atomic_write_text",
]


@dataclass
class VLExample:
    """One example of a vision-and-language task.

    `image_ids` are keys into the feature store (one image; two for NLVR2; the
    video id for video tasks). `targets` holds every acceptable target string
    (VQA: the raw answers; GQA: [answer]; NLVR2: ["true"/"false"]; captions:
    all reference captions). `text` carries no task prefix.
    """

    uid: str
    task: str
    image_ids: list[str]
    text: str
    targets: list[str]
    target_scores: dict[str, float] | None = None
    choices: list[str] | None = None
    label: int | None = None
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (optional fields left out when unset)."""
        out: dict[str, Any] = {
            "uid": self.uid,
            "task": self.task,
            "image_ids": list(self.image_ids),
            "text": self.text,
            "targets": list(self.targets),
        }
        if self.target_scores is not None:
            out["target_scores"] = {str(k): float(v) for k, v in self.target_scores.items()}
        if self.choices is not None:
            out["choices"] = list(self.choices)
        if self.label is not None:
            out["label"] = int(self.label)
        if self.extra:
            out["extra"] = dict(self.extra)
        return out

    @classmethod
    def from_json(cls, record: Mapping[str, Any], source: str = "<record>") -> VLExample:
        """Build an example from `to_json` output; `source` names the origin in errors."""
        if not isinstance(record, Mapping):
            raise DataError(f"{source}: expected a JSON object, got {type(record).__name__}")
        for key in ("uid", "task", "image_ids", "text", "targets"):
            if key not in record:
                raise DataError(f'{source}: missing key "{key}"')
        image_ids = record["image_ids"]
        targets = record["targets"]
        if not isinstance(image_ids, list) or not all(isinstance(i, str) for i in image_ids):
            raise DataError(f'{source}: "image_ids" must be a list of strings, got {image_ids!r}')
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise DataError(f'{source}: "targets" must be a list of strings, got {targets!r}')
        if not isinstance(record["text"], str):
            raise DataError(f'{source}: "text" must be a string, got {record["text"]!r}')
        scores = record.get("target_scores")
        if scores is not None:
            if not isinstance(scores, Mapping):
                raise DataError(f'{source}: "target_scores" must be an object, got {scores!r}')
            try:
                scores = {str(k): float(v) for k, v in scores.items()}
            except (TypeError, ValueError) as exc:
                raise DataError(f'{source}: "target_scores" values must be numbers ({exc})') from None
        choices = record.get("choices")
        if choices is not None and (
            not isinstance(choices, list) or not all(isinstance(c, str) for c in choices)
        ):
            raise DataError(f'{source}: "choices" must be a list of strings, got {choices!r}')
        label = record.get("label")
        if label is not None and (isinstance(label, bool) or not isinstance(label, int)):
            raise DataError(f'{source}: "label" must be an integer, got {label!r}')
        extra = record.get("extra") or {}
        if not isinstance(extra, Mapping):
            raise DataError(f'{source}: "extra" must be an object, got {extra!r}')
        return cls(
            uid=str(record["uid"]),
            task=str(record["task"]),
            image_ids=list(image_ids),
            text=record["text"],
            targets=list(targets),
            target_scores=scores,
            choices=list(choices) if choices is not None else None,
            label=label,
            extra=dict(extra),
        )


# ----------------------------------------------------------------------------- files


def write_examples_jsonl(path: str | os.PathLike, examples: Iterable[VLExample]) -> None:
    """Write examples as JSON lines, atomically."""
    lines = []
    for ex in examples:
        if not isinstance(ex, VLExample):
            raise DataError(f"{path}: can only write VLExample objects, got {type(ex).__name__}")
        lines.append(json.dumps(ex.to_json(), ensure_ascii=False))
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def read_examples_jsonl(path: str | os.PathLike) -> list[VLExample]:
    """Read examples written by `write_examples_jsonl`; rows are checked by
    `adapterkit.vl.datasets.validate` (one DataError naming the file and line)."""
    from adapterkit.vl.datasets.validate import read_jsonl_checked

    return read_jsonl_checked(path)


def load_json(path: str | os.PathLike) -> Any:
    """Load one JSON document; DataError naming the file when missing or invalid."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except RecursionError:
        raise DataError(f"{path}: nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON at line {exc.lineno} ({exc.msg})") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason})") from None


def load_json_records(path: str | os.PathLike) -> tuple[Any, bool]:
    """Load a file that is either one JSON document or JSON lines.

    Returns (data, is_jsonl): for JSON lines, data is the list of records.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason})") from None
    try:
        return json.loads(text), False
    except RecursionError:
        raise DataError(f"{path}: nested too deeply") from None
    except json.JSONDecodeError as exc:
        if exc.msg != "Extra data":
            # a single broken document, or a broken first line of JSON lines
            first = text.lstrip().split("\n", 1)[0]
            try:
                json.loads(first)
            except json.JSONDecodeError:
                raise DataError(f"{path}: invalid JSON at line {exc.lineno} ({exc.msg})") from None
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except RecursionError:
            raise DataError(f"{path}:{lineno}: nested too deeply") from None
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: invalid JSON line ({exc.msg})") from None
    return records, True


def resolve_split_file(
    path: str | os.PathLike, split: str | None, candidates: Sequence[str], what: str
) -> Path:
    """Return `path` when it is a file, else the first of `candidates` (formatted
    with `split`) that exists inside the directory `path`."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise DataError(f"{what} data not found: {path}")
    if not path.is_dir():
        raise DataError(f"{what} data path is neither a file nor a directory: {path}")
    if not split:
        raise DataError(f"{what}: {path} is a directory; give a split to pick the file inside it")
    tried = []
    for pattern in candidates:
        candidate = path / pattern.format(split=split)
        if candidate.is_file():
            return candidate
        tried.append(candidate.name)
    raise DataError(f"{what}: no file for split {split!r} in {path} (looked for {', '.join(tried)})")


_MISSING = object()


def get_field(record: Any, keys: str | Sequence[str], where: str, default: Any = _MISSING) -> Any:
    """First present key of `keys` in `record`; DataError naming `where` when none is.

    With a `default`, returns it instead of raising.
    """
    if isinstance(keys, str):
        keys = (keys,)
    if not isinstance(record, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key in keys:
        if key in record:
            return record[key]
    if default is not _MISSING:
        return default
    names = " / ".join(f'"{k}"' for k in keys)
    raise DataError(f"{where}: missing key {names}")


def require_list(value: Any, where: str, name: str) -> list:
    """`value` when it is a list, else a DataError naming `where` and `name`."""
    if not isinstance(value, list):
        raise DataError(f'{where}: "{name}" must be a list, got {type(value).__name__}')
    return value


def read_label_scores(record: Any, where: str) -> dict[str, float] | None:
    """A VL-T5 record's optional ``"label"``: answer -> soft score (None when the record has none);
    DataError naming ``where`` when it is not an object of numbers."""
    label = get_field(record, "label", where, default=None)
    if label is None:
        return None
    if not isinstance(label, dict):
        raise DataError(f'{where}: "label" must be an object answer -> score, got {label!r}')
    try:
        return {str(a): float(s) for a, s in label.items()}
    except (TypeError, ValueError):
        raise DataError(f'{where}: "label" scores must be numbers, got {label!r}') from None
