"""COCO captions in the Karpathy split (dataset_coco.json).

Layout: {"images": [{"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg",
"split": "train" | "restval" | "val" | "test", "cocoid": 391895,
"sentences": [{"raw": "A man ...", "tokens": [...]}, ...]}, ...]}.
One example per image, with every reference caption in `targets`; the image key is
the file name without extension (the VL-T5 feature-store key). "restval" images
belong to the train split.
"""

from __future__ import annotations

import os

from adapterkit.errors import DataError
from adapterkit.vl.datasets.base import VLExample, get_field, load_json, require_list, resolve_split_file

__all__ = ["read_coco_caption", "KARPATHY_SPLITS"]

KARPATHY_SPLITS = {"train": ("train", "restval"), "restval": ("restval",), "val": ("val",), "test": ("test",)}
_CANDIDATES = ("dataset_coco.json",)


def read_coco_caption(path: str | os.PathLike, split: str | None = None) -> list[VLExample]:
    """Read the images of one Karpathy split ("train" includes "restval"; None = all)."""
    if split is not None and split not in KARPATHY_SPLITS:
        raise DataError(f"COCO caption split must be one of {sorted(KARPATHY_SPLITS)}, got {split!r}")
    file = resolve_split_file(path, split or "all", _CANDIDATES, "COCO caption")
    data = load_json(file)
    if not isinstance(data, dict) or "images" not in data:
        raise DataError(f'{file}: not a Karpathy dataset_coco.json (no "images" list)')
    wanted = KARPATHY_SPLITS[split] if split is not None else None
    out = []
    for i, img in enumerate(require_list(data["images"], str(file), "images")):
        where = f"{file}: image {i}"
        img_split = get_field(img, "split", where)
        if wanted is not None and img_split not in wanted:
            continue
        filename = get_field(img, "filename", where)
        if not isinstance(filename, str) or not filename:
            raise DataError(f'{where}: "filename" must be a non-empty string, got {filename!r}')
        key = filename.rsplit(".", 1)[0]
        captions = []
        for j, sent in enumerate(require_list(get_field(img, "sentences", where), where, "sentences")):
            if isinstance(sent, dict) and isinstance(sent.get("raw"), str):
                captions.append(sent["raw"].strip())
            elif isinstance(sent, dict) and isinstance(sent.get("tokens"), list):
                captions.append(" ".join(map(str, sent["tokens"])))
            else:
                raise DataError(f'{where}: sentences[{j}] needs a "raw" string, got {sent!r}')
        extra = {"split": img_split}
        if "cocoid" in img:
            extra["cocoid"] = img["cocoid"]
        if "filepath" in img:
            extra["filepath"] = img["filepath"]
        out.append(
            VLExample(uid=key, task="caption", image_ids=[key], text="", targets=captions, extra=extra)
        )
    return out
