"""Forward+backward time and peak memory of our ``VectorQuant`` vs lucidrains' ``VectorQuantize``.

    python bench/bench_vq.py            # --quick: a subset, ~3-4 min on 2 busy CPU cores
    python bench/bench_vq.py --full     # N in {16384, 65536} x d in {64, 256} x K in {1024, 16384, 65536}
    python bench/bench_vq.py --device cuda   # bf16 autocast (the quantizers run in fp32 inside)
    python bench/bench_vq.py --precision bf16   # bf16 autocast on the CPU too (--precision fp32 on CUDA)

Both layers are set up as the same algorithm: Euclidean nearest code, a learnable codebook trained by
a codebook loss, STE to the input, no EMA, no k-means init, no dead-code replacement, no rotation
trick, no cosine similarity (``PEER_KWARGS`` below; the peer's codebook is overwritten with ours so
both make the same assignments, and the fraction of agreeing indices is reported as a check). One
step = ``vq(z)`` + ``(loss + <output, g>).backward()`` with a fixed upstream gradient g.

Timing: one fresh subprocess per size runs both layers, alternating ours / peer repetition by
repetition (other jobs on the machine slow both alike), and reports the median of each and the ratio
peer / ours (> 1: ours is faster). Memory: one fresh subprocess per (layer, size) measures the peak
resident set (VmHWM, reset through /proc/self/clear_refs) of one step minus the resident set just
before it, i.e. everything the step allocates beyond its inputs and parameters (on CUDA:
``torch.cuda.max_memory_allocated`` minus the allocation before the step). On CPU every subprocess
runs under an address-space limit (``--mem-limit-gib`` above what torch itself maps), so a size that
needs more fails with a clean "OOM" in its cell instead of summoning the kernel's OOM killer.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT

# The peer's closest equivalent of our plain VectorQuant (read from vector_quantize_pytorch 1.32.0):
# learnable_codebook + ema_update=False: the codebook is an nn.Parameter trained by the loss, never by
# EMA; with a learnable codebook its commitment loss mse(quantize, x) is not detached, so it is both
# our commitment term and our codebook term. rotation_trick=False: plain STE (its default is the
# rotation trick for dim > 1). threshold_ema_dead_code=0: no dead-code replacement.
PEER_KWARGS = dict(learnable_codebook=True, ema_update=False, rotation_trick=False, kmeans_init=False,
                   use_cosine_sim=False, threshold_ema_dead_code=0, commitment_weight=1.0,
                   stochastic_sample_codes=False, straight_through=False, sync_codebook=False)
OURS_KWARGS = dict(beta=0.95, kmeans_init=False, norm=None, cb_norm=None, affine_lr=0.0, sync_nu=0.0,
                   replace_freq=0, inplace_optimizer=None)

FULL = [(n, d, k) for n in (16384, 65536) for d in (64, 256) for k in (1024, 16384, 65536)]
# The quick subset spans both d, both N and all three K (the largest K at the small N, where one of
# our steps is a few seconds and the peer's (N, K) matrices exceed the default limit).
QUICK = [(16384, 64, 1024), (16384, 256, 1024), (65536, 64, 1024), (16384, 64, 16384), (16384, 64, 65536)]


# ---- the measured step (runs inside the worker subprocesses) -------------------------------------
def build(impl: str, d: int, k: int, device: str):
    import torch

    torch.manual_seed(0)
    if impl == "ours":
        from tokenizer import VectorQuant

        return VectorQuant(d, k, **OURS_KWARGS).to(device).train()
    from vector_quantize_pytorch import VectorQuantize

    return VectorQuantize(dim=d, codebook_size=k, **PEER_KWARGS).to(device).train()


def forward(impl: str, vq, z):
    """(output (N, d), loss, indices (N,)) of either layer."""
    if impl == "ours":
        out, info = vq(z)  # (N, d)
        return out, info["loss"], info["q"]
    out, q, loss = vq(z[None])  # the peer wants (B, N, d)
    return out[0], loss, q[0]


def step(impl: str, vq, z, g, autocast: bool, forward_fn=forward):
    """One forward + backward; returns the code indices."""
    import torch

    with torch.autocast(device_type=z.device.type, dtype=torch.bfloat16, enabled=autocast):
        out, loss, q = forward_fn(impl, vq, z)
        total = loss + (out.float() * g).sum()
    total.backward()
    z.grad = None
    for p in vq.parameters():
        p.grad = None
    return q


def bf16(a: argparse.Namespace) -> bool:
    """Whether the step runs under bf16 autocast: --precision bf16, or auto (the default) on CUDA."""
    return a.precision == "bf16" or (a.precision == "auto" and a.device == "cuda")


def inputs(n: int, d: int, device: str, low: bool = False):
    """z (N, d) as an encoder would hand it over: fp32, or bf16 (an autocast output) when ``low``."""
    import torch

    gen = torch.Generator().manual_seed(1)
    dtype = torch.bfloat16 if low else torch.float32
    z = torch.randn(n, d, generator=gen).to(device, dtype).requires_grad_(True)
    g = (torch.randn(n, d, generator=gen) / n).to(device)
    return z, g


def proc_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def limit_address_space(limit_gib: float) -> None:
    """Cap this process at what it maps now + limit_gib, so a huge allocation raises instead of OOM-killing."""
    cap = proc_kib("VmSize") * 1024 + int(limit_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


def is_oom(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or "alloc" in str(e).lower() or "out of memory" in str(e).lower()


def tie_codebooks(layers: dict) -> None:
    """Same codebook -> same assignments, same work."""
    layers["peer"]._codebook.embed.copy_(layers["ours"].codebook.weight[None])


def worker_mem(a: argparse.Namespace, build_fn=build, step_fn=step) -> dict:
    import torch

    cuda, low = a.device == "cuda", bf16(a)
    vq = build_fn(a.impl, a.d, a.k, a.device)
    step_fn(a.impl, vq, *inputs(256, a.d, a.device, low), low)  # wakes thread pools / allocators, not measured
    z, g = inputs(a.n, a.d, a.device, low)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = proc_kib("VmRSS") * 1024
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    try:
        step_fn(a.impl, vq, z, g, low)
    except (RuntimeError, MemoryError) as e:
        if is_oom(e):
            return {"status": "OOM", "error": str(e).splitlines()[0][:200]}
        raise
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = proc_kib("VmHWM") * 1024
    return {"status": "ok", "peak_mib": (peak - before) / 2**20}


def worker_time(a: argparse.Namespace, build_fn=build, step_fn=step, tie_fn=tie_codebooks) -> dict:
    """Alternate ours / peer repetitions; a layer that fails (OOM) is dropped, the other goes on."""
    import torch

    cuda, low = a.device == "cuda", bf16(a)
    impls = [i for i in ("ours", "peer") if i not in a.skip]
    z, g = inputs(a.n, a.d, a.device, low)
    layers, result = {}, {}
    for impl in impls:
        layers[impl] = build_fn(impl, a.d, a.k, a.device)
    if "ours" in layers and "peer" in layers:
        with torch.no_grad():
            tie_fn(layers)
    times: dict[str, list[float]] = {i: [] for i in impls}
    indices = {}
    for rep in range(a.reps + 1):  # rep 0 is the warm-up
        for impl in list(layers):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            try:
                q = step_fn(impl, layers[impl], z, g, low)
            except (RuntimeError, MemoryError) as e:
                if not is_oom(e):
                    raise
                result[impl] = {"status": "OOM", "error": str(e).splitlines()[0][:200]}
                del layers[impl]
                continue
            if cuda:
                torch.cuda.synchronize()
            if rep > 0:
                times[impl].append(time.perf_counter() - t0)
            else:
                indices[impl] = q.detach().reshape(-1)
    for impl in layers:
        result[impl] = {"status": "ok", "ms": 1e3 * statistics.median(times[impl]),
                        "ms_all": [1e3 * t for t in times[impl]]}
    if len(indices) == 2:
        result["index_agreement"] = (indices["ours"] == indices["peer"]).float().mean().item()
    return result


# ---- the driver ----------------------------------------------------------------------------------
def run_worker(args: argparse.Namespace, extra: list[str], timeout: float, script: str = __file__) -> dict:
    """Run ``script --worker ...`` (this file by default) in a fresh process; its last stdout line is JSON."""
    cmd = [sys.executable, str(Path(script).resolve()), "--device", args.device, "--precision", args.precision,
           "--mem-limit-gib", str(args.mem_limit_gib), *extra]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout > {timeout:.0f} s"}
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["no output"])[-1]
        status = "OOM" if p.returncode in (-9, 137) or is_oom(RuntimeError(last)) else f"failed ({last[:160]})"
        return {"status": status, "returncode": p.returncode}
    return json.loads(p.stdout.strip().splitlines()[-1])


def fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def add_measurement_args(p: argparse.ArgumentParser) -> None:
    """Repetitions, limits, and the internal arguments of one measurement in a fresh process."""
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per layer (default: 3 quick, 5 full)")
    p.add_argument("--mem-limit-gib", type=float, default=8.0,
                   help="CPU: address-space budget of each subprocess above torch's own mappings")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per subprocess")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="bf16: the step under bf16 autocast with a bf16 input (the quantizers' math stays fp32 inside); "
                        "auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--worker", choices=("time", "mem"), help=argparse.SUPPRESS)
    p.add_argument("--impl", choices=("ours", "peer"), help=argparse.SUPPRESS)
    p.add_argument("--skip", nargs="*", default=[], help=argparse.SUPPRESS)
    for name in ("n", "d", "k"):
        p.add_argument(f"--{name}", type=int, help=argparse.SUPPRESS)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    grid = p.add_mutually_exclusive_group()
    grid.add_argument("--quick", action="store_true", help="a subset of the grid (the default)")
    grid.add_argument("--full", action="store_true", help="the full grid (tens of minutes on CPU)")
    p.add_argument("--device", default="cuda" if _cuda_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--sizes", nargs="+", metavar="NxDxK", help="run only these sizes, e.g. 16384x64x1024")
    p.add_argument("--out", default="runs/bench/vq.json")
    add_measurement_args(p)
    a = p.parse_args()

    if a.worker:
        if a.device == "cpu":
            limit_address_space(a.mem_limit_gib)
        result = worker_time(a) if a.worker == "time" else worker_mem(a)
        print(json.dumps(result))
        return

    from importlib.metadata import version

    import torch
    import vector_quantize_pytorch  # noqa: F401  (fail here, not in every worker, if it is missing)

    cases = FULL if a.full else QUICK
    if a.sizes:
        cases = [tuple(int(v) for v in s.lower().split("x")) for s in a.sizes]
    reps = a.reps or (5 if a.full else 3)
    meta = {
        "device": a.device, "dtype": "z bf16 under bf16 autocast (quantizer math fp32)" if bf16(a) else "fp32",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "platform": platform.platform(), "peer": f"vector-quantize-pytorch {version('vector-quantize-pytorch')}",
        "peer_kwargs": PEER_KWARGS, "ours_kwargs": OURS_KWARGS, "reps": reps,
        "grid": "sizes" if a.sizes else "full" if a.full else "quick",
        "mem_limit_gib": a.mem_limit_gib if a.device == "cpu" else None,
        "step": "vq(z); (loss + <out, g>).backward(); z (N, d), g fixed, training mode",
        "time": "median of alternating ours/peer repetitions in one subprocess per size (1 warm-up each)",
        "memory": "peak RSS (VmHWM) of one step minus RSS before it, fresh subprocess per (layer, size)"
                  if a.device == "cpu" else "torch.cuda.max_memory_allocated minus allocated before the step",
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    rows: list[dict] = []
    for n, d, k in cases:
        rows.append(measure(a, n, d, k, reps))
        meta["elapsed_s"] = time.time() - t_start
        meta["complete"] = len(rows) == len(cases)
        # Written after every size, so an interrupted --full run keeps what it measured.
        out.write_text(json.dumps({"meta": meta, "rows": rows, "table": table(rows)}, indent=2) + "\n")
    print(f"VectorQuant vs {meta['peer']} ({a.device}, {meta['dtype']}, {meta['threads']} threads, "
          f"median of {reps} alternating reps; memory = peak of one step above its inputs)")
    print(f"peer kwargs: {PEER_KWARGS}")
    print("\n".join(table(rows)))
    print(f"total {meta['elapsed_s']:.0f} s")
    print(f"-> {out}")


def measure(a: argparse.Namespace, n: int, d: int, k: int, reps: int, script: str = __file__,
            extra: tuple[str, ...] = ()) -> dict:
    """Memory of each layer (a subprocess each), then both timed in turns (one subprocess).
    ``script`` and ``extra`` select another bench's workers (bench_families.py)."""
    size = ["--n", str(n), "--d", str(d), "--k", str(k), *extra]
    mem = {impl: run_worker(a, ["--worker", "mem", "--impl", impl, *size], a.timeout, script) for impl in ("ours", "peer")}
    skip = [impl for impl in mem if mem[impl]["status"] != "ok"]  # known not to fit: do not retry
    timing = run_worker(a, ["--worker", "time", "--reps", str(reps), *size, "--skip", *skip], a.timeout, script) \
        if len(skip) < 2 else {}
    row = {"n": n, "d": d, "k": k}
    for impl in ("ours", "peer"):
        t = timing.get(impl, {}) if isinstance(timing.get(impl), dict) else {}
        status = mem[impl]["status"] if mem[impl]["status"] != "ok" else t.get("status", timing.get("status", "?"))
        row[impl] = {"status": status, "ms": t.get("ms"), "ms_all": t.get("ms_all"),
                     "peak_mib": mem[impl].get("peak_mib"), "error": mem[impl].get("error") or t.get("error")}
    ours_ms, peer_ms = row["ours"]["ms"], row["peer"]["ms"]
    row["ratio_peer_over_ours"] = peer_ms / ours_ms if ours_ms and peer_ms else None
    row["index_agreement"] = timing.get("index_agreement")
    print(f"  {''.join(e + ' ' for e in extra)}N={n} d={d} K={k}: ours {fmt(ours_ms, '.1f')} ms [{row['ours']['status']}], "
          f"peer {fmt(peer_ms, '.1f')} ms [{row['peer']['status']}]", file=sys.stderr, flush=True)
    return row


def table(rows: list[dict], first: tuple[str, ...] = ()) -> list[str]:
    """Markdown rows; ``first`` names row keys shown as leading columns (bench_families.py: the family)."""
    header = (*first, "N", "d", "K", "ours ms", "peer ms", "peer/ours", "ours MiB", "peer MiB", "agree")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        def cell(impl: str, key: str, spec: str) -> str:
            v = r[impl][key]
            return fmt(v, spec) if r[impl]["status"] == "ok" or (key == "peak_mib" and v is not None) else r[impl]["status"]
        lines.append("| " + " | ".join([
            *(str(r[key]) for key in first), f"{r['n']:,}", str(r["d"]), f"{r['k']:,}",
            cell("ours", "ms", ".1f"), cell("peer", "ms", ".1f"),
            fmt(r["ratio_peer_over_ours"], ".2f"), cell("ours", "peak_mib", ".0f"), cell("peer", "peak_mib", ".0f"),
            fmt(r["index_agreement"], ".4f")]) + " |")
    return lines


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
