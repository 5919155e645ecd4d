"""The tokenizer's run schema: what train_tokenizer.py trains and what its checkpoints store under
"config" (read back typed by ``pretokenize.py`` and ``load_tokenizer``), with its named presets."""
from __future__ import annotations

from dataclasses import dataclass, field

from core.config import apply_overrides, require
from data import DataConfig
from tokenizer.config import TokenizerConfig, variant_overrides
from tokenizer.config import preset as tokenizer_preset
from tokenizer.losses import LossConfig
from training.config import LogConfig, OptimConfig


@dataclass
class TrainTokenizerConfig:
    """model: the tokenizer (stored again by export.py); loss: reconstruction, VQ, perceptual and GAN terms;
    data: the images (``pretokenize.py`` encodes the same ones); optim, log: shared with train_maskgit.py."""

    model: TokenizerConfig = field(default_factory=TokenizerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:  # the two are one setting: see tie_resolution
        require(self.data.resolution == self.model.resolution,
                f"data.resolution ({self.data.resolution}) must equal model.resolution ({self.model.resolution})")


def tie_resolution(overrides: list[str]) -> list[str]:
    """The image size is one setting stored twice (the model is built for it, the data resized to it): an
    override of either ``data.resolution`` or ``model.resolution`` sets both."""
    given = {value.strip() for key, _, value in (o.partition("=") for o in overrides)
             if key.strip() in ("data.resolution", "model.resolution")}
    require(len(given) <= 1, f"data.resolution and model.resolution are one setting, given as {sorted(given)}")
    return [*overrides, *(f"{key}={value}" for value in given for key in ("data.resolution", "model.resolution"))]


# Every preset weights the VQ loss by 5, as the paper (Huh et al. 2023) does; LossConfig's default is
# VQGAN's 1 (with alternating optimization, the "all" rung's, that term reaches only the affine map).
# tiny: CPU minutes on the built-in procedural faces; demo and smoke are tiny with a few overrides.
TINY = TrainTokenizerConfig(
    model=tokenizer_preset("tiny"), loss=LossConfig(vq_weight=5.0),
    data=DataConfig(resolution=32, num_images=4000, cache=True, num_workers=0),
    optim=OptimConfig(steps=600, batch_size=32, lr=2e-3, warmup_steps=50, ema_decay=0.99),
    log=LogConfig(log_every=25, image_every=200, ckpt_every=200))
# overrides of TINY. Fewer steps or smaller batches cost the demo ~3 dB of PSNR (600 x 32 images: 19.4 dB,
# 1,000 x 16: 19.8, against 22.4 at 1,000 x 32, seed 0; BENCHMARKS.md 6c), so the tokenizer keeps its 1,000 steps.
DEMO = ["optim.steps=1000"]
# smoke trains the paper's full recipe (the "all" rung: k-means init, in-place step, affine map, synchronized
# STE on top of the presets' +l2 +replace), so that the seconds-long check runs every part of the layer.
SMOKE = ["optim.steps=3", "data.num_images=64", "optim.batch_size=8", "log.val_batches=1", *variant_overrides("all")]

PRESETS = {
    "tiny": TINY,
    # `make demo` (demo.py): tiny for 1,000 steps.
    "demo": apply_overrides(TINY, DEMO),
    # seconds: `demo.py --scale smoke`, the check that every stage runs (3 steps, 64 images, the full recipe).
    "smoke": apply_overrides(TINY, SMOKE),
    # CPU minutes on real faces at 64x64 (checks on the CelebA copy, bench/ablation.py).
    "small": TrainTokenizerConfig(
        model=tokenizer_preset("small"), loss=LossConfig(vq_weight=5.0),
        data=DataConfig(resolution=64, cache=True, num_workers=0),
        optim=OptimConfig(steps=800, batch_size=32, lr=1e-3, warmup_steps=50, ema_decay=0.99),
        log=LogConfig(log_every=25, image_every=200, ckpt_every=200)),
    # One modern GPU, CelebA 64x64, 16x16 tokens.
    "celeba64": TrainTokenizerConfig(
        model=tokenizer_preset("celeba64"), loss=LossConfig(vq_weight=5.0), data=DataConfig(resolution=64, num_workers=8),
        optim=OptimConfig(steps=100_000, batch_size=64, lr=2e-4, betas=(0.5, 0.9), warmup_steps=1000,
                          mixed_precision="bf16"),
        log=LogConfig(log_every=100, image_every=2500, ckpt_every=2500)),
}
