"""MaskGIT's bidirectional transformer over a grid of VQ token ids.

Chang et al., "MaskGIT: Masked Generative Image Transformer", CVPR 2022, sec. 3. The network is a
BERT-style encoder: it sees the whole (partially masked) token grid at once and predicts a
distribution over the K codes at every position. Mask token id = K (docs/method.md section 5), so the
input embedding has K + 1 rows while the output head covers the K real codes only: the model is
never asked to predict "mask".

Conditioning (class label and/or CelebA's binary attributes) enters as ONE prefix token, the sum of
a class embedding and one embedding per attribute. A prefix token needs no change to the blocks, is
attended to by every position, and its null version ("no condition") is a learned vector, which is
what classifier-free guidance (Ho & Salimans 2022) needs: the same network gives p(x | c) and p(x).
The prefix's output is discarded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from einops import rearrange
from torch import Tensor, nn

from core.attention import attention
from core.config import require
from core.pretrained import Pretrained


@dataclass
class MaskGITConfig:
    """Everything needed to rebuild a MaskGIT; stored in checkpoints as `dataclasses.asdict`.

    num_codes / grid normally come from the tokenizer; the presets below hold model sizes only.
    """

    num_codes: int = 1024  # K, codebook size; the mask token id is K (training: from the code file)
    grid: tuple[int, int] = (16, 16)  # (h, w) of the token grid; seq_len N = h * w (from the code file)
    dim: int = 512
    depth: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0
    dropout: float = 0.1  # MaskGIT/BERT hidden dropout
    attn_dropout: float = 0.1  # MaskGIT/BERT attention-probability dropout
    tied_head: bool = True  # logits = h @ E[:K]^T + b (MaskGIT's MlmLayer), else a separate Linear
    num_classes: int = 0  # 0 = no class conditioning
    num_attrs: int = 0  # 0 = no attribute conditioning; binary attributes (CelebA has 40)
    cond_drop_prob: float = 0.1  # p of replacing the condition by null in training (CFG)

    def __post_init__(self) -> None:  # types are checked by core.config.from_dict
        self.grid = tuple(self.grid)  # JSON round-trips give a list
        for name in ("num_codes", "dim", "depth", "heads"):
            require(getattr(self, name) >= 1, f"model.{name} must be an int >= 1, got {getattr(self, name)!r}")
        for name in ("num_classes", "num_attrs"):
            require(getattr(self, name) >= 0, f"model.{name} must be an int >= 0, got {getattr(self, name)!r}")
        require(len(self.grid) == 2 and min(self.grid) >= 1, f"model.grid must be (h, w) with h, w >= 1, got {self.grid}")
        require(self.dim % self.heads == 0, f"model.dim ({self.dim}) must be divisible by model.heads ({self.heads})")
        require(self.mlp_ratio > 0, f"model.mlp_ratio must be > 0, got {self.mlp_ratio}")
        for name in ("dropout", "attn_dropout", "cond_drop_prob"):
            require(0.0 <= getattr(self, name) < 1.0, f"model.{name} must be in [0, 1), got {getattr(self, name)!r}")

    @property
    def seq_len(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def mask_id(self) -> int:
        return self.num_codes

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0 or self.num_attrs > 0


# Model sizes; num_codes and grid come from the tokenizer (see build_maskgit).
PRESETS: dict[str, MaskGITConfig] = {
    # CPU smoke runs and tests.
    "tiny": MaskGITConfig(dim=128, depth=4, heads=4, mlp_ratio=4.0, attn_dropout=0.0),
    # One GPU, 16x16 grid of 1024 codes from a 64x64 CelebA tokenizer (~38M parameters); a
    # scaled-down version of MaskGIT's 24-layer, 768-wide ImageNet model.
    "celeba64": MaskGITConfig(dim=512, depth=12, heads=8, mlp_ratio=4.0),
}


class Attention(nn.Module):
    """Non-causal multi-head self-attention via PyTorch's fused SDPA kernel (in fp32 under CPU autocast)."""

    def __init__(self, dim: int, heads: int, attn_dropout: float, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.attn_dropout = attn_dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:  # (B, L, D) -> (B, L, D)
        q, k, v = rearrange(self.qkv(x), "b l (three h d) -> three b h l d", three=3, h=self.heads)
        # not causal: every position sees every other one, the point of MaskGIT over AR models.
        y = attention(q, k, v, dropout_p=self.attn_dropout if self.training else 0.0)  # (B, H, L, Dh)
        return self.drop(self.proj(rearrange(y, "b h l d -> b l (h d)")))


class Block(nn.Module):
    """Pre-LN transformer block (more stable to train than BERT's post-LN without warmup tricks)."""

    def __init__(self, cfg: MaskGITConfig) -> None:
        super().__init__()
        hidden = int(cfg.dim * cfg.mlp_ratio)
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.attn = Attention(cfg.dim, cfg.heads, cfg.attn_dropout, cfg.dropout)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.dim, hidden), nn.GELU(), nn.Linear(hidden, cfg.dim), nn.Dropout(cfg.dropout)
        )

    def forward(self, x: Tensor) -> Tensor:  # (B, L, D)
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MaskGIT(Pretrained, nn.Module):
    """Bidirectional transformer: token ids (B, N) in [0, K] -> logits (B, N, K) over the codes.

    Conditioning, when built with it (num_classes > 0 and/or num_attrs > 0):
      cond = {"class": LongTensor (B,) in [0, num_classes), "attrs": LongTensor (B, A) in {0, 1}}.
      Raw CelebA attributes are -1/1: map -1 to 0 before calling (other values raise).
      A missing key, or cond=None, means that part is null (unconditional).
      drop_cond: BoolTensor (B,), True = use the null condition for that sample (CFG's
      unconditional branch). If None in training mode, each sample is dropped with probability
      cfg.cond_drop_prob (drawn from torch's global RNG, like nn.Dropout); in eval mode nothing is
      dropped unless asked. Asking an unconditional model for conditioning raises ValueError.

    ``save_pretrained(folder)`` / ``MaskGIT.from_pretrained(folder)``: an exported model (core.pretrained).
    """

    kind, config_class = "maskgit", MaskGITConfig

    def __init__(self, cfg: MaskGITConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.num_prefix = 1 if cfg.conditional else 0
        self.tok_emb = nn.Embedding(cfg.num_codes + 1, d)  # row K is the mask token
        self.pos_emb = nn.Parameter(torch.zeros(1, self.num_prefix + cfg.seq_len, d))
        if cfg.num_classes > 0:
            self.class_emb = nn.Embedding(cfg.num_classes + 1, d)  # row num_classes = null class
        if cfg.num_attrs > 0:
            # Row 3a + v for attribute a with value v in {0, 1}; v = 2 is that attribute's null.
            self.attr_emb = nn.Embedding(3 * cfg.num_attrs, d)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d)
        # BERT's MLM head as used by MaskGIT (MlmLayer): Dense -> GELU -> LayerNorm -> projection.
        self.head_transform = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.LayerNorm(d))
        if cfg.tied_head:
            self.head_bias = nn.Parameter(torch.zeros(cfg.num_codes))
        else:
            self.head = nn.Linear(d, cfg.num_codes)
        self.apply(self._init_weights)
        nn.init.trunc_normal_(self.pos_emb, std=0.02, a=-0.04, b=0.04)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # Truncated normal, std 0.02, cut at 2 std: BERT's initializer, which MaskGIT reuses.
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.trunc_normal_(m.weight, std=0.02, a=-0.04, b=0.04)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def mask_id(self) -> int:
        return self.cfg.mask_id

    @property
    def seq_len(self) -> int:
        return self.cfg.seq_len

    def num_params(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def forward(
        self,
        tokens: Tensor,
        cond: Mapping[str, Tensor] | None = None,
        drop_cond: Tensor | None = None,
    ) -> Tensor:
        """tokens (B, N) long in [0, K] (K = mask) -> logits (B, N, K)."""
        cfg = self.cfg
        if tokens.dim() != 2 or tokens.shape[1] != cfg.seq_len:
            raise ValueError(f"MaskGIT: tokens must be (B, {cfg.seq_len}), got {tuple(tokens.shape)}")
        if tokens.dtype not in (torch.long, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"MaskGIT: tokens must be an integer tensor, got {tokens.dtype}")
        # Ids are checked where they enter (CodeDataset, decoding builds its own); here only on the CPU,
        # where it costs no device sync (on a GPU an id out of range fails in the embedding lookup).
        if tokens.device.type == "cpu" and tokens.numel() and (tokens.min() < 0 or tokens.max() > cfg.mask_id):
            raise ValueError(f"MaskGIT: token ids must lie in [0, {cfg.mask_id}] ({cfg.mask_id} = mask)")
        b = tokens.shape[0]

        x = self.tok_emb(tokens.long())  # (B, N, D)
        prefix = self._cond_prefix(cond, drop_cond, b, tokens.device)  # (B, P, D), P in {0, 1}
        if prefix is not None:
            x = torch.cat([prefix, x], dim=1)  # (B, 1 + N, D)
        x = self.drop(x + self.pos_emb)
        for block in self.blocks:
            x = block(x)
        x = self.head_transform(self.norm(x[:, self.num_prefix:]))  # (B, N, D)
        if cfg.tied_head:
            # Output embedding = input embedding of the K real codes (the mask row is excluded).
            return x @ self.tok_emb.weight[: cfg.num_codes].t() + self.head_bias  # (B, N, K)
        return self.head(x)  # (B, N, K)

    def _cond_prefix(self, cond: Mapping[str, Tensor] | None, drop_cond: Tensor | None,
                     b: int, device: torch.device) -> Tensor | None:
        """The conditioning prefix token (B, 1, D), or None for an unconditional model."""
        cfg = self.cfg
        cond = dict(cond or {})
        unknown = sorted(set(cond) - {"class", "attrs"})
        if unknown:
            raise ValueError(f"MaskGIT: unknown conditioning keys {unknown}; valid: 'class', 'attrs'")
        if "class" in cond and cfg.num_classes == 0:
            raise ValueError("MaskGIT: got cond['class'] but the model was built with num_classes=0")
        if "attrs" in cond and cfg.num_attrs == 0:
            raise ValueError("MaskGIT: got cond['attrs'] but the model was built with num_attrs=0")
        if not cfg.conditional:
            if drop_cond is not None:
                raise ValueError("MaskGIT: drop_cond given but the model is unconditional")
            return None

        if drop_cond is None:
            if self.training and cfg.cond_drop_prob > 0:
                drop_cond = torch.rand(b, device=device) < cfg.cond_drop_prob
            else:
                drop_cond = torch.zeros(b, dtype=torch.bool, device=device)
        elif drop_cond.shape != (b,) or drop_cond.dtype != torch.bool:
            raise ValueError(f"MaskGIT: drop_cond must be a bool tensor of shape ({b},)")

        prefix = torch.zeros(b, cfg.dim, device=device, dtype=self.pos_emb.dtype)
        if cfg.num_classes > 0:
            null = torch.full((b,), cfg.num_classes, dtype=torch.long, device=device)
            labels = cond.get("class")
            if labels is None:
                labels = null
            else:
                if labels.shape != (b,) or labels.dtype != torch.long:
                    raise ValueError(f"MaskGIT: cond['class'] must be a long tensor of shape ({b},)")
                if labels.device.type == "cpu" and (labels.min() < 0 or labels.max() >= cfg.num_classes):
                    raise ValueError(f"MaskGIT: class ids must lie in [0, {cfg.num_classes})")
                labels = torch.where(drop_cond, null, labels)
            prefix = prefix + self.class_emb(labels)  # (B, D)
        if cfg.num_attrs > 0:
            a = cfg.num_attrs
            null = torch.full((b, a), 2, dtype=torch.long, device=device)
            attrs = cond.get("attrs")
            if attrs is None:
                attrs = null
            else:
                if attrs.shape != (b, a) or attrs.dtype != torch.long:
                    raise ValueError(f"MaskGIT: cond['attrs'] must be a long tensor of shape ({b}, {a})")
                if attrs.device.type == "cpu" and ((attrs != 0) & (attrs != 1)).any():
                    raise ValueError("MaskGIT: attribute values must be 0 or 1 (map CelebA's -1 to 0)")
                attrs = torch.where(drop_cond[:, None], null, attrs)
            rows = attrs + 3 * torch.arange(a, device=device)  # (B, A)
            prefix = prefix + self.attr_emb(rows).sum(dim=1)  # (B, D): sum over attributes
        return rearrange(prefix, "b d -> b 1 d")


def build_maskgit(preset: str, num_codes: int, grid: int | tuple[int, int], **overrides: Any) -> MaskGIT:
    """MaskGIT from a named preset, with the tokenizer's codebook size and grid; overrides must be
    MaskGITConfig fields (e.g. num_attrs=40, dropout=0.0)."""
    require(preset in PRESETS, f"unknown MaskGIT preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    grid = (grid, grid) if isinstance(grid, int) else tuple(grid)
    return MaskGIT(dataclasses.replace(PRESETS[preset], num_codes=num_codes, grid=grid, **overrides))
