"""Import the reference's released visual features into a feature store.

Layouts read (the ones VL-T5 and VL_adapter distribute or write):

- one HDF5 file with a group per image id (VL-T5's ``train2014_obj36.h5``,
  ``vg_gqa_obj36.h5``, ...): ``<img_id>/features`` (K, D), and optionally
  ``<img_id>/boxes`` (K, 4) in pixels with ``<img_id>/img_h`` / ``img_w``;
- a folder of one HDF5 file per image (VL_adapter's CLIP features,
  ``clip_features/data_clip_RN101_att/<img_id>.h5``), each holding the group
  ``<img_id>`` with ``features`` (36, 2048);
- a folder of one ``.npz`` per video with a ``features`` array (L, D) (the
  CLIP-ViT frame features the reference reads for TVQA / How2QA / TVC / YC2C,
  ``vis_features/<source>/clip-vit/<video_id>.npz``).

Boxes found in a file are normalised by the image size and clamped to [0, 1]
as VL-T5 does; image files without boxes get the grid cells' boxes when K is a
square (a 6x6 CLIP grid: the store then says "grid6", and the model's zero-box
switch for grid features applies as to extracted stores), video frames get zero
boxes (the reference's). ``frames=N`` resamples the token axis to N as
the reference's video loaders do: shorter clips are padded with zero frames,
longer ones adaptive-max-pooled. Several sources go into one store (the
trainer reads one store for all tasks); an image id found twice is an error.
The import is resumable: rerunning the same command continues where it stopped.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from adapterkit.cli.argtypes import positive_int
from adapterkit.errors import ConfigError, DataError
from adapterkit.vl.backends import grid_boxes
from adapterkit.vl.features import FeatureStore, FeatureStoreWriter

__all__ = [
    "FeatureSource",
    "open_source",
    "import_features",
    "resize_frames",
    "add_parser",
    "run",
]


def _h5py():
    try:
        import h5py
    except ModuleNotFoundError:
        raise ConfigError(
            "reading HDF5 feature files needs h5py: pip install h5py (or pip install 'adapterkit[h5]')"
        ) from None
    return h5py


def resize_frames(features: np.ndarray, length: int) -> np.ndarray:
    """The reference's frame resampling of (L, D) features to (length, D):
    zero-padding when L < length, adaptive max pooling (torch's bins
    [floor(i L / n), ceil((i + 1) L / n))) when L > length."""
    features = np.asarray(features)
    n_in = features.shape[0]
    if n_in == length:
        return features
    if n_in < length:
        pad = np.zeros((length - n_in, features.shape[1]), dtype=features.dtype)
        return np.concatenate([features, pad], axis=0)
    i = np.arange(length)
    starts = (i * n_in) // length
    ends = -((-(i + 1) * n_in) // length)  # ceil
    return np.stack([features[s:e].max(axis=0) for s, e in zip(starts, ends)])


@dataclass
class FeatureSource:
    """One source of features: `ids` in order and a reader of (features, boxes | None)."""

    path: Path
    kind: str  # "h5-file" | "h5-dir" | "npz-dir"
    ids: list[str]

    def read(self, image_id: str, h5file: Any = None) -> tuple[np.ndarray, np.ndarray | None]:
        where = f"{self.path}" if self.kind == "h5-file" else f"{self._file(image_id)}"
        if self.kind == "npz-dir":
            file = self._file(image_id)
            try:
                with np.load(file) as z:
                    if "features" not in z:
                        raise DataError(f'{file}: no "features" array (found {", ".join(z.files) or "none"})')
                    feats = np.asarray(z["features"])
                if feats.ndim != 2:
                    raise DataError(f"{file}: features must be 2-d (frames, dim), got shape {feats.shape}")
                return feats, None
            except (OSError, ValueError) as exc:
                raise DataError(f"{file}: cannot read ({exc})") from None
        if self.kind == "h5-dir":
            h5py = _h5py()
            file = self._file(image_id)
            try:
                with h5py.File(file, "r") as f:
                    return _read_group(f, image_id, where)
            except OSError as exc:
                raise DataError(f"{file}: not a readable HDF5 file ({exc})") from None
        return _read_group(h5file, image_id, where)

    def _file(self, image_id: str) -> Path:
        return self.path / f"{image_id}.{'npz' if self.kind == 'npz-dir' else 'h5'}"


def _read_group(f: Any, image_id: str, where: str) -> tuple[np.ndarray, np.ndarray | None]:
    if image_id in f:
        grp = f[image_id]
    elif len(f.keys()) == 1:  # a per-image file whose group is named differently
        grp = f[next(iter(f.keys()))]
    else:
        raise DataError(f"{where}: no group {image_id!r}")
    if not hasattr(grp, "keys") or "features" not in grp:
        raise DataError(f'{where}: group {image_id!r} has no "features" dataset')
    feats = np.asarray(grp["features"][()])
    if feats.ndim != 2:
        raise DataError(f"{where}: {image_id}/features must be 2-d (tokens, dim), got shape {feats.shape}")
    boxes = None
    if "boxes" in grp:
        boxes = np.asarray(grp["boxes"][()], dtype=np.float32).copy()
        if boxes.shape != (feats.shape[0], 4):
            raise DataError(
                f"{where}: {image_id}/boxes has shape {boxes.shape}, expected ({feats.shape[0]}, 4)"
            )
        if "img_h" in grp and "img_w" in grp:
            img_h, img_w = float(grp["img_h"][()]), float(grp["img_w"][()])
            if img_h <= 0 or img_w <= 0:
                raise DataError(f"{where}: {image_id} has image size {img_w} x {img_h}")
            boxes[:, (0, 2)] /= img_w
            boxes[:, (1, 3)] /= img_h
        np.clip(boxes, 0.0, 1.0, out=boxes)
    return feats, boxes


def open_source(path: str | os.PathLike) -> FeatureSource:
    """A source from a path: an .h5/.hdf5 file, or a folder of per-image .h5 or per-video .npz files."""
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() not in (".h5", ".hdf5"):
            raise DataError(f"{path}: expected an .h5 / .hdf5 file or a folder of .h5 / .npz files")
        h5py = _h5py()
        try:
            with h5py.File(path, "r") as f:
                ids = [str(k) for k in f.keys()]
        except OSError as exc:
            raise DataError(f"{path}: not a readable HDF5 file ({exc})") from None
        kind = "h5-file"
    elif path.is_dir():
        h5 = sorted(p.stem for p in path.iterdir() if p.suffix.lower() == ".h5")
        npz = sorted(p.stem for p in path.iterdir() if p.suffix.lower() == ".npz")
        if h5 and npz:
            raise DataError(f"{path} holds both .h5 and .npz files; import one kind per source")
        if not h5 and not npz:
            raise DataError(f"{path}: no .h5 or .npz feature files in this folder")
        ids, kind = (h5, "h5-dir") if h5 else (npz, "npz-dir")
    else:
        raise DataError(f"feature source not found: {path}")
    if not ids:
        raise DataError(f"{path}: no image groups in this file")
    return FeatureSource(path, kind, ids)


def _iter_rows(sources: Sequence[FeatureSource], start: int) -> Iterator[tuple[str, np.ndarray, np.ndarray | None]]:
    """(id, features, boxes) of every id of every source from global row `start` on."""
    offset = 0
    for src in sources:
        n = len(src.ids)
        if start >= offset + n:
            offset += n
            continue
        lo = max(0, start - offset)
        if src.kind == "h5-file":
            h5py = _h5py()
            with h5py.File(src.path, "r") as f:
                for image_id in src.ids[lo:]:
                    feats, boxes = src.read(image_id, f)
                    yield image_id, feats, boxes
        else:
            for image_id in src.ids[lo:]:
                feats, boxes = src.read(image_id)
                yield image_id, feats, boxes
        offset += n


def import_features(
    sources: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    frames: int | None = None,
    dtype: str = "auto",
    chunk: int = 256,
    progress: bool = True,
    duplicates: str = "error",
) -> FeatureStore:
    """Import the features of `sources` (see the module docstring) into a store at `out_dir`.

    `dtype` "auto" keeps the first array's dtype when it is float16 / float32
    (else float32). `frames` resamples every item's token axis to that length.
    An id found in two sources is an error, or, with ``duplicates="first"``,
    taken from the first source that has it.
    """
    if duplicates not in ("error", "first"):
        raise ConfigError(f'duplicates must be "error" or "first", got {duplicates!r}')
    if not sources:
        raise ConfigError("import_features needs at least one source")
    if frames is not None and frames < 1:
        raise ConfigError(f"frames must be >= 1, got {frames}")
    if chunk < 1:
        raise ConfigError(f"chunk must be >= 1, got {chunk}")
    opened = [open_source(s) for s in sources]
    ids: list[str] = []
    origin: dict[str, Path] = {}
    for src in opened:
        kept = []
        for image_id in src.ids:
            if image_id in origin:
                if duplicates == "first":
                    continue
                raise DataError(
                    f"image id {image_id!r} is in both {origin[image_id]} and {src.path} "
                    "(--duplicates first keeps the first source's)"
                )
            origin[image_id] = src.path
            ids.append(image_id)
            kept.append(image_id)
        src.ids = kept
    _, first_feats, first_boxes = next(_iter_rows(opened, 0))
    k = frames if frames is not None else first_feats.shape[0]
    dim = first_feats.shape[1]
    if dtype == "auto":
        dtype = first_feats.dtype.name if first_feats.dtype.name in ("float16", "float32") else "float32"
    kinds = sorted({s.kind for s in opened})
    backend = f"import:{'+'.join(kinds)}" + (f"/frames{frames}" if frames is not None else "")
    image_grid = frames is None and "npz-dir" not in kinds and math.isqrt(k) ** 2 == k
    if first_boxes is None and image_grid:
        backend += f"/grid{math.isqrt(k)}"
    writer = FeatureStoreWriter(out_dir, ids, k, dim, dtype=dtype, backend=backend)
    if writer.complete:
        return writer.finalize()
    from tqdm.auto import tqdm

    bar = tqdm(total=len(ids), initial=writer.done, disable=not progress, unit="img", desc="import")
    feats_buf: list[np.ndarray] = []
    boxes_buf: list[np.ndarray] = []
    default_boxes = grid_boxes(math.isqrt(k)) if image_grid else np.zeros((k, 4), dtype=np.float32)
    try:
        for image_id, feats, boxes in _iter_rows(opened, writer.done):
            where = f"{origin[image_id]} ({image_id})"
            if feats.shape[1] != dim:
                raise DataError(f"{where}: features have dim {feats.shape[1]}, the store has {dim}")
            if frames is not None:
                feats = resize_frames(feats, frames)
                boxes = None if boxes is None else resize_frames(boxes, frames)
            elif feats.shape[0] != k:
                raise DataError(
                    f"{where}: {feats.shape[0]} feature tokens, the store has {k} per image "
                    "(use --frames N to resample every item to N)"
                )
            feats_buf.append(feats)
            boxes_buf.append(default_boxes if boxes is None else boxes)
            if len(feats_buf) == chunk:
                writer.write(np.stack(feats_buf), np.stack(boxes_buf))
                bar.update(len(feats_buf))
                feats_buf, boxes_buf = [], []
        if feats_buf:
            writer.write(np.stack(feats_buf), np.stack(boxes_buf))
            bar.update(len(feats_buf))
    finally:
        bar.close()
        if writer.done != len(ids):
            writer.close()
    return writer.finalize()


# ----------------------------------------------------------------------------- CLI


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``adapterkit import-features``."""
    p = subparsers.add_parser(
        "import-features",
        help="import the reference's released HDF5 / npz visual features into a feature store",
        description="Import VL-T5 / VL_adapter feature files (one HDF5 file with a group per image id, "
        "a folder of per-image .h5 files, or a folder of per-video .npz files) into one memory-mapped "
        "feature store. Give --h5 several times to put several sources into one store.",
    )
    p.add_argument(
        "--h5",
        action="append",
        required=True,
        metavar="PATH",
        help="an .h5 file, or a folder of <id>.h5 / <id>.npz files (repeatable)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output feature store folder")
    p.add_argument(
        "--frames", type=positive_int, default=None, help="resample every item to N tokens (video: 64, as the reference)"
    )
    p.add_argument("--dtype", default="auto", choices=["auto", "float16", "float32"])
    p.add_argument(
        "--duplicates",
        default="error",
        choices=["error", "first"],
        help="an id in two sources: stop (default) or keep the first source's",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``adapterkit import-features``; returns the exit status."""
    start = time.perf_counter()
    store = import_features(
        args.h5, args.out, frames=args.frames, dtype=args.dtype, progress=not args.no_progress,
        duplicates=args.duplicates,
    )
    print(
        f"feature store {store.path}: {len(store)} items x {store.num_boxes} tokens x {store.dim} dims "
        f"({store.features.dtype}), {store.backend}; {time.perf_counter() - start:.1f} s"
    )
    return 0
