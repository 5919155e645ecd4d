"""Where a training step's time goes: the real training scripts under torch.profiler, and steps/s.

    python bench/profile_step.py                         # both stages, the `make demo` settings (tiny presets)
    python bench/profile_step.py --stage maskgit --steps 30 --top 20
    python bench/profile_step.py --compare /path/to/other/checkout --rounds 3    # steps/s, A/B in turns

Each stage is its training script's ``main()`` run in this process (train_tokenizer.py on the
procedural faces; train_maskgit.py on codes that pretokenize.py makes first from a short tokenizer run),
so the profile is of the real loop: data loading, the forward/backward/update, the NaN guard, the EMA,
the metric window and the progress bar. An optimizer post-step hook (nothing in the scripts changes)
marks the step boundaries: the profiler skips the first ``--skip`` steps, then records ``--steps``;
the table is by self CPU time. Setup, sample grids, checkpoints and the final validation are outside
the recorded steps (their steps are excluded by the hook's timestamps too).

``--compare DIR`` measures steps/s instead, in turns: each round runs every stage once with this
checkout's code and once with DIR's (another checkout of the project, e.g. ``git worktree add``
of an older commit), each in a fresh subprocess, and reports the median steps/s and the ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The settings `make demo` trains with (demo.py: the tiny presets), with a few steps; --smoke: the smoke
# presets (toy data and model, the test suite's check that this script runs).
SCRIPTS = {"tokenizer": "train_tokenizer.py", "maskgit": "train_maskgit.py"}


def run_stage(stage: str, root: Path, work: Path, skip: int, steps: int, profile: bool, top: int,
              smoke: bool = False) -> dict:
    """Run one stage's main() in this process from ``root``; return steps/s and (with ``profile``) the op table."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    preset = "smoke" if smoke else "tiny"
    sys.path.insert(0, str(root))
    os.chdir(root)
    if stage == "maskgit":  # code files from a short tokenizer run (made once per work folder)
        if not (work / "codes").exists():
            subprocess.run([sys.executable, "train_tokenizer.py", "--preset", preset, "--run-dir", str(work / "tok"),
                            "optim.steps=2", "log.val_batches=1"],
                           cwd=root, check=True, capture_output=True)
            subprocess.run([sys.executable, "pretokenize.py", "--tokenizer", str(work / "tok" / "checkpoint.pt"),
                            "--out", str(work / "codes")], cwd=root, check=True, capture_output=True)
        extra = ["--codes", str(work / "codes"), "--tokenizer", str(work / "tok" / "checkpoint.pt")]
    else:
        extra = ["log.val_batches=1"]
    total = skip + steps
    sys.argv = [SCRIPTS[stage], "--preset", preset, "--run-dir", str(work / f"run_{stage}"), "--overwrite", *extra,
                f"optim.steps={total + 1}", f"log.image_every={total + 1}", f"log.ckpt_every={total + 1}"]

    stamps: list[float] = []
    first: list = []
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                  schedule=torch.profiler.schedule(wait=skip - 1, warmup=1, active=steps, repeat=1))

    def hook(opt, args, kwargs) -> None:  # after every optimizer.step(); the first optimizer is the model's
        if not first:
            first.append(opt)
        if opt is first[0]:
            stamps.append(time.perf_counter())
            if profile:
                prof.step()

    handle = register_optimizer_step_post_hook(hook)
    module = __import__(SCRIPTS[stage].removesuffix(".py"))
    if profile:
        prof.start()
    try:
        module.main()
    finally:
        handle.remove()
        if profile:
            prof.stop()
    window = stamps[skip:skip + steps + 1]  # step boundaries of the recorded steps
    out = {"stage": stage, "steps": steps, "steps_per_s": (len(window) - 1) / (window[-1] - window[0]),
           "threads": torch.get_num_threads()}
    if profile:
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total_us = sum(e.self_cpu_time_total for e in events)
        out["self_cpu_ms_per_step"] = total_us / 1e3 / steps
        out["top"] = [{"op": e.key, "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
                       "share": e.self_cpu_time_total / total_us, "calls_per_step": e.count / steps}
                      for e in events[:top]]
    return out


def child(args: argparse.Namespace) -> None:
    """One stage in this process; the result as JSON on the last line of stdout."""
    work = Path(args.work)
    result = run_stage(args.stage, Path(args.root), work, args.skip, args.steps, not args.no_profile, args.top,
                       args.smoke)
    print("RESULT " + json.dumps(result))


def in_subprocess(stage: str, root: Path, work: Path, a: argparse.Namespace, profile: bool) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--stage", stage, "--root", str(root),
           "--work", str(work), "--skip", str(a.skip), "--steps", str(a.steps), "--top", str(a.top),
           *(["--smoke"] if a.smoke else [])]
    out = subprocess.run(cmd + ([] if profile else ["--no-profile"]), capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        sys.exit(f"profile_step: the {stage} stage failed in {root}:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", choices=(*SCRIPTS, "both"), default="both")
    p.add_argument("--skip", type=int, default=5, help="steps before the recorded ones (warm-up, >= 1)")
    p.add_argument("--steps", type=int, default=20, help="recorded steps")
    p.add_argument("--top", type=int, default=15, help="ops in the table")
    p.add_argument("--compare", metavar="DIR", help="another checkout: steps/s of both, in turns, no profiler")
    p.add_argument("--rounds", type=int, default=3, help="rounds of --compare")
    p.add_argument("--smoke", action="store_true", help="toy data and model (seconds; checks that the script runs)")
    p.add_argument("--out", default="runs/bench/profile_step.json")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-profile", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--root", default=str(ROOT), help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:  # imports the project from --root only
        return child(a)
    from common import write_result
    stages = list(SCRIPTS) if a.stage == "both" else [a.stage]
    with tempfile.TemporaryDirectory(prefix="profile_step-") as tmp:
        if a.compare:
            roots = {"this": ROOT, "other": Path(a.compare).resolve()}
            rates: dict = {s: {k: [] for k in roots} for s in stages}
            for _ in range(a.rounds):
                for s in stages:
                    for name, root in roots.items():
                        rates[s][name].append(in_subprocess(s, root, Path(tmp) / name, a, profile=False)["steps_per_s"])
            result = {"mode": "compare", "other": str(roots["other"]), "rounds": a.rounds, "steps": a.steps, "rows": [
                {"stage": s, "this_steps_per_s": statistics.median(r["this"]),
                 "other_steps_per_s": statistics.median(r["other"]), "all": r,
                 "ratio": statistics.median(r["this"]) / statistics.median(r["other"])} for s, r in rates.items()]}
            print(f"steps/s, median of {a.rounds} rounds in turns ({a.steps} steps after {a.skip}): this checkout "
                  f"vs {roots['other']}")
            print("| stage | this | other | this / other |\n|---|---|---|---|")
            for r in result["rows"]:
                print(f"| {r['stage']} | {r['this_steps_per_s']:.2f} | {r['other_steps_per_s']:.2f} | {r['ratio']:.2f}x |")
        else:
            result = {"mode": "profile", "rows": [in_subprocess(s, ROOT, Path(tmp), a, profile=True) for s in stages]}
            for r in result["rows"]:
                preset = "smoke" if a.smoke else "tiny"
                print(f"\n{r['stage']} ({preset} preset, {r['threads']} threads): {r['steps_per_s']:.2f} steps/s, "
                      f"{r['self_cpu_ms_per_step']:.1f} ms of self CPU time per step (profiled)")
                print("| op | self CPU ms / step | share | calls / step |\n|---|---:|---:|---:|")
                for e in r["top"]:
                    print(f"| `{e['op']}` | {e['self_cpu_ms_per_step']:.2f} | {100 * e['share']:.1f} % | "
                          f"{e['calls_per_step']:g} |")
    write_result(a.out, result)


if __name__ == "__main__":
    main()
