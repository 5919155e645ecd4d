"""LPIPS perceptual distance with the VGG16 backbone (Zhang et al., "The Unreasonable Effectiveness of
Deep Features as a Perceptual Metric", CVPR 2018), loaded from local weight files only.

    d(x, y) = sum_l mean_{h,w} || w_l * (f_l(x) / ||f_l(x)|| - f_l(y) / ||f_l(y)||) ||^2

f_l: torchvision VGG16 features at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of the scaled input;
the norm is over channels; w_l >= 0 are the 1x1 "linear" layers of lpips v0.1. This reproduces
``lpips.LPIPS(net="vgg", version="0.1")`` for images in [-1, 1].

No file is ever downloaded (these machines have no internet). Two files are needed:

* ``vgg16-397923af.pth``: torchvision's ImageNet VGG16 (https://download.pytorch.org/models/vgg16-397923af.pth);
  argument ``vgg_path`` or env var ``LPIPS_VGG_WEIGHTS``.
* ``vgg.pth``: the lpips v0.1 linear layers (github.com/richzhang/PerceptualSimilarity, file
  lpips/weights/v0.1/vgg.pth; keys ``lin0.model.1.weight`` ... ``lin4.model.1.weight``);
  argument ``lin_path`` or env var ``LPIPS_LIN_WEIGHTS``.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models import vgg16

from core.errors import UserError

VGG_FILE = "vgg16-397923af.pth"
VGG_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
VGG_ENV = "LPIPS_VGG_WEIGHTS"
LIN_FILE = "vgg.pth"
LIN_SOURCE = "lpips/weights/v0.1/vgg.pth in https://github.com/richzhang/PerceptualSimilarity (pip package lpips)"
LIN_ENV = "LPIPS_LIN_WEIGHTS"
# Indices into torchvision's vgg16().features ending each slice: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
SLICE_ENDS = (4, 9, 16, 23, 30)
CHANNELS = (64, 128, 256, 512, 512)
# lpips' ScalingLayer: maps [-1, 1] images to (roughly) ImageNet-normalized ones.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


class MissingWeightsError(FileNotFoundError):
    """A local weight file that LPIPS needs is missing; the message says which and where to get it."""


def resolve_weights(path: str | os.PathLike | None, env: str, filename: str, source: str, arg: str) -> Path:
    """``path`` if given, else the env var ``env``; raise ``MissingWeightsError`` unless the file exists."""
    chosen = path if path is not None else os.environ.get(env) or None
    if chosen is not None and Path(chosen).is_file():
        return Path(chosen)
    where = f"not found at {chosen}" if chosen is not None else f"no path given and ${env} is unset"
    raise MissingWeightsError(
        f"LPIPS needs the weight file {filename} ({where}); it cannot be downloaded here.\n"
        f"Get it from {source}, copy it to this machine and pass its path as {arg} or set ${env}.")


def _load(path: Path) -> dict[str, Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise UserError(f"{path}: expected a state_dict (dict of tensors), got {type(state).__name__}")
    return state


def _normalize(f: Tensor, eps: float = 1e-10) -> Tensor:
    """Unit-normalize along channels, as lpips' ``normalize_tensor``: f / (||f|| + eps).

    ``vector_norm`` has the same value as sqrt(sum f^2) but a finite gradient where a whole feature
    vector is zero (after ReLU), where the sqrt form gives NaN.
    """
    return f / (torch.linalg.vector_norm(f, dim=1, keepdim=True) + eps)


class LPIPS(nn.Module):
    """LPIPS v0.1 (VGG16) distance between images in [-1, 1]; ``forward(x, y)`` returns (B,) distances.

    Frozen: every parameter has ``requires_grad=False`` and the module stays in eval mode even under
    ``.train()``; gradients still flow to the inputs. The frozen weights come from their files and are
    kept out of ``state_dict()`` (58 MB of constants per checkpoint otherwise); ``load_state_dict``
    on a parent module does not expect them either.
    """

    def __init__(self, vgg_path: str | os.PathLike | None = None, lin_path: str | os.PathLike | None = None):
        super().__init__()
        vgg_file = resolve_weights(vgg_path, VGG_ENV, VGG_FILE, VGG_URL, "vgg_path / LossConfig.lpips_vgg_path")
        lin_file = resolve_weights(lin_path, LIN_ENV, LIN_FILE, LIN_SOURCE, "lin_path / LossConfig.lpips_lin_path")
        # torchvision's own architecture, built on the meta device: no random init of the 120M-parameter
        # classifier we discard, and no download (weights=None); the real tensors are assigned below.
        with torch.device("meta"):
            features = vgg16(weights=None).features[: SLICE_ENDS[-1]]
        vgg_state = {k[len("features."):]: v.float() for k, v in _load(vgg_file).items() if k.startswith("features.")}
        try:
            features.load_state_dict(vgg_state, strict=True, assign=True)
        except RuntimeError as err:
            raise UserError(f"{vgg_file}: not a torchvision VGG16 state_dict ({VGG_FILE}): {err}") from None
        starts = (0,) + SLICE_ENDS[:-1]
        self.slices = nn.ModuleList(features[a:b] for a, b in zip(starts, SLICE_ENDS))

        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in CHANNELS)
        lin_state = _load(lin_file)
        for i, (lin, c) in enumerate(zip(self.lins, CHANNELS)):
            key = f"lin{i}.model.1.weight"
            w = lin_state.get(key)
            if w is None or tuple(w.shape) != (1, c, 1, 1):
                got = "missing" if w is None else f"shape {tuple(w.shape)}"
                raise UserError(f"{lin_file}: expected {key} of shape (1, {c}, 1, 1) (lpips v0.1 {LIN_FILE}), "
                                 f"got {got}")
            if (w < 0).any():
                # lpips trains these with weights clamped to >= 0; a negative weight means a wrong file.
                raise UserError(f"{lin_file}: {key} has negative entries; LPIPS linear weights are non-negative")
            lin.weight.data.copy_(w.float())

        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()
        self.register_state_dict_post_hook(_drop_own_keys)
        self.register_load_state_dict_pre_hook(_fill_own_keys)

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)  # frozen network: never in training mode

    def features(self, x: Tensor) -> list[Tensor]:
        """Unit-normalized VGG16 features at the five LPIPS layers for images x (B, 3, H, W) in [-1, 1]."""
        h = (x - self.shift) / self.scale
        out = []
        for block in self.slices:
            h = block(h)
            out.append(_normalize(h))
        return out

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """LPIPS distance per sample, (B,). x, y: (B, 3, H, W) in [-1, 1], H, W >= 16."""
        if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3 or min(x.shape[-2:]) < 16:
            raise ValueError(f"LPIPS expects two (B, 3, H, W) images of equal shape with H, W >= 16 "
                             f"(four 2x poolings before relu5_3), got {tuple(x.shape)} and {tuple(y.shape)}")
        feats = self.features(torch.cat([x, y]))  # one pass over both images
        dist = x.new_zeros(x.shape[0])
        for f, lin in zip(feats, self.lins):
            fa, fb = f.chunk(2)
            dist = dist + lin((fa - fb).pow(2)).mean(dim=(1, 2, 3))  # spatial average, (B,)
        return dist


def _drop_own_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]


def _fill_own_keys(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Checkpoints hold no LPIPS weights: load the module's own (file-loaded) tensors in their place."""
    for name, tensor in module.named_parameters():
        state_dict.setdefault(prefix + name, tensor.detach())
