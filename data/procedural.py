"""Procedural faces: a built-in, download-free stand-in for CelebA, drawn from (seed, index).

Each face is a few large flat shapes (background gradient, shoulders, hair, head, ears, eyes with
irises, eyebrows, nose, mouth, glasses) drawn with ``PIL.ImageDraw`` at 4x the requested resolution
and box-downsampled, so edges are antialiased at any resolution. No noise textures, so a tiny conv
autoencoder (64x64 -> 16x16x8) reconstructs them recognisably after ~200 Adam steps on CPU; the
attributes below are visible at 64x64 (a test checks each changes many pixels).

Attributes (binary labels, ``ATTRIBUTE_NAMES``), each drawn independently:

* ``smiling``   - wide open grin with teeth, versus a straight or slightly down-turned closed mouth;
* ``dark_hair`` - black / dark brown hair, versus blond, auburn, light brown or grey (bald: 0);
* ``eyeglasses``- round or square frames (sometimes dark sunglasses);
* ``long_hair`` - hair falling past the chin on both sides (bald: 0);
* ``bangs``     - a fringe covering the forehead down to the eyebrows (bald: 0).

Everything else (background, head size and aspect, skin tone, eye position / size / iris colour,
eyebrow tilt, shirt colour, small pose jitter, bald heads about 7%) varies freely. A face depends only
on ``(seed, index)`` through ``numpy.random.default_rng([seed, index])``: the same pair always gives
the same pixels, whatever the access order, worker process or machine.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

ATTRIBUTE_NAMES = ["smiling", "dark_hair", "eyeglasses", "long_hair", "bangs"]
SUPERSAMPLE = 4  # draw at 4x, then box-filter down: antialiased edges without hand-written filters

_DARK_HAIR = [(22, 18, 18), (45, 30, 22), (62, 40, 28), (35, 25, 30)]
_LIGHT_HAIR = [(225, 190, 105), (200, 155, 80), (160, 105, 55), (170, 75, 35), (185, 185, 190), (235, 210, 120)]
_IRIS = [(90, 55, 30), (60, 35, 20), (70, 120, 170), (60, 130, 80), (120, 100, 60)]
_SKIN_LIGHT = (250, 220, 195)
_SKIN_DARK = (105, 68, 48)


@dataclass(frozen=True)
class FaceParams:
    """Every random choice of one face; coordinates are fractions of the image side."""

    smiling: bool
    dark_hair: bool
    eyeglasses: bool
    long_hair: bool
    bangs: bool
    bald: bool
    sunglasses: bool
    square_frames: bool
    bg_top: tuple[int, int, int]
    bg_bottom: tuple[int, int, int]
    shirt: tuple[int, int, int]
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    iris: tuple[int, int, int]
    frame: tuple[int, int, int]
    cx: float          # head centre
    cy: float
    rw: float          # head half-width / half-height
    rh: float
    eye_y: float       # relative to head: fraction of rh above the centre
    eye_dx: float      # fraction of rw from the centre line
    eye_w: float       # fraction of rw
    eye_open: float    # height / width of the eye
    brow_tilt: float   # fraction of rw
    mouth_w: float     # fraction of rw
    frown: bool

    def attributes(self) -> list[int]:
        return [int(self.smiling), int(self.dark_hair), int(self.eyeglasses), int(self.long_hair), int(self.bangs)]


class _Uniforms:
    """Hands out the entries of one pre-drawn uniform vector: one numpy call per face, not forty."""

    def __init__(self, rng: np.random.Generator, n: int = 48) -> None:
        self._u = rng.random(n).tolist()
        self._k = 0

    def __call__(self, lo: float = 0.0, hi: float = 1.0) -> float:
        v = self._u[self._k]
        self._k += 1
        return lo + (hi - lo) * v

    def colour(self, lo: int, hi: int) -> tuple[int, int, int]:
        return tuple(int(self(lo, hi)) for _ in range(3))

    def pick(self, palette: list[tuple[int, int, int]], jitter: int = 12) -> tuple[int, int, int]:
        base = palette[min(int(self() * len(palette)), len(palette) - 1)]
        return tuple(int(min(255, max(0, c + self(-jitter, jitter)))) for c in base)


def sample_params(seed: int, index: int) -> FaceParams:
    """The random choices of face ``index`` under ``seed`` (cheap: no drawing)."""
    u = _Uniforms(np.random.default_rng([seed, index]))
    smiling, dark, glasses, long_hair, bangs, bald, sunglasses, square = (u() for _ in range(8))
    bald = bald < 0.07
    dark = (not bald) and dark < 0.5
    t = u()
    skin = tuple(int(min(255, max(0, a + (b - a) * t + u(-8, 8)))) for a, b in zip(_SKIN_LIGHT, _SKIN_DARK))
    return FaceParams(
        smiling=smiling < 0.5,
        dark_hair=dark,
        eyeglasses=glasses < 0.35,
        long_hair=(not bald) and long_hair < 0.45,
        bangs=(not bald) and bangs < 0.4,
        bald=bald,
        sunglasses=sunglasses < 0.2,
        square_frames=square < 0.5,
        bg_top=u.colour(40, 230),
        bg_bottom=u.colour(20, 200),
        shirt=u.colour(20, 235),
        skin=skin,
        hair=u.pick(_DARK_HAIR if dark else _LIGHT_HAIR),
        iris=u.pick(_IRIS, jitter=15),
        frame=u.pick([(20, 20, 20), (90, 40, 30), (150, 150, 160), (30, 40, 110)], jitter=10),
        cx=0.5 + u(-0.03, 0.03),
        cy=0.47 + u(-0.03, 0.03),
        rw=u(0.2, 0.25),
        rh=u(0.27, 0.32),
        eye_y=u(0.0, 0.12),
        eye_dx=u(0.38, 0.48),
        eye_w=u(0.22, 0.3),
        eye_open=u(0.45, 0.7),
        brow_tilt=u(-0.06, 0.08),
        mouth_w=u(0.38, 0.55),
        frown=u() < 0.3,
    )


def _shade(c: tuple[int, int, int], f: float) -> tuple[int, int, int]:
    return tuple(int(max(0, min(255, v * f))) for v in c)


def render_face(p: FaceParams, resolution: int) -> Image.Image:
    """Draw ``p`` as an RGB image of ``resolution`` x ``resolution`` (drawn at 4x, box-downsampled)."""
    s = resolution * SUPERSAMPLE

    def box(x0: float, y0: float, x1: float, y1: float) -> list[float]:
        return [x0 * s, y0 * s, x1 * s, y1 * s]

    t = np.linspace(0.0, 1.0, s)[:, None, None]  # (S, 1, 1) vertical gradient
    column = ((1 - t) * np.array(p.bg_top) + t * np.array(p.bg_bottom)).astype(np.uint8)  # (S, 1, 3)
    img = Image.fromarray(np.ascontiguousarray(np.broadcast_to(column, (s, s, 3))))
    d = ImageDraw.Draw(img)
    cx, cy, rw, rh = p.cx, p.cy, p.rw, p.rh
    line = max(1, round(0.012 * s))

    # shoulders and neck
    d.ellipse(box(cx - 0.46, cy + rh * 1.45, cx + 0.46, cy + rh * 1.45 + 0.6), fill=p.shirt)
    d.rectangle(box(cx - rw * 0.42, cy + rh * 0.6, cx + rw * 0.42, cy + rh * 1.6), fill=_shade(p.skin, 0.88))
    # long hair: a back layer behind the head, down past the chin
    if p.long_hair:
        d.rounded_rectangle(box(cx - rw * 1.28, cy - rh * 1.05, cx + rw * 1.28, cy + rh * 1.45),
                            radius=rw * 0.9 * s, fill=p.hair)
    # ears, then the head over them
    ear_y = cy - rh * p.eye_y
    for side in (-1, 1):
        ex = cx + side * rw * 0.98
        d.ellipse(box(ex - rw * 0.16, ear_y - rh * 0.05, ex + rw * 0.16, ear_y + rh * 0.33), fill=_shade(p.skin, 0.93))
    d.ellipse(box(cx - rw, cy - rh, cx + rw, cy + rh), fill=p.skin)

    # hair cap (upper half of an ellipse whose centre line is the hairline), bangs, side locks
    if not p.bald:
        top, hairline = cy - rh * 1.12, cy - rh * 0.6
        d.chord(box(cx - rw * 1.1, top, cx + rw * 1.1, 2 * hairline - top), 180, 360, fill=p.hair)
        if p.bangs:
            fringe = cy - rh * (p.eye_y + 0.2)  # down to the eyebrows
            d.chord(box(cx - rw * 1.0, top + rh * 0.1, cx + rw * 1.0, 2 * fringe - top - rh * 0.1), 180, 360, fill=p.hair)
        if p.long_hair:
            for side in (-1, 1):
                x_out, x_in = cx + side * rw * 1.2, cx + side * rw * 0.9
                d.rounded_rectangle(box(min(x_out, x_in), hairline, max(x_out, x_in), cy + rh * 1.3),
                                    radius=rw * 0.15 * s, fill=p.hair)

    # eyes: white, iris, pupil; eyebrows above in a darker hair colour
    ey = cy - rh * p.eye_y
    ew, eh = rw * p.eye_w, rw * p.eye_w * p.eye_open
    brow = _shade(p.hair, 0.7) if not p.bald else _shade(p.skin, 0.55)
    for side in (-1, 1):
        ex = cx + side * rw * p.eye_dx
        d.ellipse(box(ex - ew, ey - eh, ex + ew, ey + eh), fill=(245, 245, 240))
        ir = eh * 0.95
        d.ellipse(box(ex - ir, ey - ir, ex + ir, ey + ir), fill=p.iris)
        d.ellipse(box(ex - ir * 0.45, ey - ir * 0.45, ex + ir * 0.45, ey + ir * 0.45), fill=(10, 10, 10))
        by = ey - eh - rh * 0.1
        tilt = side * rw * p.brow_tilt
        d.line([(ex - ew * 1.1) * s, (by + tilt) * s, (ex + ew * 1.1) * s, (by - tilt) * s],
               fill=brow, width=max(1, round(0.022 * s)))
    # nose: a small shadow triangle
    ny = cy + rh * 0.22
    d.polygon([(cx * s, (ny - rh * 0.22) * s), ((cx - rw * 0.13) * s, ny * s), ((cx + rw * 0.13) * s, ny * s)],
              fill=_shade(p.skin, 0.8))
    # mouth
    my, mw = cy + rh * 0.5, rw * p.mouth_w
    lips = _shade((190, 70, 80), 0.9)
    if p.smiling:
        mh = rh * 0.26
        d.chord(box(cx - mw, my - mh * 0.8, cx + mw, my + mh), 0, 180, fill=(110, 25, 35))
        d.chord(box(cx - mw * 0.86, my - mh * 0.7, cx + mw * 0.86, my + mh * 0.35), 0, 180, fill=(250, 250, 245))
        d.arc(box(cx - mw, my - mh * 0.8, cx + mw, my + mh), 0, 180, fill=lips, width=line)
    elif p.frown:
        d.arc(box(cx - mw * 0.8, my - 0.02, cx + mw * 0.8, my + rh * 0.2), 200, 340, fill=lips, width=2 * line)
    else:
        d.line([(cx - mw * 0.8) * s, my * s, (cx + mw * 0.8) * s, my * s], fill=lips, width=2 * line)

    if p.eyeglasses:
        line = max(1, round(0.018 * s))
        r = ew * 1.45
        for side in (-1, 1):
            ex = cx + side * rw * p.eye_dx
            lens = box(ex - r, ey - r * 0.85, ex + r, ey + r * 0.85)
            fill = (25, 25, 35) if p.sunglasses else None
            if p.square_frames:
                d.rounded_rectangle(lens, radius=r * 0.3 * s, outline=p.frame, width=line, fill=fill)
            else:
                d.ellipse(lens, outline=p.frame, width=line, fill=fill)
            d.line([(ex + side * r) * s, ey * s, (cx + side * rw * 0.98) * s, (ey - 0.01) * s], fill=p.frame, width=line)
        d.line([(cx - rw * p.eye_dx + r) * s, ey * s, (cx + rw * p.eye_dx - r) * s, ey * s], fill=p.frame, width=line)

    return img.reduce(SUPERSAMPLE)


class ProceduralFaces:
    """Faces ``offset .. offset + length - 1`` of the endless sequence under ``seed``.

    ``load(i)`` -> uint8 (3, R, R); ``attrs(i)`` -> long (5,). With ``cache=True`` every image is
    rendered once at construction into one uint8 tensor (N, 3, R, R) and served from memory.
    """

    attr_names = list(ATTRIBUTE_NAMES)

    def __init__(self, resolution: int = 64, seed: int = 0, length: int = 10000, offset: int = 0) -> None:
        if resolution <= 0 or length <= 0 or offset < 0 or seed < 0:
            raise ValueError(f"need resolution > 0, length > 0, offset >= 0, seed >= 0; got "
                             f"resolution={resolution}, length={length}, offset={offset}, seed={seed}")
        self.resolution = resolution
        self.seed = seed
        self.length = length
        self.offset = offset
        self._attrs = torch.tensor([sample_params(seed, offset + i).attributes() for i in range(length)],
                                   dtype=torch.long).reshape(length, len(ATTRIBUTE_NAMES))

    def __len__(self) -> int:
        return self.length

    def name(self, i: int) -> str:
        return f"procedural(seed={self.seed}, index={self.offset + i})"

    def load(self, i: int) -> torch.Tensor:
        img = render_face(sample_params(self.seed, self.offset + i), self.resolution)
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).contiguous()  # (3, R, R)

    def attrs(self, i: int) -> torch.Tensor:
        return self._attrs[i]
