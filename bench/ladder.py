"""The paper's claim, rung by rung: the whole pipeline once per VQ variant and seed, scored on generation.

    python bench/ladder.py                          # CPU budget, shared CelebA copy, 32x32, seeds 0 1 (`make ladder`)
    python bench/ladder.py & python bench/ladder.py # two copies share the runs (per-run locks)
    python bench/ladder.py --setting gpu64          # one GPU: 64x64, the celeba64 presets (not run here)
    python bench/ladder.py --data /path/to/images --rungs baseline opt_affine --seeds 0
    python bench/ladder.py --report-only            # rebuild the table and pages from what is on disk

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

from tokenizer.config import VQ_VARIANTS, variant_overrides  # noqa: E402

RUNGS = ["baseline", "l2_replace", "affine", "opt", "opt_affine", "all"]
LABELS = {"baseline": "baseline", "l2_replace": "+l2 +replace", "affine": "+affine", "opt": "+OPT",
          "opt_affine": "+OPT +affine", "all": "all (+k-means)", "fsq": "FSQ", "lfq": "LFQ",
          "rotation": "VQ + rotation trick", "simvq": "SimVQ"}
# The paper's MaskGIT-on-CelebA generation FID (read off its figure, about +-0.5); other rungs not reported.
PAPER_FID = {"baseline": 90.5, "l2_replace": 79.7, "opt_affine": 74.8}
PAPER_RFID = {"baseline": 93.8, "l2_replace": 86.3, "opt_affine": 74.2}

# Budgets. "cpu": 12 runs (6 rungs x 2 seeds) of about 7-8 minutes each on 2 idle cores, an estimate from
# the per-step rates of the tiny presets (about 1.5 hours in all; several copies of the command share the
# runs on a larger machine); "smoke" is the test suite's; "gpu64" is the documented setting for one GPU at
# the paper's CelebA resolution (not measured on this project's machines).
SETTINGS = {
    "cpu": dict(resolution=32, tok_preset="tiny", mg_preset="tiny", tok_steps=1000, mg_steps=600, samples=1000,
                reference=1000, tok_args=["optim.warmup_steps=50"], mg_args=[]),
    "gpu64": dict(resolution=64, tok_preset="celeba64", mg_preset="celeba64", tok_steps=20_000, mg_steps=40_000,
                  samples=10_000, reference=10_000, tok_args=["data.num_workers=8"], mg_args=[]),
    "smoke": dict(resolution=32, tok_preset="tiny", mg_preset="tiny", tok_steps=2, mg_steps=2, samples=8,
                  reference=8, tok_args=["optim.batch_size=8", "log.val_batches=1"],
                  mg_args=["optim.batch_size=8", "model.dim=32", "model.depth=1", "model.heads=2"]),
}
STAGES = ("tokenizer", "codes", "maskgit", "sample", "score", "recon")


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


def _one_run(d: Path, rung: str, seed: int, folder: str, s: dict, metrics: str, ref: Path) -> dict:
    done_path, log = d / "stages.json", d / "output.log"
    done = json.loads(done_path.read_text()) if done_path.exists() else []
    tok, codes, mg = d / "tokenizer", d / "codes", d / "maskgit"

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
        f"log.ckpt_every={max(s['tok_steps'] // 4, 1)}", *s["tok_args"], *variant_overrides(rung)], log))
    stage("codes", lambda: run(["pretokenize.py", "--tokenizer", str(tok / "checkpoint.pt"), "--out", str(codes)], log))
    stage("maskgit", lambda: run([
        "train_maskgit.py", "--preset", s["mg_preset"], "--run-dir", str(mg), "--resume", "--codes", str(codes),
        "--tokenizer", str(tok / "checkpoint.pt"), f"optim.steps={s['mg_steps']}", f"optim.seed={seed}",
        f"log.ckpt_every={max(s['mg_steps'] // 4, 1)}", *s["mg_args"]], log))

    def sample() -> None:
        shutil.rmtree(d / "samples", ignore_errors=True)  # a half-written set from a killed run
        run(["sample.py", "--tokenizer", str(tok / "checkpoint.pt"), "--maskgit", str(mg / "checkpoint.pt"),
             "--seed", str(seed), "--steps", "8", "--grid", str(d / "samples_grid.png"), "--grid-size", "16",
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
    tok = json.loads((d / "tokenizer" / "val_metrics.json").read_text())
    mg = json.loads((d / "maskgit" / "train_metrics.json").read_text())
    gen = json.loads((d / "eval" / "generation.json").read_text())["metrics"]
    rec = json.loads((d / "eval" / "reconstruction.json").read_text())["metrics"]
    log = [json.loads(line) for line in (d / "tokenizer" / "log.jsonl").read_text().splitlines() if line.strip()]
    out = {"psnr": tok["psnr"], "perplexity": tok["perplexity"], "codes_used": tok["codes_used"],
           "num_codes": tok["num_codes"], "masked_accuracy": mg.get("val_accuracy"), "swd": gen["SWD_x1e3_mean"],
           "rswd": rec["SWD_x1e3_mean"],
           "usage_curve": [(r["step"], r["window_codes_used"]) for r in log]}
    for key in ("FID", "KID_mean"):
        if key in gen:
            out[key.split("_")[0].lower()] = gen[key]
        if key in rec:
            out["r" + key.split("_")[0].lower()] = rec[key]
    return out


def mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and half the range (max - min) / 2 over seeds; 0 spread for one seed."""
    return statistics.fmean(values), (max(values) - min(values)) / 2


COLUMNS = [("psnr", "tokenizer PSNR dB", ".2f"), ("perplexity", "perplexity", ".1f"), ("codes_used", "codes used", ".1%"),
           ("rswd", "reconstruction SWD x1e3", ".2f"), ("rfid", "reconstruction FID", ".2f"),
           ("masked_accuracy", "MaskGIT masked acc.", ".3f"), ("swd", "generation SWD x1e3", ".2f"),
           ("fid", "generation FID", ".2f"), ("kid", "KID", ".4f")]


def table(results: dict, floors: dict) -> tuple[list[str], list[str]]:
    cols = [c for c in COLUMNS if any(c[0] in r for runs in results.values() for r in runs.values())]
    header = ["rung", "seeds", *[c[1] for c in cols], "paper rFID", "paper FID"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for rung, runs in results.items():
        cells = [LABELS.get(rung, rung), str(len(runs))]
        for key, _, spec in cols:
            vals = [r[key] for r in runs.values() if r.get(key) is not None]
            if not vals:
                cells.append("n/a")
                continue
            m, sp = mean_spread(vals)
            cells.append(f"{format(m, spec)} ± {format(sp, spec)}" if len(vals) > 1 else format(m, spec))
        cells += [str(PAPER_RFID.get(rung, "—")), str(PAPER_FID.get(rung, "—"))]
        lines.append("| " + " | ".join(cells) + " |")
    floor_cells = ["real train images (floor)", "—"] + [
        format(floors[k], spec) if k in floors else "—" for k, _, spec in cols] + ["—", "—"]
    lines.append("| " + " | ".join(floor_cells) + " |")
    return header, lines


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


def write_pages(out: Path, meta: dict, lines: list[str]) -> None:
    md = [f"# Generation ladder ({meta['setting']})", "", f"Command: `{meta['command']}`", "",
          "![samples, one column per rung](samples.png)", "", *lines, "",
          "![codes used during tokenizer training](codes_used.png)", "", "Protocol:", "",
          "```json", json.dumps({k: v for k, v in meta.items() if k != "command"}, indent=2), "```", ""]
    (out / "ladder.md").write_text("\n".join(md))
    rows = [line.strip("|").split("|") for line in lines if not line.startswith("|---")]
    cells = lambda row, tag: "".join(f"<{tag}>{html.escape(c.strip())}</{tag}>" for c in row)  # noqa: E731
    page = f"""<!doctype html><html><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>Generation ladder</title><style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:1em auto;padding:0 1em}}
img{{max-width:100%;image-rendering:pixelated}}table{{border-collapse:collapse;font-size:14px}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
td:first-child,th:first-child{{text-align:left}}.wrap{{overflow-x:auto}}img.strip{{max-width:none;height:300px}}</style></head><body>
<h1>Generation ladder ({html.escape(meta['setting'])})</h1>
<div class="wrap"><img class="strip" src="samples.png" alt="samples of every rung"></div>
<div class="wrap"><table><tr>{cells(rows[0], 'th')}</tr>{''.join(f'<tr>{cells(r, "td")}</tr>' for r in rows[1:])}</table></div>
<p>Mean ± half the range over seeds. SWD x1e3 between {meta['samples']} samples and {meta['reference']['val']}
held-out real images; the floor row scores {meta['reference']['train']} real train images the same way.</p>
<p><img src="codes_used.png" alt="codes used during tokenizer training"></p>
<details><summary>protocol</summary><pre>{html.escape(json.dumps(meta, indent=2))}</pre></details>
</body></html>
"""
    (out / "index.html").write_text(page)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setting", default="cpu", choices=sorted(SETTINGS))
    p.add_argument("--rungs", nargs="+", default=RUNGS, choices=list(VQ_VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--data", default=DEFAULT_DATA, help="image folder, CelebA folder, the shared tarball's folder, or 'procedural'")
    p.add_argument("--runs-dir", default="runs/ladder")
    p.add_argument("--tok-steps", type=int, help="override the setting's tokenizer steps")
    p.add_argument("--mg-steps", type=int, help="override the setting's MaskGIT steps")
    p.add_argument("--samples", type=int, help="override the setting's number of samples per run")
    p.add_argument("--report-only", action="store_true", help="only rebuild ladder.json/md/html from finished runs")
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

    t0 = time.time()
    results: dict[str, dict] = {r: {} for r in a.rungs}
    for seed in a.seeds:  # seed-major: a partial ladder already has every rung once
        for rung in a.rungs:
            d = out / rung / f"seed{seed}"
            finished = (d / "stages.json").exists() and json.loads((d / "stages.json").read_text()) == list(STAGES)
            if a.report_only and not finished:
                continue
            r = collect(d) if finished else one_run(rung, seed, folder, s, a, metrics, ref)
            if r is None:
                continue
            results[rung][f"seed{seed}"] = r
            print(f"[{rung} seed {seed}] PSNR {r['psnr']:.2f} dB, perplexity {r['perplexity']:.1f}, codes used "
                  f"{r['codes_used']:.1%}, masked acc {r['masked_accuracy']:.3f}, generation SWD {r['swd']:.2f}",
                  file=sys.stderr, flush=True)
    results = {r: v for r, v in results.items() if v}
    if not results:
        raise SystemExit("ladder: no finished run to report yet")
    header, lines = table(results, floors)
    figures(results, out)
    meta = {"command": "python bench/ladder.py " + " ".join(sys.argv[1:]), "setting": a.setting, **s,
            "data": str(folder), "seeds": a.seeds, "rungs": {r: VQ_VARIANTS[r] for r in results},
            "metrics": "FID/KID (standard Inception) + SWD" if have_fid else "SWD only (no Inception weights found)",
            "reference": counts, "decoding": {"steps": 8, "choice_temperature": 4.5, "temperature": 1.0},
            "weights": "EMA (tokenizer and MaskGIT)", "floors": floors, "elapsed_s_this_call": time.time() - t0,
            "date": time.strftime("%Y-%m-%d")}
    (out / "ladder.json").write_text(json.dumps({"meta": meta, "results": results, "table": lines}, indent=2) + "\n")
    write_pages(out, meta, lines)
    print("\n".join(lines))
    print(f"-> {out / 'ladder.md'}, {out / 'index.html'}")


if __name__ == "__main__":
    main()
