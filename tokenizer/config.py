"""Typed configs of the tokenizer (autoencoder + VQ layer) and its named presets."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from core.config import require
from tokenizer.fsq import MIN_LEVEL, FiniteScalarQuant, fsq_levels
from tokenizer.group_residual import GroupVectorQuant, ResidualVectorQuant
from tokenizer.lfq import LookupFreeQuant
from tokenizer.quantizer import VectorQuant
from tokenizer.simvq import SimVQ

KINDS = ("vector", "group", "residual", "fsq", "lfq", "simvq")


@dataclass
class VQConfig:
    """The VQ layer's options; names and formulas as in ``VectorQuant`` (docs/method.md section 2) and, for the
    other families (fsq, lfq, simvq, the rotation trick), in docs/quantizers.md. An option that a kind
    does not use must keep its default (see ``_check_kind_options``)."""

    kind: str = "vector"  # "vector", "group", "residual", "fsq", "lfq" or "simvq"
    num_codes: int = 1024
    code_dim: int = 32
    beta: float = 0.95
    kmeans_init: bool = False
    norm: str | None = None  # None or "l2" (inputs)
    cb_norm: str | None = None  # None or "l2" (effective codes, normalized inside the graph)
    cb_renorm: bool = False  # W's rows rescaled to unit length outside the graph (the reference's unit-norm codebook)
    affine_lr: float = 0.0  # > 0: learned affine re-parameterization
    affine_groups: int = 1
    running_affine: bool = False  # running-statistics affine re-parameterization
    sync_nu: float = 0.0  # synchronized STE
    replace_freq: int = 0  # dead-code replacement period in steps (0: off)
    inplace_lr: float = 0.0  # > 0: alternating optimization, SGD with this lr on the codebook (beta < 1 keeps a
    # commitment term of weight 1 - beta for the encoder; beta = 1 is the reference's: none)
    inplace_momentum: float = 0.9
    groups: int = 1  # sub-vectors (group) or stages (residual)
    share: bool | None = None  # one codebook for all groups/stages; None: True for group, False for residual
    rotation_trick: bool = False  # vector/group/residual/simvq: rotation trick instead of the STE for the encoder
    levels: tuple[int, ...] = ()  # fsq: levels per channel, prod = num_codes; (): derived from num_codes
    entropy_temperature: float = 0.01  # lfq: tau of the soft assignment softmax(-||z - c||^2 / tau)
    sample_entropy_weight: float = 0.1  # lfq: weight of the mean per-sample entropy (lowered)
    codebook_entropy_weight: float = 0.1  # lfq: weight of the entropy of the mean assignment (raised)

    def __post_init__(self) -> None:
        require(self.kind in KINDS, f"vq.kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        require(self.inplace_lr >= 0, f"vq.inplace_lr must be >= 0 (0 disables alternating optimization), got {self.inplace_lr}")
        _check_kind_options(self)
        # The layers own their rules (they are the public API, used without a config too): build one to
        # check this config against them, and say what they refuse in the config's words.
        try:
            build_quantizer(self)
        except ValueError as e:
            where = f"kind={self.kind}" + ("; the layer's feature_size is vq.code_dim" if "feature_size" in str(e) else "")
            require(False, f"vq ({where}): {e}")


# What each kind cannot use, and why. The grids (fsq, lfq) have no learned codebook at all; SimVQ's
# codebook rows are a frozen basis, so nothing may write or re-parameterize them.
_CODEBOOK_ONLY = ("kmeans_init", "norm", "cb_norm", "cb_renorm", "affine_lr", "affine_groups", "running_affine", "sync_nu",
                  "replace_freq", "inplace_lr", "rotation_trick", "groups")
_NOT_USED = {
    "vector": ("levels", "entropy_temperature", "sample_entropy_weight", "codebook_entropy_weight"),
    "fsq": _CODEBOOK_ONLY + ("beta", "entropy_temperature", "sample_entropy_weight", "codebook_entropy_weight"),
    "lfq": _CODEBOOK_ONLY + ("levels",),
    "simvq": ("kmeans_init", "cb_renorm", "affine_lr", "affine_groups", "running_affine", "replace_freq", "inplace_lr", "groups",
              "levels", "entropy_temperature", "sample_entropy_weight", "codebook_entropy_weight"),
}
_NOT_USED["group"] = _NOT_USED["residual"] = _NOT_USED["vector"]
_WHY = {"vector": "they belong to kind=fsq/lfq", "fsq": "its codebook is a fixed grid and it has no auxiliary loss",
        "lfq": "its codebook is a fixed grid of sign patterns", "simvq": "its codebook rows are a frozen basis"}


def _check_kind_options(cfg: VQConfig) -> None:
    """Refuse options that ``cfg.kind`` would ignore, and codebook sizes the grid kinds cannot make."""
    cfg.levels = tuple(cfg.levels)
    defaults = {f.name: f.default for f in dataclasses.fields(VQConfig)}
    changed = [n for n in _NOT_USED[cfg.kind] if getattr(cfg, n) != defaults[n]]
    fix = " ".join(f"vq.{n}={'none' if defaults[n] is None else str(defaults[n]).lower()}" for n in changed)
    require(not changed, f"vq.kind={cfg.kind} does not use {', '.join('vq.' + n for n in changed)} "
                         f"({_WHY.get(cfg.kind, _WHY['vector'])}); set {fix}")
    require(all(v >= MIN_LEVEL for v in cfg.levels), f"vq.levels must all be >= {MIN_LEVEL} (2 levels round to "
                                                     f"{{-1, 0}} only; use kind=lfq for binary codes), got {cfg.levels}")
    require(cfg.kind != "fsq" or not cfg.levels or math.prod(cfg.levels) == cfg.num_codes,
            f"vq.levels {cfg.levels} make {math.prod(cfg.levels)} codes but vq.num_codes is {cfg.num_codes}; "
            f"set vq.num_codes={math.prod(cfg.levels)} (FSQ's codebook is the grid)")
    if cfg.kind == "fsq" and not cfg.levels:
        try:
            fsq_levels(cfg.num_codes)
        except ValueError as e:
            require(False, f"vq.num_codes={cfg.num_codes}: {e}")
    require(cfg.kind != "lfq" or cfg.num_codes & (cfg.num_codes - 1) == 0,
            f"vq.kind=lfq needs vq.num_codes = 2^bits (one bit per channel), got {cfg.num_codes}")
    require(cfg.entropy_temperature > 0 and cfg.sample_entropy_weight >= 0 and cfg.codebook_entropy_weight >= 0,
            f"vq.entropy_temperature must be > 0 and the entropy weights >= 0, got "
            f"{cfg.entropy_temperature}, {cfg.sample_entropy_weight}, {cfg.codebook_entropy_weight}")


@dataclass
class TokenizerConfig:
    """VQGAN-style autoencoder: 2**(len(channel_mult) - 1) down-sampling, VQ layer in the bottleneck."""

    resolution: int = 64
    in_channels: int = 3
    channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    attention: bool = False  # self-attention at the lowest resolution
    dropout: float = 0.0
    vq: VQConfig = field(default_factory=VQConfig)

    def __post_init__(self) -> None:
        require(self.resolution > 0 and self.channels > 0 and self.num_res_blocks > 0,
                f"resolution, channels and num_res_blocks must be positive, got "
                f"{self.resolution}, {self.channels}, {self.num_res_blocks}")
        require(bool(self.channel_mult) and all(m > 0 for m in self.channel_mult),
                f"channel_mult must be a non-empty tuple of positive ints, got {self.channel_mult}")
        require(self.resolution % self.downsample == 0,
                f"resolution {self.resolution} is not divisible by the down-sampling factor {self.downsample}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def grid(self) -> tuple[int, int]:
        side = self.resolution // self.downsample
        return side, side


def build_quantizer(cfg: VQConfig) -> nn.Module:
    """The VQ layer for ``cfg``, with features on dim 1 (B, C, H, W). ``cfg.code_dim`` is every layer's first
    argument, ``feature_size`` (the length of the feature axis, the codes' dimension d)."""
    inplace = partial(torch.optim.SGD, lr=cfg.inplace_lr, momentum=cfg.inplace_momentum) if cfg.inplace_lr > 0 else None
    common = dict(beta=cfg.beta, kmeans_init=cfg.kmeans_init, norm=cfg.norm, cb_norm=cfg.cb_norm,
                  affine_lr=cfg.affine_lr, affine_groups=cfg.affine_groups, running_affine=cfg.running_affine,
                  sync_nu=cfg.sync_nu, replace_freq=cfg.replace_freq, inplace_optimizer=inplace, dim=1,
                  rotation_trick=cfg.rotation_trick, cb_renorm=cfg.cb_renorm)
    if cfg.kind == "fsq":
        return FiniteScalarQuant(cfg.code_dim, cfg.levels or fsq_levels(cfg.num_codes), dim=1)
    if cfg.kind == "lfq":
        return LookupFreeQuant(cfg.code_dim, cfg.num_codes, beta=cfg.beta, temperature=cfg.entropy_temperature,
                               sample_entropy_weight=cfg.sample_entropy_weight,
                               codebook_entropy_weight=cfg.codebook_entropy_weight, dim=1)
    if cfg.kind == "simvq":
        return SimVQ(cfg.code_dim, cfg.num_codes, beta=cfg.beta, norm=cfg.norm, cb_norm=cfg.cb_norm,
                     sync_nu=cfg.sync_nu, rotation_trick=cfg.rotation_trick, dim=1)
    if cfg.kind == "vector":
        return VectorQuant(cfg.code_dim, cfg.num_codes, **common)
    cls = GroupVectorQuant if cfg.kind == "group" else ResidualVectorQuant
    share = cfg.kind == "group" if cfg.share is None else cfg.share
    return cls(cfg.code_dim, cfg.num_codes, groups=cfg.groups, share=share, **common)


# The ablation ladder of the paper (Huh et al. 2023, Fig. 7 / Table 2), each rung adding what the
# paper's rung adds. "OPT" is the reference library's alternating optimization as its in-place example
# runs it: an in-place SGD step on the codebook (lr 50, momentum 0.9) with beta = 1 (no commitment term,
# the codebook term taken by the in-place step), plus the synchronized STE. The reference's in-place
# example uses nu = 0; nu = 2 comes from its autoencoder example (which has no in-place step). Under OPT
# the codebook's only main-optimizer gradient is nu * g and AdamW is invariant to its scale, so nu acts as
# an on/off switch there (docs/recipe.md). Rungs without OPT keep the default beta = 0.95. k-means++ init
# belongs to none of the five; "all" adds it.
L2_REPLACE = dict(norm="l2", cb_norm="l2", replace_freq=20)
AFFINE = dict(affine_lr=10.0)
OPT = dict(inplace_lr=50.0, inplace_momentum=0.9, sync_nu=2.0, beta=1.0)
ALL_FIXES = dict(kmeans_init=True, **L2_REPLACE, **AFFINE, **OPT)
# The presets' quantizer: +l2 +replace, the rung the ladder measured best (docs/recipe.md, "Which recipe the
# presets use"): better than the paper's full recipe (ALL_FIXES, the "all" rung) in generation at 4x MaskGIT's
# steps and in reconstruction, not separated from the other rungs that beat it, and the simplest of them.
# `train_tokenizer.py --recipe all` trains the paper's full recipe.
PRESET_FIXES = L2_REPLACE
VQ_VARIANTS = {
    "baseline": dict(),
    "l2_replace": L2_REPLACE,
    "affine": {**L2_REPLACE, **AFFINE},
    "opt": {**L2_REPLACE, **OPT},
    "opt_affine": {**L2_REPLACE, **AFFINE, **OPT},
    "all": ALL_FIXES,
    # OPT taken apart (docs/recipe.md): each differs from "opt" by one thing. opt_commit puts the
    # commitment term back (beta 0.95 as in every non-OPT rung: encoder weight 0.05 x vq_weight 5 = 0.25,
    # VQ-VAE's); opt_renorm keeps W's rows at unit length outside the graph, as the reference does,
    # instead of normalizing inside it (where SGD grows ||W|| and the in-place step decays as 1/||W||^2).
    "opt_commit": {**L2_REPLACE, **OPT, "beta": 0.95},
    "opt_renorm": {**L2_REPLACE, **OPT, "cb_norm": None, "cb_renorm": True},
    # The layer the reference library recommends in its README: no normalization, no in-place step.
    "seed_recipe": dict(beta=0.98, sync_nu=0.2, affine_lr=10.0, replace_freq=20, kmeans_init=True),
    # The other answers to collapse and gradient mismatch (docs/quantizers.md), each on its own so that a
    # rung differs from "baseline" by one idea. FSQ's levels and LFQ's bits follow num_codes (128 codes:
    # levels (8, 4, 4) or 7 bits; 512: (8, 8, 8) or 9 bits). Like every non-OPT rung they keep the default
    # beta = 0.95 (for LFQ: commitment weight 0.05; beta = 0.75 would be VQ-VAE's 0.25).
    "fsq": dict(kind="fsq"),
    "lfq": dict(kind="lfq"),
    "rotation": dict(rotation_trick=True),
    "simvq": dict(kind="simvq"),
}


def variant_overrides(name: str, keep: tuple[str, ...] = ("num_codes", "code_dim")) -> list[str]:
    """``model.vq.key=value`` overrides setting *every* VQ option to rung ``name`` of ``VQ_VARIANTS``:
    ``VQConfig``'s defaults (no fix at all) updated with the rung, so a preset's own fixes never leak
    into a rung. The fields in ``keep`` (the codebook's size) stay the preset's."""
    require(name in VQ_VARIANTS, f"unknown VQ variant {name!r}; choose one of {', '.join(VQ_VARIANTS)}")
    values = {**dataclasses.asdict(VQConfig()), **VQ_VARIANTS[name]}
    fmt = lambda v: "none" if v is None else ",".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v).lower()  # noqa: E731
    return [f"model.vq.{k}={fmt(v)}" for k, v in values.items() if k not in keep]


PRESETS: dict[str, TokenizerConfig] = {
    # CPU seconds-to-minutes: tests and `make demo`. 32x32 -> 8x8 tokens.
    "tiny": TokenizerConfig(resolution=32, channels=16, channel_mult=(1, 2, 4), num_res_blocks=1,
                            vq=VQConfig(num_codes=128, code_dim=16, **PRESET_FIXES)),
    # CPU minutes on real faces: 64x64 -> 16x16 tokens (~0.4 s per step of batch 32 on 2 idle cores).
    "small": TokenizerConfig(resolution=64, channels=16, channel_mult=(1, 2, 4), num_res_blocks=1,
                             vq=VQConfig(num_codes=512, code_dim=16, **PRESET_FIXES)),
    # One modern GPU: CelebA 64x64 -> 16x16 tokens, 1024 codes.
    "celeba64": TokenizerConfig(resolution=64, channels=128, channel_mult=(1, 2, 2), num_res_blocks=2,
                                attention=True, vq=VQConfig(num_codes=1024, code_dim=32, **PRESET_FIXES)),
}


def preset(name: str) -> TokenizerConfig:
    require(name in PRESETS, f"unknown tokenizer preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], vq=dataclasses.replace(PRESETS[name].vq))
