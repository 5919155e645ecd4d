"""The straightened vector-quantization layer (Huh et al., ICML 2023; docs/method.md section 2).

``VectorQuant`` keeps the vqtorch call convention (``z_q, info = vq(z_e)``) and implements:
affine re-parameterized codebook (learned or running-statistics), synchronized STE, alternating
(in-place) codebook optimization, k-means++ init, dead-code replacement and l2 normalization.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.errors import UserError
from core.finite import note_non_finite
from core.processes import all_reduce_, broadcast_
from tokenizer.estimators import l2_normalize, quantizer_output, quantizer_tail
from tokenizer.kmeans import kmeans, nearest_code
from tokenizer.usage import code_histogram, perplexity

NORMS = (None, "l2")


class NonFiniteInputError(UserError):
    """The quantizer's input holds NaN/inf: the encoder diverged (training scripts catch this)."""


OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def check_input(quantizer: nn.Module, z_e: Tensor) -> None:
    """The shape and dtype check every quantizer runs on its input (no device sync)."""
    name = type(quantizer).__name__
    if not torch.is_floating_point(z_e):
        raise TypeError(f"{name} expects a floating-point tensor, got dtype {z_e.dtype}")
    if z_e.dim() == 0 or z_e.shape[quantizer.dim] != quantizer.feature_size:
        raise ValueError(f"{name} expects feature size {quantizer.feature_size} on dim {quantizer.dim}, "
                         f"got input of shape {tuple(z_e.shape)}")


def check_finite(quantizer: nn.Module, z_e: Tensor) -> None:
    """Refuse an input holding NaN/inf (the encoder diverged; the trainers skip such a step). One host
    sync. One reduction is the fast check; the exact one runs only when it trips, so a finite input whose
    sum overflows is not refused.

    Inside ``core.finite.deferred`` (the training loops' steps that do not log) there is no host read
    and no error here: the verdict goes into the loop's device flag, read at the end of the log window;
    the loop then replays that window with this check raising, so the error comes at the same step as
    before, only later in wall time (see ``training.state.Rollback``)."""
    if note_non_finite(z_e):
        return
    if not torch.isfinite(z_e.sum()) and not torch.isfinite(z_e).all():
        raise NonFiniteInputError(f"{type(quantizer).__name__} input contains NaN or inf (the encoder diverged); "
                                  "refusing to assign codes")


def _check_norm(name: str | None, what: str) -> str | None:
    if isinstance(name, str) and name.lower() == "none":
        name = None
    if name not in NORMS:
        raise ValueError(f"{what} must be None or 'l2' (unit-normalize each vector), got {name!r}")
    return name


def kmeans_pending(model: nn.Module) -> bool:
    """Whether any quantizer in ``model`` still waits for its k-means init (a host sync: call it only
    until it turns False)."""
    return any(m.kmeans_init and not bool(m.kmeans_done) for m in model.modules() if isinstance(m, VectorQuant))


class VectorQuant(nn.Module):
    """Vector quantizer with the fixes of "Straightening Out the Straight-Through Estimator".

    Input ``z_e`` has its feature axis at ``dim``; it is flattened to z (N, d). Then, all in fp32:

    * ``norm="l2"``: z <- z / ||z||.  ``cb_norm="l2"``: each effective code is unit-normalized.
    * Effective codebook C = A(W). Learned affine (``affine_lr > 0``): per group g of codes,
      ``C_k = W_k * (1 + affine_lr * s_g) + affine_lr * b_g`` with s, b zero-initialised (A = identity
      at start); s, b are trained by the *main* optimizer only. Running-statistics affine
      (``running_affine=True``): ``C_k = W_k * sqrt(var_z / (var_W + 1e-8)) + (mean_z - scale*mean_W)``
      with EMA (momentum 0.1, first batch copied) statistics of z and W per dimension.
    * q = argmin_k ||z - C_k||^2 (chunked, never the full N x K matrix), z_q = C[q].
    * ``loss = (1 - beta) * mean((z - sg(z_q))^2) + beta * mean((sg(z) - z_q)^2)``: the first
      (commitment) term trains the encoder, the second the codebook. beta = 0.8 is VQ-VAE's 0.25.
    * Output (synchronized STE, nu = ``sync_nu``): ``z + sg(z_q - z) + nu*z_q - sg(nu*z_q)``, computed
      as ``sg(z_q) + (z - sg(z)) + nu*(z_q - sg(z_q))`` so the forward value is exactly z_q. The
      encoder gets the task gradient g; code k also gets nu * sum_{i: q_i = k} g_i.
    * ``rotation_trick=True`` (Fifty et al., ICLR 2025; ``tokenizer/estimators.py``): the encoder gets
      the task gradient rotated from z_q's direction onto z's and scaled by ||z_q|| / ||z|| instead of g
      itself. It replaces only the encoder's path; ``sync_nu`` still gives the codes their nu * g, so
      the two compose (forward value still exactly z_q).

    State changed during *training* forwards (all of it in buffers, so checkpoints carry it):

    * ``kmeans_init``: on the first training forward the codebook is fit by k-means++ and 10 Lloyd
      iterations on that batch's z. With fewer vectors than codes, the remaining codes are noisy copies
      of random vectors (the codebook never shrinks). W is written so the *effective* code equals the
      center (the affine map is inverted).
    * ``replace_freq = T``: at every training step, each code not assigned during the last T steps is
      re-seeded from a distinct random z of the current batch plus noise of 0.01 x its norm (again
      written through the inverse affine map, so the effective code is that vector). A code is never
      idle for more than T steps.
    * ``inplace_optimizer`` (a factory ``params -> Optimizer``, e.g.
      ``lambda p: torch.optim.SGD(p, lr=50, momentum=0.9)``): alternating optimization. After the
      assignment, one step of that optimizer on W alone lowers mean((sg(z) - C[q])^2); z_q is then
      taken from the *updated* effective codebook (same q). The gradient is computed with
      ``torch.autograd.grad`` and handed to the optimizer through a swapped-in ``.grad`` that is
      restored afterwards, so no gradient leaks into the affine parameters or into the main
      optimizer's accumulated gradients. The affine parameters do not take part in this step.
      The codebook term of ``loss`` is then computed with W detached, so the main optimizer never
      applies a second codebook-loss step to W; it still trains the affine parameters (if any). The
      commitment term keeps its weight ``1 - beta`` for the encoder: the paper's reference library
      requires ``beta = 1`` (no commitment gradient at all, only the task gradient); ``beta < 1``
      keeps a commitment term (the ``opt_commit`` rung). W does receive the synchronized task gradient
      ``nu * g`` from the main optimizer; with AdamW and no other gradient on W, only whether nu is 0
      matters, not its value (docs/recipe.md).
    * ``cb_renorm=True``: W's rows are rescaled to unit length in place, outside the graph, before the
      assignment of every training forward and again after the in-place step (the reference library's
      unit-norm codebook); ``get_codebook`` divides by the detached row norms, so the effective codes
      are unit rows (before the affine map) also after a main-optimizer step. Excludes ``cb_norm``.
    * Under ``torch.distributed`` every replica ends with the identical codebook: k-means centers and
      replaced codes are broadcast from rank 0 (the whole codebook, at every step that checks for dead codes:
      which codes are dead is never read on the host; K x d floats, 0.2-1.4 % of the bytes of the gradient
      all-reduce at the presets), code usage is all-reduced (max of last-used step) every step, the
      in-place gradient and the running statistics are averaged over replicas.
    """

    def __init__(self, feature_size: int, num_codes: int, beta: float = 0.95, kmeans_init: bool = False,
                 norm: str | None = None, cb_norm: str | None = None, affine_lr: float = 0.0,
                 affine_groups: int = 1, sync_nu: float = 0.0, replace_freq: int = 0, dim: int = -1,
                 inplace_optimizer: OptimizerFactory | None = None, running_affine: bool = False,
                 kmeans_iters: int = 10, chunk_elems: int = 2**24, rotation_trick: bool = False,
                 cb_renorm: bool = False) -> None:
        super().__init__()
        for name, v in (("feature_size", feature_size), ("num_codes", num_codes), ("affine_groups", affine_groups)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not 0.0 <= float(beta) <= 1.0:
            raise ValueError(f"beta must be in [0, 1] (trade-off between commitment and codebook loss), got {beta}")
        if affine_lr < 0:
            raise ValueError(f"affine_lr must be >= 0 (0 disables the learned affine map), got {affine_lr}")
        if num_codes % affine_groups != 0:
            raise ValueError(f"affine_groups must divide num_codes, got affine_groups={affine_groups}, num_codes={num_codes}")
        if affine_lr > 0 and running_affine:
            raise ValueError(f"choose one affine re-parameterization: affine_lr > 0 (learned) or running_affine=True, "
                             f"got affine_lr={affine_lr} and running_affine=True")
        if replace_freq < 0:
            raise ValueError(f"replace_freq must be >= 0 (0 disables dead-code replacement), got {replace_freq}")
        if cb_renorm and _check_norm(cb_norm, "cb_norm") is not None:
            raise ValueError("choose one codebook normalization: cb_norm='l2' (inside the graph) or cb_renorm=True "
                             "(W's rows rescaled to unit length outside it), got both")
        self.feature_size, self.num_codes, self.beta, self.dim = feature_size, num_codes, float(beta), dim
        self.norm, self.cb_norm = _check_norm(norm, "norm"), _check_norm(cb_norm, "cb_norm")
        self.affine_lr, self.affine_groups, self.running_affine = float(affine_lr), affine_groups, running_affine
        self.sync_nu, self.replace_freq, self.kmeans_init = float(sync_nu), replace_freq, kmeans_init
        self.kmeans_iters, self.chunk_elems = kmeans_iters, chunk_elems
        self.rotation_trick, self.cb_renorm = bool(rotation_trick), bool(cb_renorm)

        self.codebook = nn.Embedding(num_codes, feature_size)
        nn.init.normal_(self.codebook.weight, std=feature_size**-0.5)  # E||W_k|| ~ 1, like unit-scale z
        if self.affine_lr > 0:
            self.affine_scale = nn.Parameter(torch.zeros(affine_groups, feature_size))
            self.affine_bias = nn.Parameter(torch.zeros(affine_groups, feature_size))
        if running_affine:
            for name in ("z_mean", "w_mean"):
                self.register_buffer(name, torch.zeros(feature_size))
            for name in ("z_var", "w_var"):
                self.register_buffer(name, torch.ones(feature_size))
            self.register_buffer("stats_ready", torch.tensor(False))
        self.register_buffer("kmeans_done", torch.tensor(False))
        # ``kmeans_done`` read on the host once (after construction or a load), not at every step
        self._kmeans_waiting: bool | None = None
        self.register_load_state_dict_post_hook(lambda module, _: setattr(module, "_kmeans_waiting", None))
        self.register_buffer("step", torch.tensor(0, dtype=torch.long))
        self.register_buffer("last_used", torch.zeros(num_codes, dtype=torch.long))
        self.inplace_optimizer = inplace_optimizer([self.codebook.weight]) if inplace_optimizer else None

    # ---- the effective codebook ---------------------------------------------------------------
    def _affine(self, w: Tensor, detach_params: bool = False) -> Tensor:
        """A(W) (K, d) for the learned or running-statistics affine map (identity when off)."""
        if self.affine_lr > 0:
            s, b = self.affine_scale, self.affine_bias
            if detach_params:
                s, b = s.detach(), b.detach()
            g = self.affine_groups
            w = w.view(g, self.num_codes // g, -1) * (1 + self.affine_lr * s[:, None]) + self.affine_lr * b[:, None]
            return w.reshape(self.num_codes, -1)
        if self.running_affine:
            scale, bias = self._running_scale_bias()
            return w * scale + bias
        return w

    def _running_scale_bias(self) -> tuple[Tensor, Tensor]:
        scale = torch.sqrt(self.z_var / (self.w_var + 1e-8))
        return scale, self.z_mean - scale * self.w_mean

    def _invert_affine(self, c: Tensor, codes: Tensor) -> Tensor:
        """W rows such that A(W)[codes] == c (used by k-means init and dead-code replacement)."""
        if self.affine_lr > 0:
            g = codes // (self.num_codes // self.affine_groups)
            s, b = self.affine_scale.detach()[g], self.affine_bias.detach()[g]
            return (c - self.affine_lr * b) / (1 + self.affine_lr * s)
        if self.running_affine:
            scale, bias = self._running_scale_bias()
            return (c - bias) / scale
        return c

    def get_codebook(self, detach_affine: bool = False, detach_weight: bool = False) -> Tensor:
        """The effective codebook C = cb_norm(A(W)), (K, d) fp32. Decoding always goes through it."""
        w = self.codebook.weight.float()
        if self.cb_renorm:  # unit rows in value; the norm is a constant to autograd (training keeps it at 1)
            w = w / w.detach().norm(dim=-1, keepdim=True).clamp_min(1e-12)
        c = self._affine(w.detach() if detach_weight else w, detach_params=detach_affine)
        return l2_normalize(c) if self.cb_norm == "l2" else c

    def decode(self, indices: Tensor) -> Tensor:
        """Indices (...) -> vectors with the feature axis at ``dim``, from the effective codebook."""
        z_q = self.get_codebook()[indices]  # (..., d)
        return z_q if self.dim in (-1, indices.dim()) else z_q.movedim(-1, self.dim)

    # ---- forward --------------------------------------------------------------------------------
    def _check_input(self, z_e: Tensor) -> None:
        check_input(self, z_e)
        check_finite(self, z_e)

    def forward(self, z_e: Tensor) -> tuple[Tensor, dict[str, Any]]:
        self._check_input(z_e)
        with torch.autocast(device_type=z_e.device.type, enabled=False):
            z_q, info = self._quantize(z_e)
        return z_q.to(z_e.dtype), info

    def _quantize(self, z_e: Tensor) -> tuple[Tensor, dict[str, Any]]:
        z_m = z_e.float().movedim(self.dim, -1)  # (..., d)
        spatial = z_m.shape[:-1]
        z = z_m.reshape(-1, self.feature_size)  # (N, d)
        if self.norm == "l2":
            z = l2_normalize(z)
        zd = z.detach()

        if self.training:
            self.step += 1
            if self.kmeans_init and self._kmeans_pending():
                self._kmeans_init(zd)
            if self.running_affine:
                self._update_running_stats(zd)
            if self.replace_freq > 0:
                self._replace_dead_codes(zd)
            if self.cb_renorm:
                self._renormalize()

        with torch.no_grad():
            q = nearest_code(zd, self.get_codebook(), self.chunk_elems)  # (N,)
        counts = code_histogram(q, self.num_codes)
        if self.training:
            self.last_used.copy_(torch.where(counts > 0, self.step, self.last_used))  # K writes, not N
            all_reduce_(self.last_used, "max")  # usage on any replica counts: replicas keep identical state
            if self.inplace_optimizer is not None:
                self._inplace_step(zd, q)
                if self.cb_renorm:
                    self._renormalize()

        codebook = self.get_codebook()  # (K, d), the (possibly just updated) effective codebook
        if self.inplace_optimizer is None:
            loss_codebook = codebook
        elif self.affine_lr > 0:  # W already took its step on this term: only the affine map learns from it here
            loss_codebook = self.get_codebook(detach_weight=True)
        else:
            loss_codebook = None
        # the gather, the VQ loss (both terms have the value mean((z - z_q)^2)) and the straight-through output
        out, z_q, loss, d = quantizer_tail(z, codebook, loss_codebook, q, self.beta, self.sync_nu)
        if self.rotation_trick:  # the same value; the encoder's task gradient goes through the rotation instead
            out = quantizer_output(z, z_q, self.sync_nu, rotation_trick=True)

        info = {
            "q": q.view(spatial),
            "z": z.view(*spatial, -1).movedim(-1, self.dim),
            "z_q": z_q.view(*spatial, -1).movedim(-1, self.dim),
            "d": d.view(spatial),
            "loss": loss,
            "quant_error": loss.detach(),  # mean((z - z_q)^2), the straight-through error (the loss's value)
            "perplexity": perplexity(counts),
            "codes_used": (counts > 0).float().mean(),
        }
        return out.view(*spatial, -1).movedim(-1, self.dim), info

    # ---- stateful parts (training only) ----------------------------------------------------------
    def _kmeans_pending(self) -> bool:
        if self._kmeans_waiting is None:
            self._kmeans_waiting = not bool(self.kmeans_done)  # one host read, then cached
        return self._kmeans_waiting

    @torch.no_grad()
    def _kmeans_init(self, z: Tensor) -> None:
        k_fit = min(self.num_codes, z.shape[0])
        centers = kmeans(z, k_fit, iters=self.kmeans_iters, chunk_elems=self.chunk_elems)
        if k_fit < self.num_codes:  # fewer vectors than codes: fill with noisy copies, never shrink K
            extra = z[torch.randint(z.shape[0], (self.num_codes - k_fit,), device=z.device)]
            centers = torch.cat([centers, extra + self._noise_like(extra)])
        if self.running_affine and not bool(self.stats_ready):
            self._update_running_stats(z, w=centers)  # so that A(W) == centers right after init
        all_codes = torch.arange(self.num_codes, device=z.device)
        self.codebook.weight.copy_(self._invert_affine(centers, all_codes))
        broadcast_(self.codebook.weight.data)
        self.kmeans_done.fill_(True)
        self._kmeans_waiting = False

    @staticmethod
    def _noise_like(v: Tensor, rel: float = 0.01) -> Tensor:
        """Gaussian noise with norm ~ rel * ||v|| per row."""
        return torch.randn_like(v) * (rel * v.norm(dim=-1, keepdim=True) / v.shape[-1] ** 0.5)

    @torch.no_grad()
    def _update_running_stats(self, z: Tensor, w: Tensor | None = None, momentum: float = 0.1) -> None:
        w = self.codebook.weight.float() if w is None else w
        # Per-dimension first and second moments, averaged over replicas so all hold the same stats.
        moments = torch.stack([z.mean(0), z.square().mean(0)])
        all_reduce_(moments, "mean")
        z_mean, z_var = moments[0], (moments[1] - moments[0].square()).clamp_min(0)
        w_mean, w_var = w.mean(0), w.var(0, unbiased=False)
        # the first batch is copied; decided on the device (a tensor weight), without a host read
        m = torch.where(self.stats_ready, momentum, 1.0).to(z_mean.dtype)
        for buf, new in ((self.z_mean, z_mean), (self.z_var, z_var), (self.w_mean, w_mean), (self.w_var, w_var)):
            buf.lerp_(new, m)
        self.stats_ready.fill_(True)

    @torch.no_grad()
    def _replace_dead_codes(self, z: Tensor) -> None:
        """Re-seed every code idle for ``replace_freq`` steps (checked every step) from this batch's z.

        One event draws distinct vectors (a permutation; only when more codes are dead than vectors in
        the batch does a vector serve twice), and adds noise of 0.01 x its norm so that codes seeded
        from near-identical vectors still split; 0.01 is small against the typical distance between
        neighbouring codes, so the new code starts where the data is.

        No host read: which codes are dead is never asked on the host. A candidate vector is drawn for
        every code (the i-th dead code takes the i-th vector of the permutation) and written with a
        masked write, so live codes keep their rows and the draws are the same whether or not a code is
        dead (the random stream moves by the same amount every step).
        """
        dead = self.step - self.last_used > self.replace_freq  # (K,) bool: idle the last T steps
        n, k = z.shape[0], self.num_codes
        order = torch.cat([torch.randperm(n, device=z.device) for _ in range(-(-k // n))])
        rank = (dead.long().cumsum(0) - 1).clamp_min(0)  # the i-th dead code takes the i-th vector drawn
        picks = z[order[rank]]  # (K, d): a candidate for every code, used by the dead ones only
        picks = picks + self._noise_like(picks)
        codes = torch.arange(k, device=z.device)
        weight = self.codebook.weight
        weight.copy_(torch.where(dead[:, None], self._invert_affine(picks, codes).to(weight.dtype), weight))
        broadcast_(weight.data)  # every step now (rank 0's picks), not only when a code was dead
        self.last_used.copy_(torch.where(dead, self.step, self.last_used))

    @torch.no_grad()
    def _renormalize(self) -> None:
        """``cb_renorm``: rescale W's rows to unit length in place (outside the graph, as the reference
        library's unit-norm codebook does), so neither SGD nor AdamW can grow ||W_k||."""
        w = self.codebook.weight
        w.copy_(F.normalize(w.float(), dim=-1).to(w.dtype))

    def _inplace_step(self, z: Tensor, q: Tensor) -> None:
        weight = self.codebook.weight
        with torch.enable_grad():
            c = self.get_codebook(detach_affine=True)
            (grad,) = torch.autograd.grad(F.mse_loss(c.index_select(0, q), z), [weight])
        all_reduce_(grad, "mean")
        saved, weight.grad = weight.grad, grad  # hand the optimizer this gradient only ...
        self.inplace_optimizer.step()
        weight.grad = saved  # ... and give back whatever the main backward had accumulated

    def get_extra_state(self) -> dict[str, Any]:
        """The in-place optimizer's state (e.g. SGD momentum) travels with the module's state_dict."""
        return {"inplace_optimizer": self.inplace_optimizer.state_dict() if self.inplace_optimizer else None}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if self.inplace_optimizer is not None and state.get("inplace_optimizer") is not None:
            self.inplace_optimizer.load_state_dict(state["inplace_optimizer"])

    def extra_repr(self) -> str:
        return (f"feature_size={self.feature_size}, num_codes={self.num_codes}, beta={self.beta}, norm={self.norm}, "
                f"cb_norm={self.cb_norm}, affine_lr={self.affine_lr}, affine_groups={self.affine_groups}, "
                f"running_affine={self.running_affine}, sync_nu={self.sync_nu}, replace_freq={self.replace_freq}, "
                f"kmeans_init={self.kmeans_init}, inplace={'on' if self.inplace_optimizer else 'off'}, "
                f"rotation_trick={self.rotation_trick}")
