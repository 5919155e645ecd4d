"""MaskGIT's run schema: what train_maskgit.py trains and what its checkpoints store under "config"
(read back typed by ``transformer.pipeline``), with its named presets."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from core.config import apply_overrides, from_dict, require, to_dict
from data.codes import CodeHeader
from training.config import LogConfig, OptimConfig
from transformer.model import PRESETS as MODEL_PRESETS
from transformer.model import MaskGITConfig
from transformer.schedule import SCHEDULES


@dataclass
class MaskingConfig:
    # mask schedule gamma, shared with decoding; arccos measured better than MaskGIT's cosine on the recipe
    # ladder (BENCHMARKS.md: generation SWD -3.6 [-6.0, -1.3] x1e3, 3 seeds paired)
    schedule: str = "arccos"
    label_smoothing: float = 0.1
    condition: str = "none"  # "none" or "attrs" (the code file's binary attributes, with CFG dropout)
    sample_steps: int = 8  # decoding steps T for the periodic sample grids

    def __post_init__(self) -> None:  # types are checked by core.config.from_dict
        require(self.schedule in SCHEDULES, f"masking.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        require(0 <= self.label_smoothing < 1, f"masking.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        require(self.condition in ("none", "attrs"), f"masking.condition must be 'none' or 'attrs', got {self.condition!r}")
        require(self.sample_steps >= 1, f"masking.sample_steps must be >= 1, got {self.sample_steps}")


@dataclass
class TrainMaskGITConfig:
    """model: the transformer (num_codes, grid and num_attrs come from the code files); masking: the training
    masks and the decoding defaults stored with the model; optim, log: shared with train_tokenizer.py."""

    model: MaskGITConfig = field(default_factory=MaskGITConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def fit_codes(self, header: CodeHeader, codes: str) -> None:
        """Set what comes from the code files (directory ``codes``), not from a preset: the codebook size, the
        grid and, for masking.condition=attrs, the number of attributes; then check the model config again."""
        self.model.num_codes, self.model.grid = header.num_codes, tuple(header.grid)
        if self.masking.condition == "attrs":
            require(bool(header.attr_names), f"masking.condition=attrs, but the code file {codes} has no attributes")
            self.model.num_attrs = len(header.attr_names)
        self.model = from_dict(MaskGITConfig, to_dict(self.model))


# tiny: CPU minutes on the codes of the tiny tokenizer; demo and smoke are tiny with a few overrides.
TINY = TrainMaskGITConfig(
    model=dataclasses.replace(MODEL_PRESETS["tiny"]),
    optim=OptimConfig(steps=800, batch_size=64, lr=1e-3, betas=(0.9, 0.96), weight_decay=0.045,
                      warmup_steps=50, ema_decay=0.99),
    log=LogConfig(log_every=25, image_every=200, ckpt_every=200, val_batches=20))
# overrides of TINY: 800 steps without hidden dropout at twice the learning rate (until 2026-12-04: 1,200
# steps, dropout 0.1, lr 1e-3). On a CPU the dropout masks took a quarter of a step's time (BENCHMARKS.md 6c: the
# time, and the quality paired by seed).
DEMO = ["optim.steps=800", "optim.lr=2e-3", "model.dropout=0"]
SMOKE = ["optim.steps=3", "optim.batch_size=8", "model.dim=32", "model.depth=1", "model.heads=2"]

PRESETS = {
    "tiny": TINY,
    # `make demo` (demo.py): tiny for 800 steps, no dropout, lr 2e-3.
    "demo": apply_overrides(TINY, DEMO),
    # seconds: `demo.py --scale smoke`, the check that every stage runs (3 steps, a 1-block model).
    "smoke": apply_overrides(TINY, SMOKE),
    # MaskGIT's recipe (Chang et al. 2022): AdamW betas (0.9, 0.96), weight decay 0.045, lr 1e-4.
    "celeba64": TrainMaskGITConfig(
        model=dataclasses.replace(MODEL_PRESETS["celeba64"]),
        optim=OptimConfig(steps=200_000, batch_size=128, lr=1e-4, betas=(0.9, 0.96), weight_decay=0.045,
                          warmup_steps=5000, ema_decay=0.9999, mixed_precision="bf16"),
        log=LogConfig(log_every=100, image_every=5000, ckpt_every=5000, val_batches=20)),
}
