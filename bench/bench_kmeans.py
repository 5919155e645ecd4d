"""k-means++ seeding at large K: the one-center-per-step loop the VQ layer used before vs batched D²-sampling.

Both seed K centers from the same N = ``--points-per-code`` x K points (d = 64, a mixture of K Gaussians:
unit-normal means, ``--spread`` standard deviation per dimension), then run the same ``--iters`` Lloyd
iterations (``tokenizer.kmeans.lloyd_step``). Reported per K: seeding time, the quantization error (mean
squared distance to the nearest center) right after seeding and after the Lloyd iterations, and the
ratio of the two methods. The one-at-a-time loop is stopped after ``--cap-s`` seconds; its time is then
extrapolated from the steps done (marked "~", it costs the same per step throughout), its error is not
measured, and the batched seeding skips the Lloyd iterations (nothing to compare them with).

    python bench/bench_kmeans.py            # K = 1,024 / 16,384 / 65,536, ~10 min on 1 busy CPU core
    python bench/bench_kmeans.py --quick    # K = 1,024 / 4,096, ~35 s
    python bench/bench_kmeans.py --sizes 16384 --cap-s 900   # both complete: error compared at 16,384
    python bench/bench_kmeans.py --sizes 64 --points-per-code 4 --iters 1   # toy size (tests)
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import torch  # noqa: E402
from common import write_result  # noqa: E402

from tokenizer.kmeans import GROWTH, kmeans_pp, lloyd_step, nearest_code  # noqa: E402

FULL, QUICK = (1024, 16384, 65536), (1024, 4096)


def seed_one_at_a_time(x: torch.Tensor, k: int, generator: torch.Generator, cap_s: float) -> tuple[torch.Tensor, int]:
    """The seeding of tokenizer/kmeans.py before batched D²-sampling, unchanged: one center per step, an
    (x - c)^2 pass over all points and a host sync each. Stops after cap_s seconds; returns (centers, steps)."""
    n = x.shape[0]
    centers = torch.empty(k, x.shape[1], device=x.device, dtype=x.dtype)
    first = int(torch.randint(n, (1,), generator=generator))
    centers[0] = x[first]
    d2 = (x - centers[0]).square().sum(1)  # (N,) distance to the nearest chosen center
    deadline = time.perf_counter() + cap_s
    for i in range(1, k):
        if time.perf_counter() > deadline:
            return centers[:i], i
        total = d2.sum()
        if total <= 0:  # every point already coincides with a center: pick uniformly
            j = int(torch.randint(n, (1,), generator=generator))
        else:
            j = int(torch.multinomial((d2 / total).cpu(), 1, generator=generator))
        centers[i] = x[j]
        d2 = torch.minimum(d2, (x - centers[i]).square().sum(1))
    return centers, k


def quantization_error(x: torch.Tensor, centers: torch.Tensor) -> float:
    """Mean squared distance of a point to its nearest center."""
    return (x - centers[nearest_code(x, centers)]).square().sum(1).mean().item()


def mixture(k: int, n: int, d: int, spread: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(k, d, generator=g)
    return means[torch.randint(k, (n,), generator=g)] + spread * torch.randn(n, d, generator=g)  # (N, d)


def run(x: torch.Tensor, k: int, method: str, iters: int, seed: int, cap_s: float) -> dict:
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    if method == "batched":
        centers, steps = kmeans_pp(x, k, gen), k
    else:
        centers, steps = seed_one_at_a_time(x, k, gen, cap_s)
    seconds = time.perf_counter() - start
    row = {"seed_s": seconds * k / steps, "complete": steps == k, "steps_done": steps,
           "error_seeded": None, "error_lloyd": None}
    if steps == k:
        row["error_seeded"] = quantization_error(x, centers)
        for _ in range(iters):
            centers = lloyd_step(x, centers)
        row["error_lloyd"] = quantization_error(x, centers) if iters else None
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=f"K in {QUICK} (default {FULL})")
    p.add_argument("--sizes", type=int, nargs="+", help="codebook sizes K")
    p.add_argument("--points-per-code", type=int, default=4, help="N = this x K points")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--spread", type=float, default=0.25, help="standard deviation of a mixture component")
    p.add_argument("--iters", type=int, default=3, help="Lloyd iterations after either seeding")
    p.add_argument("--cap-s", type=float, default=120.0, help="stop the one-at-a-time seeding after this long")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench/kmeans.json")
    a = p.parse_args()
    sizes = a.sizes or (QUICK if a.quick else FULL)
    rows = []
    print(f"| K | N | seeding | seed time (s) | error after seeding | error after {a.iters} Lloyd | time ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for k in sizes:
        x = mixture(k, a.points_per_code * k, a.dim, a.spread, a.seed)
        result = {"one_at_a_time": run(x, k, "one_at_a_time", a.iters, a.seed + 1, a.cap_s)}
        iters = a.iters if result["one_at_a_time"]["complete"] else 0  # Lloyd only where there is a reference
        result["batched"] = run(x, k, "batched", iters, a.seed + 1, a.cap_s)
        ratio = result["one_at_a_time"]["seed_s"] / result["batched"]["seed_s"]
        rows.append({"k": k, "n": x.shape[0], "d": a.dim, **result, "time_ratio": ratio})
        for m, r in result.items():
            t = f"{r['seed_s']:.2f}" if r["complete"] else f"~{r['seed_s']:.1f} (from {r['steps_done']:,} steps)"
            errors = ["-" if r[e] is None else f"{r[e]:.4f}" for e in ("error_seeded", "error_lloyd")]
            print(f"| {k:,} | {x.shape[0]:,} | {m.replace('_', ' ')} | {t} | {' | '.join(errors)} "
                  f"| {f'{ratio:.0f}x' if m == 'batched' else ''} |", flush=True)
    write_result(a.out, {"rows": rows, "setup": {
        "points_per_code": a.points_per_code, "dim": a.dim, "spread": a.spread, "iters": a.iters, "cap_s": a.cap_s,
        "growth": GROWTH, "seed": a.seed, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "load_avg": os.getloadavg(), "torch": torch.__version__, "platform": platform.platform()}})


if __name__ == "__main__":
    main()
