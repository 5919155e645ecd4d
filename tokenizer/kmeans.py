"""Nearest-code search and k-means++ in pure torch (CPU and GPU, no cupy/faiss).

Both run in fp32 and never allocate the full (N, K) distance matrix: rows of the input are processed in
chunks of ``chunk_elems // K`` so memory stays O(chunk x K) (docs/method.md section 2, item 3).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

# 2**24 fp32 distances per chunk = 64 MiB: large enough that the matmul dominates, small enough for
# K = 65,536 codes with 65,536 inputs (the full matrix would be 16 GiB).
DEFAULT_CHUNK_ELEMS = 2**24
CACHE_ELEMS = 2**21


def search_rows(n: int, k: int, chunk_elems: int = DEFAULT_CHUNK_ELEMS) -> int:
    """Rows of z per chunk of the search: about 8 MiB of scores while the codebook is small (the matmul
    writes them and argmin reads them back while they are still in cache), but at least 1,024 rows so
    each matmul call amortises packing the codebook, and never more than ``chunk_elems`` scores."""
    k = max(k, 1)
    return max(1, min(n, chunk_elems // k, max(1024, CACHE_ELEMS // k)))


@torch.no_grad()
def nearest_code(z: Tensor, codebook: Tensor, chunk_elems: int = DEFAULT_CHUNK_ELEMS) -> Tensor:
    """Index of the nearest code (squared Euclidean) for each row of ``z``.

    z: (N, d), codebook: (K, d) -> (N,) int64. Uses argmin_k ||C_k||^2 - 2 z.C_k (the ||z||^2 term is
    constant per row). That matmul form can mis-rank two codes whose distances differ by less than
    fp32 rounding of ||C||^2; the returned index is then one of two codes that are equally near to
    within ~1e-7 relative, which is harmless. Callers compute the exact distance of the chosen code.
    """
    z = z.float()
    codebook = codebook.float()
    n, k = z.shape[0], codebook.shape[0]
    c_sq = codebook.square().sum(1)  # (K,)
    rows = search_rows(n, k, chunk_elems)
    out = torch.empty(n, dtype=torch.long, device=z.device)
    cb_t = codebook.t()
    # One scores buffer for all chunks, written by addmm(out=) and read by argmin(out=): a fresh 64 MiB
    # tensor per chunk is a fresh mmap on CPU, whose page faults cost ~1/3 of the search at large K
    # (bench/bench_vq.py).
    scores = torch.empty(rows, k, device=z.device)  # (rows, K)
    for start in range(0, n, rows):
        zc = z[start : start + rows]
        s = scores[: zc.shape[0]]
        torch.addmm(c_sq, zc, cb_t, beta=1.0, alpha=-2.0, out=s)
        torch.argmin(s, 1, out=out[start : start + rows])
    return out


@torch.no_grad()
def kmeans(x: Tensor, k: int, iters: int = 10, generator: torch.Generator | None = None,
           max_points: int = 65536, chunk_elems: int = DEFAULT_CHUNK_ELEMS) -> Tensor:
    """k-means++ seeding followed by ``iters`` Lloyd iterations. x: (N, d) with N >= k -> centers (k, d).

    At most ``max_points`` rows (a random subset) are used, which bounds the cost for large batches.
    Empty clusters keep their previous center.
    """
    x = x.float()
    n = x.shape[0]
    if n < k:
        raise ValueError(f"kmeans needs at least k={k} points, got {n}")
    if n > max_points:
        x = x[torch.randperm(n, generator=generator, device="cpu")[:max_points].to(x.device)]
        n = max_points
    centers = torch.empty(k, x.shape[1], device=x.device, dtype=x.dtype)
    first = int(torch.randint(n, (1,), generator=generator))
    centers[0] = x[first]
    d2 = (x - centers[0]).square().sum(1)  # (N,) distance to the nearest chosen center
    for i in range(1, k):
        total = d2.sum()
        if total <= 0:  # every point already coincides with a center: pick uniformly
            j = int(torch.randint(n, (1,), generator=generator))
        else:
            j = int(torch.multinomial((d2 / total).cpu(), 1, generator=generator))
        centers[i] = x[j]
        d2 = torch.minimum(d2, (x - centers[i]).square().sum(1))
    for _ in range(iters):
        assign = nearest_code(x, centers, chunk_elems)
        sums = torch.zeros_like(centers).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).unsqueeze(1).to(x.dtype)
        centers = torch.where(counts > 0, sums / counts.clamp_min(1), centers)
    return centers


def code_histogram(q: Tensor, num_codes: int) -> Tensor:
    """Counts of each code in ``q`` (any shape) -> (K,) float."""
    return torch.bincount(q.reshape(-1), minlength=num_codes).float()


def perplexity(counts: Tensor) -> Tensor:
    """exp(entropy) of a code histogram: K for uniform use, 1 when one code takes everything."""
    p = counts / counts.sum().clamp_min(1)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def broadcast_(t: Tensor, src: int = 0) -> Tensor:
    """In-place broadcast from rank ``src`` when torch.distributed is initialised (no-op otherwise)."""
    if distributed():
        dist.broadcast(t, src)
    return t


def all_reduce_(t: Tensor, op: str = "sum") -> Tensor:
    """In-place all-reduce (sum/mean/max) when torch.distributed is initialised (no-op otherwise)."""
    if distributed():
        if op == "max":
            dist.all_reduce(t, dist.ReduceOp.MAX)
        else:
            dist.all_reduce(t, dist.ReduceOp.SUM)
            if op == "mean":
                t /= dist.get_world_size()
    return t
