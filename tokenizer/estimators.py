"""Gradient estimators through a quantizer: how the task gradient reaches the encoder.

The forward value of a quantizer's output is always the code z_q; what differs is the backward pass.
``VectorQuant`` (and the layers built on it) compose their output as

    out = sg(z_q) + (path(z) - sg(path(z))) + nu * (z_q - sg(z_q))

so the value is exactly z_q (``a - sg(a)`` is exactly 0 for finite a), the encoder receives the
gradient of ``path`` and each code receives ``nu`` times the task gradient of the vectors assigned to it
(the synchronized STE of Huh et al. 2023). ``path(z) = z`` is the straight-through estimator (the
encoder gets the task gradient g unchanged); ``path = rotate_onto`` is the rotation trick.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def quantizer_output(z: Tensor, z_q: Tensor, sync_nu: float = 0.0, rotation_trick: bool = False) -> Tensor:
    """``sg(z_q) + (path(z) - sg(path(z))) + sync_nu * (z_q - sg(z_q))``: value z_q, gradients as above.

    z, z_q: (N, d). ``rotation_trick=False`` is the (synchronized) straight-through estimator.
    """
    path = rotate_onto(z, z_q.detach()) if rotation_trick else z
    return _Estimator.apply(path, z_q, float(sync_nu))


class _Estimator(torch.autograd.Function):
    """Value z_q (a view, no copy); backward: g to ``path``, ``nu * g`` to z_q (nothing when nu = 0).

    The same gradients as ``sg(z_q) + (path - sg(path)) + nu * (z_q - sg(z_q))`` without its five
    element-wise passes forward and their backward (bench/bench_vq.py measures the layer).
    """

    @staticmethod
    def forward(ctx, path: Tensor, z_q: Tensor, nu: float) -> Tensor:
        ctx.nu = nu
        return z_q.view_as(z_q)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        to_codes = g * ctx.nu if ctx.nu != 0 and ctx.needs_input_grad[1] else None
        return g, to_codes, None


def quantizer_tail(z: Tensor, codebook: Tensor, loss_codebook: Tensor | None, q: Tensor, beta: float,
                   sync_nu: float = 0.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The gather of the codes, the VQ loss and the straight-through output in one autograd node:
    ``z_q = codebook[q]``, ``out = quantizer_output(z, z_q, sync_nu)`` and, with ``zq_loss =
    loss_codebook[q]``, ``loss = (1 - beta) mean((z - sg(zq_loss))^2) + beta mean((sg(z) - zq_loss)^2)``:
    both terms have the value mean((z - z_q)^2) and differ only in where the gradient goes.

    z: (N, d); codebook: (K, d), the effective codes; loss_codebook: the codes the codebook term trains
    (``codebook`` itself, another tensor of the same values with another graph, or None for no gradient to
    any code from that term); q: (N,). Returns (out, z_q, loss, d): out has z_q's value and the
    straight-through gradients, z_q is the plain gather (its gradient reaches ``codebook`` only; the
    residual quantizer sums the stages' z_q), d the squared distance of each row (no gradient).

    The same values and gradients as those formulas written with autograd (tests/test_quantizer.py
    compares them in float64), with fewer passes over (N, d) backward: the encoder's gradient ``g + (1 - beta) 2 / numel
    (z - z_q)`` is one fused update, not a scaled copy that autograd adds to g; the codebook term reaches
    the codes as an index_add of ``z - z_q`` scaled afterwards on the (K, d) result, not a scaled (N, d)
    copy; and the codes' terms are summed on (K, d). The rotation trick takes the loss and z_q from here
    and its output from ``quantizer_output`` (``out`` then unused: no gradient from it).
    """
    return _Tail.apply(z, codebook, loss_codebook, q, float(beta), float(sync_nu))


class _Tail(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, codebook: Tensor, loss_codebook: Tensor | None, q: Tensor, beta: float,
                nu: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        # index_select, not codebook[q]: the same gather, and faster than advanced indexing
        z_q = codebook.index_select(0, q)  # (N, d); loss_codebook[q] has the same value
        diff = z - z_q
        # ||diff||^2 per row: the norm is one vectorized read (on a CPU ~5x faster than vecdot's product)
        d = torch.linalg.vector_norm(diff, dim=-1).square_()  # (N,)
        ctx.save_for_backward(diff, q)
        ctx.beta, ctx.nu, ctx.same, ctx.num_codes = beta, nu, loss_codebook is codebook, codebook.shape[0]
        ctx.mark_non_differentiable(d)
        ctx.set_materialize_grads(False)  # an output the objective does not use gets None, not zeros
        return z_q.view_as(z_q), z_q, d.sum() / diff.numel(), d

    @staticmethod
    def backward(ctx, g: Tensor | None, g_zq: Tensor | None, g_loss: Tensor | None,
                 _g_d: Tensor | None) -> tuple[Tensor | None, ...]:
        diff, q = ctx.saved_tensors
        need_z, need_codes, need_loss_codes = ctx.needs_input_grad[:3]
        commit = codebook_term = None
        if g_loss is not None:
            scale = g_loss * (2.0 / diff.numel())  # a 0-dim tensor: no host read
            commit = scale * (1 - ctx.beta) if need_z and ctx.beta != 1 else None
            if ctx.beta != 0 and (need_loss_codes or ctx.same and need_codes):
                codebook_term = scale * -ctx.beta
        g_z = None
        if need_z:
            g_z = g if commit is None else diff * commit if g is None else torch.addcmul(g, diff, commit)

        def scatter(rows: Tensor) -> Tensor:  # (N, d) -> (K, d): each code gets the sum of its rows
            return diff.new_zeros(ctx.num_codes, diff.shape[1]).index_add_(0, q, rows)

        to_codes = to_loss_codes = None
        if need_codes:
            rows = g * ctx.nu if g is not None and ctx.nu != 0 else None
            if g_zq is not None:
                rows = g_zq if rows is None else rows.add_(g_zq)
            to_codes = scatter(rows) if rows is not None else None
        if codebook_term is not None:
            term = scatter(diff).mul_(codebook_term)
            if ctx.same:
                to_codes = term if to_codes is None else to_codes.add_(term)
            else:
                to_loss_codes = term
        return g_z, to_codes, to_loss_codes, None, None, None


def rotate_onto(z: Tensor, z_q: Tensor, eps: float = 1e-6) -> Tensor:
    """The rotation trick (Fifty et al., ICLR 2025, "Restructuring Vector Quantization with the Rotation
    Trick", section 4.2): ``lambda * R z`` with ``R`` and ``lambda`` treated as constants.

    z, z_q: (N, d). With e = z/||z||, q = z_q/||z_q||, r = (e + q)/||e + q|| (all detached):
    ``R = I - 2 r r^T + 2 q e^T`` is the rotation of the plane spanned by e and q that takes e onto q
    (identity on its complement), and ``lambda = ||z_q|| / ||z||``, so the value is z_q (up to
    rounding: use it only as a gradient path). Its backward pass gives the encoder
    ``lambda * R^T g = lambda * (g - 2 r (r.g) + 2 e (q.g))``: the task gradient rotated by the angle
    between z and its code and scaled by their norm ratio, instead of copied unchanged. The codes get
    no gradient through this path (they are constants here).

    Degenerate cases: ``eps`` keeps the norms away from 0. If e = -q exactly, r = 0 and R = I + 2 q e^T,
    which still maps e onto q.
    """
    zd, zqd = z.detach(), z_q.detach()
    z_norm, zq_norm = zd.norm(dim=-1, keepdim=True), zqd.norm(dim=-1, keepdim=True)
    e, q = zd / z_norm.clamp_min(eps), zqd / zq_norm.clamp_min(eps)
    r = F.normalize(e + q, dim=-1, eps=eps)
    # R z = z - 2 r (r.z) + 2 q (e.z), one dot product each (never the (N, d, d) matrix)
    rz = z - 2 * r * (r * z).sum(-1, keepdim=True) + 2 * q * (e * z).sum(-1, keepdim=True)
    return rz * (zq_norm / z_norm.clamp_min(eps))


def l2_normalize(x: Tensor, eps: float = 1e-12) -> Tensor:
    """``F.normalize(x, dim=-1, eps=eps)`` with a fused backward: the same values and gradients.

    x: (..., d). y = x / max(||x||, eps). Backward: ``(g - y (g.y)) / max(||x||, eps)`` (the projection
    term only for rows whose norm is above eps; a clamped row is a plain scaling). Autograd's own graph of
    ``F.normalize`` (norm, clamp, expand, divide) takes about ten passes over (N, d) forward and backward;
    this takes four, which matters where the input is a whole batch of latents (bench/bench_vqtorch.py,
    the ``trained`` rows). First-order only: a double backward raises.
    """
    return _L2Normalize.apply(x, float(eps))


class _L2Normalize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, eps: float) -> Tensor:
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        inv = norm.clamp_min(eps).reciprocal()
        y = x * inv
        ctx.save_for_backward(y, inv, norm > eps)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor) -> tuple[Tensor, None]:
        y, inv, unclamped = ctx.saved_tensors
        # the row-wise dot product as a batched (1, d) x (d, 1) product: no (..., d) temporary, unlike vecdot
        dot = torch.matmul(g.unsqueeze(-2), y.unsqueeze(-1)).squeeze(-1).mul_(unclamped)  # (..., 1)
        return torch.addcmul(g, y, dot, value=-1.0).mul_(inv), None
