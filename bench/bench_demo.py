"""Does a faster `make demo` keep its sample quality? MaskGIT variants on one demo tokenizer, paired by seed.

    python demo.py --run runs/demo                       # once: the tokenizer, its codes, the reference images
    python bench/bench_demo.py --demo-run runs/demo      # fp32 / bf16 / bf16 with 800 steps, seeds 0 1 2

For every variant and seed, train_maskgit.py trains the demo preset on the demo run's codes (the same
seed is the same data order, masks and initial weights), sample.py draws the demo's 1,000 samples and
``python -m eval score`` computes their SWD against the demo's reference images, as demo.py does. The
table gives each variant's generation SWD (mean over seeds), its paired difference to ``fp32`` with a
95 % t interval, and the fp32 seeds' standard deviation (the demo's seed spread, with the tokenizer
held fixed). A variant is "no worse" when its mean difference is within that spread. Training times
here are for comparing variants on the same (possibly busy) machine, not the demo's wall time: time
that with `demo.py` on idle cores. Runs are kept in --out and reused when the command is run again.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, t_interval

VARIANTS = {
    "fp32": ["optim.mixed_precision=no"],
    "bf16": ["optim.mixed_precision=bf16"],
    "bf16_800": ["optim.mixed_precision=bf16", "optim.steps=800"],
}


def run(cmd: list, what: str) -> None:
    p = subprocess.run([sys.executable, *map(str, cmd)], cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"bench_demo: {what} failed: {(p.stderr.strip().splitlines() or ['no output'])[-1]}")


def variant_seed(demo: Path, name: str, seed: int, out: Path, samples: int) -> dict:
    d = out / name / f"seed{seed}"
    result = d / "result.json"
    if result.exists():
        return json.loads(result.read_text())
    tok = demo / "tokenizer" / "checkpoint.pt"
    t = time.perf_counter()
    run(["train_maskgit.py", "--preset", "demo", "--run-dir", d / "maskgit", "--resume", "--codes", demo / "codes",
         "--tokenizer", tok, f"optim.seed={seed}", *VARIANTS[name]], f"{name} seed {seed}: training")
    train_s = time.perf_counter() - t
    run(["sample.py", "--tokenizer", tok, "--maskgit", d / "maskgit" / "checkpoint.pt", "--num-images", samples,
         "--out-dir", d / "samples", "--overwrite"], f"{name} seed {seed}: sampling")
    run(["-m", "eval", "score", d / "samples", "--ref-images", demo / "eval" / "reference_val", "--report-dir", d,
         "--name", "generation", "--batch-size", 100, "--metrics", "swd"], f"{name} seed {seed}: scoring")
    swd = json.loads((d / "generation.json").read_text())["metrics"]["SWD_x1e3_mean"]
    acc = json.loads((d / "maskgit" / "final_metrics.json").read_text())["val_accuracy"]
    r = {"swd": swd, "val_accuracy": acc, "train_s": train_s}
    result.write_text(json.dumps(r) + "\n")
    print(f"[{name} seed {seed}] SWD {swd:.2f}, masked acc {acc:.3f}, training {train_s:.0f} s", flush=True)
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo-run", required=True, help="a finished `python demo.py --run DIR` (its tokenizer, codes, eval/)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--samples", type=int, default=1000, help="samples per run (the demo draws 1,000)")
    p.add_argument("--out", default="runs/bench_demo")
    a = p.parse_args()
    demo, out = Path(a.demo_run).resolve(), Path(a.out).resolve()
    for need in ("tokenizer/checkpoint.pt", "codes", "eval/reference_val"):
        if not (demo / need).exists():
            raise SystemExit(f"bench_demo: {demo / need} is missing; run `python demo.py --run {a.demo_run}` first")
    if "fp32" not in a.variants:
        a.variants.insert(0, "fp32")
    done = {(v, s): variant_seed(demo, v, s, out, a.samples) for s in a.seeds for v in a.variants}  # pairs first
    res = {v: [done[v, s] for s in a.seeds] for v in a.variants}
    base = [r["swd"] for r in res["fp32"]]
    spread = statistics.stdev(base) if len(base) > 1 else float("nan")
    lines = [f"Generation SWD x1e3 of the demo's samples, seeds {a.seeds}; fp32 seed spread (std) {spread:.2f}",
             "| variant | SWD (mean) | masked acc | paired diff vs fp32 [95% CI] | within the seed spread "
             "| training s (this machine) |",
             "|---|---|---|---|---|---|"]
    rows = []
    for v in a.variants:
        swd = [r["swd"] for r in res[v]]
        diffs = [x - b for x, b in zip(swd, base)]
        m, lo, hi = t_interval(diffs) if len(diffs) > 1 else (diffs[0], float("nan"), float("nan"))
        ok = abs(m) <= spread or m <= 0
        rows.append({"variant": v, "overrides": VARIANTS[v], "swd": swd, "diff": m, "ci": [lo, hi], "no_worse": ok,
                     "val_accuracy": [r["val_accuracy"] for r in res[v]], "train_s": [r["train_s"] for r in res[v]]})
        lines.append(f"| {v} | {statistics.fmean(swd):.2f} | {statistics.fmean(r['val_accuracy'] for r in res[v]):.3f} | "
                     + ("—" if v == "fp32" else f"{m:+.2f} [{lo:+.2f}, {hi:+.2f}]") + f" | {'yes' if ok else 'no'} | "
                     f"{statistics.fmean(r['train_s'] for r in res[v]):.0f} |")
    (out / "bench_demo.json").write_text(json.dumps({"command": "python bench/bench_demo.py " + " ".join(sys.argv[1:]),
                                                    "seeds": a.seeds, "fp32_spread": spread, "rows": rows}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
