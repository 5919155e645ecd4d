"""Opt-in experiment trackers through Accelerate (``log.tracker=tensorboard|wandb|aim``).

``log.jsonl`` in the run directory stays the record every tool of this project reads; a tracker gets
a copy of the same numbers (``accelerator.log``) and of the sample / reconstruction grids, for people
who watch runs in TensorBoard, Weights & Biases or Aim. The default ``none`` imports nothing: no
tracker package is needed unless one is asked for (``pip install -e ".[track]"`` installs TensorBoard).
Files go under RUN_DIR/tracker/ (TensorBoard: RUN_DIR/tracker/tokenizer or .../maskgit, so
``tensorboard --logdir runs`` finds every run); wandb and aim also follow their own settings (e.g. WANDB_MODE).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from core.config import ConfigError
from training.run import flatten

TRACKERS = ("none", "tensorboard", "wandb", "aim")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "aim": "aim"}


def accelerator_kwargs(tracker: str, run_dir: Path) -> dict[str, Any]:
    """``Accelerator(**...)`` arguments for ``tracker``; refuses, before training starts, a tracker whose
    package is not installed."""
    if tracker == "none":
        return {}
    if importlib.util.find_spec(PACKAGES[tracker]) is None:
        raise ConfigError(f"log.tracker={tracker} needs the {PACKAGES[tracker]} package: pip install {PACKAGES[tracker]}")
    return {"log_with": tracker, "project_dir": str(run_dir / "tracker")}


def start(accelerator: Any, tracker: str, name: str, config: dict[str, Any]) -> None:
    """init_trackers with the run's config flattened to scalars (dotted keys; lists and None as text)."""
    if tracker != "none":
        accelerator.init_trackers(name, config={k: v if isinstance(v, (bool, int, float, str)) else str(v)
                                                for k, v in flatten(config).items()})


def log_scalars(accelerator: Any, tracker: str, record: dict[str, Any], step: int) -> None:
    if tracker != "none":
        accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}, step=step)


def log_final(accelerator: Any, tracker: str, metrics: dict[str, Any], step: int) -> None:
    """The final validation's numbers under ``val/``; the run's wall time is not a validation metric and goes
    under ``time/wall_seconds``; the step is the record's step, not a value."""
    log_scalars(accelerator, tracker, {(f"time/{k}" if k == "wall_seconds" else f"val/{k}"): v
                                       for k, v in metrics.items() if k != "step"}, step)


def log_image(accelerator: Any, tracker: str, name: str, grid: torch.Tensor, step: int) -> None:
    """One image grid, (3, H, W) floats in [0, 1], in the form each tracker's ``log_images`` takes."""
    if tracker == "none":
        return
    pixels = (grid.clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    value: Any = pixels[None].numpy()  # TensorBoard: (1, 3, H, W)
    if tracker != "tensorboard":
        pil = Image.fromarray(pixels.permute(1, 2, 0).numpy())
        value = [pil] if tracker == "wandb" else pil
    accelerator.get_tracker(tracker).log_images({name: value}, step=step)
