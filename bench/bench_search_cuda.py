"""The nearest-code search on a CUDA GPU: ``nearest_code`` against its floor, one addmm + one argmin.

    python bench/bench_search_cuda.py          # refuses without CUDA

For each size (N rows of z, d, K codes) it prints the time of ``tokenizer.kmeans.nearest_code`` and of
the two kernels the search cannot do without on the first chunk of rows it would use (the scores by
``addmm``, then ``torch.argmin``, which is what the search's argmin is on a GPU). Timing: CUDA events,
the best of 3 rounds of 20 calls after a warm-up. Before 2026-12-04 the search cut z into the CPU's
cache-sized chunks and took the CPU's two-level argmin on a GPU too: 1.63 ms against 0.11 ms now at
N = 16,384, d = 64, K = 1,024 on an H200 (BENCHMARKS.md, GPU rows).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tokenizer.kmeans import DEFAULT_CHUNK_ELEMS, nearest_code, search_rows  # noqa: E402

SIZES = [(16384, 64, 1024), (16384, 256, 1024), (65536, 64, 1024), (16384, 64, 16384), (65536, 64, 65536)]


def best_ms(fn, reps: int = 20, rounds: int = 3) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(rounds):
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / reps)
    return best


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("error: bench_search_cuda.py needs a CUDA GPU; on a CPU the search is measured by "
                         "bench/bench_vqtorch.py --search")
    torch.manual_seed(0)
    print(f"nearest-code search on {torch.cuda.get_device_name(0)}, fp32, torch {torch.__version__}")
    print("| N | d | K | rows per chunk | nearest_code ms | one chunk: addmm ms | argmin ms |")
    print("|---|---|---|---|---|---|---|")
    for n, d, k in SIZES:
        z, c = torch.randn(n, d, device="cuda"), torch.randn(k, d, device="cuda")
        rows = search_rows(n, k, DEFAULT_CHUNK_ELEMS, cpu=False)
        c_sq = c.square().sum(1)
        s = torch.addmm(c_sq, z[:rows], c.t(), alpha=-2.0)
        out = torch.empty(rows, dtype=torch.long, device="cuda")
        search = best_ms(lambda: nearest_code(z, c))
        mm = best_ms(lambda: torch.addmm(c_sq, z[:rows], c.t(), alpha=-2.0, out=s))
        am = best_ms(lambda: torch.argmin(s, 1, out=out))
        print(f"| {n} | {d} | {k} | {rows} | {search:.3f} | {mm:.3f} | {am:.3f} |", flush=True)


if __name__ == "__main__":
    main()
