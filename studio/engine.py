"""The studio's model side: one tokenizer + MaskGIT pair in this process, one request at a time.

Sampling goes through the same `generate` as sample.py (so a seed gives the same picture in both),
with maskgit_decode's `on_step` observer recording the grid after every step for the strip.
Editing goes through the same region -> tokens rule and the same ``keep`` of the pixels outside the
regenerated tokens as ``sample.py --inpaint`` (transformer/pipeline.py), so both give the same picture.
"""
from __future__ import annotations

import base64
import io
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image

from data import to_float, to_uint8
from studio.api import Edit, ModelInfo, Sampling, parse_edit, parse_generate, sampling_choices, sampling_defaults
from tokenizer import VQModel
from transformer import MaskGIT
from transformer.pipeline import decode_settings, generate, load_models, region_tokens  # the studio's one sampling path

STRIP_DIM = 0.3  # brightness kept by a still-masked token in the strip (its prediction shows through)


class Engine:
    """Serves `generate`, `edit` and `info` requests (JSON-shaped dicts) on one model pair."""

    def __init__(self, tokenizer: VQModel, model: MaskGIT, meta: dict[str, Any], source: str = "") -> None:
        self.tokenizer, self.model, self.meta = tokenizer, model, meta
        self.device = next(model.parameters()).device
        trained = decode_settings(meta["config"])  # the mask schedule and step count the model was trained with
        self.schedule = trained["schedule"]
        names = tuple(meta.get("attr_names") or ()) if model.cfg.num_attrs else ()
        self.info = ModelInfo(tokenizer.cfg.resolution, tuple(tokenizer.grid), model.cfg.num_codes, names,
                              default_steps=trained["steps"])
        self.source = source
        self._lock = threading.Lock()  # one model, one request at a time

    @classmethod
    def from_paths(cls, tokenizer_path: str | Path, maskgit_path: str | Path, ema: bool = True,
                   device: str | torch.device = "cpu") -> Engine:
        tokenizer, model, meta = load_models(str(tokenizer_path), str(maskgit_path), ema=ema, device=device)
        return cls(tokenizer, model, meta, source=f"{tokenizer_path} + {maskgit_path}")

    def describe(self) -> dict[str, Any]:
        i = self.info
        return {"resolution": i.resolution, "grid": list(i.grid), "num_codes": i.num_codes,
                "attr_names": list(i.attr_names), "conditional": bool(i.attr_names), "schedule": self.schedule,
                "steps": i.default_steps, "defaults": sampling_defaults(), "choices": sampling_choices(),
                "device": str(self.device), "source": self.source}

    def generate(self, body: Any) -> dict[str, Any]:
        s = parse_generate(body, self.info)
        with self._lock:
            t0 = time.perf_counter()
            images, tokens, strips, fixed = self._sample(s)
            seconds = time.perf_counter() - t0
        return {"images": [_result(*x) for x in zip(images, tokens, strips, fixed)], "seconds": round(seconds, 3)}

    def edit(self, body: Any) -> dict[str, Any]:
        e = parse_edit(body, self.info)
        with self._lock:
            t0 = time.perf_counter()
            result = self._edit(e)
            result["seconds"] = round(time.perf_counter() - t0, 3)
        return result

    def _edit(self, e: Edit) -> dict[str, Any]:
        if e.tokens is not None:
            tokens = e.tokens.to(self.device)
        else:
            with torch.no_grad():
                tokens = self.tokenizer.encode(to_float(e.image)[None].to(self.device))[1].reshape(-1)  # (N,)
        drawn = region_tokens(e.region, self.info.grid, outpaint=e.mode == "outpaint")  # (h, w) True = regenerate
        images, out_tokens, strips, fixed = self._sample(e.sampling, tokens[None], drawn.reshape(1, -1), keep=e.image)
        return {"images": [_result(images[0], out_tokens[0], strips[0], fixed[0])], "region": drawn.int().tolist()}

    @torch.no_grad()
    def _sample(self, s: Sampling, init: torch.Tensor | None = None, init_mask: torch.Tensor | None = None,
                keep: torch.Tensor | None = None):
        """(images (n, 3, R, R) uint8, tokens (n, N), strips (n, 3, R, T (R + 1)) uint8, fixed (n, T))."""
        attrs = None
        if s.attrs is not None:  # unnamed attributes are 0
            attrs = torch.tensor([s.attrs.get(name, 0) for name in self.info.attr_names])  # (A,)
        states = []
        images = torch.cat(list(generate(
            self.tokenizer, self.model, s.n, s.n, s.seed, s.steps, attrs=attrs, init=init, init_mask=init_mask,
            keep=keep, progress=False, schedule=self.schedule, **s.decode,
            on_step=lambda t, tokens, predicted: states.append((tokens, predicted)))))
        tokens = states[-1][0]  # (n, N), every position fixed after the last step
        grids = torch.stack([t for t, _ in states], 1)  # (n, T, N), mask_id where still masked
        predicted = torch.stack([p for _, p in states], 1)  # (n, T, N)
        masked = grids == self.model.mask_id
        fixed = (~masked).sum(-1)  # (n, T) tokens known after each step
        strips = self._strips(torch.where(masked, predicted, grids), masked)
        return images, tokens.cpu(), strips, fixed.cpu()

    def _strips(self, beliefs: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """One picture per sample: after each step, the decoded prediction with still-masked tokens dimmed."""
        h, r = self.info.grid[0], self.info.resolution
        frames = []
        for chunk in rearrange(beliefs, "n t (h w) -> (n t) h w", h=h).split(64):
            frames.append(to_uint8(self.tokenizer.decode_indices(chunk)))
        frames = torch.cat(frames).float()  # (n T, 3, R, R) in [0, 255]
        dim = rearrange(masked, "n t (h w) -> (n t) 1 h w", h=h).float()
        dim = F.interpolate(dim, size=(r, r), mode="nearest")  # (n T, 1, R, R), 1 = still masked
        frames = frames * (1 - dim * (1 - STRIP_DIM))
        frames = F.pad(frames, (0, 1), value=255.0)  # a white line between steps
        strips = rearrange(frames, "(n t) c y x -> n c y (t x)", n=beliefs.shape[0])
        return strips.round().to(torch.uint8).cpu()


def _result(image: torch.Tensor, tokens: torch.Tensor, strip: torch.Tensor, fixed: torch.Tensor) -> dict[str, Any]:
    return {"png": png_data_url(image), "tokens": tokens.tolist(), "strip": png_data_url(strip),
            "fixed": fixed.tolist()}


def png_data_url(image: torch.Tensor) -> str:
    """(3, H, W) uint8 -> 'data:image/png;base64,...' (lossless, so pixels survive the round trip)."""
    buf = io.BytesIO()
    Image.fromarray(rearrange(image, "c h w -> h w c").contiguous().numpy()).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
