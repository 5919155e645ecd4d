"""The paper's claim, rung by rung: the whole pipeline once per VQ variant and seed, scored on generation.

    python bench/ladder.py                          # CPU budget, shared CelebA copy, 32x32, seeds 0-4 (`make ladder`)
    python bench/ladder.py --setting cpu_long --rungs baseline l2_replace all --seeds 0 1 2  # 2x / 4x the steps
    python bench/ladder.py & python bench/ladder.py # two copies share the runs (per-run locks)
    python bench/ladder.py --setting gpu64          # one GPU: 64x64, the celeba64 presets (not run here)
    python bench/ladder.py --data /path/to/images --rungs baseline opt_affine --seeds 0
    python bench/ladder.py --report-only            # rebuild the table and pages from what is on disk
    python bench/ladder.py --rungs l2_replace l2_replace@arccos --seeds 0 1 2  # MaskGIT's mask schedule, paired

Huh et al. (ICML 2023) report MaskGIT generation FID on CelebA of 90.5 (baseline VQ) -> 79.7 (+l2
+replace) -> 74.8 (+OPT +affine). For every rung of ``tokenizer.config.VQ_VARIANTS`` and every seed
this runs the project's own command-line tools, exactly as a user would:

    train_tokenizer.py -> pretokenize.py -> train_maskgit.py -> sample.py -> python -m eval score

with the same data, split, budgets and decoding settings for every rung; only the VQ options (every
one of them set explicitly, starting from ``VQConfig``'s defaults) and the seed change. The tokenizer
preset's VQ loss weight (5, the paper's) is kept for every rung.

Scores: SWD (sliced Wasserstein distance, Karras et al. 2018; x1e3, labelled as such) between the
samples and the held-out images of the split, always; FID and KID only when the standard Inception
weights are found (``eval/inception.py`` says where it looks). The floors are the same statistics
between real *train* images and the same held-out images: how far from real faces a rung is.

Statistics: every rung is compared with +l2 +replace seed by seed (the same seed is the same data order
and the same initial weights, so the difference of a pair is free of both), with the mean paired
difference, its 95 % confidence interval (Student t over the seeds) and the paired t-test's p-value. A
rung is called better or worse only where the interval excludes zero; otherwise "not separated".

Record: every finished run's numbers are also kept in ``bench/results/ladder_<setting>.json`` (with the
commit that ran it), which is committed, so a ladder spread over several sessions or machines adds up:
runs in the record count as done; the table is built from the record and the run directories.

Resumable: each finished stage of each run is recorded in ``<runs-dir>/<rung>/seed<k>/stages.json``
and training stages resume from their checkpoints, so a killed ladder continues where it stopped
(re-run the same command). Parallel: several copies of the same command share the runs (each run
directory is locked by the process working on it); on a machine with more cores than one run uses,
start one copy per free core group, then ``--report-only`` for the complete table. Outputs in ``--runs-dir`` (default runs/ladder): ladder.json, ladder.md,
index.html, samples.png (one column per rung), codes_used.png.
"""
from __future__ import annotations

import argparse
import html
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from common import DEFAULT_DATA, ROOT, resolve_image_folder  # noqa: E402
from PIL import Image  # noqa: E402

from core.files import final_metrics_path  # noqa: E402
from tokenizer.config import VQ_VARIANTS, variant_overrides  # noqa: E402

RUNGS = ["l2_replace", "baseline", "all", "seed_recipe", "opt_commit", "opt", "opt_renorm", "affine", "opt_affine"]
LABELS = {"baseline": "baseline", "l2_replace": "+l2 +replace", "affine": "+affine", "opt": "+OPT",
          "opt_affine": "+OPT +affine", "all": "all (+k-means)", "opt_commit": "+OPT, commitment kept",
          "opt_renorm": "+OPT, W renormalized", "seed_recipe": "reference's recommended layer", "fsq": "FSQ",
          "lfq": "LFQ", "rotation": "VQ + rotation trick", "simvq": "SimVQ"}
REFERENCE_RUNG = "l2_replace"  # every rung is compared with this one, seed by seed
# Stage-two variants: "<rung>@<variant>" trains only MaskGIT differently, on the tokenizer and codes of
# "<rung>" with the same seed (linked, not retrained), so its pair with "<rung>" differs in MaskGIT alone.
MG_VARIANTS = {"arccos": ["masking.schedule=arccos"]}
# The ladder's sampler, spelled out so that a change of sample.py's defaults never changes a rung's numbers
# (MaskGIT's reference sampler: confidence order, Gumbel noise 4.5 annealed linearly, temperature 1).
DECODING = ["--steps", "8", "--order", "confidence", "--choice-temperature", "4.5", "--choice-schedule", "linear",
            "--temperature", "1.0"]
LABELS.update({f"{r}@{v}": f"{LABELS.get(r, r)}, MaskGIT {v}" for r in VQ_VARIANTS for v in MG_VARIANTS})
RECORDS = ROOT / "bench" / "results"
# The paper's MaskGIT-on-CelebA generation FID (read off its figure, about +-0.5); other rungs not reported.
PAPER_FID = {"baseline": 90.5, "l2_replace": 79.7, "opt_affine": 74.8}
PAPER_RFID = {"baseline": 93.8, "l2_replace": 86.3, "opt_affine": 74.2}

# Budgets. "cpu": 12 runs (6 rungs x 2 seeds) of about 7-8 minutes each on 2 idle cores, an estimate from
# MaskGIT's mask schedule of the record's runs (made when cosine was the default): kept so that later runs
# pair with them; the "@arccos" variants override it.
MG_BASE = ["masking.schedule=cosine"]
# the per-step rates of the tiny presets (about 1.5 hours in all; several copies of the command share the
# runs on a larger machine); "smoke" is the test suite's; "gpu64" is the documented setting for one GPU at
# the paper's CelebA resolution (not measured on this project's machines).
SETTINGS = {
    "cpu": dict(resolution=32, tok_preset="tiny", mg_preset="tiny", tok_steps=1000, mg_steps=600, samples=1000,
                reference=1000, tok_args=["optim.warmup_steps=50"], mg_args=MG_BASE),
    # The same with 2x the tokenizer's and 4x MaskGIT's steps: does the budget decide the ranking?
    "cpu_long": dict(resolution=32, tok_preset="tiny", mg_preset="tiny", tok_steps=2000, mg_steps=2400, samples=1000,
                     reference=1000, tok_args=["optim.warmup_steps=50"], mg_args=MG_BASE),
    "gpu64": dict(resolution=64, tok_preset="celeba64", mg_preset="celeba64", tok_steps=20_000, mg_steps=40_000,
                  samples=10_000, reference=10_000, tok_args=["data.num_workers=8"], mg_args=[]),
    "smoke": dict(resolution=32, tok_preset="smoke", mg_preset="smoke", tok_steps=2, mg_steps=2, samples=8,
                  reference=8, tok_args=[], mg_args=[]),
}
STAGES = ("tokenizer", "codes", "maskgit", "sample", "score", "recon")


def git_commit() -> str:
    p = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return p.stdout.strip() if p.returncode == 0 else "unknown"


def load_record(path: Path | None, setting: str, folder: str) -> dict:
    """The runs finished so far in this setting (any session, any machine); refuses a record made on other data."""
    data = Path(folder).name
    if path is None or not path.exists():
        return {"setting": setting, "data": data, "runs": {}}
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"ladder: cannot read the record {path}: {e}; fix or move it (or pass --record none)")
    if record.get("setting") != setting or record.get("data") != data:
        raise SystemExit(f"ladder: the record {path} holds setting {record.get('setting')!r} on data "
                         f"{record.get('data')!r}, not {setting!r} on {data!r}; pass --record with another file")
    return record


def add_to_record(path: Path, record: dict, rung: str, key: str, entry: dict) -> None:
    """Add one run and write the record, merged with what other ladder processes wrote meanwhile."""
    try:
        on_disk = json.loads(path.read_text())["runs"] if path.exists() else {}
    except (OSError, json.JSONDecodeError, KeyError):
        on_disk = {}  # unreadable now: keep this process's view
    for r, seeds in on_disk.items():
        for k, v in seeds.items():
            record["runs"].setdefault(r, {}).setdefault(k, v)
    record["runs"].setdefault(rung, {})[key] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)  # atomic: a killed ladder never leaves half a record


def run(cmd: list[str], log: Path) -> None:
    """One stage as a subprocess of this Python; its output goes to ``log``; a failure stops the ladder."""
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        p = subprocess.run([sys.executable, *cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if p.returncode != 0:
        tail = log.read_text().strip().splitlines()[-1:] or ["no output"]
        raise SystemExit(f"ladder: '{' '.join(cmd[:2])}' failed (exit {p.returncode}): {tail[0][-300:]}; see {log}; "
                         "fix it and re-run the same command to continue")


def data_overrides(folder: str, s: dict) -> list[str]:
    return [f"data.source={folder}", f"data.resolution={s['resolution']}", f"model.resolution={s['resolution']}",
            "data.crop=140", "data.cache=true"]


def write_references(folder: str, s: dict, out: Path) -> dict:
    """Held-out images (the split's val part) and as many train images, as PNGs, written once."""
    from torchvision.utils import save_image

    from data import DataConfig, build_dataset

    cfg = DataConfig(source=folder, resolution=s["resolution"], crop=140, flip=False)
    sets = {"val": build_dataset(cfg, "val", train=False), "train": build_dataset(cfg, "train", train=False)}
    counts = {}
    for split, dataset in sets.items():
        target, n = out / split, min(s["reference"], len(sets["val"]), len(dataset))
        if not (target / ".done").exists() or (target / ".done").read_text() != str(n):
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            for i in range(n):
                save_image((dataset[i]["image"] + 1) / 2, target / f"{i:05d}.png")
            (target / ".done").write_text(str(n))
        counts[split] = n
    return counts


def score(samples: Path, ref: Path, out_dir: Path, metrics: str, log: Path) -> dict:
    run(["-m", "eval", "score", str(samples), "--ref-images", str(ref / "val"), "--run-dir", str(out_dir),
         "--name", "generation", "--metrics", metrics, *(["--ref", str(ref / "val_stats.npz")] if metrics != "swd" else [])],
        log)
    return json.loads((out_dir / "generation.json").read_text())["metrics"]


def claim(d: Path) -> bool:
    """Take run directory ``d`` for this process (a lock file holding its pid); False when another live
    process holds it. Several copies of the same command thus share the ladder's runs between them."""
    lock = d / ".lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                os.kill(int(lock.read_text() or 0), 0)
                return False  # a live process runs it
            except (ProcessLookupError, ValueError):
                lock.unlink(missing_ok=True)  # left by a killed process: take it over
                continue
            except PermissionError:
                return False
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return True
    return False


def one_run(rung: str, seed: int, folder: str, s: dict, a: argparse.Namespace, metrics: str, ref: Path) -> dict | None:
    d = Path(a.runs_dir) / rung / f"seed{seed}"
    d.mkdir(parents=True, exist_ok=True)
    if not claim(d):
        print(f"[{rung} seed {seed}] taken by another ladder process, skipped here", file=sys.stderr, flush=True)
        return None
    try:
        return _one_run(d, rung, seed, folder, s, metrics, ref)
    finally:
        (d / ".lock").unlink(missing_ok=True)


def _one_run(d: Path, rung: str, seed: int, folder: str, s: dict, metrics: str, ref: Path) -> dict | None:
    done_path, log = d / "stages.json", d / "output.log"
    done = json.loads(done_path.read_text()) if done_path.exists() else []
    tok, codes, mg = d / "tokenizer", d / "codes", d / "maskgit"
    base, _, variant = rung.partition("@")
    if variant and not (tok.exists() and codes.exists()):
        source = d.parent.parent / base / d.name
        ready = (source / "stages.json").exists() and "codes" in json.loads((source / "stages.json").read_text())
        if not ready:
            print(f"[{rung} seed {seed}] waits for the tokenizer and codes of {base} seed {seed}; skipped here",
                  file=sys.stderr, flush=True)
            return None
        for name in ("tokenizer", "codes"):
            (d / name).symlink_to((source / name).resolve(), target_is_directory=True)

    def stage(name: str, fn) -> None:
        if name in done:
            return
        t = time.time()
        print(f"[{rung} seed {seed}] {name} ...", file=sys.stderr, flush=True)
        fn()
        done.append(name)
        done_path.write_text(json.dumps(done))
        print(f"[{rung} seed {seed}] {name} done in {time.time() - t:.0f} s", file=sys.stderr, flush=True)

    stage("tokenizer", lambda: run([
        "train_tokenizer.py", "--preset", s["tok_preset"], "--run-dir", str(tok), "--resume",
        *data_overrides(folder, s), f"optim.steps={s['tok_steps']}", f"optim.seed={seed}", "log.val_batches=0",
        f"log.ckpt_every={max(s['tok_steps'] // 4, 1)}", *s["tok_args"], *variant_overrides(base)], log))
    stage("codes", lambda: run(["pretokenize.py", "--tokenizer", str(tok / "checkpoint.pt"), "--out", str(codes)], log))
    stage("maskgit", lambda: run([
        "train_maskgit.py", "--preset", s["mg_preset"], "--run-dir", str(mg), "--resume", "--codes", str(codes),
        "--tokenizer", str(tok / "checkpoint.pt"), f"optim.steps={s['mg_steps']}", f"optim.seed={seed}",
        f"log.ckpt_every={max(s['mg_steps'] // 4, 1)}", *s["mg_args"], *MG_VARIANTS.get(variant, [])], log))

    def sample() -> None:
        shutil.rmtree(d / "samples", ignore_errors=True)  # a half-written set from a killed run
        run(["sample.py", "--tokenizer", str(tok / "checkpoint.pt"), "--maskgit", str(mg / "checkpoint.pt"),
             "--seed", str(seed), *DECODING, "--grid", str(d / "samples_grid.png"), "--grid-size", "16",
             "--num-images", str(s["samples"]), "--out-dir", str(d / "samples")], log)

    stage("sample", sample)
    stage("score", lambda: score(d / "samples", ref, d / "eval", metrics, log))
    # The same statistics for the tokenizer's reconstructions of the held-out images: the quality that
    # generation could reach with a perfect MaskGIT (the paper reports it as reconstruction FID).
    stage("recon", lambda: run([
        "-m", "eval", "rfid", "--tokenizer", str(tok / "checkpoint.pt"), "--images", str(ref / "val"),
        "--run-dir", str(d / "eval"), "--name", "reconstruction", "--metrics", metrics,
        *(["--ref", str(ref / "val_stats.npz")] if metrics != "swd" else [])], log))
    return collect(d)


def collect(d: Path) -> dict:
    """The numbers of one finished run, from the files its stages wrote."""
    tok = json.loads(final_metrics_path(d / "tokenizer").read_text())
    mg = json.loads(final_metrics_path(d / "maskgit").read_text())
    gen = json.loads((d / "eval" / "generation.json").read_text())["metrics"]
    rec = json.loads((d / "eval" / "reconstruction.json").read_text())["metrics"]
    log = [json.loads(line) for line in (d / "tokenizer" / "log.jsonl").read_text().splitlines() if line.strip()]
    last = [r["vq"] for r in log[-4:] if "vq" in r]  # the VQ loss's value is mean((z - z_q)^2) for every rung
    out = {"psnr": tok["psnr"], "perplexity": tok["perplexity"], "codes_used": tok["codes_used"],
           "num_codes": tok["num_codes"], "masked_accuracy": mg.get("val_accuracy"), "swd": gen["SWD_x1e3_mean"],
           "rswd": rec["SWD_x1e3_mean"], "ste_error": statistics.fmean(last) if last else None,
           "usage_curve": [(r["step"], r["window_codes_used"]) for r in log]}
    for key in ("FID", "KID_mean"):
        if key in gen:
            out[key.split("_")[0].lower()] = gen[key]
        if key in rec:
            out["r" + key.split("_")[0].lower()] = rec[key]
    return out


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation over seeds (0 for one seed)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired(a: dict, b: dict, key: str) -> dict | None:
    """Paired comparison of ``key`` between runs ``a`` and ``b`` (seed -> numbers) on their common seeds:
    the differences a - b, their mean, 95 % confidence interval (Student t, n - 1 degrees of freedom)
    and the paired t-test's two-sided p-value. None with fewer than two common seeds."""
    from scipy import stats

    seeds = sorted(set(a) & set(b), key=lambda k: int(k.removeprefix("seed")))
    diffs = [a[k][key] - b[k][key] for k in seeds if a[k].get(key) is not None and b[k].get(key) is not None]
    if len(diffs) < 2:
        return None
    n, m = len(diffs), statistics.fmean(diffs)
    sd = statistics.stdev(diffs)
    half = stats.t.ppf(0.975, n - 1) * sd / n**0.5
    p = float(stats.ttest_1samp(diffs, 0.0).pvalue) if sd > 0 else (0.0 if m != 0 else 1.0)
    return {"n": n, "diffs": diffs, "mean": m, "ci": [m - half, m + half], "p": p}


def verdict(c: dict | None, lower_is_better: bool = True) -> str:
    if c is None:
        return "fewer than 2 paired seeds"
    lo, hi = c["ci"]
    if lo <= 0 <= hi:
        return "not separated"
    return "better" if (hi < 0) == lower_is_better else "worse"


COLUMNS = [("psnr", "tokenizer PSNR dB", ".2f"), ("perplexity", "perplexity", ".1f"), ("codes_used", "codes used", ".1%"),
           ("ste_error", "STE error", ".4f"), ("rswd", "reconstruction SWD x1e3", ".2f"),
           ("rfid", "reconstruction FID", ".2f"), ("masked_accuracy", "MaskGIT masked acc.", ".3f"),
           ("swd", "generation SWD x1e3", ".2f"), ("fid", "generation FID", ".2f"), ("kid", "KID", ".4f")]
# The paired comparisons shown: (key, label, lower is better)
COMPARED = [("swd", "generation SWD x1e3", True), ("rswd", "reconstruction SWD x1e3", True),
            ("psnr", "tokenizer PSNR dB", False), ("fid", "generation FID", True)]


def table(results: dict, floors: dict) -> tuple[list[str], list[str]]:
    cols = [c for c in COLUMNS if any(r.get(c[0]) is not None for runs in results.values() for r in runs.values())]
    header = ["rung", "seeds", *[c[1] for c in cols], "paper rFID", "paper FID"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for rung, runs in results.items():
        cells = [LABELS.get(rung, rung), str(len(runs))]
        for key, _, spec in cols:
            vals = [r[key] for r in runs.values() if r.get(key) is not None]
            if not vals:
                cells.append("n/a")
                continue
            m, sd = mean_sd(vals)
            cells.append(f"{format(m, spec)} ± {format(sd, spec)}" if len(vals) > 1 else format(m, spec))
        cells += [str(PAPER_RFID.get(rung, "—")), str(PAPER_FID.get(rung, "—"))]
        lines.append("| " + " | ".join(cells) + " |")
    # Generation is scored against held-out images, so real train images set its floor; reconstruction
    # SWD is paired (each image against its own reconstruction), so its floor is 0.
    floor_of = {**floors, "rswd": 0.0}
    floor_cells = ["real images (floor)", "—"] + [
        format(floor_of[k], spec) if k in floor_of else "—" for k, _, spec in cols] + ["—", "—"]
    lines.append("| " + " | ".join(floor_cells) + " |")
    return header, lines


def comparisons(results: dict) -> tuple[dict, list[str]]:
    """Every rung against ``REFERENCE_RUNG``, paired by seed; a markdown table and the raw numbers."""
    ref = results.get(REFERENCE_RUNG, {})
    keys = [c for c in COMPARED if any(r.get(c[0]) is not None for runs in results.values() for r in runs.values())]
    header = ["rung", "paired seeds", *[f"{label}: difference [95% CI], p" for _, label, _ in keys],
              "verdict (generation SWD)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    raw: dict = {}
    for rung, runs in results.items():
        if rung == REFERENCE_RUNG:
            continue
        raw[rung] = {key: paired(runs, ref, key) for key, _, _ in keys}
        cells = [LABELS.get(rung, rung), str(len(set(runs) & set(ref)))]
        for key, _, lower in keys:
            c = raw[rung][key]
            cells.append("—" if c is None else f"{c['mean']:+.2f} [{c['ci'][0]:+.2f}, {c['ci'][1]:+.2f}], "
                                               f"p = {c['p']:.3f} ({verdict(c, lower)})")
        raw[rung]["verdict"] = verdict(raw[rung].get("swd"))
        cells.append(raw[rung]["verdict"])
        lines.append("| " + " | ".join(cells) + " |")
    return raw, lines


def figures(results: dict, out: Path) -> None:
    rungs = [r for r in results if results[r]]
    first = {r: sorted(results[r])[0] for r in rungs}
    fig, axes = plt.subplots(1, len(rungs), figsize=(2.6 * len(rungs), 2.9), squeeze=False)
    for ax, rung in zip(axes[0], rungs):
        grid = Path(out) / rung / first[rung] / "samples_grid.png"
        if grid.exists():
            ax.imshow(Image.open(grid), interpolation="nearest")
        ax.set_title(f"{LABELS.get(rung, rung)}\n({first[rung]})", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "samples.png", dpi=130, bbox_inches="tight")
    plt.close(fig)
    # Seed spread: every run's generation SWD, one line per seed across the rungs (the pairs compared).
    fig, ax = plt.subplots(figsize=(max(6.4, 1.1 * len(rungs)), 3.6))
    seeds = sorted({k for r in rungs for k in results[r]}, key=lambda k: int(k.removeprefix("seed")))
    for j, seed in enumerate(seeds):
        xs = [i for i, r in enumerate(rungs) if seed in results[r]]
        ax.plot(xs, [results[rungs[i]][seed]["swd"] for i in xs], "o-", color=f"C{j}", alpha=0.6, ms=4, lw=0.8,
                label=seed)
    means = [statistics.fmean(r["swd"] for r in results[rung].values()) for rung in rungs]
    ax.scatter(range(len(rungs)), means, marker="_", s=600, color="black", zorder=3, label="mean")
    ax.set_xticks(range(len(rungs)), [LABELS.get(r, r) for r in rungs], rotation=25, ha="right", fontsize=8)
    ax.set(ylabel="generation SWD x1e3 (lower is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "seeds.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    for rung in rungs:
        for i, (seed, r) in enumerate(sorted(results[rung].items())):
            steps, used = zip(*r["usage_curve"]) if r["usage_curve"] else ((), ())
            ax.plot(steps, used, color=f"C{rungs.index(rung)}", alpha=1.0 if i == 0 else 0.45,
                    label=LABELS.get(rung, rung) if i == 0 else None)
    ax.set(xlabel="tokenizer training step", ylabel="fraction of codes used (log window)", ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "codes_used.png", dpi=110)
    plt.close(fig)


def write_pages(out: Path, meta: dict, lines: list[str], paired_lines: list[str]) -> None:
    md = [f"# Generation ladder ({meta['setting']})", "", f"Command: `{meta['command']}`", "",
          "![samples, one column per rung](samples.png)", "", "Mean ± standard deviation over seeds:", "", *lines, "",
          f"Paired by seed against {LABELS[REFERENCE_RUNG]} (rung minus reference; 95 % t interval; a verdict only "
          "where the interval excludes 0):", "", *paired_lines, "",
          "![generation SWD of every run, one line per seed](seeds.png)", "",
          "![codes used during tokenizer training](codes_used.png)", "", "Protocol:", "",
          "```json", json.dumps({k: v for k, v in meta.items() if k != "command"}, indent=2), "```", ""]
    (out / "ladder.md").write_text("\n".join(md))
    cells = lambda row, tag: "".join(f"<{tag}>{html.escape(c.strip())}</{tag}>" for c in row)  # noqa: E731

    def html_table(md_lines: list[str]) -> str:
        rows = [line.strip("|").split("|") for line in md_lines if not line.startswith("|---")]
        body = "".join("<tr>" + cells(r, "td") + "</tr>" for r in rows[1:])
        return '<div class="wrap"><table><tr>' + cells(rows[0], "th") + "</tr>" + body + "</table></div>"

    page = f"""<!doctype html><html><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>Generation ladder</title><style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:1em auto;padding:0 1em}}
img{{max-width:100%;image-rendering:pixelated}}table{{border-collapse:collapse;font-size:14px}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
td:first-child,th:first-child{{text-align:left}}.wrap{{overflow-x:auto}}img.strip{{max-width:none;height:300px}}</style></head><body>
<h1>Generation ladder ({html.escape(meta['setting'])})</h1>
<div class="wrap"><img class="strip" src="samples.png" alt="samples of every rung"></div>
{html_table(lines)}
<p>Mean ± standard deviation over seeds. SWD x1e3 between {meta['samples']} samples and {meta['reference']['val']}
held-out real images; the floor row scores {meta['reference']['train']} real train images the same way (the
reconstruction SWD pairs each image with its own reconstruction: its floor is 0). STE error: mean((z - z_q)^2)
over the tokenizer's last 100 steps.</p>
<h2>Paired by seed against {html.escape(LABELS[REFERENCE_RUNG])}</h2>
<p>Rung minus reference, seed by seed (same data order and initial weights); mean difference, 95 % t interval,
paired t-test p. "better" / "worse" only where the interval excludes 0.</p>
{html_table(paired_lines)}
<p><img src="seeds.png" alt="generation SWD of every run, one line per seed"></p>
<p><img src="codes_used.png" alt="codes used during tokenizer training"></p>
<details><summary>protocol</summary><pre>{html.escape(json.dumps(meta, indent=2))}</pre></details>
</body></html>
"""
    (out / "index.html").write_text(page)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setting", default="cpu", choices=sorted(SETTINGS))
    p.add_argument("--rungs", nargs="+", default=RUNGS, choices=[*VQ_VARIANTS, *LABELS],
                   help="VQ rungs, or <rung>@<variant> for a MaskGIT variant on that rung's tokenizer "
                        f"({', '.join(MG_VARIANTS)})")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--data", default=DEFAULT_DATA, help="image folder, CelebA folder, the shared tarball's folder, or 'procedural'")
    p.add_argument("--runs-dir", default="runs/ladder")
    p.add_argument("--tok-steps", type=int, help="override the setting's tokenizer steps")
    p.add_argument("--mg-steps", type=int, help="override the setting's MaskGIT steps")
    p.add_argument("--samples", type=int, help="override the setting's number of samples per run")
    p.add_argument("--report-only", action="store_true", help="only rebuild ladder.json/md/html from finished runs")
    p.add_argument("--record", help="JSON file keeping every finished run's numbers across sessions (default: "
                                    "bench/results/ladder_<setting>.json; 'none' for no record; the smoke setting keeps none)")
    a = p.parse_args()
    s = dict(SETTINGS[a.setting])
    for key, flag in (("tok_steps", a.tok_steps), ("mg_steps", a.mg_steps), ("samples", a.samples)):
        if flag is not None:
            if flag <= 0:
                raise SystemExit(f"ladder: --{key.replace('_', '-')} must be positive, got {flag}")
            s[key] = flag
    out = Path(a.runs_dir)
    out.mkdir(parents=True, exist_ok=True)
    folder = a.data if a.data == "procedural" else str(resolve_image_folder(a.data))

    from demo import inception_weights_available

    have_fid = inception_weights_available()
    metrics = "auto" if have_fid else "swd"
    ref = out / "reference"
    counts = write_references(folder, s, ref)
    if have_fid and not (ref / "val_stats.npz").exists():
        run(["-m", "eval", "ref", "--images", str(ref / "val"), "--out", str(ref / "val_stats.npz")], out / "output.log")
    if not (ref / "floor" / "generation.json").exists():
        score(ref / "train", ref, ref / "floor", metrics, out / "output.log")
    floor_raw = json.loads((ref / "floor" / "generation.json").read_text())["metrics"]
    floors = {"swd": floor_raw["SWD_x1e3_mean"], **({"fid": floor_raw["FID"]} if "FID" in floor_raw else {}),
              **({"kid": floor_raw["KID_mean"]} if "KID_mean" in floor_raw else {})}
    floors.update({"r" + k: v for k, v in floors.items() if k in ("swd", "fid")})  # real vs real bounds both

    record_path = None if (a.record or "").lower() == "none" or (a.record is None and a.setting == "smoke") else \
        Path(a.record) if a.record else RECORDS / f"ladder_{a.setting}.json"
    record = load_record(record_path, a.setting, folder)

    t0 = time.time()
    results: dict[str, dict] = {r: {} for r in a.rungs}
    for seed in a.seeds:  # seed-major: a partial ladder already has every rung once
        for rung in a.rungs:
            d, key = out / rung / f"seed{seed}", f"seed{seed}"
            finished = (d / "stages.json").exists() and json.loads((d / "stages.json").read_text()) == list(STAGES)
            recorded = record["runs"].get(rung, {}).get(key)
            if a.report_only and not finished and recorded is None:
                continue
            ran_here = False
            if finished:
                r = collect(d)
            elif recorded is not None:  # finished in an earlier session or on another machine
                r = recorded
            else:
                r, ran_here = one_run(rung, seed, folder, s, a, metrics, ref), True
            if r is None:
                continue
            if record_path is not None and recorded is None:
                # a run this process did not make (found finished in its directory) may come from another checkout
                commit = git_commit() if ran_here else "unknown (collected from its run directory)"
                add_to_record(record_path, record, rung, key, {**r, "commit": commit, "date": time.strftime("%Y-%m-%d")})
            results[rung][key] = r
            print(f"[{rung} seed {seed}] PSNR {r['psnr']:.2f} dB, perplexity {r['perplexity']:.1f}, codes used "
                  f"{r['codes_used']:.1%}, masked acc {r['masked_accuracy']:.3f}, generation SWD {r['swd']:.2f}",
                  file=sys.stderr, flush=True)
    results = {r: v for r, v in results.items() if v}
    if not results:
        raise SystemExit("ladder: no finished run to report yet")
    header, lines = table(results, floors)
    paired_raw, paired_lines = comparisons(results)
    figures(results, out)
    meta = {"command": "python bench/ladder.py " + " ".join(sys.argv[1:]), "setting": a.setting, **s,
            "data": str(folder), "seeds": a.seeds,
            "rungs": {r: {**VQ_VARIANTS[r.partition("@")[0]], **({"maskgit": MG_VARIANTS[r.partition("@")[2]]}
                                                                 if "@" in r else {})} for r in results},
            "metrics": "FID/KID (standard Inception) + SWD" if have_fid else "SWD only (no Inception weights found)",
            "reference": counts, "decoding": " ".join(DECODING),
            "weights": "EMA (tokenizer and MaskGIT)", "floors": floors, "elapsed_s_this_call": time.time() - t0,
            "date": time.strftime("%Y-%m-%d")}
    (out / "ladder.json").write_text(json.dumps({"meta": meta, "results": results, "table": lines,
                                                 "paired": paired_raw, "paired_table": paired_lines}, indent=2) + "\n")
    write_pages(out, meta, lines, paired_lines)
    print("\n".join(lines + [""] + paired_lines))
    print(f"-> {out / 'ladder.md'}, {out / 'index.html'}")


if __name__ == "__main__":
    main()
