"""Our ``VectorQuant`` against vqtorch (the paper's own library) and against the machine's GEMM floor.

    python bench/bench_vqtorch.py --vqtorch /path/to/vqtorch      # a clone of github.com/minyoungg/vqtorch
    python bench/bench_vqtorch.py --sizes 16384x64x1024           # one size; search-only: --search 65536x64x65536

vqtorch is not on the package index: pass the folder of its clone (or put it on PYTHONPATH); without it
the bench still measures our layer and the floor and says why the vqtorch column is empty. Its k-means
needs CUDA-only packages, so both layers run without k-means. vqtorch imports ``stringcolor`` only to
colour two log messages; when that package is missing the bench registers a plain stand-in for it.

Rows, fp32 on CPU, one training step = ``vq(z)`` + ``(loss + <out, g>).backward()``:

* ``plain``: nearest code, codebook loss with beta 0.95, straight-through estimator.
* ``trained``: what people train with: l2-normalized input, learned affine codebook (lr scale 10),
  synchronized STE (nu 0.2), dead-code replacement every 20 steps (vqtorch's README example plus l2).
* ``search``: the nearest-code search alone (our ``nearest_code``, vqtorch's ``euclidean_cdist_topk``).

``floor`` is the time of the matmul that the search needs, ``(N, d) x (d, K)`` in fp32 = 2 N K d FLOPs,
measured here in the same process, in the row chunks our search uses (about 8 MiB of scores, at most
2^24, into one reused buffer, so that N = K = 65,536 fits): ours / floor is what everything besides
that matmul costs (the argmin, the gather, the loss, the backward pass). Timing: one fresh subprocess per
(config, size); ours, vqtorch and the floor alternate repetition by repetition (other jobs on the
machine slow all three alike); the minimum of ``--reps`` (after one warm-up) is reported. On a machine
shared with other jobs, ``--threads 1 --clock cpu`` measures the CPU time of one thread instead of the wall
clock: the work each layer does, unaffected by the time the scheduler gives to others.

Both layers share one process, so one's allocations change the other's cost: with glibc's default
policy a large freed tensor may go back to the system and the next one is page-faulted in afresh,
depending on the whole process's history (measured: vqtorch's time for the trained d = 256, K = 1,024
row moved 285-415 ms over eight runs when only our layer's code changed). The workers therefore run with
a fixed glibc policy, ``MALLOC_MMAP_THRESHOLD_`` = 32 MiB and ``MALLOC_TRIM_THRESHOLD_`` = 1 GiB (freed
memory is reused, not returned), which makes each side's time independent of the other's (vqtorch
273-310 ms for that row over four runs); ``--malloc default`` leaves the policy as it is. Other C
libraries ignore the two variables.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import types
from pathlib import Path

from bench_vq import fmt
from common import ROOT

SIZES = [(16384, 64, 1024), (16384, 256, 1024), (65536, 64, 16384)]
SEARCH = [(65536, 64, 65536)]
# glibc: allocations up to 32 MiB from the heap, freed memory kept (see the docstring)
STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**30)}
CONFIGS = {
    "plain": dict(ours=dict(beta=0.95), vqtorch=dict(beta=0.95)),
    "trained": dict(ours=dict(beta=0.95, norm="l2", affine_lr=10.0, sync_nu=0.2, replace_freq=20),
                    vqtorch=dict(beta=0.95, norm="l2", affine_lr=10.0, sync_nu=0.2, replace_freq=20)),
}


def import_vqtorch(path: str | None):
    """vqtorch's module, or the reason it cannot be imported (a string)."""
    if path:
        if not (Path(path) / "vqtorch" / "__init__.py").exists():
            return f"--vqtorch {path}: no vqtorch/__init__.py there (give the folder of a clone of minyoungg/vqtorch)"
        sys.path.insert(0, str(Path(path).resolve()))
    try:
        import stringcolor  # noqa: F401
    except ImportError:  # cosmetics only: vqtorch colours two messages with it
        sys.modules["stringcolor"] = types.SimpleNamespace(cs=lambda text, *a, **k: text)
    try:
        import vqtorch
    except ImportError as e:
        return f"vqtorch not importable ({e}); clone github.com/minyoungg/vqtorch and pass --vqtorch PATH"
    return vqtorch


# ---- inside the worker subprocess ------------------------------------------------------------------
def floor_fn(z, codebook):
    """The search's matmul alone, in the chunks our search uses, into one reused buffer."""
    import torch

    from tokenizer.kmeans import search_rows

    rows = search_rows(z.shape[0], codebook.shape[0])
    buf, cb_t = torch.empty(rows, codebook.shape[0]), codebook.t()
    for start in range(0, z.shape[0], rows):
        zc = z[start:start + rows]
        torch.mm(zc, cb_t, out=buf[: zc.shape[0]])


def worker(a: argparse.Namespace) -> dict:
    import torch

    from tokenizer import VectorQuant
    from tokenizer.kmeans import nearest_code

    if a.threads:
        torch.set_num_threads(a.threads)
    vqtorch = import_vqtorch(a.vqtorch)
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(a.n, a.d, generator=gen)
    g = torch.randn(a.n, a.d, generator=gen) / a.n
    torch.manual_seed(0)
    fns, layers = {}, {}
    if a.config == "search":
        codebook = torch.randn(a.k, a.d, generator=gen)
        fns["ours"] = lambda: nearest_code(z, codebook)
        if not isinstance(vqtorch, str):
            from vqtorch.dists import euclidean_cdist_topk
            fns["vqtorch"] = lambda: euclidean_cdist_topk(z[None], codebook)["q"].reshape(-1)
        fns["floor"] = lambda: floor_fn(z, codebook)
    else:
        zg = z.clone().requires_grad_(True)
        layers["ours"] = VectorQuant(a.d, a.k, dim=-1, **CONFIGS[a.config]["ours"]).train()
        if not isinstance(vqtorch, str):
            layers["vqtorch"] = vqtorch.nn.VectorQuant(a.d, a.k, dim=-1, **CONFIGS[a.config]["vqtorch"]).train()
            with torch.no_grad():  # same codebook -> same assignments -> same work
                layers["vqtorch"].codebook.weight.copy_(layers["ours"].codebook.weight)

        def step(vq):
            out, info = vq(zg)
            (info["loss"] + (out * g).sum()).backward()
            zg.grad = None
            for p in vq.parameters():
                p.grad = None
            return info["q"].reshape(-1)

        for name, vq in layers.items():
            fns[name] = (lambda vq=vq: step(vq))
        codebook = layers["ours"].get_codebook().detach()
        fns["floor"] = lambda: floor_fn(z, codebook)
    clock = time.process_time if a.clock == "cpu" else time.perf_counter
    times = {name: [] for name in fns}
    first = {}
    for rep in range(a.reps + 1):  # rep 0 warms up
        for name, fn in fns.items():
            t0 = clock()
            q = fn()
            if rep > 0:
                times[name].append(clock() - t0)
            elif name != "floor":
                first[name] = q
    result = {name: 1e3 * min(t) for name, t in times.items()}
    result["mmap_threshold"] = os.environ.get("MALLOC_MMAP_THRESHOLD_")  # the allocation policy it ran under
    if "vqtorch" in first:
        result["agree"] = (first["ours"] == first["vqtorch"]).float().mean().item()
    if isinstance(vqtorch, str):
        result["vqtorch_missing"] = vqtorch
    return result


# ---- the driver ------------------------------------------------------------------------------------------
def run_worker(a: argparse.Namespace, config: str, n: int, d: int, k: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--config", config, "--n", str(n), "--d", str(d),
           "--k", str(k), "--reps", str(a.reps), *(["--vqtorch", a.vqtorch] if a.vqtorch else []),
           "--clock", a.clock, *(["--threads", str(a.threads)] if a.threads else [])]
    env = dict(os.environ, **(STEADY_MALLOC if a.malloc == "steady" else {}))
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout, cwd=ROOT, env=env)
    if p.returncode != 0:
        raise SystemExit(f"bench_vqtorch: worker failed: {(p.stderr.strip().splitlines() or ['no output'])[-1]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> list[str]:
    header = ("config", "N", "d", "K", "ours ms", "vqtorch ms", "ours / vqtorch", "GEMM floor ms", "ours / floor",
              "agree")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        ours, peer, floor = r.get("ours"), r.get("vqtorch"), r.get("floor")
        lines.append("| " + " | ".join([
            r["config"], f"{r['n']:,}", str(r["d"]), f"{r['k']:,}", fmt(ours, ".1f"), fmt(peer, ".1f"),
            fmt(ours / peer if ours and peer else None, ".2f"), fmt(floor, ".1f"),
            fmt(ours / floor if ours and floor else None, ".2f"), fmt(r.get("agree"), ".4f")]) + " |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vqtorch", help="folder of a clone of github.com/minyoungg/vqtorch (or have it on PYTHONPATH)")
    p.add_argument("--configs", nargs="+", default=["plain", "trained"], choices=sorted(CONFIGS))
    p.add_argument("--sizes", nargs="+", metavar="NxDxK", help="training-step sizes (default: the issue's three)")
    p.add_argument("--search", nargs="*", metavar="NxDxK", help="search-only sizes (default 65536x64x65536)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions (minimum reported)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: this process's CPU time (with --threads 1, the work done, whatever else runs)")
    p.add_argument("--threads", type=int, help="torch threads in the workers (default: torch's own choice); "
                   "1 is the steadier measure on a machine shared with other jobs")
    p.add_argument("--malloc", choices=("steady", "default"), default="steady",
                   help="steady: the workers run with a fixed glibc allocation policy (see above)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per subprocess")
    p.add_argument("--out", default="runs/bench/vqtorch.json")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    for name in ("n", "d", "k"):
        p.add_argument(f"--{name}", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.reps < 1 or (a.threads is not None and a.threads < 1):
        raise SystemExit(f"bench_vqtorch: --reps and --threads must be >= 1, got {a.reps} and {a.threads}")
    if a.worker:
        print(json.dumps(worker(a)))
        return

    import torch

    parse = lambda s: tuple(int(v) for v in s.lower().split("x"))  # noqa: E731
    sizes = [parse(s) for s in a.sizes] if a.sizes else SIZES
    search = [parse(s) for s in a.search] if a.search is not None else SEARCH
    vqtorch = import_vqtorch(a.vqtorch)
    missing = vqtorch if isinstance(vqtorch, str) else None
    if missing:
        print(f"bench_vqtorch: {missing}; measuring ours and the floor only", file=sys.stderr)
    jobs = [(c, *s) for c in a.configs for s in sizes] + [("search", *s) for s in search]
    meta = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "threads": a.threads or torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "platform": platform.platform(), "load_average_before": os.getloadavg(),
            "vqtorch": missing or "imported", "configs": CONFIGS, "reps": a.reps,
            "clock": "process CPU time" if a.clock == "cpu" else "wall clock",
            "malloc": STEADY_MALLOC if a.malloc == "steady" else "default",
            "time": "min of alternating ours / vqtorch / floor repetitions, one subprocess per row",
            "command": "python bench/bench_vqtorch.py " + " ".join(sys.argv[1:])}
    rows = []
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for config, n, d, k in jobs:
        r = {"config": config, "n": n, "d": d, "k": k, **run_worker(a, config, n, d, k)}
        rows.append(r)
        print(f"  {config} N={n} d={d} K={k}: ours {fmt(r.get('ours'), '.1f')} ms, vqtorch "
              f"{fmt(r.get('vqtorch'), '.1f')} ms, floor {fmt(r.get('floor'), '.1f')} ms", file=sys.stderr, flush=True)
        meta["load_average_after"] = os.getloadavg()
        out.write_text(json.dumps({"meta": meta, "rows": rows, "table": table(rows)}, indent=2) + "\n")
    print("\n".join(table(rows)))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
