"""Image data readers: IDX files (MNIST / Fashion-MNIST) and class-per-folder image trees.

Both return uint8 tensors (N, C, H, W) and int64 labels; class subsets are remapped to
0..k-1 in the order given (so "classes 5-9" become labels 0-4).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from adapterkit.errors import DataError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed): magic 0,0,dtype,ndim; big-endian int32 dims."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"IDX file not found: {p}")
    raw = p.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"{p} is a corrupt gzip file: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{p} is not an IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise DataError(f"{p} is truncated (header)")
    dims = tuple(int(v) for v in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    need = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - head != need:
        raise DataError(f"{p} holds {len(raw) - head} data bytes, the header {dims} needs {need}")
    return np.frombuffer(raw, dtype=dtype, offset=head).reshape(dims).astype(dtype.newbyteorder("="))


def load_fashion_mnist(root: str | Path = FASHION_MNIST_DIR, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Images uint8 (N, 1, 28, 28) and labels int64 of the train or test split."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise DataError(f'Fashion-MNIST split must be "train" or "test", got "{split}"')
    root = Path(root)

    def find(stem: str) -> Path:
        for name in (f"{stem}.gz", stem):
            if (root / name).is_file():
                return root / name
        raise DataError(f"{root / (stem + '.gz')} not found (install the Debian package dataset-fashion-mnist)")

    images = read_idx(find(f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(find(f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"Fashion-MNIST {split}: images {images.shape} and labels {labels.shape} do not match")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def load_image_folder(root: str | Path, image_size: int, classes: list[str] | None = None,
                      channels: int = 3) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Read ``root/<class>/*.<img>``; resize to ``image_size``; return (uint8 N,C,S,S), labels, class names."""
    from PIL import Image, UnidentifiedImageError

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    names = classes or sorted(d.name for d in root.iterdir() if d.is_dir())
    if not names:
        raise DataError(f"{root} has no class sub-folders")
    mode = "RGB" if channels == 3 else "L"
    imgs, labels = [], []
    for ci, name in enumerate(names):
        folder = root / name
        if not folder.is_dir():
            raise DataError(f"class folder not found: {folder}")
        for f in sorted(folder.iterdir()):
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(f) as im:
                    im = im.convert(mode).resize((image_size, image_size), Image.BILINEAR)
                    a = np.asarray(im, dtype=np.uint8)
            except (UnidentifiedImageError, OSError) as e:
                raise DataError(f"cannot read image {f}: {e}") from None
            imgs.append(a if a.ndim == 3 else a[:, :, None])
            labels.append(ci)
    if not imgs:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor(labels, dtype=torch.long), list(names)


def select_classes(x: torch.Tensor, y: torch.Tensor, classes: list[int] | None, per_class: int | None,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep ``classes`` (remapped to 0..k-1 in the given order) and at most ``per_class`` random
    examples of each."""
    if classes is None:
        classes = sorted(int(c) for c in torch.unique(y))
    lut = torch.full((int(y.max()) + 1 if len(y) else 1,), -1, dtype=torch.long)
    for i, c in enumerate(classes):
        if not 0 <= c < len(lut):
            raise DataError(f"class {c} does not occur in the data (labels 0..{len(lut) - 1})")
        lut[c] = i
    new = lut[y]
    keep = new >= 0
    g = torch.Generator().manual_seed(seed)
    idx = torch.nonzero(keep).squeeze(1)
    idx = idx[torch.randperm(len(idx), generator=g)]
    if per_class is not None:
        lab = new[idx]
        # rank of each example within its class (vectorised): stable sort by label
        order = torch.argsort(lab, stable=True)
        sorted_lab = lab[order]
        first = torch.searchsorted(sorted_lab, sorted_lab, right=False)
        rank = torch.arange(len(order)) - first
        idx = idx[order[rank < per_class]]
        idx = idx[torch.randperm(len(idx), generator=g)]
    return x[idx], new[idx]
