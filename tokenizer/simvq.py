"""SimVQ (Zhu et al., 2024, "Addressing Representation Collapse in Vector Quantized Models with One
Linear Layer", arXiv 2411.02038): codes C = B W^T with a frozen random basis B and one learned linear
map W, so every gradient on any code moves the whole codebook.
"""
from __future__ import annotations

from torch import Tensor, nn

from tokenizer.quantizer import VectorQuant


class SimVQ(VectorQuant):
    """``VectorQuant`` whose effective codebook is ``C_k = W B_k`` (C = B W^T), B (K, d) frozen, W (d, d) learned.

    This is the learned affine re-parameterization of Huh et al. (``C_k = W_k * (1 + s) + b``: a
    per-dimension scale shared by all codes) generalized to a full shared linear map without bias: a
    code that is never assigned still moves whenever W does, which is what prevents collapse.
    B is drawn like ``VectorQuant``'s codebook (N(0, 1/d) entries) and is stored in
    ``codebook.weight`` with ``requires_grad=False``; it never changes. W starts as the identity,
    so at step 0 SimVQ is the plain VQ layer with the same codebook and any difference in training comes
    from the re-parameterization alone. (The paper's and vector-quantize-pytorch's W start from
    nn.Linear's random init; this is the one deviation.)

    Everything else is ``VectorQuant``'s: nearest code in fp32, the beta trade-off loss (whose codebook
    term now trains W), input and code l2 norms, the synchronized STE (nu * g reaches W through the
    assigned codes) and the rotation trick. k-means init, dead-code replacement, the affine maps and
    the in-place step all write or re-parameterize codebook rows, which here are a fixed basis: they
    are refused.
    """

    def __init__(self, feature_size: int, num_codes: int, beta: float = 0.95, norm: str | None = None,
                 cb_norm: str | None = None, sync_nu: float = 0.0, rotation_trick: bool = False, dim: int = -1,
                 chunk_elems: int = 2**24) -> None:
        super().__init__(feature_size, num_codes, beta=beta, norm=norm, cb_norm=cb_norm, sync_nu=sync_nu, dim=dim,
                         rotation_trick=rotation_trick, chunk_elems=chunk_elems)
        self.codebook.weight.requires_grad_(False)  # the frozen basis B
        self.code_map = nn.Linear(feature_size, feature_size, bias=False)  # W
        nn.init.eye_(self.code_map.weight)

    def _affine(self, w: Tensor, detach_params: bool = False) -> Tensor:
        """B (K, d) -> B W^T (K, d): the hook through which ``VectorQuant`` builds its effective codebook."""
        m = self.code_map.weight.float()
        return w @ (m.detach() if detach_params else m).t()

    def extra_repr(self) -> str:
        return (f"feature_size={self.feature_size}, num_codes={self.num_codes}, beta={self.beta}, norm={self.norm}, "
                f"cb_norm={self.cb_norm}, sync_nu={self.sync_nu}, rotation_trick={self.rotation_trick}")

