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

    python bench/bench_demo.py --pipeline --before ../old-checkout --seeds 0 1 2 --jobs 2

``--pipeline`` compares two versions of the whole demo instead (e.g. new presets against the previous
ones): for every seed it runs ``demo.py --seed S`` of this checkout and of ``--before`` (another checkout
of the project, e.g. ``git worktree add ../old <commit>``), the two of a seed side by side with
``--jobs 2`` (one thread each), and pairs them by seed: generation SWD, tokenizer PSNR, masked accuracy
and each side's training and total seconds. "No worse" is the same rule as above, with the spread of
the ``--before`` seeds (tokenizer and MaskGIT both vary with the seed). ``--share-tokenizer`` is for a change
of stage two only: every after run starts from the before run's tokenizer of its seed (only if this checkout
would train the very same one), so the pairs differ in what follows it; its tokenizer time is the before run's.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
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


def demo_seed(checkout: Path, seed: int, run_dir: Path, scale: str, threads: int) -> dict:
    """One ``demo.py --seed`` of ``checkout`` into ``run_dir`` (reused when it finished before): its numbers."""
    result = run_dir / "result.json"
    if result.exists():
        return json.loads(result.read_text())
    t = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    p = subprocess.run([sys.executable, checkout / "demo.py", "--run", run_dir, "--seed", str(seed), "--scale", scale],
                       cwd=checkout, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"bench_demo: demo.py of {checkout}, seed {seed} failed: "
                         f"{(p.stderr.strip().splitlines() or ['no output'])[-1]}")
    read = lambda path: json.loads((run_dir / path).read_text())  # noqa: E731
    tok, mg = read("tokenizer/final_metrics.json"), read("maskgit/final_metrics.json")
    r = {"swd": read("eval/generation.json")["metrics"]["SWD_x1e3_mean"],
         "floor_swd": read("eval/floor.json")["metrics"]["SWD_x1e3_mean"], "psnr": tok["psnr"],
         "perplexity": tok["perplexity"], "val_accuracy": mg["val_accuracy"], "tokenizer_s": tok["wall_seconds"],
         "maskgit_s": mg["wall_seconds"], "total_s": time.perf_counter() - t, "threads": threads}
    result.write_text(json.dumps(r) + "\n")
    print(f"[{run_dir.parent.name} seed {seed}] SWD {r['swd']:.2f}, PSNR {r['psnr']:.2f}, masked acc "
          f"{r['val_accuracy']:.3f}, {r['total_s']:.0f} s", flush=True)
    return r


def pipeline_table(before: list[dict], after: list[dict], seeds: list[int]) -> tuple[list[str], list[dict]]:
    """Markdown lines and rows pairing ``after`` with ``before`` seed by seed, one metric per row."""
    lines = [f"The whole demo, this checkout (after) against --before, paired by seed ({seeds})",
             "| metric | before (mean) | after (mean) | after - before [95% CI] | before's seed spread (std) | verdict |",
             "|---|---|---|---|---|---|"]
    rows = []
    for key, lower_better in (("swd", True), ("psnr", False), ("val_accuracy", False), ("tokenizer_s", True),
                              ("maskgit_s", True), ("total_s", True)):
        b, a = [r[key] for r in before], [r[key] for r in after]
        m, lo, hi = t_interval([x - y for x, y in zip(a, b)])
        spread = statistics.stdev(b) if len(b) > 1 else float("nan")
        if key.endswith("_s"):
            verdict = f"{statistics.fmean(a) / statistics.fmean(b):.2f}x the time"
        else:
            better = (m <= 0) if lower_better else (m >= 0)
            verdict = "no worse (better or within the spread)" if better or abs(m) <= spread else "worse"
        rows.append({"metric": key, "before": b, "after": a, "diff": m, "ci": [lo, hi], "spread": spread,
                     "verdict": verdict})
        lines.append(f"| {key} | {statistics.fmean(b):.3f} | {statistics.fmean(a):.3f} | {m:+.3f} [{lo:+.3f}, {hi:+.3f}] | "
                     f"{spread:.3f} | {verdict} |")
    return lines, rows


def share_tokenizer(before_run: Path, after_run: Path, scale: str, seed: int) -> None:
    """Start ``after_run`` from ``before_run``'s finished tokenizer (demo.py then resumes past that stage), after
    checking that this checkout would train exactly that tokenizer (the same stored config)."""
    from core.config import apply_overrides, to_dict
    from tokenizer.train_config import PRESETS
    from training.run import flatten

    if (after_run / "tokenizer").exists():
        return
    stored = json.loads((before_run / "tokenizer" / "config.json").read_text())
    ours = json.loads(json.dumps(to_dict(apply_overrides(PRESETS[scale], [f"optim.seed={seed}"]))))
    ours, stored = flatten(ours), flatten(stored)
    diff = sorted(k for k in ours.keys() | stored.keys() if ours.get(k) != stored.get(k))
    if diff:
        raise SystemExit(f"bench_demo: --share-tokenizer: the two checkouts train different tokenizers ({diff[0]}: "
                         f"{stored.get(diff[0])!r} before, {ours.get(diff[0])!r} here)")
    after_run.mkdir(parents=True, exist_ok=True)
    shutil.copytree(before_run / "tokenizer", after_run / "tokenizer")


def pipeline(a: argparse.Namespace) -> None:
    here, before = ROOT, Path(a.before).resolve()
    if not (before / "demo.py").exists():
        raise SystemExit(f"bench_demo: --before {before} is not a checkout of this project (no demo.py)")
    out = Path(a.out).resolve()
    threads = max(1, (os.cpu_count() or 1) // a.jobs)
    jobs = [(side, checkout, seed) for seed in a.seeds for side, checkout in (("before", before), ("after", here))]
    run = lambda j: demo_seed(j[1], j[2], out / j[0] / f"seed{j[2]}", a.scale, threads)  # noqa: E731
    with ThreadPoolExecutor(a.jobs) as pool:
        if a.share_tokenizer:  # every "before" first; each "after" starts from its seed's tokenizer
            done = dict(zip(jobs[::2], pool.map(run, jobs[::2])))
            for seed in a.seeds:
                share_tokenizer(out / "before" / f"seed{seed}", out / "after" / f"seed{seed}", a.scale, seed)
            done.update(zip(jobs[1::2], pool.map(run, jobs[1::2])))
        else:  # the two sides of a seed run together: the same machine load
            done = dict(zip(jobs, pool.map(run, jobs)))
    res = {side: [done[side, c, s] for side2, c, s in jobs if side2 == side] for side in ("before", "after")}
    if a.share_tokenizer:  # the after runs resumed a finished tokenizer: their total time is not a demo's
        for b, r in zip(res["before"], res["after"]):
            r.update(tokenizer_s=b["tokenizer_s"], total_s=r["total_s"] + b["tokenizer_s"], tokenizer_shared=True)
    lines, rows = pipeline_table(res["before"], res["after"], a.seeds)
    (out / "bench_demo_pipeline.json").write_text(json.dumps(
        {"command": "python bench/bench_demo.py " + " ".join(sys.argv[1:]), "before": str(before), "seeds": a.seeds,
         "threads_per_run": threads, "runs": res, "rows": rows}, indent=2) + "\n")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo-run", help="a finished `python demo.py --run DIR` (its tokenizer, codes, eval/)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--samples", type=int, default=1000, help="samples per run (the demo draws 1,000)")
    p.add_argument("--out", default="runs/bench_demo")
    p.add_argument("--pipeline", action="store_true", help="compare the whole demo of this checkout with --before's")
    p.add_argument("--before", help="--pipeline: another checkout of the project (the previous version)")
    p.add_argument("--scale", default="demo", help="--pipeline: demo.py's --scale (smoke: the test suite's)")
    p.add_argument("--jobs", type=int, default=1, help="--pipeline: demo runs at once (threads split between them)")
    p.add_argument("--share-tokenizer", action="store_true",
                   help="--pipeline, for a change of stage two only: each after run starts from the before run's "
                        "tokenizer of its seed (refused unless this checkout would train the same one)")
    a = p.parse_args()
    if a.pipeline:
        if not a.before:
            raise SystemExit("bench_demo: --pipeline needs --before DIR (a checkout of the previous version)")
        if len(a.seeds) < 2:
            raise SystemExit("bench_demo: --pipeline pairs by seed: give at least two --seeds")
        return pipeline(a)
    if a.demo_run is None:
        raise SystemExit("bench_demo: --demo-run DIR is required (or --pipeline --before DIR)")
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
