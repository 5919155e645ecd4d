"""k-means++ seeding with batched D²-sampling (tokenizer/kmeans.py: kmeans_pp): quality against exact
one-at-a-time k-means++, determinism, distinct centers, chunking, and too few points."""
import pytest
import torch

from tokenizer.kmeans import kmeans, kmeans_pp, lloyd_step, nearest_code


def _clusters(k: int, per: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(k, d, generator=g) * 3
    return means.repeat_interleave(per, 0) + 0.1 * torch.randn(k * per, d, generator=g)  # (k * per, d)


def _error(x: torch.Tensor, centers: torch.Tensor) -> float:
    return (x - centers[nearest_code(x, centers)]).square().sum(1).mean().item()


def _rows_of(centers: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Index in x of each center (asserts that every center is a row of x)."""
    match = (centers[:, None] == x[None]).all(-1)  # (K, N)
    assert match.any(1).all()
    return match.float().argmax(1)


def test_batched_seeding_matches_exact_kmeanspp_quality():
    """Over several seeds, batched D²-sampling + Lloyd lands within 10 % of exact k-means++ + Lloyd on
    clustered data, and right after seeding every center is a distinct data point."""
    x = _clusters(96, 6, 8, seed=0)
    errors = {0.0: [], 0.25: []}
    for seed in range(4):
        for growth in errors:
            centers = kmeans_pp(x, 96, torch.Generator().manual_seed(seed), growth=growth)
            assert len(set(_rows_of(centers, x).tolist())) == 96
            for _ in range(3):
                centers = lloyd_step(x, centers)
            errors[growth].append(_error(x, centers))
    exact, batched = (sum(v) / len(v) for v in errors.values())
    assert batched < 1.1 * exact
    assert exact < 10 * 8 * 0.1**2  # and both are good: near the noise floor (8 dims x 0.01), not merged clusters


def test_seeding_is_deterministic_for_a_generator_and_independent_of_chunking():
    x = _clusters(32, 4, 8, seed=1)
    a = kmeans(x, 32, generator=torch.Generator().manual_seed(3))
    b = kmeans(x, 32, generator=torch.Generator().manual_seed(3), chunk_elems=64)  # chunks of 2 rows
    c = kmeans(x, 32, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_copies_of_a_point_are_never_drawn_twice():
    """Every point twice in x: the K = 40 distinct points are exactly the centers (a copy of a center has
    D² = 0 even where the matmul form rounds); asking for more than there are falls back to uniform draws."""
    u = _clusters(10, 4, 8, seed=2)  # 40 distinct points
    x = torch.cat([u, u * 1.0])[torch.randperm(80, generator=torch.Generator().manual_seed(0))]
    centers = kmeans_pp(x, 40, torch.Generator().manual_seed(0))
    assert torch.equal(torch.unique(centers, dim=0), torch.unique(u, dim=0))
    more = kmeans_pp(x, 48, torch.Generator().manual_seed(0))
    assert more.shape == (48, 8) and len(torch.unique(more, dim=0)) == 40


def test_fewer_points_than_codes_is_refused_by_kmeans():
    x = torch.randn(10, 4)
    with pytest.raises(ValueError, match="at least k=16 points, got 10"):
        kmeans(x, 16)
    with pytest.raises(ValueError, match="growth must be >= 0"):
        kmeans_pp(x, 4, growth=-1)
