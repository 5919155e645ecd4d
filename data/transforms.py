"""CelebA-style preprocessing: center crop, antialiased resize, [-1, 1] tensors, optional flip.

The standard CelebA-64 recipe (docs/method.md section 6) works on the official 178x218 aligned images:
center crop 140x140, resize to 64x64 with antialiasing. ``crop`` is given in that 178-wide reference
frame and scales with the image, so the same setting works on the shared half-size copy:

    crop_px = round_half_up(crop * W / 178)      # 178x218 -> 140,  89x109 -> 70
    left    = (W - crop_px) // 2                 # 178x218 -> 19,   89x109 -> 9
    top     = (H - crop_px) // 2                 # 178x218 -> 39,   89x109 -> 19

Rounding: the side rounds half up (``floor(x + 0.5)``, not Python's round-half-to-even), and the
offsets round *down*, so a crop that cannot be exactly centred leans towards the top-left. This
gives the box (9, 19, 79, 89) on 89x109 stated in docs/method.md section 6; torchvision's ``center_crop`` would
round 9.5 / 19.5 up to (10, 20). A crop larger than the image's shorter side is clamped to it.

``crop=0`` or ``None``: no face crop; the largest centred square is taken (offsets again rounded
down) and resized. This equals "resize the shorter side, then center crop" up to one resampling.

Resizing is PIL bicubic with antialiasing (through ``torchvision.transforms.v2.functional``).
When the crop is smaller than the output resolution the image is upsampled; ``needs_upsampling``
lets the dataset count those cases.
"""
from __future__ import annotations

import math

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

REFERENCE_WIDTH = 178  # width of the official CelebA aligned images, the frame ``crop`` is given in


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def crop_side(width: int, height: int, crop: int | None) -> int:
    """Side in pixels of the square crop for an image of ``width`` x ``height``."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if crop is None or crop == 0:
        return min(width, height)
    if crop < 0:
        raise ValueError(f"crop must be >= 0 (0 or None: no crop), got {crop}")
    side = _round_half_up(crop * width / REFERENCE_WIDTH)
    return max(1, min(side, width, height))


def crop_box(width: int, height: int, crop: int | None) -> tuple[int, int, int, int]:
    """PIL box ``(left, top, right, bottom)`` of the centred square crop (offsets rounded down)."""
    side = crop_side(width, height, crop)
    left = (width - side) // 2
    top = (height - side) // 2
    return left, top, left + side, top + side


def needs_upsampling(width: int, height: int, resolution: int, crop: int | None) -> bool:
    """True when the crop has fewer pixels per side than the output, so resizing enlarges it."""
    return crop_side(width, height, crop) < resolution


def preprocess_uint8(img: Image.Image, resolution: int, crop: int | None) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor (3, resolution, resolution): centred crop, antialiased resize."""
    if img.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {img.mode!r} (use data.images.load_rgb)")
    if resolution <= 0:
        raise ValueError(f"resolution must be a positive integer, got {resolution}")
    left, top, right, bottom = crop_box(img.width, img.height, crop)
    img = TF.crop(img, top=top, left=left, height=bottom - top, width=right - left)
    img = TF.resize(img, [resolution, resolution], interpolation=InterpolationMode.BICUBIC, antialias=True)
    return TF.pil_to_tensor(img)  # (3, R, R) uint8


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1] (any leading shape)."""
    if x.dtype != torch.uint8:
        raise ValueError(f"expected a uint8 tensor, got {x.dtype}")
    return x.float().div_(127.5).sub_(1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255], rounded and clamped: the inverse of ``to_float``."""
    return ((x.detach().float() + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)


def hflip(x: torch.Tensor) -> torch.Tensor:
    """Mirror left-right: (..., H, W) -> (..., H, W)."""
    return TF.horizontal_flip(x)
