"""Quantizers without a learned codebook: each channel is rounded onto a fixed grid (base of FSQ and LFQ).

The codebook is implicit: the K grid points, with a fixed bijection between a grid point and its index,
so there is nothing to look up, nothing to collapse and nothing for k-means, dead-code replacement,
an affine map or an in-place step to act on.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from tokenizer.estimators import quantizer_output
from tokenizer.quantizer import check_finite, check_input
from tokenizer.usage import code_histogram, perplexity


class GridQuant(nn.Module):
    """A fixed per-channel grid with an index bijection; the same call convention as ``VectorQuant``.

    ``z_e`` has ``feature_size`` features on ``dim``. When ``feature_size`` differs from ``channels``
    (the grid's dimension: one channel per FSQ level, one per LFQ bit) a linear map projects z_e into
    the grid's space and another projects the result back (as vector-quantize-pytorch does), so any
    encoder width works; with equal sizes both maps are the identity. All in fp32.

    Subclasses define ``_grid(z) -> (z_b, codes, q)``: the continuous value that gets rounded (carries
    the gradient), the grid point it rounds to (a constant) and its index; ``grid_codes(indices)``, the
    inverse of the index map; and optionally ``_losses``. The output is the straight-through estimate
    ``codes + (z_b - sg(z_b))`` (``tokenizer.estimators.quantizer_output``), so its value is exactly the
    grid point, projected back.

    ``info`` as ``VectorQuant``'s: ``q``, ``z`` (= z_b) and ``z_q`` (= codes) in the grid's space with
    features on ``dim``, ``d`` = ||z_b - codes||^2, ``loss``, ``perplexity``, ``codes_used``; the
    commitment and codebook losses are zeros unless a subclass has them (there is no codebook to train).
    """

    def __init__(self, feature_size: int, channels: int, num_codes: int, dim: int = -1) -> None:
        super().__init__()
        if isinstance(feature_size, bool) or not isinstance(feature_size, int) or feature_size <= 0:
            raise ValueError(f"feature_size must be a positive integer, got {feature_size!r}")
        self.feature_size, self.channels, self.num_codes, self.dim = feature_size, channels, num_codes, dim
        project = feature_size != channels
        self.project_in = nn.Linear(feature_size, channels) if project else nn.Identity()
        self.project_out = nn.Linear(channels, feature_size) if project else nn.Identity()

    # ---- to be defined by each grid -------------------------------------------------------------
    def _grid(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def grid_codes(self, indices: Tensor) -> Tensor:
        """Indices (...) -> grid points (..., channels), before the output projection."""
        raise NotImplementedError

    def _losses(self, z: Tensor, z_b: Tensor, codes: Tensor) -> dict[str, Tensor]:
        """Auxiliary loss terms; ``loss`` is what the trainer adds. None by default. A part of ``loss`` under
        ``entropy_loss`` carries its own weights: the tokenizer does not scale it by ``loss.vq_weight``."""
        return {"loss": z.new_zeros(())}

    # ---- shared ---------------------------------------------------------------------------------
    def get_codebook(self) -> Tensor:
        """All K grid points (K, channels), in index order (for plots; decoding never needs it)."""
        device = next(self.buffers()).device  # every grid keeps its constants in buffers
        return self.grid_codes(torch.arange(self.num_codes, device=device))

    def decode(self, indices: Tensor) -> Tensor:
        """Indices (...) -> vectors with ``feature_size`` features at ``dim`` (the forward output's value)."""
        out = self.project_out(self.grid_codes(indices))  # (..., feature_size)
        return out if self.dim in (-1, indices.dim()) else out.movedim(-1, self.dim)

    def forward(self, z_e: Tensor) -> tuple[Tensor, dict[str, Any]]:
        check_input(self, z_e)
        check_finite(self, z_e)
        with torch.autocast(device_type=z_e.device.type, enabled=False):
            z_m = z_e.float().movedim(self.dim, -1)  # (..., feature_size)
            spatial = z_m.shape[:-1]
            z = self.project_in(z_m.reshape(-1, self.feature_size))  # (N, channels)
            z_b, codes, q = self._grid(z)
            out = self.project_out(quantizer_output(z_b, codes))  # value: the grid point, projected back
            losses = self._losses(z, z_b, codes)
            d = (z_b.detach() - codes).square().sum(-1)  # (N,)
            counts = code_histogram(q, self.num_codes)
            grid_view = lambda t: t.view(*spatial, self.channels).movedim(-1, self.dim)  # noqa: E731
            info = {
                "q": q.view(spatial),
                "z": grid_view(z_b),
                "z_q": grid_view(codes),
                "d": d.view(spatial),
                "quant_error": d.mean() / self.channels,  # mean((z - code)^2) over the grid's channels
                **losses,
                "perplexity": perplexity(counts),
                "codes_used": (counts > 0).float().mean(),
            }
        return out.view(*spatial, -1).movedim(-1, self.dim).to(z_e.dtype), info
