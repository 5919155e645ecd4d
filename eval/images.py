"""Images in, uint8 NCHW batches out: the one [-1, 1] -> uint8 conversion, image folders and .npz files.

Every image that reaches the Inception network or SWD (references, generated samples, reconstructions)
is a ``uint8`` tensor ``(B, 3, H, W)``. Float images in [-1, 1] are converted by ``checked_uint8``: the
data package's conversion behind input checks, so references and samples are quantized identically.
Files are decoded with the data package's ``load_rgb`` (the loader the reference images went through:
EXIF orientation applied, alpha composited on white, grey and palette images expanded to RGB); nothing
is ever resized here: an image whose size differs from the expected resolution is an error, because a
silent resize would change FID.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from data.images import IMAGE_EXTENSIONS, is_image_name
from data.transforms import to_float, to_uint8
from eval.errors import ImageInputError

NPZ_KEY = "images"  # preferred array name inside an .npz; a file holding a single array also works


def checked_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] -> uint8 [0, 255] by ``data.to_uint8`` (``round((x + 1) * 127.5)``,
    clamped), after checking what scoring must not accept silently. Any shape."""
    if not torch.is_floating_point(x):
        raise ImageInputError(f"checked_uint8 expects float images in [-1, 1], got dtype {x.dtype}")
    if not torch.isfinite(x).all():  # NaN would silently become 0 (black) after the cast
        raise ImageInputError("images contain NaN or inf values (a diverged model?)")
    return to_uint8(x)


def checked_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1] by ``data.to_float``, the exact inverse of ``checked_uint8`` on the uint8 grid."""
    if x.dtype != torch.uint8:
        raise ImageInputError(f"checked_float expects uint8 images, got dtype {x.dtype}")
    return to_float(x)


def as_uint8_nchw(x: torch.Tensor | np.ndarray, what: str = "images") -> torch.Tensor:
    """Check and return a uint8 batch as a contiguous ``(B, 3, H, W)`` tensor; NHWC is transposed.

    Float batches are refused rather than guessed at (``[0, 1]`` and ``[-1, 1]`` both exist): convert
    them with ``checked_uint8`` first.
    """
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise ImageInputError(f"{what}: expected a uint8 tensor or array, got {type(x).__name__}")
    if x.dtype != torch.uint8:
        raise ImageInputError(f"{what}: expected dtype uint8, got {x.dtype} "
                              f"(convert [-1, 1] floats with eval.images.checked_uint8)")
    if x.dim() != 4:
        raise ImageInputError(f"{what}: expected 4 dims (B, 3, H, W) or (B, H, W, 3), got shape {tuple(x.shape)}")
    if x.shape[1] == 3:
        return x.contiguous()
    if x.shape[-1] == 3:
        return x.permute(0, 3, 1, 2).contiguous()  # (B, H, W, 3) -> (B, 3, H, W)
    raise ImageInputError(f"{what}: no axis of size 3 for RGB channels (dim 1 or last), shape {tuple(x.shape)}")


def with_progress(batches: Iterable[torch.Tensor], total: int | None, desc: str,
                  enabled: bool) -> Iterator[torch.Tensor]:
    """Pass batches through, counting images (not batches) on a tqdm bar when ``enabled``."""
    with tqdm(total=total, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True) as bar:
        for batch in batches:
            yield batch
            bar.update(len(batch))


def list_image_files(folder: str | os.PathLike) -> list[Path]:
    """Image files (data.IMAGE_EXTENSIONS, as the datasets read) directly inside ``folder`` (not recursive),
    sorted by name; never empty."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageInputError(f"image folder {folder} does not exist or is not a directory")
    files = sorted(p for p in folder.iterdir() if is_image_name(p.name) and p.is_file())
    if not files:
        raise ImageInputError(f"image folder {folder} holds no {'/'.join(sorted(IMAGE_EXTENSIONS))} files")
    return files


def _load_uint8(path: Path, size: tuple[int, int], resize: bool = False) -> torch.Tensor:
    """Decode one file to uint8 (3, H, W), refusing any size other than ``size`` = (H, W); with ``resize``,
    centre-cropped to a square and resized to ``size`` as the training images are (data.preprocess_uint8)."""
    from data.images import BadImageError, load_rgb  # the reference images' own loader

    try:
        img = load_rgb(path)
    except BadImageError as e:
        raise ImageInputError(str(e)) from None
    if resize:
        from data import preprocess_uint8

        return preprocess_uint8(img, size[0], None)
    if (img.height, img.width) != size:
        raise ImageInputError(
            f"{path}: image is {img.width}x{img.height}, expected {size[1]}x{size[0]} "
            f"(images are never resized for scoring; regenerate them at the reference resolution)")
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, H, W)


def _header_size(path: Path) -> tuple[int, int]:
    """(H, W) from the file header, without decoding pixels."""
    try:
        with Image.open(path) as img:
            width, height = img.size
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
        raise ImageInputError(f"{path}: cannot read image header ({type(e).__name__}: {e})") from None
    return height, width


@dataclass
class ImageSet:
    """A folder of image files or an in-memory uint8 array, with its count and size known up front."""

    kind: str  # "folder" or "npz"
    path: str
    count: int
    height: int
    width: int
    files: list[Path] | None = None
    array: np.ndarray | None = None  # (N, 3, H, W) uint8 (a view; NHWC files are transposed lazily)
    resize: bool = False  # files of any size, centre-cropped and resized to height x width when read

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Yield uint8 ``(B, 3, H, W)`` batches in file (sorted name) or array order."""
        for start in range(0, self.count, batch_size):
            if self.array is not None:
                yield torch.from_numpy(np.ascontiguousarray(self.array[start:start + batch_size]))
            else:
                chunk = self.files[start:start + batch_size]
                yield torch.stack([_load_uint8(p, (self.height, self.width), self.resize) for p in chunk])

    def describe(self) -> dict:
        return {"kind": self.kind, "path": self.path, "count": self.count,
                "resolution": [self.height, self.width],
                **({"preprocessing": RESIZE_DESCRIPTION} if self.resize else {})}


RESIZE_DESCRIPTION = "centre crop to a square, bicubic antialiased resize (data.preprocess_uint8, as the training images)"


def open_folder(folder: str | os.PathLike, resolution: int | None = None) -> ImageSet:
    """An image folder. Expected size: ``resolution`` x ``resolution``, else the first file's size."""
    files = list_image_files(folder)
    # Headers only (fast), so a wrong-size folder fails before minutes of feature extraction.
    sizes = [_header_size(p) for p in files]
    height, width = (int(resolution), int(resolution)) if resolution is not None else sizes[0]
    for p, size in zip(files, sizes):
        if size != (height, width):
            raise ImageInputError(
                f"{p}: image is {size[1]}x{size[0]}, expected {width}x{height} "
                f"(images are never resized for scoring; regenerate them at the reference resolution)")
    return ImageSet("folder", str(Path(folder).resolve()), len(files), height, width, files=files)


def open_npz(path: str | os.PathLike, resolution: int | None = None) -> ImageSet:
    """An ``.npz`` holding uint8 images, NHWC or NCHW, under key ``images`` or as its only array."""
    path = Path(path)
    if not path.is_file():
        raise ImageInputError(f"{path}: file not found")
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = list(f.keys())
            if NPZ_KEY in keys:
                key = NPZ_KEY
            elif len(keys) == 1:
                key = keys[0]
            else:
                raise ImageInputError(f"{path}: expected an array named '{NPZ_KEY}' or a single array, found {keys}")
            arr = f[key]
    except ImageInputError:
        raise
    except Exception as e:  # noqa: BLE001 - zip/pickle/format errors
        raise ImageInputError(f"{path}: cannot read as .npz ({type(e).__name__}: {e})") from None
    if arr.dtype != np.uint8:
        raise ImageInputError(f"{path}: array '{key}' has dtype {arr.dtype}, expected uint8 images in [0, 255]")
    if arr.ndim != 4 or 3 not in (arr.shape[1], arr.shape[3]):
        raise ImageInputError(f"{path}: array '{key}' has shape {arr.shape}, expected (N, H, W, 3) or (N, 3, H, W)")
    if arr.shape[0] == 0:
        raise ImageInputError(f"{path}: array '{key}' holds no images")
    if arr.shape[1] != 3:
        arr = arr.transpose(0, 3, 1, 2)  # (N, H, W, 3) -> (N, 3, H, W), a view
    _, _, height, width = arr.shape
    if resolution is not None and (height, width) != (resolution, resolution):
        raise ImageInputError(f"{path}: images are {width}x{height}, expected {resolution}x{resolution} "
                              f"(images are never resized for scoring)")
    return ImageSet("npz", str(path.resolve()), int(arr.shape[0]), int(height), int(width), array=arr)


def open_images(path: str | os.PathLike, resolution: int | None = None, resize: bool = False) -> ImageSet:
    """A folder of PNG/JPG files or an ``.npz`` file, decided by what ``path`` is. ``resize``: a folder of
    images of any size, read centre-cropped and resized to ``resolution`` (real photos as a reference)."""
    path = Path(path)
    if resize:
        if not path.is_dir() or resolution is None:
            raise ImageInputError(f"{path}: resizing reference images needs a folder of images and a resolution")
        files = list_image_files(path)
        return ImageSet("folder", str(path.resolve()), len(files), int(resolution), int(resolution), files=files,
                        resize=True)
    if path.is_dir():
        return open_folder(path, resolution)
    if path.suffix.lower() == ".npz":
        return open_npz(path, resolution)
    raise ImageInputError(f"{path}: expected a folder of PNG/JPG images or an .npz file")
