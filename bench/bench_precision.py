"""Does low precision keep the codes? Tokenizer training under bf16 autocast against fp32, paired by seed.

    python bench/bench_precision.py                       # every quantizer kind, seeds 0 1 2, procedural faces
    python bench/bench_precision.py --data ../celeba --kinds vector lfq --steps 300 --seeds 0 1
    python bench/bench_precision.py --precision fp16      # fp16 autocast with loss scaling (CUDA only)

For every quantizer kind and seed, the tiny tokenizer preset is trained twice with train_tokenizer.py,
identical except ``optim.mixed_precision`` ("no" vs "bf16"; the same seed is the same data order and
initial weights), and the final validation metrics are compared: codebook usage and perplexity
(goal: within 1 %) and reconstruction PSNR (goal: within 0.1 dB). Reported per kind: the mean of the
paired differences bf16 - fp32 over seeds with its 95 % t interval, and whether the goal holds for
every seed. Runs are kept in ``--out`` and reused when the command is run again.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import ROOT, t_interval

from core.files import FINAL_METRICS

KINDS = {"vector": ["model.vq.kind=vector"], "group": ["model.vq.kind=group", "model.vq.groups=2"],
         "residual": ["model.vq.kind=residual", "model.vq.groups=2", "model.vq.cb_norm=none"],
         "fsq": ["model.vq.kind=fsq"], "lfq": ["model.vq.kind=lfq"], "simvq": ["model.vq.kind=simvq"]}
# the options the grid kinds and SimVQ refuse (the tiny preset enables every fix of the VQ kinds)
PLAIN = ["model.vq.kmeans_init=false", "model.vq.norm=none", "model.vq.cb_norm=none", "model.vq.affine_lr=0",
         "model.vq.sync_nu=0", "model.vq.replace_freq=0", "model.vq.inplace_lr=0", "model.vq.beta=0.95"]
GOALS = {"codes_used": ("relative", 0.01), "perplexity": ("relative", 0.01), "psnr": ("absolute", 0.1)}


def train(kind: str, precision: str, seed: int, a: argparse.Namespace, threads: int | None = None) -> dict:
    """One run; ``threads``: the fp32 run again with another thread count (another summation order), the
    noise floor: how far any rounding change moves a 300-step training run."""
    run = Path(a.out) / kind / (precision if threads is None else f"{precision}_threads{threads}") / f"seed{seed}"
    metrics = run / FINAL_METRICS
    if not metrics.exists():
        extra = PLAIN if kind in ("fsq", "lfq", "simvq") else []
        cmd = [sys.executable, str(ROOT / "train_tokenizer.py"), "--preset", "tiny", "--run-dir", str(run),
               "--resume", f"data.source={a.data}", f"optim.steps={a.steps}", f"optim.seed={seed}",
               f"optim.mixed_precision={precision}", "log.val_batches=4", f"log.ckpt_every={a.steps}",
               *extra, *KINDS[kind], *a.args]
        env = {**os.environ, **({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {})}
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
        if p.returncode != 0:
            raise SystemExit(f"bench_precision: {kind} {precision} seed {seed} failed: "
                             f"{(p.stderr.strip().splitlines() or ['no output'])[-1]}")
    return json.loads(metrics.read_text())


def device() -> str:
    """Where train_tokenizer.py runs (Accelerate takes the GPU when there is one)."""
    import torch
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--data", default="procedural", help="image folder / CelebA root, or 'procedural'")
    p.add_argument("--precision", choices=("bf16", "fp16"), default="bf16",
                   help="the low precision compared with fp32 (fp16: CUDA only, as Accelerate allows)")
    p.add_argument("--jobs", type=int, default=1,
                   help="training runs at once (each its own process; more than 1 on a GPU or a many-core machine)")
    p.add_argument("--out", default="runs/bench_precision")
    p.add_argument("--floor-kinds", nargs="*", default=["vector"], choices=list(KINDS),
                   help="kinds whose fp32 runs are repeated with another thread count (the noise floor column)")
    p.add_argument("args", nargs="*", help="extra key=value overrides for every run (e.g. data.num_images=64)")
    a = p.parse_args()
    other_threads = 2 if os.environ.get("OMP_NUM_THREADS", "") == "1" else 1
    low = a.precision
    rows, lines = [], [f"| kind | metric | fp32 | {low} | {low} - fp32 [95% CI] | goal | met on every seed "
                       f"| noise floor: fp32 with {other_threads} thread(s) - fp32, per seed |",
                       "|---|---|---|---|---|---|---|---|"]
    tasks = [(kind, prec, s, None) for kind in a.kinds for prec in ("no", low) for s in a.seeds]
    tasks += [(kind, "no", s, other_threads) for kind in a.kinds if kind in a.floor_kinds for s in a.seeds]
    with ThreadPoolExecutor(a.jobs) as pool:  # each run is its own process; the threads only wait for them
        done = dict(zip(tasks, pool.map(lambda t: train(t[0], t[1], t[2], a, threads=t[3]), tasks)))
    for kind in a.kinds:
        runs = {prec: [done[kind, prec, s, None] for s in a.seeds] for prec in ("no", low)}
        if kind in a.floor_kinds:
            runs["floor"] = [done[kind, "no", s, other_threads] for s in a.seeds]
        for key, (mode, tol) in GOALS.items():
            fp32, lowp = [r[key] for r in runs["no"]], [r[key] for r in runs[low]]
            diffs = [b - f for b, f in zip(lowp, fp32)]
            rel = [d / f for d, f in zip(diffs, fp32)] if mode == "relative" else diffs
            met = all(abs(x) <= tol for x in rel)
            m, lo, hi = t_interval(rel)
            unit = "%" if mode == "relative" else " dB"
            scale = 100 if mode == "relative" else 1
            floor = [(r[key] - f) / (f if mode == "relative" else 1) for r, f in zip(runs.get("floor", []), fp32)]
            rows.append({"kind": kind, "metric": key, "fp32": fp32, low: lowp, "diff": m, "ci": [lo, hi], "met": met,
                         "floor": floor})
            ci = f"[{scale * lo:+.2f}, {scale * hi:+.2f}]" if len(diffs) > 1 else "(one seed: no interval)"
            lines.append(f"| {kind} | {key} | {statistics.fmean(fp32):.3f} | {statistics.fmean(lowp):.3f} | "
                         f"{scale * m:+.2f}{unit} {ci} | "
                         f"within {scale * tol:g}{unit} | {'yes' if met else 'no'} | "
                         + (", ".join(f"{scale * x:+.2f}" for x in floor) + unit if floor else "—") + " |")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "precision.json").write_text(json.dumps({"command": "python bench/bench_precision.py " + " ".join(sys.argv[1:]),
                                                    "precision": low, "device": device(), "seeds": a.seeds, "steps": a.steps,
                                                    "rows": rows}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
