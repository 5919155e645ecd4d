"""Robust image files: discovery in folders, and decoding any common file to an 8-bit RGB ``PIL.Image``.

Two kinds of failure, two exceptions:

* ``DataError`` (a ``ValueError``): the *dataset* is unusable (path missing, no images, bad annotation
  file, empty split). Raised while the dataset is built, before any model exists.
* ``BadImageError``: one *file* is unusable (zero bytes, truncated, not an image, decompression bomb).
  The dataset catches it, logs one line, and substitutes another image (see ``dataset.py``), so a bad
  file found at step 300k never kills a run.

Mode conversion choices (``to_rgb``):

* Alpha ('RGBA', 'LA', 'PA', 'P' or 'L'/'RGB' with a ``transparency`` key) is composited on **white**.
  Dropping alpha instead exposes whatever colour the encoder left under fully transparent pixels
  (often black or garbage); white is how such files are displayed almost everywhere.
* 16-bit and 32-bit integer grey ('I;16*', 'I') is scaled from the 16-bit range, ``round(v / 257)``,
  so 65535 -> 255 and mid-grey stays mid-grey; values outside [0, 65535] (rare 32-bit TIFFs) clip.
  Float grey ('F') is taken as [0, 1] when its maximum is <= 1, otherwise like 16-bit.
* CMYK, YCbCr, LAB, HSV, '1' and 'L' use Pillow's own conversion (CMYK without colour management).
* EXIF orientation is applied, so phone photos are upright; multi-frame files use their first frame.

``ImageFile.LOAD_TRUNCATED_IMAGES`` is left to the caller; with Pillow's default (False) a truncated
file raises ``BadImageError`` instead of loading as partly grey.
"""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from core.errors import UserError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})

# macOS archive debris, never images (AppleDouble "._x.jpg" files are caught by the dot rule).
_IGNORED_DIRS = frozenset({"__MACOSX"})


class DataError(UserError):
    """The dataset as a whole cannot be used; the one-line message says which path and why."""


class BadImageError(Exception):
    """One image file cannot be used. ``path`` and ``reason`` are kept for the skip record."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"bad image {self.path}: {reason}")

    def __reduce__(self):  # picklable across DataLoader worker processes
        return (BadImageError, (self.path, self.reason))


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _composite_on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _scale_to_8bit(img: Image.Image) -> Image.Image:
    """Grey with more than 8 bits ('I;16*', 'I', 'F') -> 8-bit RGB by scaling, never by clipping."""
    values = np.asarray(img).astype(np.float64)  # (H, W)
    if img.mode == "F" and values.size and np.nanmax(values) <= 1.0:
        values = values * 255.0
    else:
        values = values / 257.0  # 65535 / 255 = 257: full 16-bit scale onto full 8-bit scale
    values = np.nan_to_num(values, nan=0.0)
    grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a loaded image of any Pillow mode to 8-bit 'RGB' (rules in the module docstring)."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info:
        return _composite_on_white(img)
    if mode.startswith("I") or mode == "F":
        return _scale_to_8bit(img)
    if mode == "1":
        return img.convert("L").convert("RGB")
    return img.convert("RGB")  # 'L', 'P', 'CMYK', 'YCbCr', 'LAB', 'HSV'


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode ``path`` fully into an 8-bit RGB image, or raise ``BadImageError`` (one clear reason).

    Honours ``PIL.Image.MAX_IMAGE_PIXELS``: images over it are rejected as decompression bombs
    (Pillow only warns between 1x and 2x the limit; here both are errors).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise BadImageError(path, f"cannot read file ({e.strerror or type(e).__name__})") from None
    if size == 0:
        raise BadImageError(path, "empty file (0 bytes)")
    limit = Image.MAX_IMAGE_PIXELS
    try:
        with open(path, "rb") as f, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # Our own file object: Pillow does not close the image with it, so no copy is needed.
            img = Image.open(f)
            width, height = img.size
            if limit is not None and width * height > limit:
                raise Image.DecompressionBombError(f"Image size ({width * height} pixels)")
            img.load()
            img = ImageOps.exif_transpose(img)
            rgb = to_rgb(img)
            rgb.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        found = re.search(r"\((\d+) pixels\)", str(e))
        pixels = f"{found.group(1)} pixels" if found else _one_line(e, 120)
        raise BadImageError(path, f"decompression bomb: {pixels} > PIL.Image.MAX_IMAGE_PIXELS={limit}") from None
    except UnidentifiedImageError:
        raise BadImageError(path, f"not a recognised image format ({size} bytes)") from None
    except MemoryError:
        raise BadImageError(path, "out of memory while decoding") from None
    except Exception as e:  # noqa: BLE001 - decoders raise OSError, SyntaxError, EOFError, struct.error, ...
        raise BadImageError(path, f"cannot decode: {type(e).__name__}: {_one_line(e)}") from None
    if rgb.mode != "RGB":  # a Pillow mode the rules above do not cover: say so, do not guess
        raise BadImageError(path, f"unsupported image mode {rgb.mode!r}")
    return rgb


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) from the file header only; raises ``BadImageError``."""
    try:
        with Image.open(path) as img:
            return img.size
    except Exception as e:  # noqa: BLE001
        raise BadImageError(path, f"cannot read header: {type(e).__name__}: {_one_line(e)}") from None


def is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def find_images(root: str | os.PathLike) -> list[Path]:
    """All image files under ``root`` (recursive), sorted by their relative path's components.

    Extensions: jpg, jpeg, png, bmp, webp, tif, tiff, any case. Hidden entries (names starting with
    '.') and ``__MACOSX`` folders are ignored. Directory symlinks are followed, but each real directory
    is visited once, so symlink loops terminate and linked copies are not counted twice.
    Raises ``DataError`` when ``root`` is missing, not a folder, or holds no images.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"data path does not exist: {root}")
    if not root.is_dir():
        raise DataError(f"data path is not a folder: {root}")
    seen: set[tuple[int, int]] = set()
    found: list[tuple[tuple[str, ...], Path]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError:
            dirnames[:] = []
            continue
        key = (st.st_dev, st.st_ino)
        if key in seen:  # already visited through another path (symlink loop or duplicate link)
            dirnames[:] = []
            continue
        seen.add(key)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in _IGNORED_DIRS)
        rel = Path(dirpath).relative_to(root).parts
        for name in filenames:
            if is_image_name(name):
                found.append(((*rel, name), Path(dirpath, name)))
    if not found:
        exts = ", ".join(sorted(e[1:] for e in IMAGE_EXTENSIONS))
        raise DataError(f"no image files ({exts}) found under {root}")
    found.sort(key=lambda item: item[0])
    return [p for _, p in found]
