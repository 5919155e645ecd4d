"""Training losses of the tokenizer (docs/method.md section 4): reconstruction + VQ loss, and the optional
VQGAN terms (Esser et al., "Taming Transformers for High-Resolution Image Synthesis", CVPR 2021):
LPIPS perceptual loss (Zhang et al. 2018) and a PatchGAN hinge loss (Isola et al. 2017; hinge form of
Lim & Ye 2017) balanced by VQGAN's adaptive weight (Esser et al. 2021, eq. 7).

The paper's CelebA MaskGIT runs (Huh et al. 2023) use neither optional term: that is the default here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.config import require
from tokenizer.discriminator import NORMS as DISC_NORMS
from tokenizer.discriminator import PatchDiscriminator
from tokenizer.lpips import LPIPS

RECON_LOSSES = ("l1", "l2")


@dataclass
class LossConfig:
    """Weights of the tokenizer's loss terms; each weight is named after the term it multiplies.

    ``vq_weight`` multiplies the quantizer's own loss (commitment + codebook, docs/method.md section 2, item 4).
    The paper (Huh et al. 2023) weighted its VQ loss by 5; 1 is the VQGAN convention.
    """

    recon: str = "l1"  # "l1" or "l2" (mean absolute / mean squared error)
    recon_weight: float = 1.0
    vq_weight: float = 1.0
    perceptual_weight: float = 0.0  # 0 disables LPIPS (the paper's CelebA MaskGIT setting)
    lpips_vgg_path: str | None = None  # vgg16-397923af.pth; None: $LPIPS_VGG_WEIGHTS
    lpips_lin_path: str | None = None  # lpips v0.1 vgg.pth; None: $LPIPS_LIN_WEIGHTS
    adversarial_weight: float = 0.0  # 0 disables the PatchGAN hinge loss
    adversarial_start: int = 0  # first step with the GAN terms (generator and discriminator)
    disc_layers: int = 3
    disc_channels: int = 64
    disc_norm: str = "group"  # "group", "batch" or "none"; see tokenizer/discriminator.py

    def __post_init__(self) -> None:  # types are checked by core.config.from_dict
        require(self.recon in RECON_LOSSES, f"loss.recon must be one of {RECON_LOSSES}, got {self.recon!r}")
        for name in ("recon_weight", "vq_weight", "perceptual_weight", "adversarial_weight"):
            value = getattr(self, name)
            require(math.isfinite(value) and value >= 0, f"loss.{name} must be a finite number >= 0, got {value!r}")
        for name, low in (("adversarial_start", 0), ("disc_layers", 1), ("disc_channels", 1)):
            require(getattr(self, name) >= low, f"loss.{name} must be an int >= {low}, got {getattr(self, name)!r}")
        require(self.disc_norm in DISC_NORMS, f"loss.disc_norm must be one of {DISC_NORMS}, got {self.disc_norm!r}")


def adaptive_weight(rec_loss: Tensor, gan_loss: Tensor, last_layer: nn.Parameter, max_weight: float = 1e4) -> Tensor:
    """VQGAN's adaptive weight (Esser et al. 2021, eq. 7), detached:
    ``clamp(||grad_last rec_loss|| / (||grad_last gan_loss|| + 1e-4), 0, max_weight)``.

    It scales the GAN gradient at the decoder's last layer to the size of the reconstruction gradient.
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (gan_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


class TokenizerLoss(nn.Module):
    """Generator (autoencoder) and discriminator losses of the tokenizer.

    ``generator_loss`` = recon_weight * L1/L2 + perceptual_weight * LPIPS + vq_weight * vq_loss
    + adaptive_weight * adversarial_weight * (-mean D(x_rec)), the last term from ``adversarial_start`` on.

    ``self.lpips`` (frozen; its weights stay out of ``state_dict()``) and ``self.discriminator`` exist
    only when their weight is > 0, else they are None. Train the discriminator with its own optimizer
    over ``self.discriminator.parameters()``. As in taming-transformers, the generator loss also
    backpropagates into the discriminator's parameters (D(x_rec) runs with autograd on, which keeps a
    DDP-wrapped discriminator's gradient reduction consistent): zero the discriminator's gradients after
    the generator's backward, before ``discriminator_loss(...).backward()``. Checkpoint
    ``self.discriminator`` (or this module's ``state_dict()``, which holds only the discriminator).
    """

    def __init__(self, cfg: LossConfig):
        super().__init__()
        self.cfg = cfg
        self.lpips = LPIPS(cfg.lpips_vgg_path, cfg.lpips_lin_path) if cfg.perceptual_weight > 0 else None
        self.discriminator = (PatchDiscriminator(3, cfg.disc_channels, cfg.disc_layers, cfg.disc_norm)
                              if cfg.adversarial_weight > 0 else None)

    def gan_active(self, step: int) -> bool:
        """Whether the adversarial terms are on at ``step`` (enabled and step >= adversarial_start)."""
        return self.discriminator is not None and step >= self.cfg.adversarial_start

    def generator_loss(self, x: Tensor, x_rec: Tensor, vq_loss: Tensor, step: int,
                       last_layer: nn.Parameter | None, as_tensors: bool = False,
                       vq_unscaled: Tensor | None = None) -> tuple[Tensor, dict]:
        """Total autoencoder loss and float logs (recon, perceptual, vq, gan, adaptive_weight, loss);
        with ``as_tensors`` the logs are detached scalar tensors left on the device, so that a training
        loop that sums them on the device (training.run.MetricWindow) syncs once per log line, not per step.

        x, x_rec: (B, 3, H, W) in [-1, 1]; vq_loss: the quantizer's scalar loss; vq_unscaled: the part
        of vq_loss that carries its own weights and is added as it is, not times ``vq_weight`` (LFQ's
        entropy terms, ``info["entropy_loss"]``); last_layer: the
        decoder's final conv weight, needed for the adaptive weight once the GAN term is active. Where
        gradients are off (``torch.no_grad`` evaluation) the adaptive weight cannot be computed and is 0,
        as in taming-transformers.
        """
        if x.shape != x_rec.shape:
            raise ValueError(f"x and x_rec must have the same shape, got {tuple(x.shape)} and {tuple(x_rec.shape)}")
        vq_loss = torch.as_tensor(vq_loss, device=x.device)
        if vq_loss.numel() != 1:
            raise ValueError(f"vq_loss must be a scalar, got shape {tuple(vq_loss.shape)}")
        vq_loss = vq_loss.reshape(())
        recon = F.l1_loss(x_rec, x) if self.cfg.recon == "l1" else F.mse_loss(x_rec, x)
        rec_loss = self.cfg.recon_weight * recon
        perceptual = x.new_zeros(())
        if self.lpips is not None:
            perceptual = self.lpips(x, x_rec).mean()
            rec_loss = rec_loss + self.cfg.perceptual_weight * perceptual
        total = rec_loss + self.cfg.vq_weight * vq_loss
        if vq_unscaled is not None:  # vq_weight * (vq_loss - unscaled) + unscaled
            total = total + (1 - self.cfg.vq_weight) * vq_unscaled

        gan, weight = x.new_zeros(()), x.new_zeros(())
        if self.gan_active(step):
            gan = -self.discriminator(x_rec).mean()
            if torch.is_grad_enabled() and gan.requires_grad:
                if last_layer is None:
                    raise ValueError("the GAN term is active: generator_loss needs last_layer (the decoder's "
                                     "final conv weight) for the adaptive weight")
                weight = adaptive_weight(rec_loss, gan, last_layer)
            total = total + weight * self.cfg.adversarial_weight * gan

        names = ("recon", "perceptual", "vq", "gan", "adaptive_weight", "loss")
        values = torch.stack([t.detach().float() for t in (recon, perceptual, vq_loss, gan, weight, total)])
        return total, dict(zip(names, values.unbind() if as_tensors else values.tolist()))  # at most one sync

    def discriminator_loss(self, x: Tensor, x_rec: Tensor, step: int, as_tensors: bool = False) -> tuple[Tensor, dict]:
        """Hinge loss ``0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x_rec))))`` (taming's factor 0.5);
        logs as in ``generator_loss``.

        x_rec is detached: this loss trains the discriminator only. Before ``adversarial_start`` or when
        the GAN is disabled it returns a zero tensor with no graph (skip its backward: check
        ``gan_active(step)`` or ``loss.requires_grad``) and runs no discriminator forward.
        """
        if not self.gan_active(step):
            zero = x.new_zeros(())
            return zero, {"disc_loss": 0.0, "logits_real": 0.0, "logits_fake": 0.0}
        logits_real = self.discriminator(x.detach())
        logits_fake = self.discriminator(x_rec.detach())
        # The factor 0.5 keeps taming's scale, so its discriminator learning rates carry over.
        loss = 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())
        values = torch.stack([loss.detach(), logits_real.detach().mean(), logits_fake.detach().mean()]).float()
        return loss, dict(zip(("disc_loss", "logits_real", "logits_fake"), values.unbind() if as_tensors else values.tolist()))
