"""Debian's openclipart: real clip-art images with human-written titles and descriptions.

Install: ``apt-get install -y openclipart-png openclipart-svg`` (PNGs under
``/usr/share/openclipart/png``, the SVGs with the Dublin-Core metadata under ``.../svg``).
8,121 PNG paths, of which 1,221 are symlinks into another category folder: the same
picture filed under two categories. :func:`load_openclipart` keeps one record per real
file (6,900) with every top-level category it is filed under, its ``dc:title`` and
``dc:description`` (the work's own, not the publisher's).

The PNG package has no metadata, the SVG package no rasters; both are needed for pairs.
"""

from __future__ import annotations

import html
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from adapterkit.errors import DataError

__all__ = ["OPENCLIPART_ROOT", "ClipArt", "clipart_texts", "load_openclipart", "read_clipart_image"]

OPENCLIPART_ROOT = "/usr/share/openclipart"
_INSTALL = "install it with: apt-get install -y openclipart-png openclipart-svg"
_WORK = re.compile(r"<cc:Work\b.*?</cc:Work>", re.S)
_TITLE = re.compile(r"<dc:title>(.*?)</dc:title>", re.S)
_DESC = re.compile(r"<dc:description>(.*?)</dc:description>", re.S)
_AGENT = re.compile(r"<cc:Agent\b.*?</cc:Agent>", re.S)


@dataclass
class ClipArt:
    """One picture: ``id`` is its real PNG path relative to the png folder, without ``.png``."""

    id: str
    png: Path
    svg: Path | None
    categories: tuple[str, ...]
    title: str = ""
    description: str = ""
    folders: tuple[str, ...] = field(default_factory=tuple)

    @property
    def category(self) -> str:
        """The top-level category of the real file (the folder the picture itself lives in)."""
        return self.id.split("/", 1)[0]


def _clean(text: str) -> str:
    text = html.unescape(re.sub(r"<[^>]+>", " ", text))
    return re.sub(r"\s+", " ", text).strip()


def _metadata(svg: Path) -> tuple[str, str]:
    try:
        with open(svg, "rb") as fh:
            head = fh.read(200_000).decode("utf-8", errors="replace")
    except OSError:
        return "", ""
    work = _WORK.search(head)
    if work is None:
        return "", ""
    body = _AGENT.sub(" ", work.group(0))  # drop publisher / creator agents' titles
    t, d = _TITLE.search(body), _DESC.search(body)
    return (_clean(t.group(1)) if t else "", _clean(d.group(1)) if d else "")


def _pixels(path: Path) -> int:
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:  # lazy: reads the header only
                return im.size[0] * im.size[1]
    except (OSError, ValueError, Image.DecompressionBombError):
        return -1


def load_openclipart(root: str | os.PathLike = OPENCLIPART_ROOT, max_pixels: int = 40_000_000) -> list[ClipArt]:
    """All pictures under ``root/png`` (one per real file), with categories, title, description.

    Pictures whose PNG is unreadable or larger than ``max_pixels`` are left out (one file
    of the Debian package is 231 megapixels). Raises DataError naming the folder and the
    install command when it is missing.
    """
    root = Path(root)
    png_root, svg_root = root / "png", root / "svg"
    if not png_root.is_dir():
        raise DataError(f"openclipart folder not found: {png_root}; {_INSTALL}")
    if not svg_root.is_dir():
        raise DataError(f"openclipart SVG folder (titles and descriptions) not found: {svg_root}; {_INSTALL}")
    real_root = png_root.resolve()
    by_real: dict[str, dict] = {}
    for dirpath, _dirs, files in os.walk(png_root, followlinks=False):
        for name in files:
            if not name.endswith(".png"):
                continue
            p = Path(dirpath) / name
            real = p.resolve()
            try:
                rid = real.relative_to(real_root).with_suffix("").as_posix()
            except ValueError:  # a link pointing outside the folder
                continue
            entry = by_real.setdefault(rid, {"png": real, "folders": set()})
            entry["folders"].add(p.relative_to(png_root).parent.as_posix())
    if not by_real:
        raise DataError(f"no PNG files under {png_root}; {_INSTALL}")
    out = []
    for rid in sorted(by_real):
        e = by_real[rid]
        if not 0 < _pixels(e["png"]) <= max_pixels:
            continue
        svg = svg_root / f"{rid}.svg"
        title, desc = _metadata(svg) if svg.is_file() else ("", "")
        folders = tuple(sorted(e["folders"]))
        cats = tuple(sorted({f.split("/", 1)[0] for f in folders}))
        out.append(ClipArt(rid, e["png"], svg if svg.is_file() else None, cats, title, desc, folders))
    return out


def clipart_texts(item: ClipArt) -> list[str]:
    """The text views of a picture: its title, its description, and both joined (when they differ)."""
    views = [v for v in (item.title, item.description) if v]
    if item.title and item.description and item.description.lower() != item.title.lower():
        views.append(f"{item.title}. {item.description}")
    return list(dict.fromkeys(views))


def read_clipart_image(path: str | os.PathLike, size: int = 224) -> np.ndarray:
    """A PNG as a (size, size, 3) uint8 array: transparency composited on white, aspect kept, padded white."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.draft("RGB", (size, size))
            im = im.convert("RGBA")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image {path}: {e}") from None
    scale = size / max(im.size)
    new = (max(1, round(im.size[0] * scale)), max(1, round(im.size[1] * scale)))
    im = im.resize(new, Image.Resampling.BICUBIC)
    canvas = Image.new("RGBA", (size, size), (255, 255, 255, 255))
    canvas.alpha_composite(im, ((size - new[0]) // 2, (size - new[1]) // 2))
    return np.asarray(canvas.convert("RGB"))


def titled(items: Sequence[ClipArt]) -> list[ClipArt]:
    """The pictures that have at least one text (title or description)."""
    return [it for it in items if it.title or it.description]
