"""PatchGAN discriminator (Isola et al., "Image-to-Image Translation with Conditional Adversarial
Networks", CVPR 2017), as taming-transformers' ``NLayerDiscriminator`` used by VQGAN (Esser et al.,
"Taming Transformers for High-Resolution Image Synthesis", CVPR 2021).

Layers: conv 4x4 stride 2 + LeakyReLU(0.2); then ``n_layers - 1`` times conv 4x4 stride 2 + norm +
LeakyReLU with the channels doubling (capped at 8x); conv 4x4 stride 1 + norm + LeakyReLU; a final conv
4x4 stride 1 to one channel. The output is a map of logits, one per overlapping patch (70x70 pixels
for ``n_layers=3``). Weights are initialised N(0, 0.02), norm scales N(1, 0.02), norm biases 0.

Normalization (``norm``): ``"group"`` (default), ``"batch"`` (taming's choice) or ``"none"``.
GroupNorm is the default because it normalizes each sample on its own:

* no batch statistics, so a sample's logit does not depend on which other samples (or which replica's
  shard) it shares a batch with, and real and fake batches, which go through the network in separate
  forwards, are not normalized by different statistics (a cue BatchNorm hands the discriminator);
* no running buffers, so training and eval modes compute the same function and DDP has nothing to
  broadcast: with BatchNorm, DDP's buffer broadcast (or the running-stat update) between two forwards
  before one backward is the known "modified by an inplace operation" failure, and per-replica
  statistics differ unless SyncBatchNorm is used.
"""
from __future__ import annotations

import math

from torch import Tensor, nn

NORMS = ("group", "batch", "none")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "group":
        return nn.GroupNorm(math.gcd(32, channels), channels)  # 32 groups when channels allow
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.Identity()


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator; ``forward(x)`` maps images (B, C, H, W) to logits (B, 1, H', W').

    Args:
        in_channels: image channels.
        channels: width of the first layer (``ndf``); layer i has ``channels * min(2**i, 8)``.
        n_layers: number of stride-2 convolutions (3: the 70x70 PatchGAN). H and W must be at least
            3 * 2**n_layers so that the logit map is not empty.
        norm: ``"group"``, ``"batch"`` or ``"none"`` (see the module docstring for why group).
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3, norm: str = "group"):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"discriminator norm must be one of {NORMS}, got {norm!r}")
        if in_channels <= 0 or channels <= 0 or n_layers <= 0:
            raise ValueError(f"discriminator in_channels, channels and n_layers must be positive, "
                             f"got {in_channels}, {channels}, {n_layers}")
        self.n_layers = n_layers
        bias = norm == "none"  # a norm layer's own shift makes the conv bias redundant
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        mult = 1
        for i in range(1, n_layers + 1):
            prev, mult = mult, min(2**i, 8)
            stride = 2 if i < n_layers else 1  # the last widening conv keeps the resolution
            layers += [nn.Conv2d(channels * prev, channels * mult, 4, stride=stride, padding=1, bias=bias),
                       _norm(norm, channels * mult), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(channels * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: Tensor) -> Tensor:
        side = 3 * 2**self.n_layers
        if x.dim() != 4 or min(x.shape[-2:]) < side:
            raise ValueError(f"PatchDiscriminator with n_layers={self.n_layers} needs (B, C, H, W) images "
                             f"with H, W >= {side}, got {tuple(x.shape)}")
        return self.main(x)  # (B, 1, H', W')


def _init_weights(m: nn.Module) -> None:
    """DCGAN / taming init: conv weights N(0, 0.02), norm scales N(1, 0.02), biases 0."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.GroupNorm, nn.BatchNorm2d)):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)
