"""Streaming Gaussian fits of Inception features, the Frechet distance between them, and KID.

FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule..."):
    d^2 = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2}).
KID (Binkowski et al. 2018, "Demystifying MMD GANs"): the unbiased MMD^2 estimate with the
kernel k(x, y) = (gamma x.y + coef0)^degree, averaged over random subsets; defaults are
torch-fidelity's (subset size 1000, 100 subsets, degree 3, gamma 1/d, coef0 1, seed 2020) and the
subset draws replay torch-fidelity's, so both give the same number on the same features.
"""
from __future__ import annotations

import warnings

import numpy as np
from tqdm import tqdm

from eval.errors import EvalError

MIN_SAMPLES = 2048  # below the feature dimension the covariance is rank-deficient and FID biased upward
KID_DEFAULTS = {"subsets": 100, "subset_size": 1000, "degree": 3, "gamma": None, "coef0": 1.0, "seed": 2020}
_PSD_RTOL = 1e-5  # eigenvalues below -rtol * max|eigenvalue| mean the input is not a covariance


def warn_if_few(count: int, what: str) -> str | None:
    """``warnings.warn`` when ``count`` < 2048 samples; returns the message (for the report) or None."""
    if count >= MIN_SAMPLES:
        return None
    message = f"{what}: {count} < {MIN_SAMPLES} samples: covariance rank-deficient, FID biased upward"
    warnings.warn(message, stacklevel=3)
    return message


class FeatureStats:
    """Running mean and covariance of features in float64; optionally a bounded sample of the features.

    Batches are merged with the pairwise update of Chan, Golub & LeVeque (1979), which keeps centred
    second moments (no E[xx^T] - mu mu^T cancellation), so features are never all in memory.

    State: ``count``, the running mean and centred scatter matrix (D x D float64, 32 MiB at D = 2048),
    and, when ``keep_features`` > 0, a uniform reservoir sample (Vitter's algorithm R, seeded) of at most
    ``keep_features`` feature rows in float32 for KID: 8 KiB per row at D = 2048 (20,000 rows: 164 MB).
    """

    def __init__(self, dim: int, keep_features: int = 0, seed: int = 0) -> None:
        self.dim = dim
        self.count = 0
        self.keep_features = keep_features
        self._mean = np.zeros(dim)
        self._scatter = np.zeros((dim, dim))  # sum of (x - mean)(x - mean)^T
        self._kept: list[np.ndarray] | np.ndarray = []
        self._rng = np.random.RandomState(seed)

    def update(self, features: np.ndarray) -> None:
        x = np.asarray(features, dtype=np.float64)  # (B, D)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise EvalError(f"features must have shape (B, {self.dim}), got {x.shape}")
        if not np.isfinite(x).all():
            raise EvalError("features contain NaN or inf (broken images or weights?)")
        n_b = len(x)
        if n_b == 0:
            return
        self._keep(np.asarray(features, dtype=np.float32), start=self.count)
        mean_b = x.mean(axis=0)
        centred = x - mean_b
        n = self.count + n_b
        delta = mean_b - self._mean
        self._scatter += centred.T @ centred + np.outer(delta, delta) * (self.count * n_b / n)
        self._mean += delta * (n_b / n)
        self.count = n

    def _keep(self, x: np.ndarray, start: int) -> None:
        cap = self.keep_features
        if cap <= 0:
            return
        n_fill = max(0, min(cap - start, len(x)))
        if n_fill:
            self._kept.append(x[:n_fill].copy())
        if n_fill == len(x):
            return
        if isinstance(self._kept, list):
            self._kept = np.concatenate(self._kept)  # (cap, D), full from now on
        for k in range(n_fill, len(x)):  # algorithm R: item i replaces a random slot with prob cap / (i + 1)
            j = self._rng.randint(0, start + k + 1)
            if j < cap:
                self._kept[j] = x[k]

    @property
    def mu(self) -> np.ndarray:
        if self.count == 0:
            raise EvalError("no features were accumulated")
        return self._mean.copy()

    @property
    def sigma(self) -> np.ndarray:
        """Unbiased covariance (ddof = 1, as ``np.cov``)."""
        if self.count < 2:
            raise EvalError(f"a covariance needs at least 2 samples, got {self.count}")
        return self._scatter / (self.count - 1)

    def features(self) -> np.ndarray | None:
        """The kept float32 features (k, D), k = min(count, keep_features); None when none are kept."""
        if self.keep_features <= 0 or self.count == 0:
            return None
        return np.concatenate(self._kept) if isinstance(self._kept, list) else self._kept


def _psd_sqrt(sigma: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(symmetrised float64 covariance, its PSD square root); raises if it is not a covariance.

    Eigenvalues below ``d * eps * max`` (numpy's matrix-rank tolerance) are rounding noise of a
    rank-deficient matrix and are set to 0, so they add no spurious sqrt(noise) to the trace.
    """
    sigma = np.asarray(sigma, dtype=np.float64)
    if sigma.ndim != 2 or sigma.shape[0] != sigma.shape[1] or not np.isfinite(sigma).all():
        raise EvalError(f"{name} must be a finite square matrix, got shape {sigma.shape}")
    scale = max(np.abs(sigma).max(), np.finfo(np.float64).tiny)
    if np.abs(sigma - sigma.T).max() > 1e-6 * scale:
        raise EvalError(f"{name} is not symmetric, so it is not a covariance matrix")
    sigma = (sigma + sigma.T) / 2
    w, v = np.linalg.eigh(sigma)
    top = max(np.abs(w).max(), np.finfo(np.float64).tiny)
    if w.min() < -_PSD_RTOL * top:
        raise EvalError(f"{name} has eigenvalue {w.min():.3g} (largest {top:.3g}): not positive "
                        f"semi-definite beyond rounding, the statistics are broken")
    w = np.where(w > len(w) * np.finfo(np.float64).eps * top, w, 0.0)
    return sigma, (v * np.sqrt(w)) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    tr((S1 S2)^{1/2}) is the sum of the singular values (nuclear norm) of B = S2^{1/2} S1^{1/2}: S1 S2
    is similar to S1^{1/2} S2 S1^{1/2} = B^T B, whose square root has the singular values of B as
    eigenvalues. torch-fidelity takes eigenvalues of the non-symmetric product S1 S2 and keeps the
    real parts of their square roots; the values agree, but squaring (S1 S2 ~ B^T B) makes small
    eigenvalues carry ~sqrt(eps) relative error, while singular values of B are accurate to ~eps.
    (A set against itself, 12 samples, 2048-d, spectrum over 7 decades: ~1e-11 here, ~1e-3 there;
    with 3,000 samples both agree to 1e-10.)
    The check that torch-fidelity skips: a covariance with an eigenvalue clearly below zero (the
    analogue of a non-negligible imaginary part in sqrtm) is not a covariance, and raises.
    """
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise EvalError(f"mu1 and mu2 must be vectors of one length, got {mu1.shape} and {mu2.shape}")
    s1, sqrt_s1 = _psd_sqrt(sigma1, "sigma1")
    s2, sqrt_s2 = _psd_sqrt(sigma2, "sigma2")
    if s1.shape != (len(mu1), len(mu1)) or s2.shape != s1.shape:
        raise EvalError(f"covariances {s1.shape}, {s2.shape} do not match means of length {len(mu1)}")
    tr_covmean = np.linalg.svd(sqrt_s2 @ sqrt_s1, compute_uv=False).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def _mmd2_unbiased_poly(x: np.ndarray, y: np.ndarray, degree: int, gamma: float, coef0: float) -> float:
    """Unbiased MMD^2 (diagonals of K_xx, K_yy dropped; K_xy kept whole), as torch-fidelity's mmd2."""
    m = len(x)
    k_xx = (x @ x.T * gamma + coef0) ** degree
    k_yy = (y @ y.T * gamma + coef0) ** degree
    k_xy = (x @ y.T * gamma + coef0) ** degree
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2 * k_xy.sum() / (m * m))


def kernel_inception_distance(features1: np.ndarray, features2: np.ndarray, *, subsets: int = 100,
                              subset_size: int = 1000, degree: int = 3, gamma: float | None = None,
                              coef0: float = 1.0, seed: int = 2020, progress: bool = False) -> dict:
    """KID mean and std over ``subsets`` random subsets; returns them with the parameters actually used.

    ``features1`` are the samples being scored (torch-fidelity's input1), ``features2`` the reference;
    the order only matters for which random subsets are drawn. A subset size above either count is
    reduced to the smaller count, with a warning; the value used is returned as ``subset_size``.
    """
    f1, f2 = np.asarray(features1, dtype=np.float64), np.asarray(features2, dtype=np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
        raise EvalError(f"KID needs two feature matrices of one width, got {f1.shape} and {f2.shape}")
    n1, n2 = len(f1), len(f2)
    if min(n1, n2) < subset_size:
        warnings.warn(f"KID subset size {subset_size} > samples ({n1}, {n2}); using {min(n1, n2)}", stacklevel=2)
        subset_size = min(n1, n2)
    if subset_size < 2:
        raise EvalError(f"KID needs at least 2 samples per set, got {n1} and {n2}")
    gamma_used = 1.0 / f1.shape[1] if gamma is None else gamma
    rng = np.random.RandomState(seed)
    mmds = np.empty(subsets)
    for i in tqdm(range(subsets), desc="KID subsets", disable=not progress, leave=False):
        # same draw order as torch_fidelity.metric_kid.kid_features_to_metric
        x = f1[rng.choice(n1, subset_size, replace=False)]
        y = f2[rng.choice(n2, subset_size, replace=False)]
        mmds[i] = _mmd2_unbiased_poly(x, y, degree, gamma_used, coef0)
    return {"mean": float(mmds.mean()), "std": float(mmds.std()), "subsets": subsets,
            "subset_size": subset_size, "degree": degree, "gamma": gamma_used, "coef0": coef0, "seed": seed}
