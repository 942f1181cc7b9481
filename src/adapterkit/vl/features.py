"""Memory-mapped visual feature stores and the resumable feature extractor.

A store is a directory::

    features.npy    (N, K, D) float16 by default, written with open_memmap
    boxes.npy       (N, K, 4) float32 normalised x1, y1, x2, y2 (grid cells)
    index.json      {"ids", "num_boxes", "dim", "dtype", "backend", "complete", "version",
                     "extracted_with": [{"from_row", "torch", "threads", "cpu"}, ...]}
    progress.json   {"done": n}, rewritten atomically after every chunk

Readers memory-map the arrays, so a store is never loaded whole into RAM; a
batch is one fancy-index (`FeatureStore.gather`). The writer fills rows in
order and records progress after each flushed chunk, so an interrupted
extraction resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib.format import open_memmap

from adapterkit.cli.argtypes import positive_int
from adapterkit.errors import ConfigError, DataError, did_you_mean
from adapterkit.safeio import atomic_write_text

__all__ = [
    "FeatureStore",
    "FeatureStoreWriter",
    "ImageFolder",
    "extract_features",
    "load_image_folder",
    "parse_backend_description",
    "add_parser",
    "run",
]

STORE_VERSION = 1
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def _atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=None, separators=(",", ":")) + "\n")


def _read_json(path: Path, what: str) -> dict:
    from adapterkit.safeio import read_json_file

    if not path.is_file():
        raise DataError(f"{what}: {path} is missing")
    try:
        data = read_json_file(path, what="it", error=DataError)
    except DataError as exc:
        raise DataError(f"{what}: {path} is corrupt ({exc})") from None
    if not isinstance(data, dict):
        raise DataError(f"{what}: {path} must hold a JSON object")
    return data


# ----------------------------------------------------------------------------- reading


class FeatureStore:
    """A read-only, memory-mapped feature store (see the module docstring)."""

    def __init__(self, path: Path, index: dict, features: np.ndarray, boxes: np.ndarray) -> None:
        self.path = path
        self.index = index
        self._ids: list[str] = list(index["ids"])
        self._rows = {image_id: i for i, image_id in enumerate(self._ids)}
        self._features = features
        self._boxes = boxes

    @classmethod
    def open(cls, path: str | os.PathLike) -> FeatureStore:
        """Open a complete store; DataError naming the path when it is missing,
        incomplete or corrupt."""
        path = Path(path)
        if not path.is_dir():
            raise DataError(
                f"feature store not found: {path} (create it with `adapterkit extract-features --out {path}`)"
            )
        index = _read_json(path / "index.json", "feature store")
        for key in ("ids", "num_boxes", "dim", "dtype", "complete"):
            if key not in index:
                raise DataError(f'feature store {path}: index.json lacks "{key}"')
        from adapterkit.vl.datasets.validate import check_store_index

        check_store_index(index, f"feature store {path}: index.json")
        n = len(index["ids"])
        if not index["complete"]:
            done = "?"
            try:
                done = _read_json(path / "progress.json", "feature store").get("done", "?")
            except DataError:
                pass
            raise DataError(
                f"feature store {path} is incomplete ({done}/{n} images extracted); "
                "rerun extract-features with the same arguments to resume it"
            )
        features = cls._load_array(
            path / "features.npy", (n, index["num_boxes"], index["dim"]), index["dtype"]
        )
        boxes = cls._load_array(path / "boxes.npy", (n, index["num_boxes"], 4), "float32")
        return cls(path, index, features, boxes)

    @staticmethod
    def _load_array(file: Path, shape: tuple[int, ...], dtype: str) -> np.ndarray:
        try:
            arr = np.load(file, mmap_mode="r")
        except FileNotFoundError:
            raise DataError(f"feature store: {file} is missing") from None
        except (ValueError, OSError) as exc:
            raise DataError(f"feature store: {file} is corrupt ({exc})") from None
        if tuple(arr.shape) != tuple(shape) or arr.dtype != np.dtype(dtype):
            raise DataError(
                f"feature store: {file} has shape {tuple(arr.shape)} {arr.dtype}, "
                f"index.json says {tuple(shape)} {dtype}"
            )
        return arr

    @property
    def ids(self) -> list[str]:
        """Image ids in row order."""
        return self._ids

    @property
    def extracted_with(self) -> list[dict]:
        """Who computed the rows: [{"from_row", "torch", "threads", "cpu"}, ...], one entry per
        change of environment (a resume in another one adds one); [] for a store written before
        adapterkit recorded it."""
        return _provenance_list(self.index.get("extracted_with"))

    @property
    def num_boxes(self) -> int:
        """Visual tokens per image (K)."""
        return int(self.index["num_boxes"])

    @property
    def dim(self) -> int:
        """Feature dimension (D)."""
        return int(self.index["dim"])

    @property
    def backend(self) -> str:
        """The backend description recorded at extraction."""
        return str(self.index.get("backend", ""))

    @property
    def features(self) -> np.ndarray:
        """The (N, K, D) read-only memmap."""
        return self._features

    @property
    def boxes(self) -> np.ndarray:
        """The (N, K, 4) read-only memmap."""
        return self._boxes

    def row(self, image_id: str) -> int:
        """Row of `image_id`; DataError (with a suggestion) when unknown."""
        try:
            return self._rows[image_id]
        except KeyError:
            raise DataError(
                f"image id {image_id!r} is not in feature store {self.path}{did_you_mean(image_id, self._ids)}"
            ) from None

    def rows(self, image_ids: Sequence[str]) -> np.ndarray:
        """Rows of several ids as an int64 array."""
        return np.fromiter((self.row(i) for i in image_ids), dtype=np.int64, count=len(image_ids))

    def get(self, image_id: str) -> tuple[np.ndarray, np.ndarray]:
        """Features (K, D) and boxes (K, 4) of one image, copied out of the memmap."""
        r = self.row(image_id)
        return np.array(self._features[r]), np.array(self._boxes[r])

    def gather(self, image_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Features (B, K, D) and boxes (B, K, 4) of several images, one fancy-index each."""
        rows = self.rows(image_ids)
        return self._features[rows], self._boxes[rows]

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._rows

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, n={len(self)}, K={self.num_boxes}, D={self.dim})"


# ----------------------------------------------------------------------------- writing


def extraction_environment() -> dict:
    """What decides a feature's last bits besides the images and the backend: the torch version,
    its intra-op thread count and the processor (model name and vector ISA; on a GPU its name)."""
    import torch

    from adapterkit.engine.engine import cpu_name

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else cpu_name()
    return {"torch": torch.__version__, "threads": int(torch.get_num_threads()), "cpu": device}


def _provenance_list(value) -> list[dict]:
    """A stored ``extracted_with`` (absent in stores written before it was recorded: [])."""
    return [dict(v) for v in value if isinstance(v, dict)] if isinstance(value, list) else []


class FeatureStoreWriter:
    """Fill a store chunk by chunk; resumes a store started with the same ids.

    `done` is the number of rows already written (progress.json); `write`
    appends rows after them, flushes and records progress; `finalize` marks the
    store complete. A store started with different ids, shape or backend is
    refused with a DataError rather than mixed.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        ids: Sequence[str],
        num_boxes: int,
        dim: int,
        dtype: str = "float16",
        backend: str = "",
    ) -> None:
        self.path = Path(path)
        self.ids = [str(i) for i in ids]
        if len(set(self.ids)) != len(self.ids):
            seen: set[str] = set()
            dup = next(i for i in self.ids if i in seen or seen.add(i))
            raise DataError(f"feature store {self.path}: duplicate image id {dup!r}")
        if num_boxes < 1 or dim < 1:
            raise ConfigError(f"feature store needs num_boxes >= 1 and dim >= 1, got {num_boxes}, {dim}")
        try:
            self.dtype = np.dtype(dtype).name
        except TypeError:
            raise ConfigError(f"unknown feature dtype {dtype!r}") from None
        self.num_boxes, self.dim, self.backend = int(num_boxes), int(dim), str(backend)
        n = len(self.ids)
        self.path.mkdir(parents=True, exist_ok=True)
        self.done = 0
        self.complete = False
        existing = self._existing_index()
        if existing is not None:
            self._check_same(existing)
            resumable = self._open_existing(n)
            if resumable:
                self.complete = bool(existing.get("complete"))
                progress = self._progress()
                self.done = n if self.complete else min(progress, n)
                self._extracted_with = _provenance_list(existing.get("extracted_with"))
                if not self.complete:  # the rows from here on come from this process
                    self._note_provenance(self.done)
                self._index = self._make_index(complete=self.complete)
                return
        self._extracted_with: list[dict] = []
        self._note_provenance(0)
        self._index = self._make_index(complete=False)
        _atomic_write_json(self.path / "progress.json", {"done": 0})
        _atomic_write_json(self.path / "index.json", self._index)
        self._features = open_memmap(
            self.path / "features.npy", mode="w+", dtype=self.dtype, shape=(n, self.num_boxes, self.dim)
        )
        self._boxes = open_memmap(
            self.path / "boxes.npy", mode="w+", dtype=np.float32, shape=(n, self.num_boxes, 4)
        )

    def _make_index(self, complete: bool) -> dict:
        return {
            "ids": self.ids,
            "num_boxes": self.num_boxes,
            "dim": self.dim,
            "dtype": self.dtype,
            "backend": self.backend,
            "complete": complete,
            "version": STORE_VERSION,
            "extracted_with": self._extracted_with,
        }

    def _note_provenance(self, from_row: int) -> None:
        """Record what computes the rows from ``from_row`` on. The same images give other last
        bits with another torch thread count or CPU (oneDNN splits its sums by thread; on
        FashionVL 0.3% of the fp16 values differ between 1 and 2 threads), and a run trained on
        them moves by up to a few points: two stores can be compared by this record."""
        here = extraction_environment()
        prev = self._extracted_with[-1] if self._extracted_with else None
        if prev is None or {k: v for k, v in prev.items() if k != "from_row"} != here:
            self._extracted_with.append({"from_row": int(from_row), **here})

    def _existing_index(self) -> dict | None:
        file = self.path / "index.json"
        if not file.exists():
            return None
        try:
            return _read_json(file, "feature store")
        except DataError:
            return None  # a broken index of an unfinished run: start over

    def _check_same(self, existing: dict) -> None:
        old_ids = existing.get("ids")
        if old_ids != self.ids:
            detail = ""
            if isinstance(old_ids, list):
                diff = next(
                    (i for i, (a, b) in enumerate(zip(old_ids, self.ids)) if a != b),
                    min(len(old_ids), len(self.ids)),
                )
                detail = f" ({len(old_ids)} stored vs {len(self.ids)} requested ids, first difference at row {diff})"
            raise DataError(
                f"feature store {self.path} was started with different image ids{detail}; "
                "use another output folder or delete this one"
            )
        for key in ("num_boxes", "dim", "dtype", "backend"):
            if existing.get(key) != getattr(self, key):
                raise DataError(
                    f"feature store {self.path} was started with {key}={existing.get(key)!r}, "
                    f"now {key}={getattr(self, key)!r}; use another output folder or delete this one"
                )

    def _open_existing(self, n: int) -> bool:
        try:
            self._features = open_memmap(self.path / "features.npy", mode="r+")
            self._boxes = open_memmap(self.path / "boxes.npy", mode="r+")
        except (FileNotFoundError, ValueError, OSError):
            return False
        if self._features.shape != (n, self.num_boxes, self.dim) or self._features.dtype != self.dtype:
            return False
        if self._boxes.shape != (n, self.num_boxes, 4):
            return False
        return True

    def _progress(self) -> int:
        try:
            done = _read_json(self.path / "progress.json", "feature store").get("done", 0)
        except DataError:
            return 0
        return int(done) if isinstance(done, int) and done >= 0 else 0

    @property
    def remaining_ids(self) -> list[str]:
        """Ids still to extract, in order."""
        return self.ids[self.done :]

    def write(self, features: np.ndarray, boxes: np.ndarray) -> None:
        """Write the next rows (n, K, D) / (n, K, 4), flush, record progress."""
        if self.complete:
            raise DataError(f"feature store {self.path} is already complete")
        features = np.asarray(features)
        boxes = np.asarray(boxes, dtype=np.float32)
        n = features.shape[0]
        if features.shape[1:] != (self.num_boxes, self.dim):
            raise DataError(
                f"feature store {self.path}: chunk has shape {features.shape[1:]}, "
                f"expected ({self.num_boxes}, {self.dim})"
            )
        if boxes.shape != (n, self.num_boxes, 4):
            raise DataError(
                f"feature store {self.path}: boxes have shape {boxes.shape}, expected ({n}, {self.num_boxes}, 4)"
            )
        if self.done + n > len(self.ids):
            raise DataError(f"feature store {self.path}: more rows written than its {len(self.ids)} ids")
        if self.dtype == "float16":
            features = np.clip(features, -65504.0, 65504.0)
        self._features[self.done : self.done + n] = features
        self._boxes[self.done : self.done + n] = boxes
        self._features.flush()
        self._boxes.flush()
        self.done += n
        _atomic_write_json(self.path / "progress.json", {"done": self.done})

    def finalize(self) -> FeatureStore:
        """Mark the store complete (every row written) and open it for reading."""
        if not self.complete:
            if self.done != len(self.ids):
                raise DataError(
                    f"feature store {self.path}: only {self.done}/{len(self.ids)} rows written; cannot finalize"
                )
            self._features.flush()
            self._boxes.flush()
            self._index = self._make_index(complete=True)
            _atomic_write_json(self.path / "index.json", self._index)
            self.complete = True
        self.close()
        return FeatureStore.open(self.path)

    def close(self) -> None:
        """Release the memmaps (the store stays resumable)."""
        for name in ("_features", "_boxes"):
            arr = getattr(self, name, None)
            if arr is not None:
                arr.flush()
                setattr(self, name, None)


# ----------------------------------------------------------------------------- image sources


class ImageFolder(Sequence):
    """A lazy sequence of (id, uint8 array) over the images of a folder tree; the
    id is the relative path without its extension (POSIX separators)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise DataError(f"image folder not found: {self.folder}")
        files = sorted(
            p for p in self.folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not files:
            raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {self.folder}")
        self.files = files
        self.ids = [p.relative_to(self.folder).with_suffix("").as_posix() for p in files]
        seen: dict[str, Path] = {}
        for image_id, p in zip(self.ids, files):
            if image_id in seen:
                raise DataError(f"two images share the id {image_id!r}: {seen[image_id]} and {p}")
            seen[image_id] = p

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        from PIL import Image, UnidentifiedImageError

        path = self.files[i]
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("L" if im.mode in ("L", "I;16", "1") else "RGB"))
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"cannot read image {path}: {exc}") from None
        return self.ids[i], arr


def load_image_folder(folder: str | os.PathLike) -> ImageFolder:
    """Images of `folder` (jpg/jpeg/png/bmp/webp, recursively), loaded lazily."""
    return ImageFolder(folder)


# ----------------------------------------------------------------------------- extraction


def _batches(source: Any, start: int, batch_size: int) -> Iterator[list[tuple[str, Any]]]:
    """Batches of (id, image) from row `start` on, without materialising the source."""
    if isinstance(source, Sequence):
        for lo in range(start, len(source), batch_size):
            yield [source[i] for i in range(lo, min(lo + batch_size, len(source)))]
        return
    it = iter(source)
    for _ in range(start):
        next(it, None)
    batch: list[tuple[str, Any]] = []
    for item in it:
        batch.append(item)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


_DESCRIPTION = re.compile(r"^(?P<name>[^:@/]+)(?::(?P<source>[^@]+))?@(?P<resolution>\d+)/(?:grid(?P<grid>\d+)|pooled)$")


def parse_backend_description(desc: str) -> dict:
    """What a feature store's ``backend`` string records (``extract_features`` writes
    ``NAME[:SOURCE]@RESOLUTION/gridG`` or ``.../pooled``): {name, source, resolution, grid}, grid
    None for one pooled vector. Lets another extraction reproduce a store's features exactly."""
    m = _DESCRIPTION.match(desc or "")
    if m is None:
        raise DataError(f"feature store backend {desc!r} is not NAME[:SOURCE]@RESOLUTION/gridG or .../pooled "
                        "(a store written by another tool?)")
    return {"name": m["name"], "source": m["source"], "resolution": int(m["resolution"]),
            "grid": None if m["grid"] is None else int(m["grid"])}


def extract_features(
    images: Iterable[tuple[str, Any]] | Sequence[tuple[str, Any]],
    backend: Any,
    out_dir: str | os.PathLike,
    batch_size: int = 64,
    grid: int | None = 6,
    progress: bool = True,
    ids: Sequence[str] | None = None,
    dtype: str = "float16",
    **backend_kw: Any,
) -> FeatureStore:
    """Encode (id, image) pairs with a frozen backend into a feature store at `out_dir`.

    `backend` is a `VisionBackend` or a registry name (`backend_kw` go to it).
    `grid=g` stores g*g max-pooled grid tokens per image, `grid=None` one mean
    pooled vector. Rows already recorded in progress.json are skipped, so an
    interrupted run resumes. Ids come from `ids`, else `images.ids`, else the
    sequence itself; a one-shot iterator without `ids` is materialised first.
    Only one batch of features is in memory at a time.
    """
    from adapterkit.vl.backends import VisionBackend, get_backend, grid_boxes

    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(backend, str):
        backend = get_backend(backend, **backend_kw)
    if not isinstance(backend, VisionBackend):
        raise ConfigError(f"backend must be a VisionBackend or a backend name, got {type(backend).__name__}")
    if ids is None:
        ids = getattr(images, "ids", None)
    if ids is None:
        if not isinstance(images, Sequence):
            images = list(images)
        ids = [item[0] for item in images]
    ids = [str(i) for i in ids]
    if not ids:
        raise DataError(f"no images to extract features for ({out_dir})")
    num_boxes = 1 if grid is None else int(grid) ** 2
    dim = int(backend.dim)
    if dim <= 0:  # probe the backend once
        dim = int(backend.encode([np.zeros((8, 8), np.uint8)], grid=grid).shape[-1])
    desc = f"{backend.describe()}/{'pooled' if grid is None else f'grid{grid}'}"
    writer = FeatureStoreWriter(out_dir, ids, num_boxes, dim, dtype=dtype, backend=desc)
    if writer.complete:
        return writer.finalize()
    boxes = grid_boxes(grid)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(ids), initial=writer.done, disable=not progress, unit="img", desc="features")
    try:
        for batch in _batches(images, writer.done, batch_size):
            expected = ids[writer.done : writer.done + len(batch)]
            got = [str(item[0]) for item in batch]
            if got != expected:
                bad = next(
                    (i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected))
                )
                raise DataError(
                    f"image source does not match the ids of feature store {out_dir} at row "
                    f"{writer.done + bad}: got {got[bad] if bad < len(got) else None!r}, "
                    f"expected {expected[bad] if bad < len(expected) else None!r}"
                )
            feats = backend.encode([item[1] for item in batch], grid=grid).numpy()
            writer.write(feats, np.broadcast_to(boxes, (len(batch), num_boxes, 4)))
            bar.update(len(batch))
    finally:
        bar.close()
    if writer.done != len(ids):
        writer.close()
        raise DataError(f"image source ended after {writer.done} of {len(ids)} images ({out_dir})")
    return writer.finalize()


# ----------------------------------------------------------------------------- CLI


def _grid_arg(value: str) -> int | None:
    if value.lower() in ("none", "pooled", "0"):
        return None
    try:
        g = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--grid must be a positive integer or 'none', got {value!r}"
        ) from None
    if g < 1:
        raise argparse.ArgumentTypeError(f"--grid must be a positive integer or 'none', got {value!r}")
    return g


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``adapterkit extract-features``."""
    p = subparsers.add_parser(
        "extract-features",
        help="encode images with a frozen vision backbone into a memory-mapped feature store",
        description="Encode images with a frozen vision backbone into a memory-mapped, resumable "
        "feature store (features.npy, boxes.npy, index.json).",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", metavar="FOLDER", help="a folder of jpg/png/jpeg/bmp/webp images")
    src.add_argument(
        "--fashionvl", metavar="DIR", help="a FashionVL benchmark folder (adapterkit fashionvl build)"
    )
    p.add_argument(
        "--backend",
        default="efficientnet-lite0",
        help="efficientnet-lite0 | hf-clip-vision | hf-vision | clip-rn101",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output feature store folder")
    p.add_argument(
        "--grid",
        type=_grid_arg,
        default=6,
        help="pool to GRIDxGRID tokens, or 'none' for one pooled vector (default 6)",
    )
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument(
        "--resolution", type=positive_int, default=None, help="backend input resolution in pixels (e.g. 112 or 224)"
    )
    p.add_argument(
        "--model",
        default=None,
        help="hub id or local path of the vision model (hf-* backends; RN101 for clip-rn101)",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``adapterkit extract-features``; returns the exit status."""
    from adapterkit.vl.backends import get_backend

    if args.fashionvl:
        from adapterkit.vl.datasets.fashionvl import iter_fashionvl_images

        images: Any = iter_fashionvl_images(args.fashionvl)
    else:
        images = load_image_folder(args.images)
    backend = get_backend(args.backend, resolution=args.resolution, model=args.model, device=args.device)
    start = time.perf_counter()
    store = extract_features(
        images,
        backend,
        args.out,
        batch_size=args.batch_size,
        grid=args.grid,
        progress=not args.no_progress,
        dtype=args.dtype,
    )
    secs = time.perf_counter() - start
    print(
        f"feature store {store.path}: {len(store)} images x {store.num_boxes} tokens x {store.dim} dims "
        f"({store.features.dtype}), backend {store.backend}; {secs:.1f} s"
    )
    return 0
