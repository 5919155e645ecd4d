"""The optimization and logging configs both training scripts share."""
from __future__ import annotations

import dataclasses
import math

from core.config import require


@dataclasses.dataclass
class OptimConfig:
    """Optimization settings shared by both training scripts (AdamW, warmup + cosine decay)."""

    steps: int = 1000
    batch_size: int = 32  # per process
    lr: float = 2e-4
    betas: tuple[float, ...] = (0.9, 0.99)
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 1.0  # 0 disables clipping
    grad_accum: int = 1
    ema_decay: float = 0.999
    mixed_precision: str = "no"  # "no", "bf16" or "fp16" (the quantizer always runs in fp32)
    seed: int = 0
    nan_policy: str = "skip"  # "skip" the step (stop after 20 in a row) or "stop" at the first NaN/inf loss
    # When the NaN/inf check reads the device: "window" (once per log window; a window that held one is
    # rolled back and replayed, at the cost of one device copy of the training state) or "step" (every
    # step, no copy: for a model whose training state does not fit twice, at one host sync per step)
    nan_check: str = "window"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum"):
            require(getattr(self, name) > 0, f"optim.{name} must be positive, got {getattr(self, name)}")
        finite = {"lr": self.lr, "weight_decay": self.weight_decay, "grad_clip": self.grad_clip, "betas": sum(self.betas)}
        for name, value in finite.items():  # nan and inf pass every comparison below
            require(math.isfinite(value), f"optim.{name} must be finite, got {getattr(self, name)}")
        require(self.lr > 0 and self.warmup_steps >= 0 and self.grad_clip >= 0 and 0 <= self.ema_decay < 1,
                f"optim: need lr > 0, warmup_steps >= 0, grad_clip >= 0, 0 <= ema_decay < 1; got lr={self.lr}, "
                f"warmup_steps={self.warmup_steps}, grad_clip={self.grad_clip}, ema_decay={self.ema_decay}")
        require(len(self.betas) == 2, f"optim.betas must be two numbers, got {self.betas}")
        require(self.mixed_precision in ("no", "bf16", "fp16"),
                f"optim.mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}")
        require(self.nan_policy in ("skip", "stop"), f"optim.nan_policy must be 'skip' or 'stop', got {self.nan_policy!r}")
        require(self.nan_check in ("window", "step"),
                f"optim.nan_check must be 'window' or 'step', got {self.nan_check!r}")


@dataclasses.dataclass
class LogConfig:
    """How often to log, write image grids and checkpoints (in optimizer steps)."""

    log_every: int = 50
    image_every: int = 500
    ckpt_every: int = 500
    val_batches: int = 0  # batches of the validation split for the final metrics; 0 = the whole split
    tracker: str = "none"  # also send metrics and image grids to "tensorboard", "wandb" or "aim" (log.jsonl stays)

    def __post_init__(self) -> None:
        for name in ("log_every", "image_every", "ckpt_every"):
            require(getattr(self, name) > 0, f"log.{name} must be positive, got {getattr(self, name)}")
        require(self.val_batches >= 0, f"log.val_batches must be >= 0, got {self.val_batches}")
        require(self.tracker in ("none", "tensorboard", "wandb", "aim"),
                f"log.tracker must be none, tensorboard, wandb or aim, got {self.tracker!r}")

    def due(self, step: int, steps: int) -> tuple[bool, bool, bool]:
        """Whether step ``step`` of ``steps`` logs, writes images, checkpoints (the last step does all three)."""
        return tuple(step % every == 0 or step == steps for every in (self.log_every, self.image_every, self.ckpt_every))
