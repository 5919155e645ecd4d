"""Finite scalar quantization (Mentzer et al., ICLR 2024, "Finite Scalar Quantization: VQ-VAE Made
Simple", arXiv 2309.15505): bound each channel, round it to one of L_i levels; the codebook is the
implicit grid of prod(L_i) points and there is no auxiliary loss.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from tokenizer.scalar import GridQuant

MIN_LEVEL = 3  # 2 levels round to {-1, 0} only (asymmetric); binary codes are LFQ's job
DERIVED_MAX_LEVEL = 8  # the paper's level sets stay at or below 8 levels per channel


def fsq_levels(num_codes: int) -> tuple[int, ...]:
    """Levels whose product is exactly ``num_codes``: the fewest channels with levels in 3..8, then the
    most even set (smallest max - min), largest levels first. This reproduces the paper's sets where
    their product is the target (e.g. 240 -> (8, 6, 5), 1000 -> (8, 5, 5, 5), 64000 -> (8, 8, 8, 5, 5, 5));
    128 -> (8, 4, 4), 512 -> (8, 8, 8), 1024 -> (8, 8, 4, 4). Raises ValueError when none exists.
    """
    best: tuple[int, ...] | None = None

    def search(rest: int, top: int, acc: tuple[int, ...]) -> None:
        nonlocal best
        if rest == 1:
            key = (len(acc), acc[0] - acc[-1], tuple(-v for v in acc))
            if best is None or key < (len(best), best[0] - best[-1], tuple(-v for v in best)):
                best = acc
            return
        if best is not None and len(acc) >= len(best):
            return
        for level in range(min(top, rest), MIN_LEVEL - 1, -1):
            if rest % level == 0:
                search(rest // level, level, acc + (level,))

    if num_codes >= MIN_LEVEL:
        search(num_codes, DERIVED_MAX_LEVEL, ())
    if best is None:
        raise ValueError(f"FSQ: num_codes={num_codes} is not a product of levels in {MIN_LEVEL}..{DERIVED_MAX_LEVEL}; "
                         f"pass the levels explicitly (their product is the codebook size)")
    return best


class FiniteScalarQuant(GridQuant):
    """FSQ with ``levels`` = (L_1, ..., L_c): ``K = prod(L_i)`` codes on ``c`` channels.

    Per channel i, with L = L_i, ``half_l = (L - 1)(1 + eps) / 2``, ``offset = 1/2`` for even L else 0
    and ``shift = atanh(offset / half_l)``:

        bound(z) = tanh(z + shift) * half_l - offset        # in (-L/2, L/2), bound(0) = 0
        code     = round(bound(z)) / (L // 2)              # one of L values in [-1, 1]
        gradient = straight through the rounding: d code / d z = bound'(z) / (L // 2)

    Index: the digits ``round(bound(z)) + L // 2`` in 0..L-1, read as a mixed-radix number with the
    first channel least significant (``q = sum_i digit_i * prod_{j<i} L_j``); ``grid_codes`` inverts it.

    Deviation from the paper's appendix code, which uses ``(1 - eps)`` and ``tan``: ``atanh`` is the
    exact inverse, so bound(0) = 0, and ``(1 + eps)`` keeps atanh finite for every L. This is also what
    vector-quantize-pytorch computes, so both give identical codes and indices on the same input.
    """

    def __init__(self, feature_size: int, levels: tuple[int, ...] | list[int], dim: int = -1, eps: float = 1e-3) -> None:
        levels = tuple(levels)
        if not levels or any(isinstance(v, bool) or not isinstance(v, int) or v < MIN_LEVEL for v in levels):
            raise ValueError(f"FSQ levels must be a non-empty list of integers >= {MIN_LEVEL} (2 levels round to "
                             f"{{-1, 0}} only; use LFQ for binary codes), got {levels}")
        super().__init__(feature_size, len(levels), math.prod(levels), dim)
        self.levels = levels
        lv = torch.tensor(levels, dtype=torch.int32)
        half_l = (lv - 1) * (1 + eps) / 2
        offset = torch.where(lv % 2 == 0, 0.5, 0.0)
        basis = torch.cumprod(torch.tensor((1,) + levels[:-1]), 0)  # int64
        # Constants of ``levels``, not state. Float copies keep the forward free of mixed-dtype ops.
        for name, value in (("_levels", lv.long()), ("_basis", basis), ("_basis_f", basis.float()),
                            ("_half_l", half_l), ("_offset", offset), ("_shift", torch.atanh(offset / half_l)),
                            ("_half_width", (lv // 2).float())):
            self.register_buffer(name, value, persistent=False)

    def bound(self, z: Tensor) -> Tensor:
        """(..., c) -> (..., c), channel i in (-L_i/2, L_i/2)."""
        return torch.tanh(z + self._shift) * self._half_l - self._offset

    def _grid(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b = self.bound(z)  # (N, c)
        rounded = b.detach().round()
        digits = rounded + self._half_width  # 0..L-1
        if self.num_codes <= 2**24:  # fp32 holds every integer below 2^24 exactly: the index is exact
            q = (digits * self._basis_f).sum(-1).long()  # (N,)
        else:
            q = (digits.long() * self._basis).sum(-1)
        return b / self._half_width, rounded / self._half_width, q

    def grid_codes(self, indices: Tensor) -> Tensor:
        digits = (indices.unsqueeze(-1) // self._basis) % self._levels  # (..., c) in 0..L-1
        return (digits - self._half_width) / self._half_width

    def extra_repr(self) -> str:
        return f"feature_size={self.feature_size}, levels={self.levels}, num_codes={self.num_codes}"
