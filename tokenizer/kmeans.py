"""Nearest-code search and k-means++ in pure torch (CPU and GPU, no cupy/faiss).

Both run in fp32 and never allocate the full (N, K) distance matrix: rows of the input are processed in
chunks of ``chunk_elems // K`` so memory stays O(chunk x K) (docs/method.md section 2, item 3).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

# 2**24 fp32 distances per chunk = 64 MiB: large enough that the matmul dominates, small enough for
# K = 65,536 codes with 65,536 inputs (the full matrix would be 16 GiB).
DEFAULT_CHUNK_ELEMS = 2**24
CACHE_ELEMS = 2**21
# k-means++ rounds draw ceil(GROWTH x centers so far) new centers at once (kmeans_pp)
GROWTH = 0.25


def search_rows(n: int, k: int, chunk_elems: int = DEFAULT_CHUNK_ELEMS, cpu: bool = True) -> int:
    """Rows of z per chunk of the search, never more than ``chunk_elems`` scores. On a CPU about 8 MiB of
    scores while the codebook is small (the matmul writes them and argmin reads them back while they are
    still in cache), but at least 1,024 rows so each matmul call amortises packing the codebook. On a GPU
    as many as ``chunk_elems`` allows: there each chunk costs kernel launches, and cache-sized chunks made
    the search 10-14x slower than one chunk (H200, N = 16,384, K = 1,024: 1.63 ms against 0.12 ms)."""
    k = max(k, 1)
    return max(1, min(n, chunk_elems // k, max(1024, CACHE_ELEMS // k) if cpu else n))


ARGMIN_BLOCK = 64  # codes per block of the blocked argmin (row_argmin)


def row_argmin(scores: Tensor, out: Tensor) -> None:
    """out[i] = argmin_k scores[i, k], the first index of the minimum as ``torch.argmin`` gives it.

    For K a multiple of ARGMIN_BLOCK (and at least two blocks) it is taken in two levels: the minimum of
    each block of 64 codes (``amin``, a vectorized reduction that reads the scores once), the first
    block holding the row's minimum (argmin over K/64 values), then the first index of the minimum inside
    that block (argmin over 64). Every comparison is exact, so the index is the one ``torch.argmin``
    returns, ties included. On a CPU ``torch.argmin`` over a row of scores runs ~10x slower than
    ``amin`` (it tracks the index element by element); this costs 3-8x less than it at K = 1,024-65,536
    (bench/bench_vqtorch.py, the search row). On a GPU ``torch.argmin`` is one reduction that is 5x faster
    than the five kernels of the two levels (H200, 16,384 x 1,024 scores: 0.028 ms against 0.14 ms)."""
    rows, k = scores.shape
    if k % ARGMIN_BLOCK or k < 2 * ARGMIN_BLOCK or not scores.is_cpu:  # a GPU's argmin is one fast reduction
        torch.argmin(scores, 1, out=out)
        return
    nb = k // ARGMIN_BLOCK
    blocks = scores.view(rows, nb, ARGMIN_BLOCK)
    block = blocks.amin(2).argmin(1)  # (rows,)
    # each row's block by index_select on the flat (rows x blocks, 64) view: ~5x faster than blocks[arange, block]
    flat = torch.arange(0, rows * nb, nb, device=scores.device).add_(block)
    inner = blocks.reshape(rows * nb, ARGMIN_BLOCK).index_select(0, flat).argmin(1)  # (rows,)
    torch.add(inner, block, alpha=ARGMIN_BLOCK, out=out)  # no scalar tensor: its copy to a GPU would sync


@torch.no_grad()
def nearest_code(z: Tensor, codebook: Tensor, chunk_elems: int = DEFAULT_CHUNK_ELEMS) -> Tensor:
    """Index of the nearest code (squared Euclidean) for each row of ``z``.

    z: (N, d), codebook: (K, d) -> (N,) int64. Uses argmin_k ||C_k||^2 - 2 z.C_k (the ||z||^2 term is
    constant per row). That matmul form can mis-rank two codes whose distances differ by less than
    fp32 rounding of ||C||^2; the returned index is then one of two codes that are equally near to
    within ~1e-7 relative, which is harmless. Callers compute the exact distance of the chosen code.

    The scores of a chunk are one ``addmm`` into a reused buffer. (A CPU-only variant multiplied [z, 1]
    by [-2 C, ||C||^2] to avoid addmm's copy of the bias; with torch 2.14 on one thread it was never
    faster and 15 % slower at d = 256, whose inner size 257 the GEMM handles worse: BENCHMARKS.md 1b.)
    The argmin is ``row_argmin``.
    """
    z = z.float()
    codebook = codebook.float()
    n, k = z.shape[0], codebook.shape[0]
    c_sq = codebook.square().sum(1)  # (K,)
    rows = search_rows(n, k, chunk_elems, cpu=z.device.type == "cpu")
    out = torch.empty(n, dtype=torch.long, device=z.device)
    cb_t = codebook.t()
    # One scores buffer for all chunks, written by the matmul (out=) and read by the argmin: a fresh 64 MiB
    # tensor per chunk is a fresh mmap on CPU, whose page faults cost ~1/3 of the search at large K
    # (bench/bench_vq.py).
    scores = torch.empty(rows, k, device=z.device)  # (rows, K)
    for start in range(0, n, rows):
        zc = z[start : start + rows]
        s = scores[: zc.shape[0]]
        torch.addmm(c_sq, zc, cb_t, beta=1.0, alpha=-2.0, out=s)
        row_argmin(s, out[start : start + rows])
    return out


@torch.no_grad()
def kmeans(x: Tensor, k: int, iters: int = 10, generator: torch.Generator | None = None,
           max_points: int = 65536, chunk_elems: int = DEFAULT_CHUNK_ELEMS) -> Tensor:
    """k-means++ seeding (``kmeans_pp``) followed by ``iters`` Lloyd iterations. x: (N, d) with N >= k ->
    centers (k, d).

    At most ``max_points`` rows (a random subset) are used, which bounds the cost for large batches.
    Empty clusters keep their previous center. ``generator`` (CPU) makes the result reproducible.
    """
    x = x.float()
    n = x.shape[0]
    if n < k:
        raise ValueError(f"kmeans needs at least k={k} points, got {n}")
    if n > max_points:
        x = x[torch.randperm(n, generator=generator, device="cpu")[:max_points].to(x.device)]
    centers = kmeans_pp(x, k, generator, chunk_elems)
    for _ in range(iters):
        centers = lloyd_step(x, centers, chunk_elems)
    return centers


def lloyd_step(x: Tensor, centers: Tensor, chunk_elems: int = DEFAULT_CHUNK_ELEMS) -> Tensor:
    """One Lloyd iteration: every center moves to the mean of the points nearest to it (an empty cluster
    keeps its center). x: (N, d), centers: (K, d) -> (K, d)."""
    assign = nearest_code(x, centers, chunk_elems)
    sums = torch.zeros_like(centers).index_add_(0, assign, x)
    counts = torch.bincount(assign, minlength=centers.shape[0]).unsqueeze(1).to(x.dtype)
    return torch.where(counts > 0, sums / counts.clamp_min(1), centers)


@torch.no_grad()
def kmeans_pp(x: Tensor, k: int, generator: torch.Generator | None = None,
              chunk_elems: int = DEFAULT_CHUNK_ELEMS, growth: float = GROWTH) -> Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007) with batched D²-sampling: k rows of x.

    x: (N, d) with N >= k -> (k, d). k-means++ draws each new center with probability proportional to
    D², the squared distance of a point to its nearest center so far. One center at a time (``growth=0``)
    that is K rounds, each a pass over x too thin for a matmul plus a host sync to draw one index: minutes
    at K = 65,536. Here each round draws ``b = max(1, ceil(growth * chosen))`` candidates at once from the
    round's D², without replacement, and keeps candidate j with probability D²_j' / D²_j, where D²_j'
    also counts the candidates drawn before j in the round (rejection sampling: a candidate next to an
    earlier one is mostly dropped, as sequential k-means++ would rarely have drawn it; counting dropped
    candidates too makes the rule slightly more cautious than exact). D² is then updated for the kept
    centers with one chunked matmul. About log(K) / log(1 + growth) rounds (about 50 at K = 65,536 with
    the default 0.25, a few more for the dropped candidates), and the distance work of one Lloyd iteration
    in matmuls. Without the rejection step two centers of one round often land in one cluster and leave
    another empty, which costs error that the Lloyd iterations do not recover.

    Why not k-means|| (Bahmani et al. 2012): it oversamples about 2K candidates per round and then needs
    a weighted k-means++ pass over the candidates to reduce them to K, and that pass is the same
    sequential loop over K. The layer fits a batch of encoder outputs, often only a few vectors per code,
    so the candidates would be about as many as the points: nothing saved. ``bench/bench_kmeans.py``
    measures time and final error against the one-at-a-time seeding; tests/test_kmeans.py checks the error
    against exact k-means++ (``growth=0``).

    Every center is a data point, and no point is drawn twice while points with D² > 0 are left; when
    none are (the data has fewer distinct points than k), the rest are drawn uniformly, as in k-means++.
    Draws come from ``generator`` (CPU) on the host, so a seed gives the same centers on any device.
    """
    if growth < 0:
        raise ValueError(f"k-means++: growth must be >= 0, got {growth}")
    x = x.float()
    n = x.shape[0]
    if n < k:
        raise ValueError(f"k-means++ needs at least k={k} points, got {n}")
    x_sq = x.square().sum(1)  # (N,)
    chosen = torch.randint(n, (1,), generator=generator)  # (1,) CPU indices of the centers so far
    d2 = _sq_dist_to_nearest(x, x_sq, x[chosen.to(x.device)], chunk_elems)  # (N,)
    d2[chosen.to(x.device)] = 0
    while len(chosen) < k:
        b = min(k - len(chosen), max(1, math.ceil(growth * len(chosen))))
        w = d2.cpu()
        m = min(b, int((w > 0).sum()))
        if m:  # candidates drawn by D², each kept with probability D²_round / D² (rejection sampling)
            cand = torch.multinomial(w, m, replacement=False, generator=generator)  # (m,)
            u = torch.rand(m, generator=generator)  # (m,)
            keep = u * w[cand] < _sq_dist_to_earlier(x[cand.to(x.device)], chunk_elems).cpu()
            new = cand[keep]
        else:  # every point coincides with a center: uniform draws, as k-means++ does
            new = torch.randint(n, (b,), generator=generator)
        chosen = torch.cat([chosen, new])
        new = new.to(x.device)
        d2 = torch.minimum(d2, _sq_dist_to_nearest(x, x_sq, x[new], chunk_elems))
        d2[new] = 0  # exactly: rounding in the matmul form can leave a chosen point at ~1e-7
    return x[chosen.to(x.device)]


def _sq_dist_to_earlier(c: Tensor, chunk_elems: int) -> Tensor:
    """min_{i < j} ||c_i - c_j||^2 for every row j of c (B, d) -> (B,), inf for the first; (rows, B) chunks."""
    b = c.shape[0]
    c_sq = c.square().sum(1)  # (B,)
    rows = max(1, min(b, chunk_elems // b))
    out = torch.empty(b, device=c.device)
    for start in range(0, b, rows):
        stop = min(b, start + rows)
        d2 = torch.addmm(c_sq[:stop], c[start:stop], c[:stop].t(), alpha=-2.0)  # (r, stop)
        d2 += c_sq[start:stop, None]
        later = torch.arange(stop, device=c.device)[None] >= torch.arange(start, stop, device=c.device)[:, None]
        out[start:stop] = d2.masked_fill_(later, float("inf")).min(1).values.clamp_min_(0)
    return out


def _sq_dist_to_nearest(x: Tensor, x_sq: Tensor, centers: Tensor, chunk_elems: int) -> Tensor:
    """min_j ||x_i - c_j||^2 for every row of x (N,), as ||x||^2 - 2 x.c + ||c||^2 in (rows, B) chunks.

    A distance below the rounding of that form (relative 2e-5 of ||x||^2, about ||x||^2 + ||c||^2 when x
    is that near c) reads as 0: a copy of a center elsewhere in x must not keep a ~1e-7 weight and be
    drawn as a duplicate center."""
    c_sq = centers.square().sum(1)  # (B,)
    rows = max(1, min(x.shape[0], chunk_elems // centers.shape[0]))
    out = torch.empty_like(x_sq)
    for start in range(0, x.shape[0], rows):
        xc, xc_sq = x[start : start + rows], x_sq[start : start + rows]  # (r, d), (r,)
        d2 = torch.addmm(c_sq, xc, centers.t(), alpha=-2.0).amin(1) + xc_sq  # (r,)
        out[start : start + rows] = d2.masked_fill_(d2 <= 2e-5 * xc_sq, 0.0)
    return out
