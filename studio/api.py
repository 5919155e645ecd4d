"""The studio's JSON requests: parsed and checked where they enter, before any model work.

Every field is checked for type and range, unknown fields are refused (a typo is an error, not a
silent default), and images arrive as base64 data URLs whose size is checked before they are
decoded. Each problem raises ``RequestError`` with one line that says what is wrong; the server
turns it into ``{"error": ...}`` with status 400 and keeps running.

    generate: {"n": 4, "seed": 0, "steps": 8, "order": "confidence" | "halton", "temperature": 1.0,
               "temperature_end": null, "choice_temperature": 4.5, "choice_schedule": "linear",
               "top_k": null, "cfg": 0.0, "cfg_schedule": "constant", "cfg_power": 3.0,
               "attrs": {"smiling": 1} | null}
    edit:     the same sampling fields (without "n") plus
              {"image": "data:image/png;base64,...", "tokens": [N ints] | null,
               "box": [x0, y0, x1, y1] | null, "mask": "data:image/png;base64,..." | null,
               "mode": "inpaint" | "outpaint"}

Unset sampling fields take sample.py's defaults (``DECODE_DEFAULTS``; "steps": the model's trained
count); "cfg" is maskgit_decode's cfg_scale. Every setting goes through the check sample.py's flags go
through (``check_decode_settings``).

A box is in pixels of the model's R x R image, x1/y1 exclusive; a mask is an R x R image, white =
the region. "inpaint" regenerates the region and keeps the rest, "outpaint" keeps the region and
regenerates the rest.
"""
from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms.functional import pil_to_tensor

from core.errors import UserError
from data import preprocess_uint8, to_rgb
from transformer.pipeline import DECODE_CHOICES, DECODE_DEFAULTS, check_decode_settings

MAX_SAMPLES = 16
MAX_STEPS = 64
MAX_IMAGE_SIDE = 2048  # an uploaded picture larger than this is refused before it is decoded
MODES = ("inpaint", "outpaint")


class RequestError(UserError):
    """A request the studio refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ModelInfo:
    """What requests are checked against: the pair's image size, code grid and conditioning."""

    resolution: int
    grid: tuple[int, int]
    num_codes: int
    attr_names: tuple[str, ...]  # empty for an unconditional model
    default_steps: int = 8  # decoding steps T when a request names none: the model's trained setting

    @property
    def seq_len(self) -> int:
        return self.grid[0] * self.grid[1]


@dataclass(frozen=True)
class Sampling:
    n: int
    seed: int
    steps: int
    decode: dict[str, Any]  # maskgit_decode's settings, DECODE_DEFAULTS' keys: order, temperature, cfg_scale, ...
    attrs: dict[str, int] | None


@dataclass(frozen=True)
class Edit:
    sampling: Sampling
    image: torch.Tensor  # (3, R, R) uint8, the pixels kept outside the regenerated tokens
    tokens: torch.Tensor | None  # (N,) long, the image's own code grid when the studio made it
    region: torch.Tensor  # (R, R) bool, True = the box or mask as drawn (before "mode" is applied)
    mode: str


FIELD_NAMES = {"cfg_scale": "cfg"}  # a request's name of a DECODE_DEFAULTS setting, where it is not the same
SAMPLING_FIELDS = ("seed", "steps", *(FIELD_NAMES.get(name, name) for name in DECODE_DEFAULTS), "attrs")
EDIT_FIELDS = ("image", "tokens", "box", "mask", "mode")


def parse_generate(body: Any, info: ModelInfo) -> Sampling:
    fields = _object(body, ("n", *SAMPLING_FIELDS))
    return _sampling(fields, info, n=_int(fields, "n", 4, 1, MAX_SAMPLES))


def parse_edit(body: Any, info: ModelInfo) -> Edit:
    fields = _object(body, (*SAMPLING_FIELDS, *EDIT_FIELDS))
    mode = fields.get("mode", "inpaint")
    if mode not in MODES:
        raise RequestError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    r = info.resolution
    if "image" not in fields:
        raise RequestError("edit needs 'image': the picture to edit, as a data URL")
    tokens = None
    if fields.get("tokens") is not None:
        tokens = _tokens(fields["tokens"], info)
        image = _image(fields["image"], "image", exact=r)  # the studio's own sample: its exact pixels
    else:
        image = preprocess_uint8(_image(fields["image"], "image"), r, None)  # an upload: crop + resize
    has_box, has_mask = fields.get("box") is not None, fields.get("mask") is not None
    if has_box == has_mask:
        raise RequestError("edit needs exactly one of 'box' ([x0, y0, x1, y1]) or 'mask' (an image)")
    region = _box(fields["box"], r) if has_box else _mask(fields["mask"], r)
    return Edit(_sampling(fields, info, n=1), image, tokens, region, mode)


def _object(body: Any, allowed: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise RequestError(f"unknown field(s) {', '.join(unknown)}; valid: {', '.join(allowed)}")
    return body


def sampling_defaults() -> dict[str, Any]:
    """The sampling fields' values where a request leaves them out (the page starts from these)."""
    return {FIELD_NAMES.get(name, name): value for name, value in DECODE_DEFAULTS.items()}


def sampling_choices() -> dict[str, list[str]]:
    """The options of the sampling fields that name a choice (order, choice_schedule, cfg_schedule)."""
    return {FIELD_NAMES.get(name, name): list(options) for name, options in DECODE_CHOICES.items()
            if name in DECODE_DEFAULTS}


def _sampling(fields: dict[str, Any], info: ModelInfo, n: int) -> Sampling:
    attrs = _attrs(fields.get("attrs"), info)
    decode = {}
    for name, default in DECODE_DEFAULTS.items():
        field = FIELD_NAMES.get(name, name)
        value = fields.get(field, default)
        if value is None and default is None:  # top_k, temperature_end: off
            pass
        elif name in DECODE_CHOICES:
            if not isinstance(value, str):
                raise RequestError(f"{field} must be one of {', '.join(DECODE_CHOICES[name])}, got {value!r}")
        elif name == "top_k":
            value = _int(fields, field, None, 1, info.num_codes)
        else:  # its range: the shared check below
            value = _number(fields, field, default)
        decode[name] = value
    if decode["cfg_scale"] > 0 and attrs is None:
        raise RequestError("cfg > 0 needs 'attrs': guidance pushes the samples towards a condition")
    sampling = Sampling(n=n, seed=_int(fields, "seed", 0, 0, 2**63 - 1),
                        steps=_int(fields, "steps", info.default_steps, 1, MAX_STEPS), decode=decode, attrs=attrs)
    try:  # the one check every front-end shares (sample.py, eval gen): e.g. no more steps than tokens
        check_decode_settings({"steps": sampling.steps, **decode}, info.grid, info.num_codes,
                              flag=lambda name: FIELD_NAMES.get(name, name))
    except UserError as e:
        raise RequestError(str(e)) from None
    return sampling


def _int(fields: dict[str, Any], name: str, default: int | None, lo: int, hi: int) -> int:
    value = fields.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise RequestError(f"{name} must lie in [{lo}, {hi}], got {value}")
    return value


def _number(fields: dict[str, Any], name: str, default: float) -> float:
    value = fields.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"{name} must be a number, got {value!r}")
    return float(value)


def _attrs(value: Any, info: ModelInfo) -> dict[str, int] | None:
    if value is None:
        return None
    if not info.attr_names:
        raise RequestError("attrs given, but this MaskGIT was trained without attribute conditioning")
    if not isinstance(value, dict):
        raise RequestError(f"attrs must be an object {{name: 0 or 1}}, got {value!r}")
    unknown = sorted(set(value) - set(info.attr_names))
    if unknown:
        raise RequestError(f"unknown attribute(s) {', '.join(unknown)}; this model knows {', '.join(info.attr_names)}")
    for name, v in value.items():
        if v not in (0, 1) or not isinstance(v, (int, bool)):
            raise RequestError(f"attrs.{name} must be 0 or 1, got {v!r}")
    return {name: int(v) for name, v in value.items()}


def _tokens(value: Any, info: ModelInfo) -> torch.Tensor:
    n, k = info.seq_len, info.num_codes
    if not isinstance(value, list) or len(value) != n:
        raise RequestError(f"tokens must be a list of {n} code ids (the {info.grid[0]}x{info.grid[1]} grid)")
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < k for t in value):
        raise RequestError(f"tokens must be integers in [0, {k})")
    return torch.tensor(value, dtype=torch.long)


def _box(value: Any, r: int) -> torch.Tensor:
    if not (isinstance(value, list) and len(value) == 4 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                 for v in value)):
        raise RequestError(f"box must be [x0, y0, x1, y1], four integers, got {value!r}")
    x0, y0, x1, y1 = value
    if not (0 <= x0 < x1 <= r and 0 <= y0 < y1 <= r):
        raise RequestError(f"box {value} is empty or outside the {r}x{r} image (x1, y1 exclusive)")
    region = torch.zeros(r, r, dtype=torch.bool)
    region[y0:y1, x0:x1] = True
    return region


def _mask(value: Any, r: int) -> torch.Tensor:
    pixels = _image(value, "mask", exact=r).float().mean(0)  # (R, R)
    return pixels > 127  # white = the region


def _image(value: Any, name: str, exact: int | None = None) -> Image.Image | torch.Tensor:
    """A data URL -> an RGB PIL image, or with ``exact`` an (3, R, R) uint8 tensor of exactly R x R."""
    if not isinstance(value, str) or not value.startswith("data:image/") or ";base64," not in value:
        raise RequestError(f"{name} must be a data URL 'data:image/...;base64,...'")
    try:
        raw = base64.b64decode(value.split(";base64,", 1)[1], validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{name}: invalid base64") from None
    try:
        img = Image.open(io.BytesIO(raw))
        w, h = img.size  # read from the header: nothing is decoded yet
        if exact is not None and (w, h) != (exact, exact):
            raise RequestError(f"{name} is {w}x{h} pixels; this model works on {exact}x{exact}")
        if max(w, h) > MAX_IMAGE_SIDE:
            raise RequestError(f"{name} is {w}x{h} pixels; the studio accepts at most {MAX_IMAGE_SIDE} per side")
        img.load()
        rgb = to_rgb(img)
    except RequestError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise RequestError(f"{name}: not a readable image ({type(e).__name__})") from None
    if exact is None:
        return rgb
    return pil_to_tensor(rgb)  # (3, R, R) uint8
