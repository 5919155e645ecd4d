"""Group and residual variants of the straightened VQ layer (same options as ``VectorQuant``)."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from tokenizer.estimators import l2_normalize, quantizer_output
from tokenizer.quantizer import VectorQuant, _check_norm, check_input


def _merge_infos(infos: list[dict[str, Any]], q: Tensor) -> dict[str, Any]:
    """Scalar loss and statistics averaged over groups/stages; per-group indices stacked on a last axis."""
    mean = lambda key: torch.stack([i[key] for i in infos]).mean()  # noqa: E731
    return {"q": q, "loss": mean("loss"), "perplexity": mean("perplexity"), "codes_used": mean("codes_used"),
            "quant_error": mean("quant_error"),
            "d": torch.stack([i["d"] for i in infos], -1).sum(-1)}


class GroupVectorQuant(nn.Module):
    """Split each d-vector into ``groups`` sub-vectors of size d / groups and quantize each.

    ``share=True`` uses one codebook for all groups (one ``VectorQuant`` over all sub-vectors);
    ``share=False`` gives each group its own ``VectorQuant`` (and its own in-place optimizer, bound to
    that group's codebook). ``info["q"]`` has a trailing group axis: (..., groups).
    """

    def __init__(self, feature_size: int, num_codes: int, groups: int = 1, share: bool = True,
                 dim: int = -1, **vq_kwargs: Any) -> None:
        super().__init__()
        if groups <= 0 or feature_size % groups != 0:
            raise ValueError(f"groups must divide feature_size, got groups={groups}, feature_size={feature_size}")
        self.groups, self.share, self.dim, self.feature_size = groups, share, dim, feature_size
        sub = feature_size // groups
        n = 1 if share else groups
        self.vqs = nn.ModuleList(VectorQuant(sub, num_codes, dim=-1, **vq_kwargs) for _ in range(n))

    def forward(self, z_e: Tensor) -> tuple[Tensor, dict[str, Any]]:
        check_input(self, z_e)
        z = z_e.movedim(self.dim, -1)
        z = z.reshape(*z.shape[:-1], self.groups, -1)  # (..., G, d/G)
        if self.share:
            out, info = self.vqs[0](z)
            infos, q = [info], info["q"]
        else:
            outs, infos = zip(*(vq(z[..., g, :]) for g, vq in enumerate(self.vqs)))
            out, q = torch.stack(outs, -2), torch.stack([i["q"] for i in infos], -1)
            infos = list(infos)
        merged = _merge_infos(infos, q)
        if self.share:
            merged["d"] = info["d"].sum(-1)
        out = out.flatten(-2).movedim(-1, self.dim)
        merged["z"], merged["z_q"] = z_e, out.detach()
        return out, merged

    def decode(self, indices: Tensor) -> Tensor:
        """Indices (..., groups) -> vectors with features at ``dim``."""
        if self.share:
            parts = self.vqs[0].decode(indices)
        else:
            parts = torch.stack([vq.decode(indices[..., g]) for g, vq in enumerate(self.vqs)], -2)
        return parts.flatten(-2).movedim(-1, self.dim)


class ResidualVectorQuant(nn.Module):
    """``groups`` residual stages: stage i quantizes what stages < i left, z_q = sum of stage codes.

    Each stage is a full ``VectorQuant`` (own codebook, own in-place optimizer, own k-means init and
    dead-code replacement); ``share=True`` reuses one codebook for all stages. The straight-through
    estimator is applied once to the sum, so the encoder gets the task gradient g (not groups * g),
    and with ``sync_nu`` each stage's code gets nu * g of the vectors assigned to it. ``rotation_trick``
    likewise acts once, rotating z onto the summed code.
    ``norm="l2"`` normalizes the input once, before the first stage (normalizing residuals would
    change their scale and make the sum meaningless).
    """

    def __init__(self, feature_size: int, num_codes: int, groups: int = 2, share: bool = False,
                 dim: int = -1, sync_nu: float = 0.0, norm: str | None = None, rotation_trick: bool = False,
                 **vq_kwargs: Any) -> None:
        super().__init__()
        self.norm = _check_norm(norm, "norm")
        if share and (vq_kwargs.get("inplace_optimizer") is not None or vq_kwargs.get("replace_freq", 0) > 0):
            # One codebook rewritten between stages would invalidate the earlier stages' graphs.
            raise ValueError("ResidualVectorQuant: share=True cannot be combined with an inplace_optimizer or "
                             f"replace_freq > 0 (got replace_freq={vq_kwargs.get('replace_freq', 0)}, "
                             f"inplace_optimizer={vq_kwargs.get('inplace_optimizer')}); use share=False")
        if groups <= 0:
            raise ValueError(f"groups (number of residual stages) must be positive, got {groups}")
        if _check_norm(vq_kwargs.get("cb_norm"), "cb_norm") is not None:
            raise ValueError("ResidualVectorQuant refuses cb_norm='l2': unit-norm codes cannot follow residuals that "
                             "shrink stage after stage; use cb_norm=None (norm='l2' still normalizes the input)")
        self.groups, self.share, self.dim, self.sync_nu, self.feature_size = groups, share, dim, float(sync_nu), feature_size
        self.rotation_trick = bool(rotation_trick)
        n = 1 if share else groups
        self.vqs = nn.ModuleList(VectorQuant(feature_size, num_codes, dim=-1, sync_nu=0.0, **vq_kwargs) for _ in range(n))

    def forward(self, z_e: Tensor) -> tuple[Tensor, dict[str, Any]]:
        check_input(self, z_e)
        z = z_e.float().movedim(self.dim, -1)  # (..., d)
        if self.norm == "l2":
            z = l2_normalize(z)
        residual, z_q, infos = z, torch.zeros_like(z), []
        for i in range(self.groups):
            _, info = self.vqs[0 if self.share else i](residual)
            z_q = z_q + info["z_q"]  # carries the codebook gradients of every stage
            residual = residual - info["z_q"].detach()
            infos.append(info)
        out = quantizer_output(z, z_q, self.sync_nu, self.rotation_trick)
        merged = _merge_infos(infos, torch.stack([i["q"] for i in infos], -1))
        merged["d"] = residual.detach().square().sum(-1)  # distance of z to the summed code
        out = out.to(z_e.dtype).movedim(-1, self.dim)
        merged["z"], merged["z_q"] = z.movedim(-1, self.dim), z_q.movedim(-1, self.dim)
        return out, merged

    def decode(self, indices: Tensor) -> Tensor:
        """Indices (..., groups) -> summed vectors with features at ``dim``."""
        vecs = sum(self.vqs[0 if self.share else i].decode(indices[..., i]) for i in range(self.groups))
        return vecs.movedim(-1, self.dim)
