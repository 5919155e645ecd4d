"""VQGAN-style convolutional autoencoder (Esser et al., CVPR 2021) with the straightened VQ layer.

Encoder: conv -> [ResBlock x n, Downsample] per level -> ResBlock, (Attention), ResBlock -> GroupNorm,
SiLU, conv -> 1x1 projection to the code dimension -> VQ. The decoder mirrors it.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from core.attention import attention
from core.pretrained import Pretrained
from tokenizer.config import TokenizerConfig, build_quantizer


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.block = nn.Sequential(group_norm(c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1),
                                   group_norm(c_out), nn.SiLU(), nn.Dropout(dropout), nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.block(x)


class Attention(nn.Module):
    """Single-head self-attention over all positions of the lowest-resolution feature map."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm, self.qkv, self.out = group_norm(c), nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (three c) h w -> three b 1 (h w) c", three=3)
        y = attention(q, k, v)  # (B, 1, HW, C)
        return x + self.out(rearrange(y, "b 1 (h w) c -> b c h w", h=h, w=w))


def _middle(c: int, attention: bool, dropout: float) -> nn.Sequential:
    return nn.Sequential(ResBlock(c, c, dropout), Attention(c) if attention else nn.Identity(), ResBlock(c, c, dropout))


class Encoder(nn.Module):
    def __init__(self, cfg: TokenizerConfig) -> None:
        super().__init__()
        chans = [cfg.channels * m for m in cfg.channel_mult]
        layers: list[nn.Module] = [nn.Conv2d(cfg.in_channels, chans[0], 3, padding=1)]
        c = chans[0]
        for level, c_out in enumerate(chans):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(c, c_out, cfg.dropout))
                c = c_out
            if level < len(chans) - 1:
                layers.append(nn.Conv2d(c, c, 3, stride=2, padding=1))  # down-sample by 2
        layers += [_middle(c, cfg.attention, cfg.dropout), group_norm(c), nn.SiLU(),
                   nn.Conv2d(c, cfg.vq.code_dim, 3, padding=1), nn.Conv2d(cfg.vq.code_dim, cfg.vq.code_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)  # (B, code_dim, H / f, W / f)


class Decoder(nn.Module):
    def __init__(self, cfg: TokenizerConfig) -> None:
        super().__init__()
        chans = [cfg.channels * m for m in cfg.channel_mult][::-1]
        c = chans[0]
        layers: list[nn.Module] = [nn.Conv2d(cfg.vq.code_dim, cfg.vq.code_dim, 1), nn.Conv2d(cfg.vq.code_dim, c, 3, padding=1),
                                   _middle(c, cfg.attention, cfg.dropout)]
        for level, c_out in enumerate(chans):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(c, c_out, cfg.dropout))
                c = c_out
            if level < len(chans) - 1:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c, 3, padding=1)]
        self.conv_out = nn.Conv2d(c, cfg.in_channels, 3, padding=1)
        layers += [group_norm(c), nn.SiLU(), self.conv_out]
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


class VQModel(Pretrained, nn.Module):
    """Images in [-1, 1] <-> token grids. ``forward(x) -> (x_rec, info)`` with the quantizer's info.

    ``save_pretrained(folder)`` / ``VQModel.from_pretrained(folder)``: an exported model (core.pretrained)."""

    kind, config_class = "tokenizer", TokenizerConfig

    def __init__(self, cfg: TokenizerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.quantizer = build_quantizer(cfg.vq)

    @property
    def num_codes(self) -> int:
        return self.cfg.vq.num_codes

    @property
    def grid(self) -> tuple[int, int]:
        return self.cfg.grid

    @property
    def last_layer(self) -> nn.Parameter:
        """The decoder's last weight, for the adaptive GAN weight (VQGAN eq. 7)."""
        return self.decoder.conv_out.weight

    def _check_images(self, x: Tensor) -> None:
        r, c = self.cfg.resolution, self.cfg.in_channels
        if x.dim() != 4 or x.shape[1] != c or x.shape[-2:] != (r, r):
            raise ValueError(f"tokenizer expects images of shape (B, {c}, {r}, {r}), got {tuple(x.shape)}")

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor, dict[str, Any]]:
        """x (B, 3, H, W) -> z_q (B, code_dim, h, w), indices (B, h, w) [(B, h, w, G) for group/residual], info."""
        self._check_images(x)
        z_q, info = self.quantizer(self.encoder(x))
        return z_q, info["q"], info

    def decode(self, z_q: Tensor) -> Tensor:
        return self.decoder(z_q)

    def decode_indices(self, indices: Tensor) -> Tensor:
        """Token grid -> images, through the effective codebook (affine and cb_norm applied)."""
        return self.decode(self.quantizer.decode(indices))

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Any]]:
        z_q, _, info = self.encode(x)
        return self.decode(z_q), info


def load_tokenizer(path: str, ema: bool = True, device: str | torch.device = "cpu") -> tuple[VQModel, TokenizerConfig]:
    """Rebuild a tokenizer from its self-describing checkpoint (EMA weights by default), in eval mode."""
    from core.checkpoint import load_checkpoint
    from core.config import stored_config

    ckpt = load_checkpoint(path, kind="tokenizer")
    cfg = stored_config(TokenizerConfig, ckpt["config"]["model"], str(path))
    model = VQModel(cfg)
    model.load_state_dict(ckpt["ema" if ema and ckpt.get("ema") is not None else "model"])
    return model.to(device).eval(), cfg
